//! Items 5 and 7 at a steady 1,000 readings/s: zgate's peak RSS (item 5), and CPU per reading
//! and RSS of zgate and of the pyserial + pyzmq script doing the same job (item 7). One zgate
//! run feeds both items.

use crate::backend::{setup, Backend};
use crate::process::{sample, vm_hwm_kib};
use crate::pty::{pty, writer, Pty};
use crate::report::{mib, Report};
use crate::{Opts, Res};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

pub struct Steady {
    pub cpu_per_reading_ns: f64,
    /// utime + stime of the whole process over the run, clock ticks (/proc/<pid>/stat).
    pub ticks: u64,
    pub hwm_kib: u64,
    pub received: u64,
}

/// Feeds `count` lines at 1,000/s into `pty` while `be` receives; measures `pid`.
pub fn steady(be: &mut Backend, pid: u32, pty: &Pty, count: u64) -> Steady {
    steady_at(be, pid, pty, 1_000, count)
}

/// Feeds `count` lines at `rate`/s into `pty` while `be` receives; measures `pid` (CPU of
/// all its threads, from the scheduler's ns clock).
pub fn steady_at(be: &mut Backend, pid: u32, pty: &Pty, rate: u64, count: u64) -> Steady {
    let before = be.readings;
    let a = sample(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(pty.master.clone(), rate, count, stop);
    while !w.is_finished() {
        be.poll(Duration::from_millis(20));
    }
    let _ = w.join();
    be.recv_until(before + count, Duration::from_secs(3));
    let b = sample(pid);
    let received = be.readings - before;
    Steady {
        cpu_per_reading_ns: (b.cpu_ns - a.cpu_ns) as f64 / received.max(1) as f64,
        ticks: b.ticks.saturating_sub(a.ticks),
        hwm_kib: vm_hwm_kib(pid),
        received,
    }
}

pub fn bench_steady(o: &Opts, r: &mut Report) -> Res<()> {
    let secs = if o.quick { 3 } else { 20 };
    let count = 1_000 * secs;
    let (mut be, gw) = setup(o, false)?;
    let z = steady(&mut be, gw.pid(), &gw.ptys[0], count);
    drop(gw.stop(Duration::from_secs(5)));
    r.check(
        "5",
        format!("peak RSS (VmHWM), steady 1,000 readings/s × {secs} s"),
        mib(z.hwm_kib),
        "< 16 MiB",
        z.hwm_kib < 16 * 1024 && z.received == count,
    );

    // The Python peer: same pty feed, same ROUTER.
    let py = (|| -> Res<Steady> {
        let mut be = Backend::bind("tcp://127.0.0.1:*")?;
        let p = pty()?;
        let mut child = Command::new(&o.python)
            .arg(&o.py_script)
            .args(["--serial", &p.path.display().to_string()])
            .args(["--endpoint", &be.endpoint])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", o.python))?;
        let res = be.wait_hello(Duration::from_secs(20)).map(|_| {
            thread::sleep(Duration::from_millis(200));
            steady(&mut be, child.id(), &p, count)
        });
        let _ = child.kill();
        let _ = child.wait();
        res
    })();
    let per = |s: &Steady| format!("{:.1} µs CPU/reading", s.cpu_per_reading_ns / 1e3);
    r.row(
        "7",
        format!("zgate, 1,000 readings/s × {secs} s: CPU per reading / RSS"),
        format!("{} / {}", per(&z), mib(z.hwm_kib)),
    );
    match py {
        Ok(p) => {
            r.row(
                "7",
                "Python pyserial+pyzmq script, same feed: CPU per reading / RSS",
                format!(
                    "{} / {}{}",
                    per(&p),
                    mib(p.hwm_kib),
                    if p.received < count {
                        format!(" ({} of {count} received)", p.received)
                    } else {
                        String::new()
                    }
                ),
            );
            r.row(
                "7",
                "Python / zgate",
                format!(
                    "CPU ×{:.1}, RSS ×{:.1}",
                    p.cpu_per_reading_ns / z.cpu_per_reading_ns,
                    p.hwm_kib as f64 / z.hwm_kib as f64
                ),
            );
        }
        Err(e) => r.fail("7", "Python baseline", e),
    }
    Ok(())
}
