//! The queue of writes waiting for the device, with their deadlines.

use super::{WriteError, MAX_PENDING_WRITE};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub(super) struct PendingWrite {
    pub(super) data: Vec<u8>,
    pub(super) done: usize,
    pub(super) token: u64,
    /// When the write fails if the device has not taken all of it.
    deadline: Instant,
}

/// A write that timed out: its token, and whether part of it already reached the tty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Expired {
    pub(super) token: u64,
    pub(super) partial: bool,
}

/// The queue of writes waiting for the device. Plain data with `now` passed in, so the
/// timeout rule is tested without a loop or a tty.
pub(super) struct WriteQueue {
    pub(super) pending: VecDeque<PendingWrite>,
    pub(super) pending_bytes: usize,
    pub(super) timeout: Duration,
}

impl WriteQueue {
    pub(super) fn new(timeout: Duration) -> WriteQueue {
        WriteQueue {
            pending: VecDeque::new(),
            pending_bytes: 0,
            timeout,
        }
    }

    pub(super) fn push(
        &mut self,
        data: Vec<u8>,
        token: u64,
        now: Instant,
    ) -> Result<(), WriteError> {
        if self.pending_bytes + data.len() > MAX_PENDING_WRITE {
            return Err(WriteError::Busy);
        }
        self.pending_bytes += data.len();
        self.pending.push_back(PendingWrite {
            data,
            done: 0,
            token,
            deadline: now + self.timeout,
        });
        Ok(())
    }

    /// The deadline of the oldest write (writes are queued in deadline order).
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.pending.front().map(|w| w.deadline)
    }

    /// Removes every write whose deadline has come, unsent bytes included.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<Expired> {
        let mut out = Vec::new();
        while let Some(w) = self.pending.front() {
            if w.deadline > now {
                break;
            }
            let w = self.pending.pop_front().expect("front exists");
            self.pending_bytes -= w.data.len();
            out.push(Expired {
                token: w.token,
                partial: w.done > 0,
            });
        }
        out
    }

    /// Removes every write (the port was lost); returns their tokens.
    pub(super) fn clear(&mut self) -> Vec<u64> {
        self.pending_bytes = 0;
        self.pending.drain(..).map(|w| w.token).collect()
    }
}
