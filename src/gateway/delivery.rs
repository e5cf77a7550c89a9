//! Delivery: which readings go from the spool into the outbox, in what order and when.
//!
//! The spool stores every reading and returns its seq; the outbox holds what the socket will
//! send next. [`Delivery`] keeps the cursor between them (`next_send`), the retransmit clock,
//! and the replay pace (`[spool] replay_max_per_s`). It sees the spool only through a
//! [`SpoolView`] and asks for reads with [`Effect::ReadSpool`]; the interpreter does the I/O
//! and reports back with [`Delivery::replayed`].
//!
//! It also judges acks ([`Delivery::accept_ack`]): an ack deletes readings from the spool, so
//! one above what was really sent on the current connection is refused.

use super::effect::{Effect, Effects, TimerId};
use crate::limit::{LogLimiter, RateLimiter};
use crate::spool::SpoolConfig;
use std::time::{Duration, Instant};

/// Readings moved from the spool into the outbox per step (and per paced-replay timer).
pub const REPLAY_BATCH: usize = 256;

/// Repeat period of the "readings faster than replay_max_per_s" warning.
const PACE_WARN_EVERY: Duration = Duration::from_secs(3600);

/// What delivery needs to know of the spool at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolView {
    /// The oldest stored reading not acked yet.
    pub first_unacked: Option<u64>,
    /// The seq the next appended reading gets.
    pub next_seq: u64,
    /// Readings below this seq are on disk and may be sent ([`Spool::sendable_end`]): under
    /// `fsync = "always"` a reading waits for its `fdatasync` before it is queued.
    ///
    /// [`Spool::sendable_end`]: crate::spool::Spool::sendable_end
    pub sendable_end: u64,
}

impl SpoolView {
    /// The lowest seq the gateway may still send; everything below is acked or dropped.
    pub fn resume_seq(&self) -> u64 {
        self.first_unacked.unwrap_or(self.next_seq)
    }
}

/// The delivery state machine (see the module doc).
#[derive(Debug)]
pub struct Delivery {
    /// The next seq to move from the spool into the outbox.
    next_send: u64,
    /// The backend connection is up: only then are unacked readings resent.
    connected: bool,
    /// `[spool] retransmit_s`.
    retransmit: Duration,
    /// When the ack last advanced, readings were last rewound, or a reading was queued while
    /// none was outstanding: the start of the `retransmit_s` wait.
    ack_progress: Instant,
    /// `[spool] replay_max_per_s` as a token bucket (None: no limit).
    replay: Option<RateLimiter>,
    replay_max_per_s: u32,
    /// A [`TimerId::Replay`] timer is armed.
    replay_armed: bool,
    /// A [`Effect::ReadSpool`] was issued and not yet answered.
    read_pending: bool,
    /// Readings stored so far, and at the start of the current pace interval.
    stored: u64,
    ingest_mark: (Instant, u64),
    /// When the pace warning was last logged.
    pace_warned: Option<Instant>,
    /// `resume_seq - 1` as announced in the current connection's hello: an ack up to it is
    /// the answer to the hello.
    ack_floor: u64,
    bad_ack_log: LogLimiter,
    /// Times unacked readings were sent again.
    pub retransmits: u64,
}

impl Delivery {
    /// Starts with the cursor at the oldest unacked reading.
    pub fn new(cfg: &SpoolConfig, view: SpoolView, now: Instant) -> Delivery {
        // Burst: a tenth of a second's worth (at least one batch, or the rate if smaller).
        let replay = match cfg.replay_max_per_s {
            0 => None,
            rate => Some(RateLimiter::with_burst(
                rate,
                (rate / 10).max(rate.min(REPLAY_BATCH as u32)),
                now,
            )),
        };
        Delivery {
            next_send: view.resume_seq(),
            connected: false,
            retransmit: Duration::from_secs(cfg.retransmit_s),
            ack_progress: now,
            replay,
            replay_max_per_s: cfg.replay_max_per_s,
            replay_armed: false,
            read_pending: false,
            stored: 0,
            ingest_mark: (now, 0),
            pace_warned: None,
            ack_floor: view.resume_seq().saturating_sub(1),
            bad_ack_log: LogLimiter::default(),
            retransmits: 0,
        }
    }

    /// The next seq to move from the spool into the outbox.
    pub fn next_send(&self) -> u64 {
        self.next_send
    }

    /// Whether every sendable reading (below `sendable_end`) was moved into the outbox: then
    /// [`Delivery::fill`] has nothing to do.
    pub fn caught_up(&self, sendable_end: u64) -> bool {
        self.next_send >= sendable_end
    }

