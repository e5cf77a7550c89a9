//! The gateway under test as a child process (generated config, ptys, sim GPIO on tmpfs,
//! optionally under valgrind), what /proc says about a process (wake-ups, CPU, VmHWM), and
//! the observer of the sim GPIO file that timestamps command effects.

use crate::pty::{now_ns, pty, Pty};
use crate::{Opts, Res};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use zgate::spool::DEFAULT_REPLAY_MAX_PER_S;

// ---------------------------------------------------------------------------------------
// /proc readings

pub fn status_field(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

pub fn tasks(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Voluntary context switches of the loop (main) thread.
    pub wake_main: u64,
    /// Voluntary context switches of all threads.
    pub wake_all: u64,
    /// CPU time of all threads, ns (schedstat).
    pub cpu_ns: u64,
    /// utime+stime in clock ticks (whole process, from /proc/PID/stat).
    pub ticks: u64,
    pub threads: usize,
}

pub fn sample(pid: u32) -> Sample {
    let mut s = Sample::default();
    for t in tasks(pid) {
        let v = status_field(&t.join("status"), "voluntary_ctxt_switches").unwrap_or(0);
        s.wake_all += v;
        if t.file_name().and_then(|n| n.to_str()) == Some(&pid.to_string()) {
            s.wake_main = v;
        }
        if let Ok(text) = std::fs::read_to_string(t.join("schedstat")) {
            s.cpu_ns += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        s.threads += 1;
    }
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Fields after the ")" of comm: state is field 3; utime 14, stime 15.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let g = |i: usize| {
                f.get(i - 3)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            s.ticks = g(14) + g(15);
        }
    }
    s
}

pub fn vm_hwm_kib(pid: u32) -> u64 {
    status_field(Path::new(&format!("/proc/{pid}/status")), "VmHWM").unwrap_or(0)
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// The gateway under test

pub const CONFIG: &str = r#"
[gateway]
id = "gw-bench"
data_dir = "{dir}/data"
stats_interval_s = {stats}

[backend]
endpoint = "{endpoint}"
outbox_max = 10000
shutdown_flush_ms = 500

[commands]
# The harness sends a command every 10 ms; the default limit (20/s) would refuse most of them.
max_per_s = 1000

[spool]
# Room for the 1,000,000-reading backlog case (about 200 MB of segments), in the temp dir.
max_bytes = {spool_max}
fsync = "{fsync}"
fsync_interval_ms = 1000
replay_max_per_s = {replay}

[gpio]
backend = "sim"
sim_dir = "{simdir}"

[[gpio.input]]
name = "door"
pin = 17
pull = "up"

[[gpio.input]]
name = "button"
pin = 22

[[gpio.output]]
name = "relay1"
pin = 27

[[gpio.output]]
name = "relay2"
pin = 23

[[serial]]
name = "weather"
path = "{tty1}"
baud = 115200
format = "kv"

[[serial]]
name = "aux"
path = "{tty2}"
baud = 115200
format = "kv"
"#;

pub const STATS_INTERVAL_S: u64 = 30;
/// `[spool] max_bytes` of the generated config: 512 MiB, room for the 1,000,000 readings of
/// the backlog case (about 200 B each on disk).
pub const SPOOL_MAX_BYTES: u64 = 512 << 20;
/// libzmq heartbeat interval configured by the gateway (ZMQ_HEARTBEAT_IVL).
pub const ZMQ_HEARTBEAT_S: u64 = 10;

/// The simulated GPIO files stand in for GPIO hardware (a register write, or the kernel's
/// gpiochip/sysfs pseudo-files): no journal, no disk. On a disk file system their writes
/// would measure that file system instead (on ext4, a 2-byte write waits for the journal
/// while the spool's segment deletions commit: several ms during the backlog drain). So
/// they go on tmpfs (/dev/shm) when it exists; the spool stays on the disk.
pub fn sim_tempdir() -> Res<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("zgate-bench-gpio")
            .tempdir_in(shm)
    } else {
        tempfile::Builder::new()
            .prefix("zgate-bench-gpio")
            .tempdir()
    };
    dir.map_err(|e| format!("sim GPIO dir: {e}"))
}

pub struct Gw {
    pub child: Child,
    pub dir: tempfile::TempDir,
    /// The simulated GPIO directory, on tmpfs when /dev/shm exists (see `sim_tempdir`).
    pub sim: tempfile::TempDir,
    pub ptys: [Pty; 2],
    pub cachegrind_out: Option<PathBuf>,
}

impl Gw {
    pub fn start(o: &Opts, endpoint: &str, valgrind: bool) -> Res<Gw> {
        Gw::start_paced(o, endpoint, valgrind, DEFAULT_REPLAY_MAX_PER_S)
    }

    /// With `[spool] replay_max_per_s = replay` (0: no limit).
    pub fn start_paced(o: &Opts, endpoint: &str, valgrind: bool, replay: u32) -> Res<Gw> {
        Gw::start_with(o, endpoint, valgrind, replay, "interval")
    }

