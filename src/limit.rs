//! Rate and log limiters. Both take `now` from the caller, so tests drive time by hand.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A token bucket: a burst of `capacity`, refilled at `rate` per second.
#[derive(Debug)]
pub struct RateLimiter {
    capacity: f64,
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// `per_second` tokens per second, with a burst of one second's worth.
    pub fn new(per_second: u32, now: Instant) -> RateLimiter {
        RateLimiter::with_burst(per_second, per_second, now)
    }

    /// `per_second` tokens per second, at most `burst` saved up (both at least 1).
    pub fn with_burst(per_second: u32, burst: u32, now: Instant) -> RateLimiter {
        let capacity = f64::from(burst.max(1));
        RateLimiter {
            capacity,
            rate: f64::from(per_second.max(1)),
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
    }

    /// Whole tokens available now.
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.tokens as usize
    }

    /// Spends `n` tokens (at most what [`RateLimiter::available`] returned).
    pub fn take(&mut self, n: usize) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }

    /// How long until `n` tokens (capped at the burst) are available.
    pub fn time_until(&self, n: usize) -> Duration {
        let want = (n as f64).min(self.capacity);
        Duration::from_secs_f64(((want - self.tokens) / self.rate).max(0.0))
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What a [`LogLimiter`] lets through at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log the line.
    Log,
    /// Log the line, after a summary: this many lines of the kind were suppressed in the
    /// window that just ended.
    LogAfter(u64),
    /// Suppress the line (it is counted for the next summary).
    Suppress,
}

/// Allows a burst of log lines per minute for one kind of problem, then summarises.
#[derive(Debug, Default)]
pub struct LogLimiter {
    window: Option<Instant>,
    count: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// Lines allowed per window.
    pub const BURST: u32 = 10;
    /// The window.
    pub const WINDOW: Duration = Duration::from_secs(60);

    /// Whether a line may be logged at `now`, and whether a summary of a suppressed stretch
    /// must come first.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let mut summary = 0;
        let expired = self
            .window
            .map_or(true, |w| now.saturating_duration_since(w) >= Self::WINDOW);
        if expired {
            summary = std::mem::take(&mut self.suppressed);
            self.window = Some(now);
            self.count = 0;
        }
        if self.count < Self::BURST {
            self.count += 1;
            if summary > 0 {
                Verdict::LogAfter(summary)
            } else {
                Verdict::Log
            }
        } else {
            self.suppressed += 1;
            Verdict::Suppress
        }
    }

    /// True when a line about `what` may be logged at `now`; logs the summary line of a
    /// suppressed stretch first.
    pub fn allow_at(&mut self, what: &str, now: Instant) -> bool {
        match self.check(now) {
            Verdict::Log => true,
            Verdict::LogAfter(n) => {
                log::warn!("{what}: suppressed={n} similar messages in the last minute");
                true
            }
            Verdict::Suppress => false,
        }
    }

    /// [`LogLimiter::allow_at`] with the current time.
    pub fn allow(&mut self, what: &str) -> bool {
        self.allow_at(what, Instant::now())
    }
}

/// One [`LogLimiter`] per kind of problem: a flood of one kind ("outbox full") never hides
/// another ("spool append failed"), and each summary line names its own kind.
#[derive(Debug, Default)]
pub struct LogLimits {
    kinds: HashMap<&'static str, LogLimiter>,
}

impl LogLimits {
    /// The verdict for one line of `kind` at `now` (see [`LogLimiter::check`]).
    pub fn check(&mut self, kind: &'static str, now: Instant) -> Verdict {
        self.kinds.entry(kind).or_default().check(now)
    }

    /// True when a line of `kind` may be logged at `now`; a summary line naming `kind` comes
    /// first after a suppressed stretch.
    pub fn allow(&mut self, kind: &'static str, now: Instant) -> bool {
        self.kinds.entry(kind).or_default().allow_at(kind, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_bursts_then_refills() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(20, t0);
        let burst = (0..50).filter(|_| r.try_take(t0)).count();
        assert_eq!(burst, 20);
        assert!(!r.try_take(t0 + Duration::from_millis(10)));
        // 20/s: one token every 50 ms.
        assert!(r.try_take(t0 + Duration::from_millis(60)));
        assert!(!r.try_take(t0 + Duration::from_millis(70)));
        // Never more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..50).filter(|_| r.try_take(later)).count(), 20);
    }

    /// The replay pace: a burst, then `rate` per second; `time_until` says when a batch is
    /// available.
    #[test]
    fn replay_limiter_paces_batches() {
        let t0 = Instant::now();
        let mut r = RateLimiter::with_burst(1000, 256, t0);
        assert_eq!(r.available(t0), 256);
        r.take(256);
        assert_eq!(r.available(t0), 0);
        let wait = r.time_until(256);
        assert!((wait.as_secs_f64() - 0.256).abs() < 1e-6, "{wait:?}");
        // 100 ms later: 100 tokens.
        assert_eq!(r.available(t0 + Duration::from_millis(100)), 100);
        r.take(40);
        assert_eq!(r.available(t0 + Duration::from_millis(100)), 60);
        // Capped at the burst; asking for more than the burst waits for the burst only.
        assert_eq!(r.available(t0 + Duration::from_secs(60)), 256);
        assert_eq!(r.time_until(10_000), Duration::ZERO);
        // Over 10 s at most burst + 10 × rate tokens are handed out.
        let mut total = 0;
        for ms in (0..=10_000).step_by(7) {
            let n = r.available(t0 + Duration::from_secs(60) + Duration::from_millis(ms));
            r.take(n);
            total += n;
        }
        assert!((10_000..=10_000 + 256).contains(&total), "{total}");
    }

    #[test]
    fn log_limiter_bursts_then_summarises() {
        let t0 = Instant::now();
        let mut l = LogLimiter::default();
        let allowed = (0..100)
            .filter(|_| l.check(t0) != Verdict::Suppress)
            .count();
        assert_eq!(allowed, LogLimiter::BURST as usize);
        // Still the same window.
        assert_eq!(l.check(t0 + Duration::from_secs(59)), Verdict::Suppress);
        // The next window opens with the count of what was suppressed.
        assert_eq!(l.check(t0 + Duration::from_secs(60)), Verdict::LogAfter(91));
        assert_eq!(l.check(t0 + Duration::from_secs(61)), Verdict::Log);
    }

    /// A flood of one kind leaves every other kind its own burst, and each kind's summary
    /// counts only its own suppressed lines.
    #[test]
    fn log_limits_are_per_kind() {
        let t0 = Instant::now();
        let mut l = LogLimits::default();
        for _ in 0..100 {
            l.check("outbox full", t0);
        }
        assert_eq!(l.check("outbox full", t0), Verdict::Suppress);
        assert_eq!(l.check("spool error", t0), Verdict::Log);
        for _ in 0..(LogLimiter::BURST + 2) {
            l.check("spool error", t0);
        }
        let t1 = t0 + LogLimiter::WINDOW;
        assert_eq!(l.check("outbox full", t1), Verdict::LogAfter(91));
        assert_eq!(l.check("spool error", t1), Verdict::LogAfter(3));
    }
}
