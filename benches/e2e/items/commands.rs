//! Item 3: command `set` → sim GPIO file written (inotify) and → reply received, while 5,000
//! readings/s flow, and while the backend has stopped reading.

use crate::backend::{setup, Backend};
use crate::process::{pin_latencies, watch_pin, Gw};
use crate::pty::{now_ns, writer};
use crate::report::{median_of_runs, pct, us, Report};
use crate::{Opts, Res};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Latencies of one round of `ncmd` commands, 10 ms apart: command → GPIO file written, and
/// (when the backend reads) → reply received.
pub struct CommandRound {
    pub file: Vec<u64>,
    pub reply: Vec<u64>,
    pub file_missing: usize,
    pub reply_missing: usize,
}

pub fn command_round(
    be: &mut Backend,
    gw: &Gw,
    reading: bool,
    ncmd: usize,
    id: &mut u64,
) -> Res<CommandRound> {
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_pin(&gw.sim_dir(), stop.clone())?;
    let mut sent = Vec::new();
    for k in 0..ncmd {
        *id += 1;
        let cid = format!("c-{id}");
        let t = now_ns();
        be.command(&cid, "relay1", (k % 2) as u8);
        sent.push((cid, t, (k % 2) as u8));
        let next = Instant::now() + Duration::from_millis(10);
        while Instant::now() < next {
            if reading {
                be.poll(next.saturating_duration_since(Instant::now()));
            } else {
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        }
    }
    if reading {
        let end = Instant::now() + Duration::from_millis(200);
        while Instant::now() < end {
            be.poll(Duration::from_millis(10));
        }
    } else {
        thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().map_err(|_| "watcher panicked")?;
    let pin = pin_latencies(
        &sent.iter().map(|&(_, t, v)| (t, v)).collect::<Vec<_>>(),
        &seen,
    );
    let file: Vec<u64> = pin.iter().flatten().copied().collect();
    let reply: Vec<u64> = if reading {
        sent.iter()
            .filter_map(|(cid, t, _)| be.replies.get(cid).map(|at| at.saturating_sub(*t)))
            .collect()
    } else {
        Vec::new()
    };
    Ok(CommandRound {
        file_missing: ncmd - file.len(),
        reply_missing: if reading { ncmd - reply.len() } else { 0 },
        file,
        reply,
    })
}

/// "p50 / p99" where p99 is the median of the runs' p99s (like item 2: a burst of noise
/// from elsewhere spoils one run, not the median), then every run's p99 and the max of all
/// samples. Returns the text and the median p99.
pub fn runs_summary(runs: &[Vec<u64>]) -> (String, u64) {
    let p99s: Vec<u64> = runs
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.sort_unstable();
            pct(&r, 99.0)
        })
        .collect();
    let (median, listed) = median_of_runs(&p99s);
    let mut all: Vec<u64> = runs.concat();
    all.sort_unstable();
    let text = format!(
        "{} / {} (runs' p99: {listed}; max {})",
        us(pct(&all, 50.0)),
        us(median),
        us(pct(&all, 100.0))
    );
    (text, median)
}

pub fn bench_commands(o: &Opts, r: &mut Report) -> Res<()> {
    let (mut be, gw) = setup(o, false)?;
    let ncmd: usize = if o.quick { 50 } else { 300 };
    let runs: usize = if o.quick { 1 } else { 5 };
    let stop_w = Arc::new(AtomicBool::new(false));
    let w = writer(gw.ptys[0].master.clone(), 5_000, u64::MAX, stop_w.clone());
    let mut id = 0u64;
    for reading in [true, false] {
        // Let the flow settle; when the backend stops reading, let the pipes fill up first.
        let settle = Instant::now() + Duration::from_secs(if o.quick { 1 } else { 3 });
        while Instant::now() < settle {
            if reading {
                be.poll(Duration::from_millis(10));
            } else {
                thread::sleep(Duration::from_millis(10));
            }
        }
        let mut rounds = Vec::new();
        for _ in 0..runs {
            rounds.push(command_round(&mut be, &gw, reading, ncmd, &mut id)?);
        }
        let ctx = if reading {
            "while 5,000 readings/s flow"
        } else {
            "backend not reading, 5,000 readings/s queued"
        };
        let missing: usize = rounds.iter().map(|c| c.file_missing).sum();
        let files: Vec<Vec<u64>> = rounds.iter().map(|c| c.file.clone()).collect();
        let (text, p99) = runs_summary(&files);
        let not_applied = if missing > 0 {
            format!(" ({missing} not applied)")
        } else {
            String::new()
        };
        r.check(
            "3",
            format!(
                "command set → GPIO file changed, {ctx}, {runs} runs × {ncmd} cmds: p50 / p99 \
                 (median of the runs' p99s)"
            ),
            format!("{text}{not_applied}"),
            "p99 < 2 ms",
            p99 < 2_000_000 && missing == 0,
        );
        if reading {
            let missing: usize = rounds.iter().map(|c| c.reply_missing).sum();
            let replies: Vec<Vec<u64>> = rounds.iter().map(|c| c.reply.clone()).collect();
            let (text, p99) = runs_summary(&replies);
            r.check(
                "3",
                format!(
                    "command set → reply received, {ctx}: p50 / p99 (median of the runs' p99s)"
                ),
                format!(
                    "{text}{}{}",
                    if missing > 0 {
                        format!(" ({missing} missing)")
                    } else {
                        String::new()
                    },
                    if be.refused > 0 {
                        format!(" ({} refused)", be.refused)
                    } else {
                        String::new()
                    }
                ),
                "p99 < 2 ms",
                p99 < 2_000_000 && missing == 0 && be.refused == 0,
            );
        } else {
            r.row(
                "3",
                "command set → reply, backend not reading",
                "n/a (the backend reads no replies)",
            );
        }
    }
    stop_w.store(true, Ordering::Relaxed);
    let _ = w.join();
    drop(gw.stop(Duration::from_secs(5)));
    Ok(())
}
