//! The forced reconnect (`OutboxHandle::request_reconnect`) and the per-connection record
//! of the highest reading seq handed to libzmq, against a real ROUTER over tcp loopback.

use super::*;
use crate::protocol::{write_reading_body, Values, KIND_READING};
use calloop::EventLoop;
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    got: Vec<ZmqEvent>,
    /// `highest_reading_sent` as seen by the callback of each Connected.
    highest_at_connect: Vec<u64>,
}

fn reading(seq: u64) -> Message {
    let mut body = String::new();
    let values = Values::single("n", &serde_json::json!(seq));
    write_reading_body(
        &mut body,
        "gw-x",
        seq,
        "s",
        "2026-01-01T00:00:00.000Z",
        &values,
    );
    Message {
        kind: KIND_READING,
        body,
    }
}

fn dispatch_until(
    ev: &mut EventLoop<'static, State>,
    st: &mut State,
    mut done: impl FnMut(&State) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(st) && Instant::now() < deadline {
        ev.dispatch(Some(Duration::from_millis(10)), st).unwrap();
    }
}

fn connections(st: &State) -> usize {
    st.got.iter().filter(|e| **e == ZmqEvent::Connected).count()
}

/// Seqs of the readings the ROUTER received, in order (waits up to 5 s for `n`).
fn received(router: &zmq::Socket, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n && router.poll(zmq::POLLIN, 5000).unwrap() > 0 {
        let frames = router.recv_multipart(0).unwrap();
        let body = String::from_utf8(frames[2].clone()).unwrap();
        out.push(crate::protocol::reading_seq(&body).unwrap());
    }
    out
}

#[test]
fn forced_reconnect_reports_the_drop_holds_the_outbox_and_resets_the_record() {
    let ctx = zmq::Context::new();
    let router = ctx.socket(zmq::ROUTER).unwrap();
    router.set_router_handover(true).unwrap();
    router.bind("tcp://127.0.0.1:*").unwrap();
    let ep = router.get_last_endpoint().unwrap().unwrap();
    let dealer = ctx.socket(zmq::DEALER).unwrap();
    dealer.set_identity(b"gw-x").unwrap();
    dealer.set_immediate(true).unwrap();
    dealer.set_linger(0).unwrap();
    let mut source = ZmqSource::new(&ctx, dealer, 100).unwrap();
    source.connect(&ep).unwrap();
    let handle = source.handle();
    let mut ev: EventLoop<State> = EventLoop::try_new().unwrap();
    let h = handle.clone();
    ev.handle()
        .insert_source(source, move |e, _, st: &mut State| {
            if e == ZmqEvent::Connected {
                st.highest_at_connect.push(h.highest_reading_sent());
            }
            st.got.push(e);
        })
        .unwrap();
    let mut st = State::default();
    dispatch_until(&mut ev, &mut st, |st| connections(st) == 1);
    assert_eq!(connections(&st), 1, "{:?}", st.got);

    // Replies and stats do not count; readings count by their seq, not by their order.
    handle
        .with(|o| {
            o.push_back(Message::new(
                crate::protocol::KIND_STATS,
                &serde_json::json!({}),
            ))?;
            for seq in [5, 7, 6] {
                o.push_back(reading(seq))?;
            }
            Ok::<_, Message>(())
        })
        .unwrap();
    dispatch_until(&mut ev, &mut st, |_| handle.is_empty());
    assert_eq!(handle.highest_reading_sent(), 7);
    let _stats = router.recv_multipart(0).unwrap();
    assert_eq!(received(&router, 3), vec![5, 7, 6]);

    // The drop is reported at once; what is queued meanwhile waits for the new connection.
    let before = st.got.len();
    handle.request_reconnect();
    ev.dispatch(Some(Duration::ZERO), &mut st).unwrap();
    assert_eq!(
        st.got.get(before),
        Some(&ZmqEvent::Disconnected),
        "{:?}",
        st.got
    );
    // libzmq may have made the new connection within that same dispatch (a busy machine);
    // otherwise a reading pushed now waits for it.
    let reconnected = connections(&st) == 2;
    handle.push(reading(8)).unwrap();
    if !reconnected {
        assert!(!handle.is_connected());
        assert_eq!(
            handle.len(),
            1,
            "nothing goes out before the new connection"
        );
    }
    dispatch_until(&mut ev, &mut st, |st| connections(st) == 2);
    assert_eq!(connections(&st), 2, "{:?}", st.got);
    assert_eq!(
        st.highest_at_connect,
        vec![0, 0],
        "each connection starts with none"
    );
    dispatch_until(&mut ev, &mut st, |_| handle.is_empty());
    assert_eq!(received(&router, 1), vec![8]);
    assert_eq!(handle.highest_reading_sent(), 8);
}
