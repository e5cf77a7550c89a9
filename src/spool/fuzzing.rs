//! Spool recovery under arbitrary input, shared by the fuzz target
//! `fuzz/fuzz_targets/spool_recovery.rs` and the unit tests (which run it on deterministic
//! random inputs), so both check the same things.
//!
//! Raw random bytes almost never contain a record with valid checksums, so the input is
//! mostly read as a little program that builds a segment file: records whose seqs, times and
//! payloads come from the input and whose CRCs are computed (so crafted contents such as a
//! seq of `u64::MAX` or a payload that is not UTF-8 get past the checksums), junk, bit flips,
//! a truncation, and optionally a `state` file with valid CRC and values from the input.

use crate::spool::record::{encode_record, MAX_SEQ};
use crate::spool::scan::acceptable;
use crate::spool::state::{self, State};
use crate::spool::{Record, Spool, SpoolConfig, SpoolError};
use std::path::Path;

/// Reads the input front to back; missing bytes read as 0.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |v, _| (v << 8) | u64::from(self.byte()))
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A segment file and an optional `state` file built from `data`.
pub struct Crafted {
    /// Contents of `00000000000000000001.seg`.
    pub segment: Vec<u8>,
    /// Contents of `state`, if any.
    pub state: Option<String>,
}

/// Builds a segment file (and maybe a `state`) from arbitrary bytes. If the first byte is odd
/// the rest is taken as the segment file's raw bytes after one valid record; else it is a
/// sequence of operations, each one byte followed by its arguments.
pub fn craft(data: &[u8]) -> Crafted {
    let mut input = Input(data);
    let mode = input.byte();
    let mut seg = Vec::new();
    if mode & 1 == 1 {
        encode_record(1, 0, b"prefix", &mut seg);
        seg.extend_from_slice(input.0);
        return Crafted {
            segment: seg,
            state: None,
        };
    }
    let state = (mode & 2 == 2).then(|| {
        let id = if mode & 4 == 4 {
            Some(*b"0123456789abcdef0123456789abcdef")
        } else {
            None
        };
        let floor = input.u64();
        let acked = input.u64();
        state::encode(&State { id, floor, acked })
    });
    let mut seq = 1u64;
    while !input.is_empty() {
        let op = input.byte();
        match op % 8 {
            // A record after the previous one (or, with the high bit, a step back).
            0..=3 => {
                let step = u64::from(input.byte() % 4);
                seq = if op & 0x80 == 0 {
                    seq.saturating_add(step)
                } else {
                    seq.saturating_sub(step).max(1)
                };
                let len = usize::from(input.byte());
                let time = input.u64();
                let payload = input.bytes(len).to_vec();
                encode_record(seq, time, &payload, &mut seg);
                seq = seq.saturating_add(1);
            }
            // A record with a seq taken whole from the input (u64::MAX, MAX_SEQ + 1, ...).
            4 => {
                let s = match input.byte() % 4 {
                    0 => u64::MAX,
                    1 => MAX_SEQ,
                    2 => MAX_SEQ + 1,
                    _ => input.u64(),
                }
                .max(1);
                let len = usize::from(input.byte());
                let payload = input.bytes(len).to_vec();
                encode_record(s, 0, &payload, &mut seg);
            }
            // A text record whose payload is made not UTF-8 by one byte.
            5 => {
                let mut payload = b"{\"seq\":1}".to_vec();
                let at = usize::from(input.byte()) % payload.len();
                payload[at] = 0xFF;
                encode_record(seq, 0, &payload, &mut seg);
                seq = seq.saturating_add(1);
            }
            // Junk bytes.
            6 => {
                let n = usize::from(input.byte());
                seg.extend_from_slice(input.bytes(n));
            }
            // A bit flip somewhere in what is built so far.
            _ => {
                let at = input.u64();
                let bit = input.byte() % 8;
                if !seg.is_empty() {
                    let i = (at % seg.len() as u64) as usize;
                    seg[i] ^= 1 << bit;
                }
            }
        }
    }
    if mode & 8 == 8 && !seg.is_empty() {
        let keep = usize::from(mode >> 4) * seg.len() / 16;
        seg.truncate(keep);
    }
    Crafted {
        segment: seg,
        state,
    }
}

fn read_all(sp: &mut Spool) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let n = out.len();
        sp.read_from(from, 64, &mut out).expect("read");
        match out.last() {
            Some(&(seq, _)) if out.len() > n => from = seq + 1,
            _ => return out,
        }
    }
}

/// Writes the files [`craft`] builds from `data` into the empty directory `dir`, opens the
/// spool and checks what recovery promises: `open` neither fails nor panics; only records with
/// valid checksums and acceptable contents (seq <= `MAX_SEQ`, UTF-8 payload) come back, in
/// seq order, below `next_seq`; counts agree; the spool takes an append and finds it again
/// after a reopen. Panics when a check fails.
pub fn check_recovery(dir: &Path, data: &[u8]) {
    let crafted = craft(data);
    std::fs::write(dir.join("00000000000000000001.seg"), &crafted.segment).expect("write");
    if let Some(s) = &crafted.state {
        std::fs::write(dir.join("state"), s).expect("write state");
    }
    let (mut spool, rec) = Spool::open(dir, SpoolConfig::default()).expect("open must not fail");
    assert!(rec.next_seq >= 1 && rec.next_seq <= MAX_SEQ + 1);
    assert!(rec.acked < rec.next_seq);
    let all = read_all(&mut spool);
    for w in all.windows(2) {
        assert!(w[0].0 < w[1].0, "seq order");
    }
    for (seq, p) in &all {
        assert!(*seq < rec.next_seq && *seq > rec.acked);
        let r = Record {
            seq: *seq,
            time_ms: 0,
            payload: p,
        };
        assert!(acceptable(&r), "seq {seq}: a corrupt record came back");
    }
    let stats = spool.stats();
    assert_eq!(stats.readings, all.len() as u64);
    assert_eq!(spool.first_unacked(), all.first().map(|r| r.0));
    if let Some(&(last, _)) = all.last() {
        // A cumulative ack of everything read leaves nothing to wait for.
        spool.ack(last).expect("ack");
        assert_eq!(spool.first_unacked(), None);
    }
    match spool.append_with(0, |s| s.to_string()) {
        Ok(_) => {
            spool.flush().expect("flush");
            drop(spool);
            let (_, rec2) = Spool::open(dir, SpoolConfig::default()).expect("reopen");
            assert!(rec2.records >= 1);
            assert_eq!(rec2.next_seq, rec.next_seq + 1);
        }
        Err(SpoolError::SeqsExhausted { .. }) => assert_eq!(rec.next_seq, MAX_SEQ + 1),
        Err(e) => panic!("append after recovery: {e}"),
    }
}
