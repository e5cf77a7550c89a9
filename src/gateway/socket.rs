//! The DEALER socket to the backend: options, CURVE keys, the endpoint policy.

use super::GatewayError;
use crate::config::Config;
use crate::security;

fn zerr(what: &'static str) -> impl FnOnce(zmq::Error) -> GatewayError {
    move |source| GatewayError::Zmq { what, source }
}

/// Builds the DEALER socket that dials out to the backend, with CURVE when configured
/// (not yet connected: [`ZmqSource::connect`] connects it once the monitor is attached).
///
/// [`ZmqSource::connect`]: crate::sources::zmq::ZmqSource::connect
pub fn backend_socket(ctx: &zmq::Context, cfg: &Config) -> Result<zmq::Socket, GatewayError> {
    let b = &cfg.backend;
    // The config parser enforces the endpoint policy; checked again here for callers that
    // build a Config by hand.
    if !b.curve() && !b.insecure && !security::endpoint_is_local(&b.endpoint) {
        return Err(GatewayError::Security(format!(
            "key backend.endpoint: {} is not loopback and the link is not encrypted: set \
             backend.server_public_key and backend.secret_key_file, or backend.insecure = true",
            b.endpoint
        )));
    }
    let s = ctx
        .socket(zmq::DEALER)
        .map_err(zerr("creating the socket"))?;
    if let (Some(server), Some(secret_file)) = (&b.server_public_key, &b.secret_key_file) {
        security::require_curve().map_err(GatewayError::Security)?;
        let server = security::z85_decode_key(server)
            .map_err(|e| GatewayError::Security(format!("backend.server_public_key: {e}")))?;
        let pair = security::load_secret_key(secret_file).map_err(GatewayError::Security)?;
        s.set_curve_serverkey(&server)
            .map_err(zerr("setting ZMQ_CURVE_SERVERKEY"))?;
        s.set_curve_publickey(&pair.public_bytes())
            .map_err(zerr("setting ZMQ_CURVE_PUBLICKEY"))?;
        s.set_curve_secretkey(&pair.secret_bytes())
            .map_err(zerr("setting ZMQ_CURVE_SECRETKEY"))?;
        log::info!(
            "CURVE on: gateway public key {} (this is what the backend's allow list needs, as {}.pub)",
            pair.public,
            cfg.gateway.id
        );
        if b.insecure {
            log::warn!("backend.insecure = true has no effect: CURVE is configured");
        }
    } else if b.insecure_link() {
        log::warn!(
            "INSECURE: backend.insecure = true: the link to {} is plaintext and \
             unauthenticated; anyone on the network path can read and forge readings and \
             commands (see /usr/share/doc/zgate/security.md)",
            b.endpoint
        );
    }
    s.set_identity(cfg.gateway.id.as_bytes())
        .map_err(zerr("setting the routing id"))?;
    // Queue only to completed connections: while the backend is away, messages wait in our
    // bounded outbox (and later the spool), not in libzmq's pipes.
    s.set_immediate(true)
        .map_err(zerr("setting ZMQ_IMMEDIATE"))?;
    s.set_sndhwm(1000).map_err(zerr("setting ZMQ_SNDHWM"))?;
    s.set_linger(0).map_err(zerr("setting ZMQ_LINGER"))?;
    s.set_reconnect_ivl(100)
        .map_err(zerr("setting ZMQ_RECONNECT_IVL"))?;
    s.set_reconnect_ivl_max(5000)
        .map_err(zerr("setting ZMQ_RECONNECT_IVL_MAX"))?;
    s.set_maxmsgsize(b.max_msg_size)
        .map_err(zerr("setting ZMQ_MAXMSGSIZE"))?;
    s.set_heartbeat_ivl(10_000)
        .map_err(zerr("setting ZMQ_HEARTBEAT_IVL"))?;
    s.set_heartbeat_timeout(30_000)
        .map_err(zerr("setting ZMQ_HEARTBEAT_TIMEOUT"))?;
    Ok(s)
}
