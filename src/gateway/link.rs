//! The backend link as the gateway sees it: connected or not, heard or not, and the
//! connection checks.
//!
//! The socket and its monitor live in [`crate::sources::zmq`]; this machine takes their
//! events. While no connection is reported it keeps one [`TimerId::ConnCheck`] armed (1 s,
//! doubling up to 30 s) whose expiry asks for [`Effect::CheckConnection`]: the source then
//! reconnects if libzmq gave up after a protocol error, and reports a connection whose
//! handshake event was lost.
//!
//! A completed handshake does not prove that the backend hears the gateway: a backend ROUTER
//! without `ZMQ_ROUTER_HANDOVER` that still holds this routing id for an old connection
//! silently ignores the new one. So after each connection's `hello` the link waits
//! `[backend] hello_timeout_s` ([`TimerId::HelloTimeout`]) for any message from the backend
//! ([`Link::on_heard`]). Nothing heard: the connection is counted
//! ([`Link::unheard_connections`]), a warning names the likely causes, and the connection is
//! made again ([`Effect::Reconnect`]): at once the first time, then no sooner than
//! [`FORCED_RECONNECT_MIN`] after the previous forced reconnect, doubling up to
//! [`FORCED_RECONNECT_MAX`] ([`TimerId::Reconnect`]), until a connection is heard.
//! Once connected and heard, no timer of the link runs (idle cost).
//!
//! [`Link::check_unheard`], called from a periodic timer, warns now and then while the
//! backend has not been heard for [`UNHEARD_WARN_AFTER`] although it should have been (the
//! link is down, or readings wait for an ack).

use super::effect::{Effect, Effects, TimerId};
use crate::limit::LogLimits;
use std::time::{Duration, Instant};

/// First delay of the connection check.
pub const CONN_CHECK_MIN: Duration = Duration::from_secs(1);
/// Longest delay of the connection check.
pub const CONN_CHECK_MAX: Duration = Duration::from_secs(30);
/// Least time between the first two forced reconnects of unheard connections.
pub const FORCED_RECONNECT_MIN: Duration = Duration::from_secs(10);
/// Longest time between two forced reconnects of unheard connections.
pub const FORCED_RECONNECT_MAX: Duration = Duration::from_secs(300);
/// How long the backend may stay unheard, while it should be heard, before a warning.
pub const UNHEARD_WARN_AFTER: Duration = Duration::from_secs(60);
/// Least time between two "backend not heard" warnings.
pub const UNHEARD_WARN_EVERY: Duration = Duration::from_secs(300);

/// The link state machine (see the module doc).
#[derive(Debug)]
pub struct Link {
    endpoint: String,
    curve: bool,
    connected: bool,
    /// Delay of the next connection check; doubles while no handshake succeeds.
    check_delay: Duration,
    check_armed: bool,
    /// `[backend] hello_timeout_s`.
    hello_timeout: Duration,
    /// The current connection's hello was queued and nothing was heard since: the
    /// [`TimerId::HelloTimeout`] timer runs.
    awaiting_answer: bool,
    /// A [`TimerId::Reconnect`] timer is armed.
    reconnect_armed: bool,
    /// The earliest time of the next forced reconnect (`None`: at once).
    next_forced_at: Option<Instant>,
    /// Least gap after the next forced reconnect; doubles with each one.
    forced_backoff: Duration,
    /// A forced reconnect was asked for and its disconnect not reported yet.
    forcing: bool,
    /// When the gateway started waiting for the link ([`Link::start`]).
    started: Option<Instant>,
    /// When the backend was last heard.
    last_heard: Option<Instant>,
    /// Since when the backend should be heard (the link went down, or a check found
    /// readings waiting); `None` while it need not be.
    due_since: Option<Instant>,
    /// When the "backend not heard" warning was last logged (`None`: not since last heard).
    unheard_warned: Option<Instant>,
    logs: LogLimits,
    /// Handshakes reported since start.
    pub connects: u64,
    /// Handshakes after the first.
    pub reconnects: u64,
    /// Connections on which nothing was heard within `hello_timeout_s` of the hello.
    pub unheard_connections: u64,
}

