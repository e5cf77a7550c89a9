//! Item 1: outbox throughput, in process: `ZmqSource` vs a plain libzmq loop (ratio of
//! medians). The measurement itself is `benches/e2e/outbox.rs`, shared with the criterion
//! bench.

use crate::report::{median, Report};
use crate::Opts;
use std::sync::atomic::Ordering;

pub fn bench_outbox(o: &Opts, r: &mut Report) {
    let (n, runs) = if o.quick { (5_000, 3) } else { (20_000, 7) };
    let mut src = Vec::new();
    let mut plain = Vec::new();
    // Interleaved, so a change of machine load hits both sides alike.
    for _ in 0..runs {
        src.push(n as f64 / crate::outbox::zmq_source(n).as_secs_f64());
        plain.push(n as f64 / crate::outbox::plain(n).as_secs_f64());
    }
    let (s, p) = (median(&mut src), median(&mut plain));
    r.row(
        "1",
        format!("outbox: ZmqSource → ROUTER, tcp loopback (median of {runs}×{n})"),
        format!("{:.0} readings/s", s),
    );
    r.row(
        "1",
        format!("outbox: plain libzmq send loop, same layout (median of {runs}×{n})"),
        format!("{:.0} msgs/s", p),
    );
    let retries = crate::outbox::WARMUP_RETRIES.load(Ordering::Relaxed);
    if retries > 0 {
        r.notes.push(format!(
            "Item 1: {retries} ZmqSource set-up(s) were made again because libzmq reported no \
             handshake on the socket monitor (see benches/e2e/outbox.rs)."
        ));
    }
    r.check(
        "1",
        "outbox throughput ratio ZmqSource / plain",
        format!("{:.2}", s / p),
        "≥ 0.5",
        s / p >= 0.5,
    );
}
