//! Spool benchmarks (issue 3), in process against `zgate::spool` on a temporary directory
//! under $TMPDIR (the machine's own disk, not tmpfs: fsync costs are real).
//!
//! - append throughput per fsync policy (200-byte payloads, like a reading body);
//! - `tick()` (the loop's one-shot spool timer: interval fsync, ack persistence) while
//!   readings are appended at a steady rate and acked: how long it holds the loop;
//! - read-back with `read_from` in chunks of 1000 (the sender's refill), acking each chunk:
//!   the longest `ack()` that deleted segments (compaction), and one bulk ack;
//! - the helper thread's unlink time (off the loop: `wait_for_deletions`).
//!
//! Adapted from the standalone measurement in the spool's development tree (`spool_bench.rs`).

use crate::report::{pct, us, Report};
use std::time::{Duration, Instant};
use zgate::spool::{FsyncPolicy, Spool, SpoolConfig, WhenFull};

const PAYLOAD: usize = 200;

/// A reading-sized payload: text (the spool stores UTF-8 only), its seq in front.
fn payload(seq: u64) -> Vec<u8> {
    let mut v = vec![b'U'; PAYLOAD];
    let head = format!("{seq:020}");
    v[..head.len()].copy_from_slice(head.as_bytes());
    v
}

fn cfg(fsync: FsyncPolicy) -> SpoolConfig {
    SpoolConfig {
        max_bytes: 1 << 30,
        when_full: WhenFull::DropOldest,
        fsync,
        fsync_interval_ms: 1000,
        ..SpoolConfig::default()
    }
}

fn tempdir() -> Result<tempfile::TempDir, String> {
    tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))
}

fn open(d: &tempfile::TempDir, fsync: FsyncPolicy) -> Result<Spool, String> {
    Spool::open(d.path(), cfg(fsync))
        .map(|(s, _)| s)
        .map_err(|e| e.to_string())
}

fn e(err: zgate::spool::SpoolError) -> String {
    err.to_string()
}

