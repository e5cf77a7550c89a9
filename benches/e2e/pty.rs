//! Sensors on pseudo-terminals: the pty pair (the config's serial path is the slave) and the
//! writer thread that feeds it `t=<ns> n=<i>` lines at a given rate.

use crate::Res;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the harness started (monotonic; shared by all threads).
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------------------------------
// Sensors on pseudo-terminals

pub struct Pty {
    pub master: Arc<File>,
    pub _slave: OwnedFd,
    pub path: PathBuf,
}

pub fn pty() -> Res<Pty> {
    let p = nix::pty::openpty(None, None).map_err(|e| format!("openpty: {e}"))?;
    let mut t = nix::sys::termios::tcgetattr(&p.slave).map_err(|e| e.to_string())?;
    nix::sys::termios::cfmakeraw(&mut t);
    nix::sys::termios::tcsetattr(&p.slave, nix::sys::termios::SetArg::TCSANOW, &t)
        .map_err(|e| e.to_string())?;
    let path = std::fs::read_link(format!("/proc/self/fd/{}", p.slave.as_raw_fd()))
        .map_err(|e| e.to_string())?;
    Ok(Pty {
        master: Arc::new(File::from(p.master)),
        _slave: p.slave,
        path,
    })
}

/// Writes `count` lines `t=<ns> n=<i>` at `rate` lines/s (0: as fast as the pty takes them,
/// in 64-line writes) from a thread. Returns the thread; it yields the writing time.
pub fn writer(
    master: Arc<File>,
    rate: u64,
    count: u64,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Duration> {
    thread::spawn(move || {
        let mut f: &File = &master;
        let start = Instant::now();
        let mut buf = String::with_capacity(4096);
        let mut i = 0;
        while i < count && !stop.load(Ordering::Relaxed) {
            buf.clear();
            match (i * 1_000_000_000).checked_div(rate) {
                None => {
                    let end = (i + 64).min(count);
                    while i < end {
                        let _ = writeln!(buf, "t={} n={i}", now_ns());
                        i += 1;
                    }
                }
                Some(offset) => {
                    let due = start + Duration::from_nanos(offset);
                    let now = Instant::now();
                    if due > now {
                        thread::sleep(due - now);
                    }
                    let _ = writeln!(buf, "t={} n={i}", now_ns());
                    i += 1;
                }
            }
            if f.write_all(buf.as_bytes()).is_err() {
                break;
            }
        }
        start.elapsed()
    })
}