    /// Whether the backend connection is up, as last reported.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// A reading was stored as `seq`. True: it is sendable already and nothing older waits in
    /// the spool, so it may go straight into the outbox without being read back from disk;
    /// report that with [`Delivery::direct_pushed`]. False under `fsync = "always"` until its
    /// sync is done: [`Delivery::fill`] then reads it back.
    pub fn on_stored(&mut self, seq: u64, view: SpoolView, now: Instant) -> bool {
        self.stored += 1;
        seq < view.sendable_end && self.may_go_direct(seq, view, now)
    }

    /// Reading `seq` got its seq but is not on disk (file system full). True: it is next in
    /// line on a live connection, so it may still go out from memory (report that with
    /// [`Delivery::direct_pushed`]); otherwise call [`Delivery::skip_unstored`].
    pub fn on_unstored(&mut self, seq: u64, view: SpoolView, now: Instant) -> bool {
        self.connected && self.may_go_direct(seq, view, now)
    }

    /// Reading `seq` is neither on disk nor in the outbox: never wait for it.
    pub fn skip_unstored(&mut self, seq: u64) {
        self.move_past(seq);
    }

    /// The reading `seq` offered by [`Delivery::on_stored`] is in the outbox.
    pub fn direct_pushed(&mut self, seq: u64) {
        self.move_past(seq);
    }

    /// True when `seq` is next in line and no spool read is pending: it may skip the spool
    /// read-back (its retransmit clock starts now if nothing older waits for an ack).
    fn may_go_direct(&mut self, seq: u64, view: SpoolView, now: Instant) -> bool {
        if self.next_send == seq && !self.read_pending {
            self.start_retransmit_clock(seq, view, now);
            true
        } else {
            false
        }
    }

    /// `seq` will never be read from the spool for sending: the next one is.
    fn move_past(&mut self, seq: u64) {
        if self.next_send == seq {
            self.next_send = seq + 1;
        }
    }

    /// Moves readings from the spool into the outbox while it has `room`, in seq order,
    /// within the replay pace.
    pub fn fill(&mut self, view: SpoolView, room: usize, now: Instant, fx: &mut Effects) {
        if room == 0 || self.read_pending || self.next_send >= view.sendable_end {
            return;
        }
        let mut want = room.min(REPLAY_BATCH);
        if let Some(limit) = &mut self.replay {
            let available = limit.available(now);
            if available == 0 {
                if !self.replay_armed {
                    let delay = limit.time_until(REPLAY_BATCH).max(Duration::from_millis(1));
                    self.replay_armed = true;
                    fx.push(Effect::Arm(TimerId::Replay, now + delay));
                }
                return;
            }
            want = want.min(available);
            limit.take(want);
        }
        self.start_retransmit_clock(self.next_send, view, now);
        self.read_pending = true;
        fx.push(Effect::ReadSpool {
            from: self.next_send,
            max: want,
        });
    }

    /// The answer to [`Effect::ReadSpool`] (a read below `view.sendable_end`): `next` is the
    /// seq after the last reading queued, `None` when nothing sendable from the requested seq
    /// on was left (acked or dropped meanwhile).
    pub fn replayed(&mut self, next: Option<u64>, view: SpoolView) {
        self.read_pending = false;
        self.next_send = match next {
            Some(n) => n.max(self.next_send),
            None => view.sendable_end.max(self.next_send),
        };
    }

    /// [`Effect::ReadSpool`] failed: nothing was queued; the next fill tries again.
    pub fn read_failed(&mut self) {
        self.read_pending = false;
    }

    /// The [`TimerId::Replay`] timer fired: continue the paced replay.
    pub fn on_replay_timer(
        &mut self,
        view: SpoolView,
        room: usize,
        now: Instant,
        fx: &mut Effects,
    ) {
        self.replay_armed = false;
        self.fill(view, room, now, fx);
    }

    /// The backend connection is up: unacked readings go again, in order.
    /// `view` is the state the connection's hello announces.
    pub fn on_connected(&mut self, view: SpoolView, now: Instant, fx: &mut Effects) {
        self.connected = true;
        self.ack_floor = view.resume_seq().saturating_sub(1);
        self.rewind(view, now, fx);
    }

    /// The backend connection is down: nothing is resent until it is back.
    pub fn on_disconnected(&mut self) {
        self.connected = false;
    }

