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
    drop(gw.stop(Duration::from_secs(5)));
    if s.received < n {
        return Err(format!("only {} of {n} readings arrived", s.received));
    }
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
    r.notes.push(
        "System calls per reading (item 8), what remains and why. Loop thread, per wake-up \
         (one for the line, one for the backend's ack): `epoll_pwait` (the wait itself). Per \
         reading: the serial `read`, the spool `write` (the reading is in the kernel before it \
         is queued), and libzmq's calls: the send `write`s its I/O thread's mailbox eventfd \
         (the hand-over to the thread that owns the TCP socket), a ZMQ_EVENTS read after it \
         (`poll` of the socket's mailbox: the edge-triggered ZMQ_FD rule), and on the ack's \
         wake-up the monitor read, ZMQ_EVENTS, the receive and the closing ZMQ_EVENTS read \
         (`poll`, and a `read` of the mailbox command that announced the ack); libzmq calls \
         `getpid` before each of these (its fork check, one per mailbox access). The I/O \
         thread: `epoll_wait`, `sendto`/`recvfrom` on the TCP socket, `epoll_ctl` to start and \
         stop polling it for output, its own mailbox `read`/`write`/`poll`. Not inherent: \
         `timerfd_settime`, two `epoll_ctl` and a notifier `read` per wake-up (calloop's \
         poller, polling 3.11, re-arms its timeout and notifier on every wait; a patched \
         poller without them gave no measurable CPU change, see docs/design.md)."
            .into(),
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
