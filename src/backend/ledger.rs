//! The reference backend's per-gateway ledger of received readings.

use std::collections::BTreeSet;
use std::sync::Arc;

/// Out-of-order seqs remembered per gateway before the oldest are forgotten.
const MAX_PENDING_SEQS: usize = 100_000;

/// Per-gateway delivery state for the gateway's current spool: every seq ≤ `high` was
/// received; `ahead` holds seqs > high+1.
///
/// Seqs are numbers within one spool. A gateway whose spool was replaced (a new SD card, a
/// wiped `data_dir`) starts again at 1 under a new `spool_id`; its `hello` says so, and
/// [`GatewayLedger::hello`] then starts a fresh ledger, so the new readings are not mistaken
/// for duplicates of the old ones.
#[derive(Debug, Default)]
pub struct GatewayLedger {
    /// Every seq up to this one was received.
    pub high: u64,
    /// Seqs received above `high + 1`.
    pub ahead: BTreeSet<u64>,
    /// A hello or a reading arrived.
    pub started: bool,
    /// Readings received (not counting duplicates).
    pub received: u64,
    /// Duplicate readings received.
    pub duplicates: u64,
    /// The spool these seqs belong to (`spool_id` of the last `hello`; `""` when a hello
    /// has none). `None` before the first hello. Shared: the bridge names it in every
    /// publish of the spool's readings.
    pub spool_id: Option<Arc<str>>,
    /// The highest seq the gateway may have sent on its current connection: `resume_seq - 1`
    /// from its last hello, raised by every reading since. A gateway refuses an ack above
    /// what it sent on the connection, so acks never exceed this. `None` before any hello.
    pub conn_high: Option<u64>,
}

impl GatewayLedger {
    /// Records a reading; returns false for a duplicate.
    pub fn receive(&mut self, seq: u64) -> bool {
        if !self.started {
            // First contact without a hello: take the stream from here.
            self.started = true;
            self.high = seq.saturating_sub(1);
        }
        if let Some(c) = &mut self.conn_high {
            *c = (*c).max(seq);
        }
        if seq <= self.high || self.ahead.contains(&seq) {
            self.duplicates += 1;
            return false;
        }
        self.received += 1;
        if Some(seq) == self.high.checked_add(1) {
            self.high = seq;
            self.absorb_ahead();
        } else {
            self.ahead.insert(seq);
            while self.ahead.len() > MAX_PENDING_SEQS {
                self.ahead.pop_first();
            }
        }
        true
    }

    /// Moves `high` over the seqs in `ahead` that now follow it.
    fn absorb_ahead(&mut self) {
        while let Some(next) = self.high.checked_add(1) {
            if !self.ahead.remove(&next) {
                break;
            }
            self.high = next;
        }
    }

    /// The gateway says everything below `resume` is acked or dropped: skip the gap.
    pub fn resume(&mut self, resume: u64) {
        self.started = true;
        if resume > self.high.saturating_add(1) {
            self.high = resume - 1;
            self.ahead.retain(|&s| s > resume - 1);
            self.absorb_ahead();
        }
    }

    /// A `hello`: the gateway's spool identity and `resume_seq`. When the spool differs from
    /// the one this ledger was kept for, the ledger starts afresh; returns the old spool id
    /// then.
    pub fn hello(&mut self, spool_id: &str, resume: Option<u64>) -> Option<String> {
        let replaced = self.spool_id.as_deref().filter(|old| *old != spool_id);
        let replaced = replaced.map(str::to_string);
        if replaced.is_some() {
            *self = GatewayLedger::default();
        }
        if self.spool_id.as_deref() != Some(spool_id) {
            self.spool_id = Some(Arc::from(spool_id));
        }
        if let Some(r) = resume {
            self.resume(r);
        }
        self.conn_high = Some(resume.unwrap_or(0).saturating_sub(1));
        replaced
    }

    /// The seq to acknowledge: the highest contiguous seq received, but never above what
    /// the gateway sent on its current connection (so an answer to a hello is exactly
    /// `resume_seq - 1`).
    pub fn ack_seq(&self) -> u64 {
        self.high.min(self.conn_high.unwrap_or(u64::MAX))
    }
}

