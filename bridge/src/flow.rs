//! Per-gateway delivery: when a reading is published, when an ack may go back.
//!
//! A plain struct: it takes `now` and returns what to do; the ROUTER thread applies it. The
//! rule: the gateway's seq N is acked (cumulative `ack`, protocol v1) only once JetStream
//! confirmed (a PubAck, `duplicate` included) every reading up to N of the gateway's current
//! spool, and never above the highest seq the gateway sent on its current connection. The
//! ledger ([`GatewayLedger`], shared with `zgate backend`) counts a reading as "received" when
//! its PubAck arrives, not when the gateway's message does.
//!
//! At most `max_inflight` readings per gateway are published and unconfirmed. A reading beyond
//! that is neither published nor acked: the gateway keeps it in its spool and sends it again
//! (after `[spool] retransmit_s` or a reconnect), by when confirmations made room. A publish
//! that fails (JetStream unavailable, timeout) leaves its seq unconfirmed, so nothing at or
//! above it is acked until a resend of it is confirmed. An unconfirmed reading whose outcome
//! never comes back is forgotten after `inflight_timeout` so it can be published again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zgate::backend::GatewayLedger;

/// What to do with a reading the gateway sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadingAction {
    /// Publish it (under this spool id, for the `Nats-Msg-Id`).
    Publish {
        /// The spool the seq belongs to (shared: every reading of a spool names it).
        spool_id: Arc<str>,
    },
    /// Already confirmed: not published again; an ack is due (the gateway missed one).
    Duplicate,
    /// Published and not confirmed yet: wait for that outcome.
    InFlight,
    /// `max_inflight` unconfirmed already: dropped here, neither published nor acked.
    OverLimit,
    /// No hello on this connection yet, so no spool id to name it by: dropped, not acked.
    NoHello,
}

/// One gateway's delivery state (see the module documentation).
#[derive(Debug)]
pub struct Flow {
    ledger: GatewayLedger,
    /// Published, unconfirmed seqs of the current spool, with when they were published.
    inflight: HashMap<u64, Instant>,
    max_inflight: usize,
    inflight_timeout: Duration,
    /// The last ack sent on the current connection.
    last_ack: Option<u64>,
    ack_due: bool,
    /// The highest seq acked for the current spool (over every connection).
    acked_high: u64,
}

impl Flow {
    /// A gateway's flow, before its hello.
    pub fn new(max_inflight: usize, inflight_timeout: Duration) -> Flow {
        Flow {
            ledger: GatewayLedger::default(),
            inflight: HashMap::new(),
            max_inflight,
            inflight_timeout,
            last_ack: None,
            ack_due: false,
            acked_high: 0,
        }
    }

    /// The current spool id (`None` before the first hello).
    pub fn spool_id(&self) -> Option<&str> {
        self.ledger.spool_id.as_deref()
    }

    /// Readings published and not confirmed.
    #[cfg(test)]
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// A hello: a new connection. A new spool id starts afresh (seqs restart); the hello is
    /// answered (an ack of `resume_seq - 1` at most: it acknowledges nothing new).
    pub fn on_hello(&mut self, spool_id: &str, resume_seq: Option<u64>) -> Option<String> {
        let replaced = self.ledger.hello(spool_id, resume_seq);
        if replaced.is_some() {
            self.inflight.clear();
            self.acked_high = 0;
        }
        self.last_ack = None;
        self.ack_due = true;
        replaced
    }

    /// A `stats` whose spool is the current one: readings below `resume_seq` were acked or
    /// dropped at the gateway, so a gap they left no longer holds acks back.
    pub fn on_stats(&mut self, spool_id: &str, resume_seq: u64) {
        if self.spool_id() != Some(spool_id) {
            return;
        }
        let before = self.ledger.ack_seq();
        self.ledger.resume(resume_seq);
        if self.ledger.ack_seq() != before {
            self.ack_due = true;
        }
    }

    /// A reading with `seq` arrived.
    pub fn on_reading(&mut self, seq: u64, now: Instant) -> ReadingAction {
        let Some(spool_id) = self.ledger.spool_id.clone() else {
            return ReadingAction::NoHello;
        };
        if let Some(c) = &mut self.ledger.conn_high {
            *c = (*c).max(seq);
        }
        if seq <= self.ledger.high || self.ledger.ahead.contains(&seq) {
            self.ack_due = true;
            return ReadingAction::Duplicate;
        }
        if self.inflight.contains_key(&seq) {
            return ReadingAction::InFlight;
        }
        if self.inflight.len() >= self.max_inflight {
            return ReadingAction::OverLimit;
        }
        self.inflight.insert(seq, now);
        ReadingAction::Publish { spool_id }
    }

    /// JetStream's outcome for a reading published under `spool_id`: `ok` for a PubAck
    /// (duplicate or not), false for a failure. Outcomes for another spool are ignored.
    pub fn on_outcome(&mut self, spool_id: &str, seq: u64, ok: bool) {
        if self.spool_id() != Some(spool_id) || self.inflight.remove(&seq).is_none() {
            return;
        }
        if !ok {
            return;
        }
        // The ledger raises its connection high to a received seq; a confirmation of a seq
        // published on an earlier connection must not: the gateway refuses acks above what it
        // sent on the current one.
        let conn_high = self.ledger.conn_high;
        self.ledger.receive(seq);
        self.ledger.conn_high = conn_high;
        if Some(self.ledger.ack_seq()) != self.last_ack {
            self.ack_due = true;
        }
    }

    /// Forgets unconfirmed readings published more than `inflight_timeout` ago (their outcome
    /// was lost); the gateway's resend publishes them again.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.inflight.len();
        let timeout = self.inflight_timeout;
        self.inflight
            .retain(|_, at| now.saturating_duration_since(*at) < timeout);
        before - self.inflight.len()
    }

    /// The ack to send now, if one is due (at most one per batch of messages), and whether
    /// it acknowledges readings no earlier ack of this spool covered.
    pub fn take_ack(&mut self) -> Option<(u64, bool)> {
        if !std::mem::take(&mut self.ack_due) || self.ledger.spool_id.is_none() {
            return None;
        }
        let seq = self.ledger.ack_seq();
        let advanced = seq > self.acked_high;
        self.acked_high = self.acked_high.max(seq);
        self.last_ack = Some(seq);
        Some((seq, advanced))
    }

    /// The last ack sent on this connection (a harmless re-send of it probes the route).
    pub fn last_ack(&self) -> Option<u64> {
        self.last_ack
    }
}

#[cfg(test)]
#[path = "flow_tests.rs"]
mod tests;
