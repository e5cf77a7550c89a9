//! Is the wall clock right? The kernel knows whether NTP (or anything else that disciplines
//! the clock) has synchronised it; a Raspberry Pi has no real-time clock, so until then its
//! time is 1970 or fake-hwclock's last shutdown time.
//!
//! [`ClockStatus`] is the question, [`KernelClock`] the answer from `adjtimex(2)` (read-only:
//! `modes = 0`, allowed without privileges, no subprocess), [`ClockWatch`] asks at most once a
//! second. While the clock is not synchronised, readings carry `"clock": "unsynced"` and
//! `"mono_ms"` ([`boottime_ms`]), so a backend can re-date them later (docs/protocol.md,
//! "Honest timestamps").
//!
//! Timers never use the wall clock: every deadline in the gateway is an [`Instant`]
//! (CLOCK_MONOTONIC), and calloop's timers run on it too, so setting the clock (NTP's first
//! step, a manual `date -s`) neither fires nor stalls any of them.

use std::time::{Duration, Instant};

/// Tells whether the system's wall clock is synchronised.
pub trait ClockStatus {
    /// True when the wall clock is known to be right.
    fn is_synced(&mut self) -> bool;
}

/// The kernel's view: `adjtimex` returns a state other than `TIME_ERROR` and `STA_UNSYNC` is
/// clear. A failing call (a seccomp filter, say) counts as not synchronised: nothing says the
/// clock is right.
#[derive(Debug, Default)]
pub struct KernelClock {
    failed_logged: bool,
}

impl ClockStatus for KernelClock {
    fn is_synced(&mut self) -> bool {
        // SAFETY: timex is plain data; all-zero is a valid value and `modes = 0` only reads.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        // SAFETY: `tx` is a valid, writable timex for the duration of the call.
        let state = unsafe { libc::adjtimex(&mut tx) };
        if state < 0 {
            if !self.failed_logged {
                self.failed_logged = true;
                log::warn!(
                    "adjtimex failed error=\"{}\": the clock is reported as unsynced",
                    std::io::Error::last_os_error()
                );
            }
            return false;
        }
        state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0
    }
}

/// How often [`ClockWatch`] asks again.
pub const RECHECK: Duration = Duration::from_secs(1);

/// Caches a [`ClockStatus`] answer for [`RECHECK`].
pub struct ClockWatch {
    status: Box<dyn ClockStatus>,
    last: Option<(Instant, bool)>,
}

impl ClockWatch {
    /// Watches `status`.
    pub fn new(status: Box<dyn ClockStatus>) -> ClockWatch {
        ClockWatch { status, last: None }
    }

    /// Whether the clock is synchronised, asked again when the last answer is a second old.
    pub fn synced(&mut self, now: Instant) -> bool {
        match self.last {
            Some((at, synced)) if now.saturating_duration_since(at) < RECHECK => synced,
            _ => {
                let synced = self.status.is_synced();
                if let Some((_, was)) = self.last {
                    if was != synced {
                        log::info!(
                            "wall clock {}",
                            if synced {
                                "synchronised"
                            } else {
                                "no longer synchronised"
                            }
                        );
                    }
                }
                self.last = Some((now, synced));
                synced
            }
        }
    }
}

impl Default for ClockWatch {
    fn default() -> Self {
        ClockWatch::new(Box::<KernelClock>::default())
    }
}

/// `"synced"` or `"unsynced"`, as messages say it.
pub fn clock_word(synced: bool) -> &'static str {
    if synced {
        "synced"
    } else {
        "unsynced"
    }
}

/// CLOCK_BOOTTIME in ms: time since boot, suspend included; never set, never jumps.
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every Linux
    // since 2.6.39.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Where the kernel publishes the boot's random id.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// This boot's id (a UUID, new at every boot), or `""` when it cannot be read.
pub fn boot_id() -> String {
    match std::fs::read_to_string(BOOT_ID_PATH) {
        Ok(s) => s.trim().to_string(),
        Err(e) => {
            log::warn!("cannot read {BOOT_ID_PATH} error=\"{e}\": boot_id is sent empty");
            String::new()
        }
    }
}

/// A clock status driven by a test; counts the questions.
#[cfg(test)]
pub(crate) struct Fake {
    pub synced: std::rc::Rc<std::cell::Cell<bool>>,
    pub asked: std::rc::Rc<std::cell::Cell<u32>>,
}

#[cfg(test)]
impl ClockStatus for Fake {
    fn is_synced(&mut self) -> bool {
        self.asked.set(self.asked.get() + 1);
        self.synced.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn asks_at_most_once_a_second() {
        let (synced, asked) = (Rc::new(Cell::new(false)), Rc::new(Cell::new(0)));
        let mut w = ClockWatch::new(Box::new(Fake {
            synced: synced.clone(),
            asked: asked.clone(),
        }));
        let t0 = Instant::now();
        assert!(!w.synced(t0));
        synced.set(true);
        assert!(!w.synced(t0 + Duration::from_millis(999)), "cached");
        assert_eq!(asked.get(), 1);
        assert!(w.synced(t0 + Duration::from_millis(1000)));
        assert_eq!(asked.get(), 2);
    }

    #[test]
    fn kernel_clock_and_boottime_answer() {
        // Whatever this machine's clock is, the call works and boottime moves forward.
        let _ = KernelClock::default().is_synced();
        let a = boottime_ms();
        assert!(a > 0);
        assert!(boottime_ms() >= a);
        let id = boot_id();
        assert_eq!(id.len(), 36, "{id:?}");
    }
}