impl Link {
    /// A link to `endpoint` (`curve`: the link is encrypted; used in hints) that waits
    /// `hello_timeout` after each hello for the backend to be heard.
    pub fn new(endpoint: &str, curve: bool, hello_timeout: Duration) -> Link {
        Link {
            endpoint: endpoint.to_string(),
            curve,
            connected: false,
            check_delay: CONN_CHECK_MIN,
            check_armed: false,
            hello_timeout,
            awaiting_answer: false,
            reconnect_armed: false,
            next_forced_at: None,
            forced_backoff: FORCED_RECONNECT_MIN,
            forcing: false,
            started: None,
            last_heard: None,
            due_since: None,
            unheard_warned: None,
            logs: LogLimits::default(),
            connects: 0,
            reconnects: 0,
            unheard_connections: 0,
        }
    }

    /// Whether a handshake was reported and no disconnect since.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// When the backend was last heard (`None`: never since start).
    pub fn last_heard(&self) -> Option<Instant> {
        self.last_heard
    }

    /// At start: check the connection until the first handshake is reported.
    pub fn start(&mut self, now: Instant, fx: &mut Effects) {
        self.started = Some(now);
        self.due_since = Some(now);
        self.arm_check(now, fx);
    }

    fn arm_check(&mut self, now: Instant, fx: &mut Effects) {
        let delay = self.check_delay;
        self.check_delay = (delay * 2).min(CONN_CHECK_MAX);
        self.check_armed = true;
        fx.push(Effect::Arm(TimerId::ConnCheck, now + delay));
    }

    /// A handshake succeeded: the `hello` goes first (delivery rewinds behind it), and the
    /// wait for the backend's answer starts.
    pub fn on_connected(&mut self, now: Instant, fx: &mut Effects) {
        self.connected = true;
        self.forcing = false;
        self.connects += 1;
        if self.connects > 1 {
            self.reconnects += 1;
        }
        self.check_delay = CONN_CHECK_MIN;
        if std::mem::take(&mut self.check_armed) {
            fx.push(Effect::Cancel(TimerId::ConnCheck));
        }
        log::info!(
            "backend connected endpoint={} connects={}",
            self.endpoint,
            self.connects
        );
        fx.push(Effect::Hello);
        self.awaiting_answer = true;
        fx.push(Effect::Arm(TimerId::HelloTimeout, now + self.hello_timeout));
    }

    /// Any message arrived from the backend (an ack, a command, anything): the connection
    /// works. Called for every incoming message, so it only writes a few fields unless
    /// something was waiting for it.
    pub fn on_heard(&mut self, now: Instant, fx: &mut Effects) {
        let before = self.last_heard.replace(now).or(self.started);
        if self.unheard_warned.take().is_some() {
            let quiet = before.map_or(0, |t| now.saturating_duration_since(t).as_secs());
            log::info!(
                "backend heard again after {quiet} s endpoint={}",
                self.endpoint
            );
        }
        if std::mem::take(&mut self.awaiting_answer) {
            fx.push(Effect::Cancel(TimerId::HelloTimeout));
        }
        if std::mem::take(&mut self.reconnect_armed) {
            fx.push(Effect::Cancel(TimerId::Reconnect));
        }
        self.next_forced_at = None;
        self.forced_backoff = FORCED_RECONNECT_MIN;
    }

    /// The connection went down.
    pub fn on_disconnected(&mut self, now: Instant, fx: &mut Effects) {
        self.connected = false;
        self.due_since.get_or_insert(now);
        // Whatever waited for this connection is moot: libzmq reconnects by itself, and the
        // next connection gets its own hello and wait.
        if std::mem::take(&mut self.awaiting_answer) {
            fx.push(Effect::Cancel(TimerId::HelloTimeout));
        }
        if std::mem::take(&mut self.reconnect_armed) {
            fx.push(Effect::Cancel(TimerId::Reconnect));
        }
        // Rate-limited: a failing handshake (e.g. a wrong key) disconnects repeatedly. A
        // forced reconnect was already logged as such.
        if !std::mem::take(&mut self.forcing) && self.logs.allow("backend disconnected", now) {
            log::warn!("backend disconnected endpoint={}", self.endpoint);
        }
        // libzmq does not retry after a protocol error (e.g. an oversized frame): check a
        // little later and reconnect if it gave up.
        if !self.check_armed {
            self.arm_check(now, fx);
        }
    }

    /// A handshake failed (`why` from the monitor).
    pub fn on_handshake_failed(&mut self, why: &str, now: Instant) {
        if self.logs.allow("backend handshake failed", now) {
            let hint = if self.curve {
                "; check that backend.server_public_key is the backend's public key, that the \
                 backend has CURVE on, and that this gateway's public key is in the backend's \
                 allow list as <gateway id>.pub"
            } else {
                "; this gateway has no CURVE keys: if the backend uses CURVE, set \
                 backend.server_public_key and backend.secret_key_file"
            };
            log::error!("backend handshake failed: {why}{hint}");
        }
    }

