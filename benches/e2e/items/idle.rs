//! Item 4: idle cost with 2 serial ports and 4 GPIO lines, no traffic: wake-ups/s of the
//! loop thread and of all threads, CPU time.

use crate::backend::setup;
use crate::process::{sample, STATS_INTERVAL_S, ZMQ_HEARTBEAT_S};
use crate::report::Report;
use crate::{Opts, Res};
use std::time::{Duration, Instant};

pub fn bench_idle(o: &Opts, r: &mut Report) -> Res<()> {
    let (mut be, gw) = setup(o, false)?;
    let secs = if o.quick { 10 } else { 60 };
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        be.poll(Duration::from_millis(100));
    }
    let a = sample(gw.pid());
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        // The backend answers stats (acks) like a real one; nothing else is sent.
        be.poll(Duration::from_millis(500));
    }
    let b = sample(gw.pid());
    let s = secs as f64;
    let main = (b.wake_main - a.wake_main) as f64 / s;
    let all = (b.wake_all - a.wake_all) as f64 / s;
    // Configured timers: stats (loop thread); libzmq heartbeats (I/O thread: send PING,
    // receive PONG).
    let timers_main = 1.0 / STATS_INTERVAL_S as f64;
    let timers_all = timers_main + 2.0 / ZMQ_HEARTBEAT_S as f64;
    r.check(
        "4",
        format!("idle {secs} s, 2 serial + 4 GPIO: wake-ups/s, loop thread (timers: {timers_main:.2}/s)"),
        format!("{main:.2}/s"),
        "≤ timers + 1/s",
        main <= timers_main + 1.0,
    );
    r.check(
        "4",
        format!(
            "idle: wake-ups/s, all {} threads (timers incl. zmq heartbeat: {timers_all:.2}/s)",
            b.threads
        ),
        format!("{all:.2}/s"),
        "≤ timers + 1/s",
        all <= timers_all + 1.0,
    );
    let cpu = (b.cpu_ns - a.cpu_ns) as f64;
    r.row(
        "4",
        format!("idle: CPU time over {secs} s (all threads)"),
        format!(
            "{:.2} ms ({:.4} % of a core; {} ticks)",
            cpu / 1e6,
            cpu / (s * 1e9) * 100.0,
            b.ticks - a.ticks
        ),
    );
    drop(gw.stop(Duration::from_secs(5)));
    Ok(())
}
