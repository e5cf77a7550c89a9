//! Item 9: CPU per reading of zgate against the minimal Python forwarder
//! (`benches/py_forwarder.py`: read the pty, split `k=v`, `json.dumps`, pyzmq DEALER
//! `send_multipart`, read the acks), at 1,000 and at 100 lines/s: same pty feed, same acking
//! ROUTER (the harness's backend, the one object for both), runs alternating so both see the
//! same machine. Budget: the Python script spends at least 4 times zgate's CPU per reading.

use crate::backend::Backend;
use crate::items::steady::{steady_at, Steady};
use crate::profile::{describe, kernel_or_libzmq, record, share_of, Shares};
use crate::pty::pty;
use crate::report::{median, Report};
use crate::{Opts, Res};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The budget: Python's CPU per reading over zgate's.
pub const MIN_RATIO: f64 = 4.0;

/// The steady phase of one run, sampled with `perf record` when `profile` (and perf can).
fn steady_profiled(
    be: &mut Backend,
    pid: u32,
    p: &crate::pty::Pty,
    rate: u64,
    count: u64,
    profile: bool,
) -> (Steady, Option<Shares>) {
    let secs = (count / rate).saturating_sub(1).max(1);
    let rec = if profile { record(pid, secs) } else { None };
    let s = steady_at(be, pid, p, rate, count);
    (s, rec.and_then(|r| r.finish()))
}