    /// The [`TimerId::ConnCheck`] timer fired: ask for a check, and check again later while
    /// no connection is reported.
    pub fn on_check_timer(&mut self, now: Instant, fx: &mut Effects) {
        self.check_armed = false;
        fx.push(Effect::CheckConnection);
        if !self.connected {
            self.arm_check(now, fx);
        }
    }

    /// The [`TimerId::HelloTimeout`] timer fired: nothing was heard on this connection since
    /// its hello. Counts it, warns, and makes the connection again when the backoff allows.
    pub fn on_hello_timer(&mut self, now: Instant, fx: &mut Effects) {
        if !std::mem::take(&mut self.awaiting_answer) || !self.connected {
            return;
        }
        self.unheard_connections += 1;
        let at = self.next_forced_at.filter(|&t| t > now);
        if self.logs.allow("backend unheard", now) {
            let when = at.map_or_else(
                || "now".to_string(),
                |t| format!("in {} s", (t - now).as_secs_f64().ceil() as u64),
            );
            log::warn!(
                "backend not heard within hello_timeout_s={} of the hello endpoint={} \
                 unheard_connections={}: treating the connection as not working, reconnecting \
                 {when}. Likely causes: the backend's ROUTER still holds this gateway's routing \
                 id for an old connection and does not set ZMQ_ROUTER_HANDOVER (the new \
                 connection is ignored), or the backend does not answer hello (it must ack \
                 resume_seq - 1 at once); see docs/protocol.md, \"What a backend must do\"",
                self.hello_timeout.as_secs(),
                self.endpoint,
                self.unheard_connections
            );
        }
        match at {
            Some(at) => {
                self.reconnect_armed = true;
                fx.push(Effect::Arm(TimerId::Reconnect, at));
            }
            None => self.force_reconnect(now, fx),
        }
    }

    /// The [`TimerId::Reconnect`] timer fired: the backoff allows the reconnect now.
    pub fn on_reconnect_timer(&mut self, now: Instant, fx: &mut Effects) {
        if std::mem::take(&mut self.reconnect_armed) && self.connected {
            self.force_reconnect(now, fx);
        }
    }

    fn force_reconnect(&mut self, now: Instant, fx: &mut Effects) {
        self.forcing = true;
        self.next_forced_at = Some(now + self.forced_backoff);
        self.forced_backoff = (self.forced_backoff * 2).min(FORCED_RECONNECT_MAX);
        fx.push(Effect::Reconnect);
    }

