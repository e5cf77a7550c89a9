//! Item 11, Modbus RTU polling rate: a bus of 4 devices at 9600 baud (8N2: 11 bits a
//! character, as the Modbus standard framing; a pty refuses parity) polled as fast as the bus allows (`poll_ms` far
//! below the time one poll takes). The slaves are `zgate::modbus_sim` on a pseudo-terminal,
//! in a harness thread that plays the wire: a response is written when it would have fully
//! arrived over a real 9600-baud line (request's wire time + 3.5-character turnaround +
//! response's wire time after the request was read).
//!
//! Wire-time limit of one poll: (request + response bytes) × 11 bits / 9600 + two 3.5-character
//! gaps (the slave's turnaround and the master's silence before its next request). The row
//! is achieved polls/s against that limit (goal ≥ 0.8).

use crate::backend::Backend;
use crate::pty::pty;
use crate::report::Report;
use crate::{Opts, Res};
use std::fs::File;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zgate::modbus_sim::{request_len, SimSlave};

const BAUD: u32 = 9600;
const BITS: u32 = 11;
const DEVICES: u8 = 4;
/// Holding registers per device, read with one request.
const REGS: u16 = 10;

fn wire(bytes: usize) -> Duration {
    Duration::from_secs_f64(bytes as f64 * f64::from(BITS) / f64::from(BAUD))
}

fn config(dir: &std::path::Path, endpoint: &str, tty: &std::path::Path) -> String {
    let mut s = format!(
        "[gateway]\nid = \"gw-bench\"\ndata_dir = \"{}/data\"\nstats_interval_s = 1\n\n\
         [backend]\nendpoint = \"{endpoint}\"\n\n[gpio]\nbackend = \"sim\"\nsim_dir = \"{}/sim\"\n\n\
         [[modbus]]\nname = \"bus1\"\npath = \"{}\"\nbaud = {BAUD}\nstop_bits = 2\n\
         timeout_ms = 200\nretries = 0\n",
        dir.display(),
        dir.display(),
        tty.display()
    );
    for unit in 1..=DEVICES {
        s += &format!("\n[[modbus.device]]\nname = \"dev{unit}\"\nunit = {unit}\npoll_ms = 10\n");
        for a in 0..REGS {
            s += &format!(
                "\n[[modbus.device.register]]\nname = \"r{a}\"\nkind = \"holding\"\naddress = {a}\n"
            );
        }
    }
    s
}

/// The slaves on the pty master, answering at the pace of a 9600-baud line; counts the
/// requests answered in `answered`.
fn slaves(mut master: File, stop: Arc<AtomicBool>, answered: Arc<AtomicU64>) {
    let mut devs: Vec<SimSlave> = (1..=DEVICES).map(SimSlave::new).collect();
    for (i, d) in devs.iter_mut().enumerate() {
        for a in 0..REGS {
            d.set_holding(a, (i as u16 + 1) * 100 + a);
        }
    }
    let gap = wire(1).mul_f64(3.5);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        let n = match master.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let read_at = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        while let Some(len) = request_len(&buf).filter(|&l| buf.len() >= l) {
            let req: Vec<u8> = buf.drain(..len).collect();
            let Some(resp) = devs.iter_mut().find_map(|d| d.answer(&req)) else {
                continue;
            };
            let due = read_at + wire(req.len()) + gap + wire(resp.len());
            // Sleep most of the way, then spin: a late response would be the harness's
            // delay, not the gateway's.
            let left = due.saturating_duration_since(Instant::now());
            if left > Duration::from_micros(300) {
                std::thread::sleep(left - Duration::from_micros(300));
            }
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            if master.write_all(&resp).is_err() {
                return;
            }
            answered.fetch_add(1, Ordering::Relaxed);
        }
        if buf.len() >= 2 && request_len(&buf).is_none() {
            buf.clear();
        }
    }
}

pub fn bench_modbus(o: &Opts, r: &mut Report) -> Res<()> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let p = pty()?;
    let master = p.master.try_clone().map_err(|e| e.to_string())?;
    let mut be = Backend::bind("tcp://127.0.0.1:*")?;
    let cfg_path = dir.path().join("zgate.toml");
    std::fs::write(&cfg_path, config(dir.path(), &be.endpoint, &p.path))
        .map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let t = {
        let (stop, answered) = (stop.clone(), answered.clone());
        std::thread::spawn(move || slaves(master, stop, answered))
    };
    let log = File::create(dir.path().join("zgate.log")).map_err(|e| e.to_string())?;
    let mut child = Command::new(&o.zgate)
        .arg("run")
        .arg("--config")
        .arg(&cfg_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", o.zgate.display()))?;
    let result = (|| {
        be.wait_hello(Duration::from_secs(10))?;
        // Warm up, then count readings (one per poll) over the window.
        be.recv_until(u64::from(DEVICES) * 4, Duration::from_secs(5));
        let window = Duration::from_secs(if o.quick { 3 } else { 15 });
        let (start_readings, start) = (be.readings, Instant::now());
        while start.elapsed() < window {
            be.poll(Duration::from_millis(20));
        }
        let polls = (be.readings - start_readings) as f64 / start.elapsed().as_secs_f64();
        Ok::<f64, String>(polls)
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    stop.store(true, Ordering::Relaxed);
    drop(p);
    let _ = t.join();
    let polls = result.map_err(|e| {
        let log = std::fs::read_to_string(dir.path().join("zgate.log")).unwrap_or_default();
        format!("{e}; log: {}", &log[log.len().saturating_sub(2000)..])
    })?;
    if answered.load(Ordering::Relaxed) == 0 {
        return Err("the simulated slaves answered no request".into());
    }
    let (req, resp) = (8, 5 + 2 * usize::from(REGS));
    let per_poll = wire(req + resp) + wire(1).mul_f64(7.0);
    let limit = 1.0 / per_poll.as_secs_f64();
    let ratio = polls / limit;
    r.check(
        "11",
        format!(
            "Modbus RTU: {DEVICES} devices × {REGS} holding registers at {BAUD} baud 8N2, polled \
             as fast as the bus allows: polls/s against the wire-time limit ({req}+{resp} bytes \
             × 11 bits / {BAUD} + 2 × 3.5 characters = {:.1} ms a poll)",
            per_poll.as_secs_f64() * 1e3
        ),
        format!("{polls:.1} polls/s of {limit:.1}: ratio {ratio:.2}"),
        "≥ 0.8",
        ratio >= 0.8,
    );
    Ok(())
}
