//! Item 6: instructions per reading (valgrind cachegrind, minus an idle run of the same
//! length). `BENCH_PROFILE` runs callgrind instead and keeps the profiles.

use crate::backend::setup;
use crate::pty::writer;
use crate::report::Report;
use crate::{Opts, Res};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn cachegrind_total(path: &Path) -> Res<u64> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no summary in cachegrind output".into())
}

pub fn bench_instructions(o: &Opts, r: &mut Report) -> Res<()> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        r.fail(
            "6",
            "instructions per reading",
            "valgrind not installed".into(),
        );
        return Ok(());
    }
    let (n, rate) = if o.quick {
        (500u64, 500u64)
    } else {
        (5_000, 500)
    };
    let secs = n / rate;
    let mut totals = [0u64; 2];
    for (i, with_readings) in [false, true].into_iter().enumerate() {
        let (mut be, gw) = setup(o, true)?;
        let before = be.readings;
        if with_readings {
            let w = writer(
                gw.ptys[0].master.clone(),
                rate,
                n,
                Arc::new(AtomicBool::new(false)),
            );
            while !w.is_finished() {
                be.poll(Duration::from_millis(20));
            }
            let _ = w.join();
            be.recv_until(before + n, Duration::from_secs(10));
            if be.readings - before < n {
                return Err(format!(
                    "only {} of {n} readings arrived under valgrind",
                    be.readings - before
                ));
            }
        } else {
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end {
                be.poll(Duration::from_millis(50));
            }
        }
        let gw = gw.stop(Duration::from_secs(60));
        let out = gw.cachegrind_out.clone().ok_or("no cachegrind output")?;
        totals[i] = cachegrind_total(&out)?;
        if let Some(prefix) = std::env::var_os("BENCH_PROFILE") {
            let to = format!(
                "{}.{}",
                prefix.to_string_lossy(),
                if with_readings { "readings" } else { "idle" }
            );
            std::fs::copy(&out, &to).map_err(|e| format!("{to}: {e}"))?;
            eprintln!("bench: callgrind profile kept in {to}");
        }
    }
    let per = totals[1].saturating_sub(totals[0]) as f64 / n as f64;
    r.row(
        "6",
        format!("instructions per reading ({n} at {rate}/s, minus an idle run of {secs} s; all threads)"),
        format!("{per:.0}"),
    );
    r.notes.push(format!(
        "Instructions (valgrind cachegrind, whole process incl. libzmq threads): idle run {} / \
         run with {n} readings {}.",
        totals[0], totals[1]
    ));
    Ok(())
}
