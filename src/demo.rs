//! `zgate demo`: the embedded default. No hardware, no config.
//!
//! Starts, in a fresh directory under the system temp dir:
//! - the reference backend (`zgate backend`, a child process) on an ipc endpoint; its stdout
//!   is the demo's stdout, so every reading and reply appears as a JSON line;
//! - a simulated weather sensor on a pseudo-terminal: `temperature=.. humidity=.. pressure=..`
//!   lines at 2 Hz;
//! - a simulated Modbus RTU energy meter ("meter1", unit 1) on a second pseudo-terminal,
//!   answered by [`crate::modbus_sim::SimSlave`] in a demo thread: the gateway polls it every
//!   2 s over its `[[modbus]]` bus "rs485" (voltage, current, power, energy, a writable
//!   setpoint);
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

/// The demo's configuration; `{dir}`, `{tty}` and `{mbtty}` are filled in at start.
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

[[modbus]]
name = "rs485"
path = "{mbtty}"
baud = 9600
timeout_ms = 200
retries = 1

[[modbus.device]]
name = "meter1"
unit = 1
poll_ms = 2000

[[modbus.device.register]]
name = "voltage"
kind = "input"
address = 0
scale = 0.1

[[modbus.device.register]]
name = "current"
kind = "input"
address = 1
scale = 0.01

[[modbus.device.register]]
name = "power"
kind = "input"
address = 2
type = "f32"

[[modbus.device.register]]
name = "energy_kwh"
kind = "input"
address = 4
type = "u32"
scale = 0.001

[[modbus.device.register]]
name = "setpoint"
kind = "holding"
address = 10
scale = 0.1
writable = true
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
    let meter_pty = nix::pty::openpty(None, None).context("opening a pseudo-terminal")?;
    let mbtty = std::fs::read_link(format!("/proc/self/fd/{}", meter_pty.slave.as_raw_fd()))
        .context("finding the pty's path")?;
    if let Ok(mut t) = nix::sys::termios::tcgetattr(&meter_pty.slave) {
        nix::sys::termios::cfmakeraw(&mut t);
        let _ =
            nix::sys::termios::tcsetattr(&meter_pty.slave, nix::sys::termios::SetArg::TCSANOW, &t);
    }
    let text = DEMO_CONFIG
        .replace("{dir}", &dir.display().to_string())
        .replace("{tty}", &tty.display().to_string())
        .replace("{mbtty}", &mbtty.display().to_string());
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
         Drive the door yourself: echo 0 > {}/gpio/gpio17 ; watch the relay: cat {}/gpio/gpio27\n\
         The Modbus meter (pty {}) is polled every 2 s; its setpoint is writable: \
         {{\"gateway\":\"gw-01\",\"command\":{{\"id\":\"s1\",\"target\":\"meter1.setpoint\",\"action\":\"set\",\"value\":42.5}}}}",
        dir.display(),
        tty.display(),
        dir.display(),
        dir.display(),
        mbtty.display()
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
    // The Modbus meter: answers the gateway's requests on its pty.
    {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            meter(meter_pty.master, meter_pty.slave, &stop)
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

/// The simulated energy meter: reads requests from the pty master, answers them with a
/// [`SimSlave`](crate::modbus_sim::SimSlave) whose input registers follow a plausible load.
fn meter(master: std::os::fd::OwnedFd, slave: std::os::fd::OwnedFd, stop: &AtomicBool) {
    use crate::modbus_sim::{request_len, SimSlave};
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let _slave = slave; // kept open: the master never sees a hang-up
    let mut dev = SimSlave::new(1);
    dev.set_holding(10, 400);
    let mut n = Noise(0x2545_f491_4f6c_dd1d);
    let (mut volts, mut amps, mut kwh) = (230.0f64, 4.0f64, 1520.0f64);
    let mut last_update = Instant::now() - Duration::from_secs(1);
    let mut buf: Vec<u8> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if last_update.elapsed() >= Duration::from_secs(1) {
            let dt = last_update.elapsed().as_secs_f64();
            last_update = Instant::now();
            volts = (volts + n.next() * 0.8).clamp(215.0, 245.0);
            amps = (amps + n.next() * 0.3).clamp(0.5, 16.0);
            let watts = volts * amps;
            kwh += watts * dt / 3.6e6;
            dev.set_input(0, (volts * 10.0).round() as u16);
            dev.set_input(1, (amps * 100.0).round() as u16);
            let p = (((watts * 10.0).round() / 10.0) as f32).to_bits();
            dev.set_input(2, (p >> 16) as u16);
            dev.set_input(3, p as u16);
            let e = (kwh * 1000.0).round() as u32;
            dev.set_input(4, (e >> 16) as u16);
            dev.set_input(5, e as u16);
        }
        let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => break,
        }
        let mut chunk = [0u8; 256];
        match nix::unistd::read(master.as_fd().as_raw_fd(), &mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
        loop {
            match request_len(&buf) {
                Some(len) if buf.len() >= len => {
                    if let Some(resp) = dev.answer(&buf[..len]) {
                        if nix::unistd::write(&master, &resp).is_err() {
                            return;
                        }
                    }
                    buf.drain(..len);
                }
                // Not a request this meter knows: start over with the next bytes.
                None if buf.len() >= 2 => buf.clear(),
                _ => break,
            }
        }
    }
}
