//! The in-memory index of one segment file.

use std::path::PathBuf;

/// A seek mark (seq, time, offset) is kept in memory every this many bytes of a segment.
const MARK_STRIDE: u64 = 16 * 1024;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark {
    pub seq: u64,
    pub time_ms: u64,
    pub offset: u64,
}

/// In-memory index of one segment file: which seqs it holds (as inclusive runs; one run unless
/// corruption or a restart left gaps) and sparse seek marks.
#[derive(Debug)]
pub(crate) struct Segment {
    pub path: PathBuf,
    pub bytes: u64,
    pub runs: Vec<(u64, u64)>,
    pub marks: Vec<Mark>,
}

impl Segment {
    pub(crate) fn new(path: PathBuf) -> Segment {
        Segment {
            path,
            bytes: 0,
            runs: Vec::new(),
            marks: Vec::new(),
        }
    }
    pub(crate) fn first_seq(&self) -> u64 {
        self.runs.first().map_or(0, |r| r.0)
    }
    pub(crate) fn last_seq(&self) -> u64 {
        self.runs.last().map_or(0, |r| r.1)
    }
    pub(crate) fn push(&mut self, seq: u64, time_ms: u64, offset: u64) {
        match self.runs.last_mut() {
            Some(r) if r.1.checked_add(1) == Some(seq) => r.1 = seq,
            _ => self.runs.push((seq, seq)),
        }
        if !matches!(self.marks.last(), Some(m) if offset < m.offset + MARK_STRIDE) {
            self.marks.push(Mark {
                seq,
                time_ms,
                offset,
            });
        }
    }
    /// Number of stored seqs in (lo, hi].
    pub(crate) fn count_in(&self, lo: u64, hi: u64) -> u64 {
        self.runs
            .iter()
            .map(|&(a, b)| {
                let a = a.max(lo.saturating_add(1));
                let b = b.min(hi);
                if a <= b {
                    b - a + 1
                } else {
                    0
                }
            })
            .sum()
    }
    pub(crate) fn first_above(&self, low: u64) -> Option<u64> {
        self.runs
            .iter()
            .find(|r| r.1 > low)
            .map(|r| r.0.max(low.saturating_add(1)))
    }

    pub(crate) fn contains(&self, seq: u64) -> bool {
        let i = self.runs.partition_point(|r| r.1 < seq);
        self.runs.get(i).is_some_and(|r| r.0 <= seq)
    }
    /// The last mark at or before `seq` (the first mark if none).
    pub(crate) fn mark_for(&self, seq: u64) -> Mark {
        let i = self.marks.partition_point(|m| m.seq <= seq);
        self.marks[i.saturating_sub(1)]
    }
}