pub fn run(quick: bool, r: &mut Report) -> Result<(), String> {
    let fs = crate::process::sh("df -T \"${TMPDIR:-/tmp}\" | awk 'NR==2 {print $2}'");

    // 1. fsync = "always": every append is fsynced before it returns.
    {
        let d = tempdir()?;
        let mut sp = open(&d, FsyncPolicy::Always)?;
        let (max_n, max_t) = if quick {
            (2_000, Duration::from_secs(2))
        } else {
            (20_000, Duration::from_secs(10))
        };
        let mut lat = Vec::with_capacity(max_n);
        let t = Instant::now();
        let mut k = 0u64;
        while (k as usize) < max_n && t.elapsed() < max_t {
            let a = Instant::now();
            sp.append_with(k, payload).map_err(e)?;
            lat.push(a.elapsed().as_nanos() as u64);
            k += 1;
        }
        let secs = t.elapsed().as_secs_f64();
        lat.sort_unstable();
        r.row(
            "S",
            format!("spool append, fsync = always ({PAYLOAD} B payloads, {fs} on this VM's disk)"),
            format!(
                "{:.0} records/s ({k} in {secs:.1} s); per append p50 {} / p99 {} / max {}",
                k as f64 / secs,
                us(pct(&lat, 50.0)),
                us(pct(&lat, 99.0)),
                us(pct(&lat, 100.0))
            ),
        );
    }

    // 2. fsync = "interval" (1000 ms), flat out, tick() driven by wall time like the loop.
    let n: u64 = if quick { 100_000 } else { 1_000_000 };
    let d = tempdir()?;
    let mut sp = open(&d, FsyncPolicy::Interval)?;
    let t = Instant::now();
    let mut last_tick = Instant::now();
    let mut ticks = 0;
    for i in 0..n {
        sp.append_with(i, payload).map_err(e)?;
        if i % 256 == 0 && last_tick.elapsed() >= Duration::from_millis(1000) {
            sp.tick().map_err(e)?;
            last_tick = Instant::now();
            ticks += 1;
        }
    }
    sp.tick().map_err(e)?;
    let secs = t.elapsed().as_secs_f64();
    r.row(
        "S",
        "spool append, fsync = interval (1000 ms), flat out",
        format!(
            "{:.0} records/s ({n} in {secs:.2} s, {ticks} timed ticks; {} segments of {} MiB)",
            n as f64 / secs,
            sp.segment_count(),
            sp.segment_size() >> 20
        ),
    );

    // 3. Read back in chunks of 1000 and ack each chunk (the sender's refill and the
    //    backend's acks); time every ack(). The second half is acked in one call.
    let t = Instant::now();
    let mut out = Vec::with_capacity(1000);
    let mut next = 1u64;
    let mut read = 0u64;
    let mut acks = Vec::new();
    let mut max_deleting = Duration::ZERO;
    let mut deleting = 0;
    loop {
        out.clear();
        sp.read_from(next, 1000, &mut out).map_err(e)?;
        let Some(&(last, _)) = out.last() else { break };
        read += out.len() as u64;
        next = last + 1;
        if last <= n / 2 {
            let before = sp.segment_count();
            let a = Instant::now();
            sp.ack(last).map_err(e)?;
            let dt = a.elapsed();
            acks.push(dt.as_nanos() as u64);
            if sp.segment_count() < before {
                deleting += 1;
                max_deleting = max_deleting.max(dt);
            }
        }
    }
    let read_secs = t.elapsed().as_secs_f64();
    if read != n {
        return Err(format!("spool read back {read} of {n} records"));
    }
    let segs_before = sp.segment_count();
    let a = Instant::now();
    let acked = sp.ack(n).map_err(e)?;
    let bulk = a.elapsed();
    let segs_deleted = segs_before - sp.segment_count();
    let w = Instant::now();
    sp.wait_for_deletions();
    let unlink = w.elapsed();
    acks.sort_unstable();
    r.row(
        "S",
        "spool read_from (chunks of 1000) with an ack per chunk",
        format!(
            "{:.0} records/s ({read} in {read_secs:.2} s)",
            read as f64 / read_secs
        ),
    );
    r.check(
        "S",
        format!(
            "spool compaction stall: longest ack() that deleted segments ({deleting} such of {} acks; p99 of all {})",
            acks.len(),
            us(pct(&acks, 99.0))
        ),
        us(max_deleting.as_nanos() as u64),
        "< 1 ms",
        max_deleting < Duration::from_millis(1),
    );
    r.check(
        "S",
        format!(
            "spool compaction stall: one ack() of {acked} readings, {segs_deleted} segments deleted"
        ),
        us(bulk.as_nanos() as u64),
        "< 1 ms",
        bulk < Duration::from_millis(1),
    );
    r.row(
        "S",
        "spool: the unlinks behind it, on the spool-unlink thread (off the loop)",
        format!(
            "{} for the last {segs_deleted} segments",
            us(unlink.as_nanos() as u64)
        ),
    );
    drop(sp);
    drop(d);

    // 4. tick() while readings arrive at a steady rate and are acked (what the loop sees
    //    once per fsync_interval_ms in steady operation): fsync of the active segment and
    //    the ack persist.
    let d = tempdir()?;
    let mut sp = open(&d, FsyncPolicy::Interval)?;
    let (rate, secs) = if quick { (1_000u64, 3u64) } else { (1_000, 15) };
    let start = Instant::now();
    let mut tick_at = start + Duration::from_millis(1000);
    let mut ticks = Vec::new();
    let (mut blocked, mut preempted, mut unpreempted) = (0usize, 0usize, Vec::new());
    for i in 0..rate * secs {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let seq = sp.next_seq();
        sp.append_with(i, payload).map_err(e)?;
        if i % 10 == 0 {
            sp.ack(seq).map_err(e)?;
        }
        if Instant::now() >= tick_at {
            let before = switches();
            let a = Instant::now();
            sp.tick().map_err(e)?;
            let wall = a.elapsed().as_nanos() as u64;
            let after = switches();
            ticks.push(wall);
            blocked += usize::from(after.0 > before.0);
            if after.1 > before.1 {
                preempted += 1;
            } else {
                unpreempted.push(wall);
            }
            tick_at += Duration::from_millis(1000);
        }
    }
    ticks.sort_unstable();
    unpreempted.sort_unstable();
    // The budget is about blocking: a tick that waited for I/O or a lock shows a voluntary
    // context switch. One that another process preempted (an involuntary switch) measures
    // the machine, not the spool: it is shown, not held to the budget.
    let max_own = unpreempted.last().copied().unwrap_or(0);
    r.check(
        "S",
        format!(
            "spool tick() on the loop, {rate} readings/s appended + acked, fsync = interval: \
             {} ticks: p50 / max; ticks that blocked (voluntary context switch); max of the \
             {} not preempted",
            ticks.len(),
            unpreempted.len()
        ),
        format!(
            "{} / {}; {blocked} blocked; {} ({preempted} preempted)",
            us(pct(&ticks, 50.0)),
            us(pct(&ticks, 100.0)),
            us(max_own)
        ),
        "0 blocked, max < 1 ms",
        blocked == 0 && max_own < 1_000_000,
    );
    Ok(())
}

/// This thread's (voluntary, involuntary) context switches so far (getrusage RUSAGE_THREAD).
fn switches() -> (i64, i64) {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_THREAD is valid on Linux.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    (u.ru_nvcsw, u.ru_nivcsw)
}
