//! Reading back: the oldest unacked reading's time, and streaming stored readings from a seq
//! on ([`Spool::read_from`]) through one cached segment reader.

use crate::spool::error::io_err;
use crate::spool::scan::{Item, Scanner};
use crate::spool::{Spool, SpoolError};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// A segment reader kept between [`Spool::read_from`] calls, so reading on in seq order
/// costs no seek.
pub(super) struct CachedReader {
    pub(super) key: u64,
    pub(super) sc: Scanner,
    /// The reader is positioned after the record with this seq.
    pub(super) last: u64,
}

/// Opens a segment for reading without updating its access time where allowed (our own
/// files). Under `relatime` (the usual mount option) the first read after a write would
/// update it, so every read-back of the active segment during a backlog would dirty the inode
/// once more: one more metadata write for the journal and the SD card.
fn open_for_reading(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => File::open(path),
        r => r,
    }
}

impl Spool {
    /// `time_ms` of the oldest unacked record. Costs no I/O when that record starts a segment
    /// or sits on a seek mark; else one read of at most one mark stride (16 KiB).
    pub(super) fn oldest_unacked_ms(&self) -> Option<u64> {
        let seq = self.first_unacked()?;
        match self.time_of(seq) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("spool: reading the time of seq {seq}: {e}");
                None
            }
        }
    }

    /// `time_ms` of a stored record: from a mark, or by scanning at most one mark stride.
    fn time_of(&self, seq: u64) -> io::Result<Option<u64>> {
        let Some((_, seg)) = self.segs.range(..=seq).next_back() else {
            return Ok(None);
        };
        let mark = seg.mark_for(seq);
        if mark.seq == seq {
            return Ok(Some(mark.time_ms));
        }
        let mut sc = Scanner::new(open_for_reading(&seg.path)?, mark.offset)?;
        loop {
            match sc.next()? {
                Item::Record { rec, .. } if rec.seq == seq => return Ok(Some(rec.time_ms)),
                Item::Record { rec, .. } if rec.seq > seq && seg.contains(rec.seq) => {
                    return Ok(None)
                }
                Item::Record { .. } | Item::Garbage | Item::Invalid { .. } => {}
                Item::End { .. } => return Ok(None),
            }
        }
    }

    /// Key of the segment holding `seq`, or else of the first segment after it.
    fn segment_for(&self, seq: u64) -> Option<u64> {
        if let Some((&k, s)) = self.segs.range(..=seq).next_back() {
            if s.last_seq() >= seq {
                return Some(k);
            }
        }
        self.segs
            .range(seq.saturating_add(1)..)
            .next()
            .map(|(&k, _)| k)
    }

    /// Appends to `out` up to `max` stored, unacked, undropped records with seq >= `from`, in
    /// seq order, streaming from disk. One reader is cached, so reading sequentially costs
    /// O(1) per record; a random `from` seeks via in-memory marks (at most 64 KiB scanned).
    pub fn read_from(
        &mut self,
        from: u64,
        max: usize,
        out: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<(), SpoolError> {
        self.read_range(from, u64::MAX, max, out)
    }

    /// As [`Spool::read_from`], but only records with seq < `end` (e.g.
    /// [`Spool::sendable_end`]).
    pub fn read_range(
        &mut self,
        from: u64,
        end: u64,
        max: usize,
        out: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<(), SpoolError> {
        let mut want = from.max(self.low() + 1);
        let mut got = 0usize;

        while got < max && want < end {
            let Some(key) = self.segment_for(want) else {
                break;
            };
            let seg = &self.segs[&key];
            want = want.max(seg.first_seq());
            let mark = seg.mark_for(want);
            let reuse = self
                .reader
                .as_ref()
                .is_some_and(|r| r.key == key && r.last < want && mark.seq <= r.last + 1);
            if !reuse {
                let file = open_for_reading(&seg.path).map_err(io_err(&seg.path))?;
                let sc = Scanner::new(file, mark.offset).map_err(io_err(&seg.path))?;
                self.reader = Some(CachedReader {
                    key,
                    sc,
                    last: mark.seq - 1,
                });
            }
            let r = self.reader.as_mut().expect("reader");
            loop {
                match r.sc.next().map_err(io_err(&seg.path))? {
                    Item::Record { rec, offset, .. } => {
                        if rec.seq <= r.last {
                            continue;
                        }
                        if rec.seq >= end {
                            // Not taken: the cached reader stays before it for the next call.
                            r.sc.back_to(offset).map_err(io_err(&seg.path))?;
                            want = end;
                            break;
                        }
                        r.last = rec.seq;
                        if rec.seq >= want && seg.contains(rec.seq) {
                            out.push((rec.seq, rec.payload.to_vec()));
                            got += 1;
                            want = rec.seq + 1;
                            if got == max {
                                break;
                            }
                        }
                    }
                    // Corrupt despite valid checksums: never indexed at open (a valid record
                    // with the same seq may follow it).
                    Item::Invalid { .. } | Item::Garbage => {}
                    Item::End { .. } => {
                        // Continue with the next segment (always makes progress).
                        want = want.max(seg.last_seq().saturating_add(1));
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}
