//! Item 10: the loop's disk work under write pressure. Command `set` → sim GPIO file p99
//! while 1,000 readings/s are spooled and another process floods the spool's file system
//! with buffered writes and periodic fsyncs (`bench_e2e --flood DIR SECONDS`), for
//! `fsync = "interval"` and `"always"`. Evidence that the flood reached dirty-page
//! throttling: the peak of `nr_dirty` in /proc/vmstat against the kernel's thresholds, and
//! the `writeback:balance_dirty_pages` tracepoint (a writer paused by throttling) counted by
//! `perf stat`, system-wide and for the gateway alone.

use crate::backend::Backend;
use crate::items::commands::{command_round, runs_summary};
use crate::process::Gw;
use crate::pty::writer;
use crate::report::Report;
use crate::{Opts, Res};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// The budget: command p99 under the flood.
pub const P99_BUDGET_NS: u64 = 5_000_000;

fn vmstat(key: &str) -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|v| v.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// `perf stat` counting the throttling tracepoint (`-a`, or `-p pid`), when perf can.
fn perf_count(target: &[&str], out: &std::path::Path) -> Option<Child> {
    Command::new("perf")
        .args(["stat", "-x,", "-e", "writeback:balance_dirty_pages", "-o"])
        .arg(out)
        .args(target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

fn perf_result(child: Option<Child>, out: &std::path::Path) -> Option<u64> {
    let mut c = child?;
    let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGINT);
    let _ = c.wait();
    let text = std::fs::read_to_string(out).ok()?;
    text.lines()
        .filter(|l| l.contains("balance_dirty_pages"))
        .find_map(|l| l.split(',').next()?.trim().parse().ok())
}

/// `--flood DIR SECONDS`: for SECONDS, writes 1 MiB buffers into 1 GiB files in DIR without
/// syncing them (the kernel's writeback and dirty-page throttling deal with them; the oldest
/// of [`FLOOD_FILES`] is deleted when a new one starts), and every 200 ms appends 4 KiB to a
/// small journal file and fsyncs it (file-system journal commits, as a database would cause).
pub fn flood(dir: &str, secs: &str) -> ! {
    let secs: u64 = secs.parse().expect("--flood DIR SECONDS");
    let dir = std::path::PathBuf::from(dir);
    let end = Instant::now() + Duration::from_secs(secs);
    let stop = Arc::new(AtomicBool::new(false));
    let journal = {
        let (dir, stop) = (dir.clone(), stop.clone());
        thread::spawn(move || {
            let mut j = std::fs::File::create(dir.join("journal")).expect("journal file");
            let page = vec![0xa5u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let _ = j.write_all(&page);
                let _ = j.sync_data();
                thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let buf = vec![0x5au8; 1 << 20];
    let mut files = std::collections::VecDeque::new();
    let mut n = 0u64;
    'flood: while Instant::now() < end {
        let path = dir.join(format!("flood-{n}"));
        let mut f = std::fs::File::create(&path).expect("flood file");
        files.push_back(path);
        if files.len() > FLOOD_FILES {
            if let Some(old) = files.pop_front() {
                let _ = std::fs::remove_file(old);
            }
        }
        for _ in 0..1024 {
            if f.write_all(&buf).is_err() || Instant::now() >= end {
                break 'flood;
            }
        }
        n += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = journal.join();
    for f in files {
        let _ = std::fs::remove_file(f);
    }
    std::process::exit(0)
}

/// Flood files of 1 GiB kept on disk: more than the default throttling threshold (20 % of
/// the memory available for the page cache) on a machine with up to ~30 GiB.
pub const FLOOD_FILES: usize = 6;

pub fn bench_diskflood(o: &Opts, r: &mut Report) -> Res<()> {
    let (runs, ncmd, warm) = if o.quick { (1, 100, 3) } else { (3, 300, 5) };
    for fsync in ["interval", "always"] {
        let mut be = Backend::bind("tcp://127.0.0.1:*")?;
        let gw = Gw::start_with(o, &be.endpoint, false, 0, fsync)?;
        be.wait_hello(Duration::from_secs(10))
            .map_err(|e| format!("{e}; log: {}", gw.log_tail()))?;
        gw.wait_serial_open(Duration::from_secs(10))?;
        let stop = Arc::new(AtomicBool::new(false));
        let w = writer(gw.ptys[0].master.clone(), 1_000, u64::MAX, stop.clone());
        let flood_dir = gw.dir.path().join("flood");
        std::fs::create_dir_all(&flood_dir).map_err(|e| e.to_string())?;
        let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (all_out, gw_out) = (tmp.path().join("all"), tmp.path().join("gw"));
        let perf_all = perf_count(&["-a"], &all_out);
        let perf_gw = perf_count(&["-p", &gw.pid().to_string()], &gw_out);
        // The flood runs a little longer than the command rounds need.
        let secs = warm + runs as u64 * (ncmd as u64 / 100 + 1) + 5;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut flooder = Command::new(exe)
            .arg("--flood")
            .arg(&flood_dir)
            .arg(secs.to_string())
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("flood: {e}"))?;
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(vmstat("nr_dirty"), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let warm_end = Instant::now() + Duration::from_secs(warm);
        while Instant::now() < warm_end {
            be.poll(Duration::from_millis(10));
        }
        let mut id = 0u64;
        let mut rounds = Vec::new();
        let mut err = None;
        for _ in 0..runs {
            match command_round(&mut be, &gw, true, ncmd, &mut id) {
                Ok(c) => rounds.push(c),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let flooding = matches!(flooder.try_wait(), Ok(None));
        let _ = flooder.kill();
        let _ = flooder.wait();
        let (thr_all, thr_gw) = (
            perf_result(perf_all, &all_out),
            perf_result(perf_gw, &gw_out),
        );
        stop.store(true, Ordering::Relaxed);
        let _ = w.join();
        let _ = sampler.join();
        let (thresh, bg) = (
            vmstat("nr_dirty_threshold"),
            vmstat("nr_dirty_background_threshold"),
        );
        drop(gw.stop(Duration::from_secs(5)));
        if let Some(e) = err {
            return Err(e);
        }
        let missing: usize = rounds.iter().map(|c| c.file_missing).sum();
        let files: Vec<Vec<u64>> = rounds.iter().map(|c| c.file.clone()).collect();
        let (text, p99) = runs_summary(&files);
        let fmt =
            |v: Option<u64>| v.map_or("n/a (perf cannot count here)".into(), |n| n.to_string());
        r.check(
            "10",
            format!(
                "command set → GPIO file, fsync = \"{fsync}\", 1,000 readings/s spooled, while \
                 another process floods the spool's file system (buffered 1 MiB writes, a \
                 4 KiB fsync every 200 ms), {runs} runs × {ncmd} cmds: p50 / p99 (median of \
                 the runs' p99s)"
            ),
            format!(
                "{text}{}{}",
                if missing > 0 {
                    format!(" ({missing} not applied)")
                } else {
                    String::new()
                },
                if flooding {
                    ""
                } else {
                    " (the flood ended early)"
                }
            ),
            "p99 < 5 ms",
            p99 < P99_BUDGET_NS && missing == 0 && flooding,
        );
        r.row(
            "10",
            format!("… the flood's pressure (fsync = \"{fsync}\"): peak nr_dirty / dirty thresholds (background, throttling); writers paused in balance_dirty_pages: system-wide / the gateway"),
            format!(
                "{} / {bg}, {thresh} pages; {} / {}",
                peak.load(Ordering::Relaxed),
                fmt(thr_all),
                fmt(thr_gw)
            ),
        );
    }
    Ok(())
}
