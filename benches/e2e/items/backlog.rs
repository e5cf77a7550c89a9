//! Item 5, the backlog: readings written while the backend is absent wait in the on-disk
//! spool (ingest rate, peak RSS), then the backend returns: every one delivered, drain time
//! and rate, command latency during the drain; unpaced and at the default pace.

use crate::backend::{free_tcp_endpoint, Backend};
use crate::process::{sample, vm_hwm_kib, watch_pin, Gw};
use crate::pty::{now_ns, writer};
use crate::report::{mib, pct, us, Report, Status};
use crate::{Opts, Res};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// A backlog of `n` readings spooled while the backend is absent, then drained with
/// `[spool] replay_max_per_s = replay` (0: unpaced) while commands are sent every 10 ms.
/// The unpaced run reports ingest, memory and raw drain throughput; the paced run (the
/// default rate) holds the command budget.
pub fn bench_backlog(o: &Opts, r: &mut Report, n: u64, replay: u32) -> Res<()> {
    let endpoint = free_tcp_endpoint()?;
    let gw = Gw::start_paced(o, &endpoint, false, replay)?;
    gw.wait_serial_open(Duration::from_secs(10))?;
    let t0 = sample(gw.pid());
    let w = writer(
        gw.ptys[0].master.clone(),
        0,
        n,
        Arc::new(AtomicBool::new(false)),
    );
    let wrote = w.join().map_err(|_| "writer panicked")?;
    // Let the gateway finish what is still in the pty buffer.
    let mut last = sample(gw.pid()).cpu_ns;
    loop {
        thread::sleep(Duration::from_millis(200));
        let now = sample(gw.pid()).cpu_ns;
        if now - last < 5_000_000 {
            break;
        }
        last = now;
    }
    let t1 = sample(gw.pid());
    let hwm_backlog = vm_hwm_kib(gw.pid());
    let spool_bytes = dir_bytes(&gw.dir.path().join("data/spool"));

    // The backend comes back. While the backlog drains (the gateway reads it back from the
    // spool, the acks unlink segments), a command every 10 ms: set → sim GPIO file, as a
    // proxy for how long the loop is held (the gateway logs nothing per dispatch).
    let connect_at = Instant::now();
    let mut be = Backend::bind(&endpoint)?;
    be.track_distinct(n);
    while be.first_rx.is_none() && connect_at.elapsed() < Duration::from_secs(15) {
        be.poll(Duration::from_millis(20));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_pin(&gw.sim_dir(), stop.clone())?;
    let mut sent = Vec::new();
    let mut next_cmd = Instant::now();
    let mut progress = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(if o.quick { 60 } else { 300 });
    while be.complete_at.is_none()
        && progress.elapsed() < Duration::from_secs(15)
        && Instant::now() < deadline
    {
        let now = Instant::now();
        if now >= next_cmd && be.gw.is_some() {
            let k = sent.len();
            let cid = format!("drain-{k}");
            let t = now_ns();
            be.command(&cid, "relay1", (k % 2) as u8);
            sent.push((t, (k % 2) as u8));
            next_cmd = now + Duration::from_millis(10);
        }
        let before = be.distinct;
        be.poll(
            next_cmd
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(10)),
        );
        if be.distinct > before {
            progress = Instant::now();
        }
    }
    let drain_end = be.complete_at.unwrap_or_else(Instant::now);
    // Commands sent in the last 10 ms may still be on their way.
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().map_err(|_| "watcher panicked")?;
    // Drain the last acks, then let the spool settle, before reading VmHWM.
    be.recv_until(u64::MAX, Duration::from_millis(500));
    let hwm_after = vm_hwm_kib(gw.pid());
    let spool_after = dir_bytes(&gw.dir.path().join("data/spool"));
    drop(gw.stop(Duration::from_secs(10)));
    let first = be
        .first_rx
        .map(|t| t - connect_at)
        .unwrap_or(Duration::ZERO);
    let drain = be.first_rx.map(|a| drain_end - a).unwrap_or(Duration::ZERO);
    let pacing = match replay {
        0 => "unpaced (replay_max_per_s = 0)".to_string(),
        rate => format!("paced at the default replay_max_per_s = {rate}"),
    };
    if replay == 0 {
        r.row(
            "5",
            format!("backlog: {n} lines written, backend absent: ingest rate (pty → spool)"),
            format!(
                "{:.0} lines/s ({:.1} s; {:.1} µs CPU/line); spool {:.0} MiB on disk",
                n as f64 / wrote.as_secs_f64(),
                wrote.as_secs_f64(),
                (t1.cpu_ns - t0.cpu_ns) as f64 / n as f64 / 1e3,
                spool_bytes as f64 / 1048576.0
            ),
        );
        r.check(
            "5",
            format!("backlog: peak RSS (VmHWM) with {n} readings spooled, backend absent"),
            mib(hwm_backlog),
            "< 16 MiB",
            hwm_backlog < 16 * 1024,
        );
    }
    r.check(
        "5",
        format!("backlog {pacing}: distinct readings delivered (all of them, from the spool)"),
        format!(
            "{} of {n} ({} messages incl. retransmits)",
            be.distinct, be.readings
        ),
        format!("= {n}"),
        be.distinct == n,
    );
    let rate = be.distinct as f64 / drain.as_secs_f64().max(1e-9);
    r.push(
        "5",
        format!(
            "backlog {pacing}: reconnect delay / drain time (first → last missing reading) / rate"
        ),
        format!(
            "{} / {:.2} s / {:.0} readings/s; VmHWM after {}; spool after {:.1} MiB",
            us(first.as_nanos() as u64),
            drain.as_secs_f64(),
            rate,
            mib(hwm_after),
            spool_after as f64 / 1048576.0
        ),
        if replay == 0 {
            "—".to_string()
        } else {
            format!("≤ {replay}/s (+ burst)")
        },
        // The pace holds: the drain is not faster than the limit (plus its 0.1 s burst).
        if replay == 0 || rate <= f64::from(replay) * 1.1 {
            Status::Info
        } else {
            Status::Fail
        },
    );
    let mut lat: Vec<u64> = crate::process::pin_latencies(&sent, &seen)
        .into_iter()
        .flatten()
        .collect();
    lat.sort_unstable();
    let missing = sent.len() - lat.len();
    let (p50, p99, max) = (pct(&lat, 50.0), pct(&lat, 99.0), pct(&lat, 100.0));
    let what = format!(
        "backlog drain {pacing} (spool read-back + acks + segment deletion): command set → \
         GPIO file, {} cmds: p50 / p99 / max",
        sent.len()
    );
    let res = format!(
        "{} / {} / {}{}",
        us(p50),
        us(p99),
        us(max),
        if missing > 0 {
            format!(" ({missing} not applied)")
        } else {
            String::new()
        }
    );
    let ok = missing == 0 && !lat.is_empty();
    if replay == 0 {
        // Unpaced, the drain keeps both cores busy (gateway loop + I/O thread, harness
        // backend + its I/O thread): latency then measures the scheduler. No budget.
        r.push(
            "5",
            what,
            res,
            "—",
            if ok { Status::Info } else { Status::Fail },
        );
    } else {
        r.check("5", what, res, "p99 < 2 ms", p99 < 2_000_000 && ok);
    }
    Ok(())
}

/// Total size of the regular files in `dir` (0 if it cannot be read).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