    /// Whether an ack of `seq` may be applied. It may cover what was really sent on the
    /// current connection: up to the highest reading seq handed to libzmq on it
    /// (`highest_sent`, 0 for none), or up to `resume_seq - 1` as the connection's hello or
    /// the spool now says (below that everything is acked or dropped: such an ack changes
    /// nothing). A higher ack would delete readings the backend never got: it is refused,
    /// logged (rate-limited) and changes nothing; the caller counts it.
    pub fn accept_ack(
        &mut self,
        seq: u64,
        view: SpoolView,
        highest_sent: u64,
        now: Instant,
    ) -> bool {
        let limit = self
            .ack_floor
            .max(view.resume_seq().saturating_sub(1))
            .max(highest_sent);
        if seq <= limit {
            return true;
        }
        if self.bad_ack_log.allow_at("bad ack", now) {
            log::warn!(
                "ack seq={seq} refused: above the highest seq sent on this connection \
                 limit={limit}; nothing acknowledged (a backend must ack only readings it \
                 received, see docs/protocol.md)"
            );
        }
        false
    }

    /// The backend acked `newly_acked` more readings.
    pub fn on_acked(&mut self, newly_acked: u64, now: Instant) {
        if newly_acked > 0 {
            self.ack_progress = now;
        }
    }

    /// From the retransmit timer: while connected, when readings were sent and no ack came
    /// for `retransmit_s`, the unacked ones are sent again. True when it rewound.
    pub fn on_retransmit_timer(&mut self, view: SpoolView, now: Instant, fx: &mut Effects) -> bool {
        let unacked_sent = view
            .first_unacked
            .is_some_and(|first| first < self.next_send);
        let quiet = now.saturating_duration_since(self.ack_progress) >= self.retransmit;
        if !(self.connected && unacked_sent && quiet) {
            return false;
        }
        self.retransmits += 1;
        log::info!(
            "no ack for {} s: resending unacked readings from seq={}",
            self.retransmit.as_secs(),
            view.resume_seq()
        );
        self.rewind(view, now, fx);
        true
    }

    /// Sends unacked readings again from the oldest, in seq order: queued readings leave the
    /// outbox first so that nothing is reordered.
    fn rewind(&mut self, view: SpoolView, now: Instant, fx: &mut Effects) {
        fx.push(Effect::DropQueuedReadings);
        self.next_send = view.resume_seq();
        self.read_pending = false;
        self.ack_progress = now;
        fx.push(Effect::Fill);
    }

    /// Readings from `from` on are about to be queued for sending. If no earlier reading is
    /// unacked, nothing was outstanding until now: the `retransmit_s` wait starts here, not
    /// at the last ack (which may be long ago: an idle gateway would otherwise resend a new
    /// reading at the next retransmit check, before the backend had `retransmit_s` to ack it).
    fn start_retransmit_clock(&mut self, from: u64, view: SpoolView, now: Instant) {
        if view.first_unacked.map_or(true, |first| first >= from) {
            self.ack_progress = now;
        }
    }

    /// From the stats timer: warns when readings arrived, over the last interval, at least
    /// as fast as `[spool] replay_max_per_s` lets them out of the spool. Then a backlog (after
    /// any outage) can never shrink: every new reading queues behind it. Logged once, then at
    /// most once an hour while it lasts. True when it warned.
    pub fn check_replay_pace(&mut self, view: SpoolView, now: Instant) -> bool {
        let (t0, r0) = std::mem::replace(&mut self.ingest_mark, (now, self.stored));
        let limit = self.replay_max_per_s;
        let secs = now.saturating_duration_since(t0).as_secs_f64();
        if limit == 0 || secs <= 0.0 {
            return false;
        }
        let rate = (self.stored - r0) as f64 / secs;
        if rate < f64::from(limit)
            || self
                .pace_warned
                .is_some_and(|t| now.saturating_duration_since(t) < PACE_WARN_EVERY)
        {
            return false;
        }
        self.pace_warned = Some(now);
        log::warn!(
            "readings arrive at {rate:.0}/s, at least [spool] replay_max_per_s = {limit}: a \
             backlog (now {} readings) cannot drain; set replay_max_per_s well above the \
             reading rate, or 0 for no limit",
            view.next_seq.saturating_sub(self.next_send)
        );
        true
    }
}

#[cfg(test)]
mod ack_tests;

#[cfg(test)]
mod tests {
    use super::*;

    const RETRANSMIT_S: u64 = 30;

    fn cfg(replay_max_per_s: u32) -> SpoolConfig {
        SpoolConfig {
            retransmit_s: RETRANSMIT_S,
            replay_max_per_s,
            ..SpoolConfig::default()
        }
    }

