//! `zgate demo`: the embedded default. No hardware, no config.
//!
//! Starts, in a fresh directory under the system temp dir:
//! - the reference backend (`zgate backend`, a child process) on an ipc endpoint; its stdout
//!   is the demo's stdout, so every reading and reply appears as a JSON line;
//! - a simulated weather sensor on a pseudo-terminal: `temperature=.. humidity=.. pressure=..`
//!   lines at 2 Hz;
//! - simulated GPIO: input "door" (pin 17) flipped every few seconds through its file, output
//!   "relay1" (pin 27) toggled by a command sent to the backend every 5 seconds;
//! - the gateway itself, in this process, on its calloop loop.
//!
//! Ctrl-C (or `--seconds N` / `DEMO_SECONDS=N`) ends it cleanly.

use crate::config::Config;
use crate::gateway::Gateway;
use crate::hw::sim::write_pin_file;
use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The demo's configuration; `{dir}` and `{tty}` are filled in at start.
pub const DEMO_CONFIG: &str = r#"
[gateway]
id = "gw-01"
data_dir = "{dir}/data"
stats_interval_s = 10

[backend]
endpoint = "ipc://{dir}/backend.ipc"
outbox_max = 10000
shutdown_flush_ms = 2000

[gpio]
backend = "sim"
sim_dir = "{dir}/gpio"

[[gpio.input]]
name = "door"
pin = 17
pull = "up"
edge = "both"
debounce_ms = 20

[[gpio.output]]
name = "relay1"
pin = 27
initial = 0
max_pulse_ms = 10000

[[serial]]
name = "weather"
path = "{tty}"
baud = 9600
format = "kv"
"#;

/// A tiny deterministic PRNG (xorshift) for plausible sensor noise.
struct Noise(u64);
impl Noise {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % 10_000) as f64 / 10_000.0 - 0.5
    }
}

/// Runs the demo (see the module documentation) until Ctrl-C, SIGTERM or, with `seconds`,
/// that many seconds; then stops the gateway (with its flush) and the backend.
pub fn run(seconds: Option<u64>) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("zgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pty = nix::pty::openpty(None, None).context("opening a pseudo-terminal")?;
    let tty = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))
        .context("finding the pty's path")?;
    // Make the pty raw-ish on the sensor side: no echo of what the gateway writes.
    if let Ok(mut t) = nix::sys::termios::tcgetattr(&pty.slave) {
        nix::sys::termios::cfmakeraw(&mut t);
        let _ = nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &t);
    }
    let text = DEMO_CONFIG
        .replace("{dir}", &dir.display().to_string())
        .replace("{tty}", &tty.display().to_string());
    let cfg = Config::parse(&text, "<demo>").map_err(anyhow::Error::new)?;
    std::fs::write(dir.join("zgate.toml"), &text)?;

    let exe = std::env::current_exe().context("finding the zgate binary")?;
    let mut backend = Command::new(exe)
        .args(["backend", "--bind", &cfg.backend.endpoint])
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        // Its own process group: Ctrl-C reaches the gateway, which flushes, and then the demo
        // stops the backend.
        .process_group(0)
        .spawn()
        .context("starting the reference backend")?;
    // Block SIGINT/SIGTERM before any thread exists (the backend child is spawned with the
    // default mask), so every thread inherits the mask and the
    // gateway's signalfd receives them (a thread with them unblocked would be killed instead).
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.thread_block().context("blocking signals")?;

    let mut backend_in = backend.stdin.take().context("backend stdin")?;

    eprintln!(
        "zgate demo: dir={} sensor pty={} — readings and replies below are what the backend receives.\n\
         Drive the door yourself: echo 0 > {}/gpio/gpio17 ; watch the relay: cat {}/gpio/gpio27",
        dir.display(),
        tty.display(),
        dir.display(),
        dir.display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    // The sensor: writes on the pty master at 2 Hz.
    {
        let stop = stop.clone();
        let mut master = std::fs::File::from(pty.master);
        let slave = pty.slave; // keep the slave open so the master never sees a hang-up
        threads.push(std::thread::spawn(move || {
            let _slave = slave;
            let mut n = Noise(0x9e37_79b9_7f4a_7c15);
            let (mut t, mut h, mut p) = (21.0f64, 45.0f64, 1013.0f64);
            while !stop.load(Ordering::Relaxed) {
                t = (t + n.next() * 0.2).clamp(-10.0, 40.0);
                h = (h + n.next() * 0.5).clamp(10.0, 95.0);
                p = (p + n.next() * 0.3).clamp(950.0, 1050.0);
                let line = format!("temperature={t:.2} humidity={h:.1} pressure={p:.1}\n");
                if master.write_all(line.as_bytes()).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }));
    }
    // The door and the operator: the door flips every 7 s; a toggle command every 5 s.
    {
        let stop = stop.clone();
        let gpio_dir = cfg.gpio.sim_dir.clone();
        threads.push(std::thread::spawn(move || {
            let start = Instant::now();
            let mut door = crate::hw::Level::High;
            let mut last_door = start;
            let mut last_cmd = start;
            let mut n = 1;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if last_door.elapsed() >= Duration::from_secs(7) {
                    door = !door;
                    let _ = write_pin_file(&gpio_dir, 17, door);
                    last_door = Instant::now();
                }
                if last_cmd.elapsed() >= Duration::from_secs(5) {
                    let line = format!(
                        "{{\"gateway\":\"gw-01\",\"command\":{{\"id\":\"demo-{n}\",\"target\":\"relay1\",\"action\":\"toggle\"}}}}\n"
                    );
                    n += 1;
                    if backend_in.write_all(line.as_bytes()).is_err() {
                        break;
                    }
                    last_cmd = Instant::now();
                }
            }
        }));
    }
    if let Some(s) = seconds {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(s));
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM);
        });
    }

    let result = Gateway::run(cfg);
    stop.store(true, Ordering::Relaxed);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(backend.id() as i32),
        Signal::SIGTERM,
    );
    let _ = backend.wait();
    for t in threads {
        let _ = t.join();
    }
    let _ = std::fs::remove_dir_all(&dir);
    result.context("gateway")?;
    eprintln!("zgate demo: stopped cleanly");
    Ok(())
}
