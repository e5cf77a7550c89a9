//! Item 8: system calls per reading by kind, for the loop thread and for all threads, at a
//! steady 1,000 readings/s (strace attached to every thread, see `crate::trace`).

use crate::backend::setup;
use crate::report::Report;
use crate::trace::{merge, per_reading, perf_available, strace_available, Kinds, Tracer};
use crate::{Opts, Res};
use std::time::{Duration, Instant};

pub fn bench_syscalls(o: &Opts, r: &mut Report) -> Res<()> {
    if !perf_available() && !strace_available() {
        r.fail(
            "8",
            "system calls per reading",
            "neither perf nor strace can trace here".into(),
        );
        return Ok(());
    }
    let rate = 1_000;
    let n = if o.quick { 2_000 } else { 10_000 };
    let (mut be, gw) = setup(o, false)?;
    let settle = Instant::now() + Duration::from_secs(1);
    while Instant::now() < settle {
        be.poll(Duration::from_millis(50));
    }
    let tracer = Tracer::attach(gw.pid())?;
    let s = crate::items::steady::steady_at(&mut be, gw.pid(), &gw.ptys[0], rate, n);
    let tool = tracer.tool.name();
    let threads = tracer.stop()?;
    if s.received < n {
        return Err(format!(
            "only {} of {n} readings arrived; log: {}",
            s.received,
            gw.log_tail()
        ));
    }
    drop(gw.stop(Duration::from_secs(5)));
    let main = threads.first().ok_or("no thread traced")?;
    r.row(
        "8",
        format!("system calls per reading, loop thread ({n} at {rate}/s, {tool}): all: by kind"),
        per_reading(&main.calls, n),
    );
    let mut all = Kinds::new();
    for t in &threads {
        merge(&mut all, &t.calls);
    }
    r.row(
        "8",
        format!(
            "system calls per reading, all {} threads: all: by kind",
            threads.len()
        ),
        per_reading(&all, n),
    );
    for t in threads.iter().skip(1) {
        r.row(
            "8",
            format!("… of which thread `{}`", t.comm),
            per_reading(&t.calls, n),
        );
    }
    Ok(())
}