    fn view(first_unacked: Option<u64>, next_seq: u64) -> SpoolView {
        SpoolView {
            first_unacked,
            next_seq,
            sendable_end: next_seq,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Stores readings 1..=n and pushes each directly, as the interpreter does.
    fn store_direct(d: &mut Delivery, n: u64, now: Instant) {
        for seq in 1..=n {
            assert!(d.on_stored(seq, view(Some(1), seq + 1), now), "seq {seq}");
            d.direct_pushed(seq);
        }
    }

    #[test]
    fn new_readings_go_direct_while_nothing_waits() {
        let t0 = Instant::now();
        let mut d = Delivery::new(&cfg(0), view(None, 1), t0);
        store_direct(&mut d, 3, t0);
        assert_eq!(d.next_send(), 4);
        // An outbox that was full: seq 4 stays in the spool; seq 5 must queue behind it.
        assert!(d.on_stored(4, view(Some(1), 5), t0));
        assert!(!d.on_stored(5, view(Some(1), 6), t0));
        let mut fx = Effects::default();
        d.fill(view(Some(1), 6), 10, t0, &mut fx);
        assert_eq!(fx.drain(), vec![Effect::ReadSpool { from: 4, max: 10 }]);
        // No second read while the first is unanswered, and no direct push either.
        d.fill(view(Some(1), 6), 10, t0, &mut fx);
        assert!(fx.is_empty());
        assert!(!d.on_stored(6, view(Some(1), 7), t0));
        d.replayed(Some(7), view(Some(1), 7));
        assert_eq!(d.next_send(), 7);
        assert!(d.on_stored(7, view(Some(1), 8), t0));
    }

    #[test]
    fn readings_not_yet_durable_wait_for_their_sync() {
        let t0 = Instant::now();
        let mut d = Delivery::new(&cfg(0), view(None, 1), t0);
        let unsynced = |first, next, end| SpoolView {
            sendable_end: end,
            ..view(first, next)
        };
        // fsync = "always": seqs 1 and 2 are written, their sync has not returned.
        assert!(!d.on_stored(1, unsynced(Some(1), 2, 1), t0));
        assert!(!d.on_stored(2, unsynced(Some(1), 3, 1), t0));
        let mut fx = Effects::default();
        d.fill(unsynced(Some(1), 3, 1), 10, t0, &mut fx);
        assert!(fx.is_empty(), "nothing sendable yet");
        assert!(d.caught_up(1));
        // The sync covered seq 1 only: one is read back, up to the sendable end.
        d.fill(unsynced(Some(1), 3, 2), 10, t0, &mut fx);
        assert_eq!(fx.drain(), vec![Effect::ReadSpool { from: 1, max: 10 }]);
        d.replayed(Some(2), unsynced(Some(1), 3, 2));
        assert_eq!(d.next_send(), 2);
        // Seq 2 was dropped meanwhile: the read finds nothing below the end.
        d.fill(unsynced(Some(1), 3, 3), 10, t0, &mut fx);
        fx.drain();
        d.replayed(None, unsynced(Some(1), 3, 3));
        assert_eq!(d.next_send(), 3);
    }

    #[test]
    fn fill_skips_to_the_end_when_nothing_is_left() {
        let t0 = Instant::now();
        let mut d = Delivery::new(&cfg(0), view(Some(5), 9), t0);
        let mut fx = Effects::default();
        d.fill(view(Some(5), 9), 0, t0, &mut fx);
        assert!(fx.is_empty(), "no room: no read");
        d.fill(view(Some(5), 9), 1000, t0, &mut fx);
        assert_eq!(
            fx.drain(),
            vec![Effect::ReadSpool {
                from: 5,
                max: REPLAY_BATCH
            }]
        );
        d.replayed(None, view(None, 9));
        assert_eq!(d.next_send(), 9);
    }

    #[test]
    fn connect_rewinds_to_the_oldest_unacked() {
        let t0 = Instant::now();
        let mut d = Delivery::new(&cfg(0), view(None, 1), t0);
        store_direct(&mut d, 5, t0);
        let mut fx = Effects::default();
        d.on_connected(view(Some(3), 6), t0, &mut fx);
        assert_eq!(fx.drain(), vec![Effect::DropQueuedReadings, Effect::Fill]);
        assert_eq!(d.next_send(), 3);
    }

    #[test]
    fn retransmits_after_retransmit_s_without_ack() {
        let t0 = Instant::now();
        let mut d = Delivery::new(&cfg(0), view(None, 1), t0);
        let mut fx = Effects::default();
        d.on_connected(view(None, 1), t0, &mut fx);
        fx.drain();
        store_direct(&mut d, 3, t0);
        let v = view(Some(1), 4);
        // An ack of part of it restarts the wait.
        d.on_acked(0, t0 + secs(10));
        d.on_acked(1, t0 + secs(20));
        assert!(!d.on_retransmit_timer(view(Some(2), 4), t0 + secs(RETRANSMIT_S), &mut fx));
        assert!(fx.is_empty());
        assert!(d.on_retransmit_timer(v, t0 + secs(20 + RETRANSMIT_S), &mut fx));
        assert_eq!(fx.drain(), vec![Effect::DropQueuedReadings, Effect::Fill]);
        assert_eq!(d.retransmits, 1);
        assert_eq!(d.next_send(), 1);
    }

    /// During an outage nothing is resent: no outbox rebuild from disk, no count.
    #[test]
    fn no_retransmit_while_disconnected() {
        let t0 = Instant::now();
        let mut d = Delivery::new(&cfg(0), view(None, 1), t0);
        let mut fx = Effects::default();
        d.on_connected(view(None, 1), t0, &mut fx);
        fx.drain();
        store_direct(&mut d, 3, t0);
        d.on_disconnected();
        for k in 1..10 {
            assert!(!d.on_retransmit_timer(view(Some(1), 4), t0 + secs(k * RETRANSMIT_S), &mut fx));
        }
        assert!(fx.is_empty(), "{:?}", fx.drain());
        assert_eq!(d.retransmits, 0);
        // Back online: the reconnect rewinds; the clock restarts there.
        let t1 = t0 + secs(10 * RETRANSMIT_S);
        d.on_connected(view(Some(1), 4), t1, &mut fx);
        fx.drain();
        assert!(!d.on_retransmit_timer(view(Some(1), 4), t1 + secs(1), &mut fx));
    }

    /// The wait starts when a reading is queued with nothing outstanding, not at the last ack
    /// (which may be long ago on an idle gateway).
    #[test]
    fn retransmit_clock_starts_when_idle_link_gets_a_reading() {
        let t0 = Instant::now();
        let mut d = Delivery::new(&cfg(0), view(None, 1), t0);
        let mut fx = Effects::default();
        d.on_connected(view(None, 1), t0, &mut fx);
        fx.drain();
        let t1 = t0 + secs(3600);
        assert!(d.on_stored(1, view(Some(1), 2), t1));
        d.direct_pushed(1);
        assert!(!d.on_retransmit_timer(view(Some(1), 2), t1 + secs(1), &mut fx));
        assert!(d.on_retransmit_timer(view(Some(1), 2), t1 + secs(RETRANSMIT_S), &mut fx));
    }

    #[test]
    fn paced_replay_arms_one_timer_then_continues() {
        let t0 = Instant::now();
        // 100/s: burst min(100, 256) = 100.
        let mut d = Delivery::new(&cfg(100), view(Some(1), 1001), t0);
        let mut fx = Effects::default();
        d.fill(view(Some(1), 1001), 1000, t0, &mut fx);
        assert_eq!(fx.drain(), vec![Effect::ReadSpool { from: 1, max: 100 }]);
        d.replayed(Some(101), view(Some(1), 1001));
        d.fill(view(Some(1), 1001), 1000, t0, &mut fx);
        let Some(Effect::Arm(TimerId::Replay, at)) = fx.pop() else {
            panic!("expected a replay timer");
        };
        assert_eq!(at, t0 + secs(1), "the burst (100 tokens) refills in 1 s");
        // Not armed twice.
        d.fill(view(Some(1), 1001), 1000, t0, &mut fx);
        assert!(fx.is_empty());
        d.on_replay_timer(view(Some(1), 1001), 1000, at, &mut fx);
        assert_eq!(
            fx.drain(),
            vec![Effect::ReadSpool {
                from: 101,
                max: 100
            }]
        );
    }

    #[test]
    fn pace_warning_when_readings_outrun_the_replay_limit() {
        let t0 = Instant::now();
        let mut d = Delivery::new(&cfg(10), view(None, 1), t0);
        for seq in 1..=100 {
            d.on_stored(seq, view(Some(1), seq + 1), t0);
        }
        // 100 readings in 60 s: 1.7/s, under 10/s.
        assert!(!d.check_replay_pace(view(Some(1), 101), t0 + secs(60)));
        for seq in 101..=1300 {
            d.on_stored(seq, view(Some(1), seq + 1), t0);
        }
        assert!(d.check_replay_pace(view(Some(1), 1301), t0 + secs(120)));
        for seq in 1301..=2500 {
            d.on_stored(seq, view(Some(1), seq + 1), t0);
        }
        // At most once an hour.
        assert!(!d.check_replay_pace(view(Some(1), 2501), t0 + secs(180)));
    }
}