    /// From a periodic timer: warns, at most every [`UNHEARD_WARN_EVERY`], while the backend
    /// should be heard (the link is down, or `waiting` readings wait for an ack) and has not
    /// been for [`UNHEARD_WARN_AFTER`]. The warning says how long since it was last heard
    /// and how many readings wait. True when it warned.
    pub fn check_unheard(&mut self, waiting: u64, now: Instant) -> bool {
        if self.connected && waiting == 0 {
            // A quiet backend with nothing to acknowledge is fine.
            self.due_since = None;
            return false;
        }
        let due_since = *self.due_since.get_or_insert(now);
        let heard_at = self.last_heard.or(self.started).unwrap_or(due_since);
        let quiet = now.saturating_duration_since(heard_at.max(due_since));
        let recently_warned = self
            .unheard_warned
            .is_some_and(|t| now.saturating_duration_since(t) < UNHEARD_WARN_EVERY);
        if quiet < UNHEARD_WARN_AFTER || recently_warned {
            return false;
        }
        self.unheard_warned = Some(now);
        let link = if self.connected {
            "connected"
        } else {
            "not connected"
        };
        match self.last_heard {
            Some(t) => log::warn!(
                "backend not heard for {} s endpoint={} link={link} readings_waiting={waiting}",
                now.saturating_duration_since(t).as_secs(),
                self.endpoint
            ),
            None => log::warn!(
                "backend never heard since start ({} s ago) endpoint={} link={link} \
                 readings_waiting={waiting}",
                now.saturating_duration_since(heard_at).as_secs(),
                self.endpoint
            ),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn link() -> Link {
        Link::new("tcp://127.0.0.1:1", false, HELLO_TIMEOUT)
    }

    #[test]
    fn checks_back_off_until_connected_then_stop() {
        let t0 = Instant::now();
        let mut l = link();
        let mut fx = Effects::default();
        l.start(t0, &mut fx);
        assert_eq!(fx.drain(), vec![Effect::Arm(TimerId::ConnCheck, t0 + s(1))]);
        let mut t = t0 + s(1);
        for delay in [2, 4, 8, 16, 30, 30] {
            l.on_check_timer(t, &mut fx);
            assert_eq!(
                fx.drain(),
                vec![
                    Effect::CheckConnection,
                    Effect::Arm(TimerId::ConnCheck, t + s(delay))
                ]
            );
            t += s(delay);
        }
        l.on_connected(t, &mut fx);
        assert_eq!(
            fx.drain(),
            vec![
                Effect::Cancel(TimerId::ConnCheck),
                Effect::Hello,
                Effect::Arm(TimerId::HelloTimeout, t + HELLO_TIMEOUT)
            ]
        );
        assert_eq!((l.connects, l.reconnects), (1, 0));
        // A lost connection checks from 1 s again; a reconnect counts.
        l.on_disconnected(t, &mut fx);
        assert_eq!(
            fx.drain(),
            vec![
                Effect::Cancel(TimerId::HelloTimeout),
                Effect::Arm(TimerId::ConnCheck, t + s(1))
            ]
        );
        l.on_disconnected(t, &mut fx);
        assert!(fx.is_empty(), "one check timer at a time");
        l.on_connected(t, &mut fx);
        fx.drain();
        assert_eq!((l.connects, l.reconnects), (2, 1));
        // A check timer that fires while connected asks once and stops.
        l.on_check_timer(t, &mut fx);
        assert_eq!(fx.drain(), vec![Effect::CheckConnection]);
    }

    /// Any message within hello_timeout_s of the hello ends the wait: no timer is left, no
    /// reconnect, nothing counted.
    #[test]
    fn a_connection_heard_in_time_is_left_alone() {
        let t0 = Instant::now();
        let mut l = link();
        let mut fx = Effects::default();
        l.start(t0, &mut fx);
        l.on_connected(t0, &mut fx);
        fx.drain();
        l.on_heard(t0 + s(1), &mut fx);
        assert_eq!(fx.drain(), vec![Effect::Cancel(TimerId::HelloTimeout)]);
        // Later messages cost nothing.
        l.on_heard(t0 + s(1), &mut fx);
        assert!(fx.is_empty());
        // A timer that fired anyway (cancelled too late) does nothing.
        l.on_hello_timer(t0 + HELLO_TIMEOUT, &mut fx);
        assert!(fx.is_empty(), "{:?}", fx.drain());
        assert_eq!(l.unheard_connections, 0);
        assert_eq!(l.last_heard(), Some(t0 + s(1)));
    }

    /// Nothing heard after the hello: counted, reconnected at once the first time, then no
    /// sooner than 10 s, 20 s, 40 s ... 5 min after the previous forced reconnect; a heard
    /// connection resets the backoff.
    #[test]
    fn unheard_connections_reconnect_with_backoff() {
        let t0 = Instant::now();
        let mut l = link();
        let mut fx = Effects::default();
        l.start(t0, &mut fx);
        l.on_connected(t0, &mut fx);
        fx.drain();
        let mut t = t0 + HELLO_TIMEOUT;
        l.on_hello_timer(t, &mut fx);
        assert_eq!(fx.drain(), vec![Effect::Reconnect]);
        assert_eq!(l.unheard_connections, 1);
        let mut last_forced = t;
        for (n, gap) in [10u64, 20, 40, 80, 160, 300, 300].into_iter().enumerate() {
            // The source reports the drop and the new connection at once.
            l.on_disconnected(t, &mut fx);
            l.on_connected(t, &mut fx);
            fx.drain();
            t += HELLO_TIMEOUT;
            l.on_hello_timer(t, &mut fx);
            let due = last_forced + s(gap);
            assert_eq!(
                fx.drain(),
                vec![Effect::Arm(TimerId::Reconnect, due)],
                "{n}"
            );
            assert_eq!(l.unheard_connections, n as u64 + 2);
            t = due;
            l.on_reconnect_timer(t, &mut fx);
            assert_eq!(fx.drain(), vec![Effect::Reconnect], "{n}");
            last_forced = t;
        }
        // Heard: the next unheard connection is made again at once.
        l.on_disconnected(t, &mut fx);
        l.on_connected(t, &mut fx);
        l.on_heard(t + s(1), &mut fx);
        l.on_disconnected(t + s(2), &mut fx);
        l.on_connected(t + s(2), &mut fx);
        fx.drain();
        l.on_hello_timer(t + s(2) + HELLO_TIMEOUT, &mut fx);
        assert_eq!(fx.drain(), vec![Effect::Reconnect]);
    }

    /// A pending forced reconnect is dropped when the connection goes down by itself
    /// (libzmq reconnects) or when the backend is heard after all.
    #[test]
    fn a_pending_forced_reconnect_is_cancelled() {
        let t0 = Instant::now();
        let mut l = link();
        let mut fx = Effects::default();
        l.start(t0, &mut fx);
        l.on_connected(t0, &mut fx);
        l.on_hello_timer(t0 + HELLO_TIMEOUT, &mut fx);
        l.on_disconnected(t0 + s(3), &mut fx);
        l.on_connected(t0 + s(3), &mut fx);
        fx.drain();
        l.on_hello_timer(t0 + s(5), &mut fx);
        assert_eq!(
            fx.drain(),
            vec![Effect::Arm(TimerId::Reconnect, t0 + HELLO_TIMEOUT + s(10))]
        );
        l.on_heard(t0 + s(6), &mut fx);
        assert_eq!(fx.drain(), vec![Effect::Cancel(TimerId::Reconnect)]);
        l.on_reconnect_timer(t0 + s(12), &mut fx);
        assert!(fx.is_empty(), "{:?}", fx.drain());

        l.on_disconnected(t0 + s(20), &mut fx);
        l.on_connected(t0 + s(20), &mut fx);
        fx.drain();
        l.on_hello_timer(t0 + s(22), &mut fx);
        assert_eq!(fx.drain(), vec![Effect::Reconnect]);
        l.on_disconnected(t0 + s(22), &mut fx);
        l.on_connected(t0 + s(22), &mut fx);
        l.on_hello_timer(t0 + s(24), &mut fx);
        fx.drain();
        l.on_disconnected(t0 + s(25), &mut fx);
        assert!(fx.drain().contains(&Effect::Cancel(TimerId::Reconnect)));
        l.on_reconnect_timer(t0 + s(32), &mut fx);
        assert!(fx.is_empty(), "no reconnect while down: {:?}", fx.drain());
        // A stale hello timer while down does nothing either.
        l.on_hello_timer(t0 + s(33), &mut fx);
        assert!(fx.is_empty());
        assert_eq!(l.unheard_connections, 4);
    }

    /// The "not heard" warning: only while the backend should be heard (link down, or
    /// readings waiting), after 60 s of silence, then at most every 5 min.
    #[test]
    fn unheard_warning_when_due_and_rate_limited() {
        let t0 = Instant::now();
        let mut l = link();
        let mut fx = Effects::default();
        l.start(t0, &mut fx);
        // Never connected: due from the start.
        assert!(!l.check_unheard(0, t0 + s(59)));
        assert!(l.check_unheard(0, t0 + s(60)));
        assert!(!l.check_unheard(5, t0 + s(120)), "at most every 5 min");
        assert!(l.check_unheard(5, t0 + s(360)));
        // Connected and heard: quiet.
        l.on_connected(t0 + s(400), &mut fx);
        l.on_heard(t0 + s(400), &mut fx);
        assert!(!l.check_unheard(0, t0 + s(4000)), "nothing to acknowledge");
        // A reading waits after an hour of (fine) silence: the 60 s count from when the
        // wait was first seen, not from the last message.
        assert!(!l.check_unheard(1, t0 + s(4010)));
        assert!(!l.check_unheard(1, t0 + s(4069)));
        assert!(l.check_unheard(1, t0 + s(4070)));
        // Heard again: a new silence counts from then.
        l.on_heard(t0 + s(4080), &mut fx);
        assert!(!l.check_unheard(1, t0 + s(4100)));
        assert!(l.check_unheard(1, t0 + s(4140)));
        // The link goes down: due from the disconnect.
        l.on_heard(t0 + s(4150), &mut fx);
        assert!(!l.check_unheard(0, t0 + s(4160)));
        l.on_disconnected(t0 + s(4200), &mut fx);
        assert!(!l.check_unheard(0, t0 + s(4259)));
        assert!(l.check_unheard(0, t0 + s(4260)));
    }
}
