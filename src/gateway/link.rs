//! The backend link as the gateway sees it: connected or not, and the connection check.
//!
//! The socket and its monitor live in [`crate::sources::zmq`]; this machine takes their
//! events. While no connection is reported it keeps one [`TimerId::ConnCheck`] armed (1 s,
//! doubling up to 30 s) whose expiry asks for [`Effect::CheckConnection`]: the source then
//! reconnects if libzmq gave up after a protocol error, and reports a connection whose
//! handshake event was lost. Once connected, no timer runs (idle cost).

use super::effect::{Effect, Effects, TimerId};
use crate::limit::LogLimits;
use std::time::{Duration, Instant};

/// First delay of the connection check.
pub const CONN_CHECK_MIN: Duration = Duration::from_secs(1);
/// Longest delay of the connection check.
pub const CONN_CHECK_MAX: Duration = Duration::from_secs(30);

/// The link state machine (see the module doc).
#[derive(Debug)]
pub struct Link {
    endpoint: String,
    curve: bool,
    connected: bool,
    /// Delay of the next connection check; doubles while no handshake succeeds.
    check_delay: Duration,
    check_armed: bool,
    logs: LogLimits,
    /// Handshakes reported since start.
    pub connects: u64,
    /// Handshakes after the first.
    pub reconnects: u64,
}

impl Link {
    /// A link to `endpoint` (`curve`: the link is encrypted; used in hints).
    pub fn new(endpoint: &str, curve: bool) -> Link {
        Link {
            endpoint: endpoint.to_string(),
            curve,
            connected: false,
            check_delay: CONN_CHECK_MIN,
            check_armed: false,
            logs: LogLimits::default(),
            connects: 0,
            reconnects: 0,
        }
    }

    /// Whether a handshake was reported and no disconnect since.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// At start: check the connection until the first handshake is reported.
    pub fn start(&mut self, now: Instant, fx: &mut Effects) {
        self.arm_check(now, fx);
    }

    fn arm_check(&mut self, now: Instant, fx: &mut Effects) {
        let delay = self.check_delay;
        self.check_delay = (delay * 2).min(CONN_CHECK_MAX);
        self.check_armed = true;
        fx.push(Effect::Arm(TimerId::ConnCheck, now + delay));
    }

    /// A handshake succeeded: the `hello` goes first (delivery rewinds behind it).
    pub fn on_connected(&mut self, fx: &mut Effects) {
        self.connected = true;
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
    }

    /// The connection went down.
    pub fn on_disconnected(&mut self, now: Instant, fx: &mut Effects) {
        self.connected = false;
        // Rate-limited: a failing handshake (e.g. a wrong key) disconnects repeatedly.
        if self.logs.allow("backend disconnected", now) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn checks_back_off_until_connected_then_stop() {
        let t0 = Instant::now();
        let mut l = Link::new("tcp://127.0.0.1:1", false);
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
        l.on_connected(&mut fx);
        assert_eq!(
            fx.drain(),
            vec![Effect::Cancel(TimerId::ConnCheck), Effect::Hello]
        );
        assert_eq!((l.connects, l.reconnects), (1, 0));
        // A lost connection checks from 1 s again; a reconnect counts.
        l.on_disconnected(t, &mut fx);
        assert_eq!(fx.drain(), vec![Effect::Arm(TimerId::ConnCheck, t + s(1))]);
        l.on_disconnected(t, &mut fx);
        assert!(fx.is_empty(), "one check timer at a time");
        l.on_connected(&mut fx);
        fx.drain();
        assert_eq!((l.connects, l.reconnects), (2, 1));
        // A check timer that fires while connected asks once and stops.
        l.on_check_timer(t, &mut fx);
        assert_eq!(fx.drain(), vec![Effect::CheckConnection]);
    }
}