/// A spool identity as gateways send it: 32 hex characters (128 bits).
pub fn is_spool_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPOOL_A: &str = "0123456789abcdef0123456789abcdef";
    const SPOOL_B: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn ledger_acks_contiguous_and_dedupes() {
        let mut l = GatewayLedger::default();
        assert!(l.receive(1));
        assert!(l.receive(2));
        assert!(!l.receive(2));
        assert!(l.receive(4));
        assert_eq!(l.high, 2, "gap at 3 holds the ack back");
        assert!(l.receive(3));
        assert_eq!(l.high, 4);
        assert!(!l.receive(4));
        assert_eq!(l.duplicates, 2);
        assert_eq!(l.received, 4);
    }

    #[test]
    fn ledger_resume_skips_dropped_gap() {
        let mut l = GatewayLedger::default();
        l.receive(1);
        l.receive(10);
        l.receive(11);
        assert_eq!(l.high, 1);
        l.resume(10);
        assert_eq!(l.high, 11);
        l.resume(5);
        assert_eq!(l.high, 11);
    }

    #[test]
    fn a_new_spool_id_starts_a_fresh_ledger() {
        let mut l = GatewayLedger::default();
        assert_eq!(l.hello(SPOOL_A, Some(1)), None);
        for seq in 1..=50 {
            assert!(l.receive(seq));
        }
        assert_eq!(l.ack_seq(), 50);
        // The same spool reconnecting keeps its ledger: 1..50 stay duplicates.
        assert_eq!(l.hello(SPOOL_A, Some(51)), None);
        assert!(!l.receive(50));
        // A wiped spool: seqs start again at 1 and are new readings.
        assert_eq!(l.hello(SPOOL_B, Some(1)), Some(SPOOL_A.to_string()));
        assert_eq!(l.ack_seq(), 0);
        for seq in 1..=30 {
            assert!(l.receive(seq), "seq {seq} taken for a duplicate");
        }
        assert_eq!((l.high, l.duplicates, l.received), (30, 0, 30));
        assert_eq!(l.spool_id.as_deref(), Some(SPOOL_B));
    }

    #[test]
    fn hello_is_acked_with_resume_minus_one_never_above_what_was_sent() {
        // Fresh ledger: exactly resume_seq - 1.
        let mut l = GatewayLedger::default();
        l.hello(SPOOL_A, Some(7));
        assert_eq!(l.ack_seq(), 6);
        // Readings 7..=10 arrive: acked as they come.
        for seq in 7..=10 {
            l.receive(seq);
        }
        assert_eq!(l.ack_seq(), 10);
        // The gateway missed that ack and reconnects with resume_seq 8: the answer is 7,
        // not 10, because it has sent nothing on the new connection yet.
        l.hello(SPOOL_A, Some(8));
        assert_eq!(l.ack_seq(), 7);
        // Once it sent 8..=10 again (duplicates here), the ack covers them.
        for seq in 8..=10 {
            assert!(!l.receive(seq));
        }
        assert_eq!(l.ack_seq(), 10);
        // A hello without resume_seq is answered with 0; none with seq 0 underflows.
        let mut l = GatewayLedger::default();
        l.hello("", None);
        assert_eq!(l.ack_seq(), 0);
        l.hello("", Some(0));
        assert_eq!(l.ack_seq(), 0);
    }

    #[test]
    fn extreme_seqs_do_not_overflow() {
        let mut l = GatewayLedger::default();
        assert!(l.receive(u64::MAX - 1));
        assert!(l.receive(u64::MAX));
        assert_eq!(l.high, u64::MAX);
        assert!(!l.receive(u64::MAX));
        l.resume(u64::MAX);
        let mut l = GatewayLedger::default();
        l.receive(1);
        l.receive(u64::MAX);
        l.resume(u64::MAX);
        assert_eq!(l.high, u64::MAX);
        assert!(is_spool_id(SPOOL_A) && !is_spool_id("xyz") && !is_spool_id(&SPOOL_A[1..]));
    }

    #[test]
    fn first_contact_without_hello_starts_at_first_seq() {
        let mut l = GatewayLedger::default();
        assert!(l.receive(500));
        assert_eq!(l.high, 500);
    }
}
