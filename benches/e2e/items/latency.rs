//! Item 2: line written into the pty → reading received, p50/p99/max at 100/s (against the
//! floor of a null gateway, interleaved) and at 5,000/s.

use crate::backend::{setup, Backend};
use crate::pty::{pty, writer, Pty};
use crate::report::{median_of_runs, pct, us, Report, Status};
use crate::{Opts, Res};
use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// One latency run: `count` lines at `rate`/s; the sorted latencies and how many were lost.
pub fn latency_run(be: &mut Backend, master: &Arc<File>, rate: u64, count: u64) -> (Vec<u64>, u64) {
    be.lat.clear();
    be.record = true;
    let before = be.readings;
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(master.clone(), rate, count, stop);
    while !w.is_finished() {
        be.poll(Duration::from_millis(20));
    }
    let _ = w.join();
    be.recv_until(before + count, Duration::from_secs(2));
    be.record = false;
    let mut lat = std::mem::take(&mut be.lat);
    lat.sort_unstable();
    let lost = count.saturating_sub(lat.len() as u64);
    (lat, lost)
}

/// A "null gateway" (`bench_e2e --null-gateway`): a blocking read of the pty and a libzmq
/// send per line, no loop, no parsing, no spool. Its path has the same hops as the gateway's
/// (pty flip work, reader, libzmq I/O thread, loopback TCP, the harness's I/O thread and
/// receiving thread), so it measures the floor this machine allows.
pub struct NullGw {
    pub child: Child,
    pub tty: Pty,
}

impl NullGw {
    pub fn start(be: &mut Backend) -> Res<NullGw> {
        let tty = pty()?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = Command::new(exe)
            .arg("--null-gateway")
            .arg(&tty.path)
            .arg(&be.endpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("null gateway: {e}"))?;
        let mut n = NullGw { child, tty };
        if let Err(e) = be.wait_hello(Duration::from_secs(10)) {
            n.stop();
            return Err(e);
        }
        Ok(n)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 100/s: `runs` runs of 10 s through the gateway, each followed by the same run through
/// the null gateway (interleaved: both see the same machine). The budget holds the median of
/// the gateway runs' p99s (a burst of noise from elsewhere spoils one run, not the median);
/// the rows also show every run's p99 and the percentiles of all samples together.
/// 5,000/s: one run of 10 s through the gateway, no budget.
pub fn bench_latency(o: &Opts, r: &mut Report) -> Res<()> {
    let (mut be, gw) = setup(o, false)?;
    let mut floor_be = Backend::bind("tcp://127.0.0.1:*")?;
    let mut null = NullGw::start(&mut floor_be)?;
    let (runs, secs) = if o.quick { (1u64, 3u64) } else { (5, 6) };
    let mut all = [Vec::new(), Vec::new()];
    let mut p99s = [Vec::new(), Vec::new()];
    let mut lost = [0, 0];
    for _ in 0..runs {
        for (k, (b, master)) in [
            (&mut be, &gw.ptys[0].master),
            (&mut floor_be, &null.tty.master),
        ]
        .into_iter()
        .enumerate()
        {
            let (lat, l) = latency_run(b, master, 100, 100 * secs);
            p99s[k].push(pct(&lat, 99.0));
            all[k].extend(lat);
            lost[k] += l;
        }
    }
    null.stop();
    let lost_note = |lost: u64| {
        if lost > 0 {
            format!(" ({lost} lost)")
        } else {
            String::new()
        }
    };
    let mut medians = [0u64; 2];
    let mut results = [String::new(), String::new()];
    for k in 0..2 {
        all[k].sort_unstable();
        let listed;
        (medians[k], listed) = median_of_runs(&p99s[k]);
        results[k] = format!(
            "{} (runs: {listed}; all: {} / {} / {}){}",
            us(medians[k]),
            us(pct(&all[k], 50.0)),
            us(pct(&all[k], 99.0)),
            us(pct(&all[k], 100.0)),
            lost_note(lost[k])
        );
    }
    r.check(
        "2",
        format!(
            "pty line → backend, 100/s, {runs} runs × {secs} s: p99 (median of the runs' p99s; \
             all samples: p50 / p99 / max)"
        ),
        results[0].clone(),
        "p99 < 1 ms",
        medians[0] < 1_000_000 && lost[0] == 0,
    );
    r.push(
        "2",
        "floor, interleaved with the runs above: the same 100/s through a null gateway \
         (blocking read + libzmq send, `--null-gateway`)",
        results[1].clone(),
        "—",
        if lost[1] > 0 {
            Status::Fail
        } else {
            Status::Info
        },
    );
    let secs = if o.quick { 3 } else { 10 };
    let (lat, lost) = latency_run(&mut be, &gw.ptys[0].master, 5_000, 5_000 * secs);
    r.push(
        "2",
        format!("pty line → backend, 5000/s × {secs} s: p50 / p99 / max"),
        format!(
            "{} / {} / {}{}",
            us(pct(&lat, 50.0)),
            us(pct(&lat, 99.0)),
            us(pct(&lat, 100.0)),
            lost_note(lost)
        ),
        "—",
        if lost > 0 { Status::Fail } else { Status::Info },
    );
    drop(gw.stop(Duration::from_secs(5)));
    Ok(())
}

/// `--null-gateway TTY ENDPOINT`: reads `t=<ns> n=<i>` lines from TTY with blocking reads and
/// sends each as a minimal `reading` (DEALER, DONTWAIT) to ENDPOINT. Never returns.
pub fn null_gateway(tty: &str, endpoint: &str) -> ! {
    use std::io::BufRead;
    let ctx = zmq::Context::new();
    let sock = ctx.socket(zmq::DEALER).expect("DEALER socket");
    sock.connect(endpoint).expect("connect");
    sock.send_multipart([&b"hello"[..], b"{}"], 0)
        .expect("hello");
    let f = File::open(tty).expect("open tty");
    let mut lines = std::io::BufReader::new(f);
    let mut line = String::new();
    let mut seq = 0u64;
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => std::process::exit(0),
            Ok(_) => {}
        }
        let mut t = 0u64;
        let mut n = 0u64;
        for kv in line.split_whitespace() {
            match kv.split_once('=') {
                Some(("t", v)) => t = v.parse().unwrap_or(0),
                Some(("n", v)) => n = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        seq += 1;
        let body = format!("{{\"seq\":{seq},\"values\":{{\"t\":{t},\"n\":{n}}}}}");
        let _ = sock.send_multipart([&b"reading"[..], body.as_bytes()], zmq::DONTWAIT);
    }
}
