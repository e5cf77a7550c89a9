//! Backend socket options.

use super::*;

#[test]
fn router_sends_heartbeats() {
    let ctx = zmq::Context::new();
    let b = Backend::new(
        &ctx,
        BackendOptions {
            bind: "tcp://127.0.0.1:*".into(),
            ack: true,
            ..Default::default()
        },
    )
    .unwrap();
    // (ZMQ_ROUTER_HANDOVER cannot be read back: tests/py/test_backend_link.py checks it.)
    let s = b.socket();
    assert_eq!(s.get_heartbeat_ivl().unwrap(), HEARTBEAT_IVL_MS);
    assert_eq!(s.get_heartbeat_timeout().unwrap(), HEARTBEAT_TIMEOUT_MS);
}
