//! What the backend received from each gateway: which seqs to ack, which are duplicates.

use std::collections::BTreeSet;

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
    /// Highest seq below which every seq was received (or skipped by a `resume_seq`).
    pub high: u64,
    /// Seqs received above `high + 1`, waiting for the gap to fill (bounded: the oldest go
    /// when there are too many).
    pub ahead: BTreeSet<u64>,
    /// A hello or a reading has been seen from this gateway.
    pub started: bool,
    /// Distinct readings received.
    pub received: u64,
    /// Readings received again (seq already counted).
    pub duplicates: u64,
    /// The spool these seqs belong to (`spool_id` of the last `hello`; `""` when a hello
    /// has none). `None` before the first hello.
    pub spool_id: Option<String>,
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
        self.spool_id = Some(spool_id.to_string());
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