/// One run of the Python forwarder on `be`, `count` lines at `rate`/s.
fn python_run(
    o: &Opts,
    be: &mut Backend,
    rate: u64,
    count: u64,
    profile: bool,
) -> Res<(Steady, Option<Shares>)> {
    // The backend now serves a new peer: it learns its identity from its hello.
    be.hello = false;
    be.max_seq = 0;
    let p = pty()?;
    let mut child = Command::new(&o.python)
        .arg(&o.py_forwarder)
        .arg(&p.path)
        .arg(&be.endpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", o.python))?;
    let res = be.wait_hello(Duration::from_secs(20)).map(|_| {
        // Its start-up (imports) is not part of the cost per reading.
        thread::sleep(Duration::from_millis(300));
        steady_profiled(be, child.id(), &p, rate, count, profile)
    });
    let _ = child.kill();
    let _ = child.wait();
    res
}

/// One run of zgate (a fresh gateway on `be`), `count` lines at `rate`/s.
fn zgate_run(
    o: &Opts,
    be: &mut Backend,
    rate: u64,
    count: u64,
    profile: bool,
) -> Res<(Steady, Option<Shares>)> {
    be.hello = false;
    be.max_seq = 0;
    let gw = crate::process::Gw::start(o, &be.endpoint, false)?;
    be.wait_hello(Duration::from_secs(10))
        .map_err(|e| format!("{e}; log: {}", gw.log_tail()))?;
    gw.wait_serial_open(Duration::from_secs(10))?;
    let settle = Instant::now() + Duration::from_millis(300);
    while Instant::now() < settle {
        be.poll(Duration::from_millis(20));
    }
    let (s, shares) = steady_profiled(be, gw.pid(), &gw.ptys[0], rate, count, profile);
    if s.received < count {
        eprintln!(
            "bench: zgate run: {} of {count} received; log: {}",
            s.received,
            gw.log_tail()
        );
    }
    drop(gw.stop(Duration::from_secs(5)));
    Ok((s, shares))
}

pub fn bench_forwarder(o: &Opts, r: &mut Report) -> Res<()> {
    r.notes.push(
        "CPU per reading (item 9): both forwarders hand each reading to libzmq's I/O thread \
         and read an ack per reading, so both wake about four threads per reading (the \
         reader for the line and for the ack, the I/O thread to send and to receive; item 8 \
         counts zgate's). The kernel's share of a wake-up (scheduling, the pty, loopback TCP) \
         is the same for both and grows at 100 lines/s (colder caches, idle CPUs woken), so \
         the ratio is bounded by how much of Python's cost is its interpreter. zgate also \
         writes every reading to its spool (an ext4 buffered write, and the interval's \
         fdatasync on its helper thread), which the script does not do at all. The \
         profiled row (perf record, by binary) measures the bound: Python's CPU per reading \
         over zgate's kernel + libzmq share."
            .into(),
    );
    let runs = if o.quick { 1 } else { 3 };
    let mut be = Backend::bind("tcp://127.0.0.1:*")?;
    for (rate, secs) in [
        (1_000u64, if o.quick { 3 } else { 10 }),
        (100, if o.quick { 5 } else { 20 }),
    ] {
        let count = rate * secs;
        let mut z = Vec::new();
        let mut p = Vec::new();
        let mut ratios = Vec::new();
        let mut short = String::new();
        for _ in 0..runs {
            let (zs, _) = zgate_run(o, &mut be, rate, count, false)?;
            let (ps, _) = python_run(o, &mut be, rate, count, false)?;
            for (who, s) in [("zgate", &zs), ("Python", &ps)] {
                if s.received < count {
                    short += &format!(" ({who}: {} of {count} received)", s.received);
                }
            }
            ratios.push(ps.cpu_per_reading_ns / zs.cpu_per_reading_ns);
            z.push(zs);
            p.push(ps);
        }
        let listed = ratios
            .iter()
            .map(|x| format!("×{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        let ratio = median(&mut ratios.clone());
        let zm = median(&mut z.iter().map(|s| s.cpu_per_reading_ns).collect::<Vec<_>>());
        let pm = median(&mut p.iter().map(|s| s.cpu_per_reading_ns).collect::<Vec<_>>());
        let ticks = |v: &[Steady]| {
            v.iter()
                .map(|s| s.ticks.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        r.check(
            "9",
            format!(
                "CPU per reading (all threads), {rate} lines/s, {runs} runs × {secs} s, zgate vs \
                 the minimal Python forwarder (`benches/py_forwarder.py`), same feed, same acking \
                 ROUTER: zgate / Python (medians), Python ÷ zgate (median of the runs' ratios)"
            ),
            format!(
                "{:.1} µs / {:.1} µs: ×{ratio:.2} (runs: {listed}; utime+stime ticks zgate {}, \
                 Python {}){short}",
                zm / 1e3,
                pm / 1e3,
                ticks(&z),
                ticks(&p)
            ),
            format!("≥ ×{MIN_RATIO}"),
            ratio >= MIN_RATIO && short.is_empty(),
        );
    }
    profile_pair(o, &mut be, r)
}

/// One more pair of runs at 1,000 lines/s, sampled with `perf record`: the share of each
/// forwarder's CPU spent in the kernel and in libzmq (the pty, loopback TCP, the wake-ups of
/// four threads per reading, libzmq's I/O thread), which both pay alike. With zgate's own
/// code at zero, the ratio could at most be Python's CPU per reading over that share of
/// zgate's.
fn profile_pair(o: &Opts, be: &mut Backend, r: &mut Report) -> Res<()> {
    let (rate, secs) = (1_000u64, if o.quick { 3 } else { 10 });
    let (zs, zp) = zgate_run(o, be, rate, rate * secs, true)?;
    let (ps, pp) = python_run(o, be, rate, rate * secs, true)?;
    let (Some(zp), Some(pp)) = (zp, pp) else {
        r.row(
            "9",
            "CPU per reading by binary (perf record)",
            "n/a (perf cannot record here)",
        );
        return Ok(());
    };
    let z_floor = zs.cpu_per_reading_ns * share_of(&zp, kernel_or_libzmq);
    let p_floor = ps.cpu_per_reading_ns * share_of(&pp, kernel_or_libzmq);
    r.row(
        "9",
        format!(
            "CPU per reading by binary (perf record, 1,000 lines/s × {secs} s, one more run \
             each): zgate; Python; kernel + libzmq per reading, zgate / Python; the highest \
             ratio zgate could reach if its own code cost nothing (Python ÷ zgate's kernel + \
             libzmq)"
        ),
        format!(
            "zgate {:.1} µs: {}; Python {:.1} µs: {}; kernel + libzmq {:.1} µs / {:.1} µs; \
             ×{:.2} at most",
            zs.cpu_per_reading_ns / 1e3,
            describe(&zp),
            ps.cpu_per_reading_ns / 1e3,
            describe(&pp),
            z_floor / 1e3,
            p_floor / 1e3,
            ps.cpu_per_reading_ns / z_floor.max(1.0),
        ),
    );
    Ok(())
}