    /// With `[spool] replay_max_per_s = replay` and `fsync = "<fsync>"`.
    pub fn start_with(
        o: &Opts,
        endpoint: &str,
        valgrind: bool,
        replay: u32,
        fsync: &str,
    ) -> Res<Gw> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let ptys = [pty()?, pty()?];
        let sim = sim_tempdir()?;
        let sim_dir = sim.path().to_path_buf();
        let cfg = CONFIG
            .replace("{simdir}", &sim_dir.display().to_string())
            .replace("{replay}", &replay.to_string())
            .replace("{fsync}", fsync)
            .replace("{dir}", &dir.path().display().to_string())
            .replace("{stats}", &STATS_INTERVAL_S.to_string())
            .replace("{endpoint}", endpoint)
            .replace("{spool_max}", &SPOOL_MAX_BYTES.to_string())
            .replace("{tty1}", &ptys[0].path.display().to_string())
            .replace("{tty2}", &ptys[1].path.display().to_string());
        let cfg_path = dir.path().join("zgate.toml");
        std::fs::write(&cfg_path, cfg).map_err(|e| e.to_string())?;
        let log = File::create(dir.path().join("zgate.log")).map_err(|e| e.to_string())?;
        let cachegrind_out = valgrind.then(|| dir.path().join("cachegrind.out"));
        let mut cmd = match &cachegrind_out {
            Some(out) => {
                let mut c = Command::new("valgrind");
                if std::env::var_os("BENCH_PROFILE").is_some() {
                    c.arg("--tool=callgrind")
                        .arg(format!("--callgrind-out-file={}", out.display()));
                } else {
                    c.arg("--tool=cachegrind")
                        .arg("--cache-sim=no")
                        .arg(format!("--cachegrind-out-file={}", out.display()));
                }
                c.arg(&o.zgate);
                c
            }
            None => Command::new(&o.zgate),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", o.zgate.display()))?;
        Ok(Gw {
            child,
            dir,
            sim,
            ptys,
            cachegrind_out,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sim_dir(&self) -> PathBuf {
        self.sim.path().to_path_buf()
    }

    /// Waits until the gateway holds both pty slaves open (its serial ports are connected).
    pub fn wait_serial_open(&self, timeout: Duration) -> Res<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let open = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .map(|d| {
                    d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                        .filter(|l| self.ptys.iter().any(|p| &p.path == l))
                        .count()
                })
                .unwrap_or(0);
            if open >= 2 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("serial ports not opened; log: {}", self.log_tail()));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("zgate.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// SIGTERM, then wait (SIGKILL after `timeout`).
    pub fn stop(mut self, timeout: Duration) -> Gw {
        let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return self;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The sim GPIO observer

/// Records the time of every write to `<dir>/gpio27` (the sim writes a level in place).
/// A write of the pin file seen by [`watch_pin`]: when (ns), and the level it held.
pub type PinWrite = (u64, Option<u8>);

pub fn watch_pin(dir: &Path, stop: Arc<AtomicBool>) -> Res<thread::JoinHandle<Vec<PinWrite>>> {
    let ino =
        Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|e| e.to_string())?;
    ino.add_watch(dir, AddWatchFlags::IN_MODIFY)
        .map_err(|e| e.to_string())?;
    let file = dir.join("gpio27");
    Ok(thread::spawn(move || {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        realtime_observer();
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(50u16));
            let at = now_ns();
            let mut modified = false;
            while let Ok(events) = ino.read_events() {
                modified |= events
                    .iter()
                    .any(|e| e.name.as_deref().and_then(|n| n.to_str()) == Some("gpio27"));
            }
            if modified {
                // The level written, so a command is paired with the write that carried its
                // value: inotify merges identical events the reader has not read yet, so a
                // count of events may fall behind the writes.
                let level = std::fs::read_to_string(&file)
                    .ok()
                    .and_then(|t| t.trim().parse::<u8>().ok());
                seen.push((at, level));
            }
        }
        seen
    }))
}

/// For each command (sent at `t`, setting level `v`): the time from `t` to the first
/// observed write of `v` at or after `t` (`None`: never seen). A write merged with a later
/// one is found at the next write of the same level (an overestimate); a write delayed past
/// the next command of the same level (20 ms on) is counted for both, and its own latency
/// shows the delay.
pub fn pin_latencies(sent: &[(u64, u8)], seen: &[PinWrite]) -> Vec<Option<u64>> {
    sent.iter()
        .map(|&(t, v)| {
            seen.iter()
                .find(|&&(at, level)| at >= t && level == Some(v))
                .map(|&(at, _)| at - t)
        })
        .collect()
}

/// Makes the calling (observer) thread SCHED_FIFO if allowed, so that its timestamps do not
/// wait for a CPU while the gateway and the harness's backend keep both cores busy (the
/// backlog drain); it sleeps in poll(2) otherwise, so it takes almost no CPU from them.
pub static OBSERVER_FIFO: AtomicBool = AtomicBool::new(false);

pub fn realtime_observer() -> bool {
    let p = libc::sched_param { sched_priority: 10 };
    // SAFETY: plain syscall on the calling thread with a valid sched_param.
    let ok = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) } == 0;
    if ok {
        OBSERVER_FIFO.store(true, Ordering::Relaxed);
    }
    ok
}
