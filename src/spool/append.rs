//! Appending: the budget (`max_bytes`), the drop policies, and a full file system handled like
//! a full budget. See `docs/design.md`, "Full spool: drop policies".

use crate::spool::index::Segment;
use crate::spool::{
    encode_record, io_err, is_disk_full, segment_name, segment_size_for, Active, Appended,
    FsyncPolicy, Spool, SpoolError, WhenFull, MAX_PAYLOAD, MAX_SEQ, OVERHEAD,
};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;

/// Why [`Spool::write_record`] did not store a record.
enum Unwritten {
    /// ENOSPC or EDQUOT (nothing of the record left behind).
    DiskFull(PathBuf, io::Error),
    Failed(SpoolError),
}

impl From<SpoolError> for Unwritten {
    fn from(e: SpoolError) -> Unwritten {
        match e {
            SpoolError::Io { path, source } if is_disk_full(&source) => {
                Unwritten::DiskFull(path, source)
            }
            e => Unwritten::Failed(e),
        }
    }
}

impl Spool {
    /// Deletes the oldest segment (the active one too, if it is the only one), counting its
    /// unacked records as dropped. Returns how many, or None if there is no segment.
    fn drop_oldest_segment(&mut self) -> Result<Option<u64>, SpoolError> {
        let Some((&key, seg)) = self.segs.iter().next() else {
            return Ok(None);
        };
        let n = seg.count_in(self.low(), u64::MAX);
        let last = seg.last_seq();
        self.remove_segment(key)?;
        self.live -= n;
        self.dropped_upto = self.dropped_upto.max(last);
        self.dropped_oldest += n;
        self.drop_log.oldest += n;
        Ok(Some(n))
    }

    /// Assigns the next seq, builds the payload with it, stores it. On return the record has
    /// been handed to the kernel with write(2) (and fsynced under `fsync = "always"`).
    ///
    /// `build` may return a borrow of a caller's buffer (`&[u8]`), so the caller keeps the
    /// payload for the outbox without a copy. The payload must be UTF-8 (the spool reads back
    /// only UTF-8 payloads).
    ///
    /// A full file system (ENOSPC, EDQUOT) is handled like a full `max_bytes`: no partial
    /// record is left behind, and `when_full` applies: `drop_newest` returns
    /// [`Appended::DroppedNewest`]; `drop_oldest` deletes the oldest segments one by one,
    /// retrying after each. If nothing is left to delete the reading is not stored and
    /// [`SpoolError::DiskFull`] carries its seq (which is used up).
    pub fn append_with<P: AsRef<[u8]>>(
        &mut self,
        time_ms: u64,
        build: impl FnOnce(u64) -> P,
    ) -> Result<Appended, SpoolError> {
        let seq = self.next_seq;
        if seq > MAX_SEQ {
            return Err(SpoolError::SeqsExhausted {
                dir: self.dir.clone(),
            });
        }
        let payload = build(seq);
        let payload = payload.as_ref();
        let rec_len = (OVERHEAD + payload.len()) as u64;
        if payload.len() > MAX_PAYLOAD || rec_len > self.cfg.max_bytes {
            let limit = (MAX_PAYLOAD as u64).min(self.cfg.max_bytes - OVERHEAD as u64);
            return Err(SpoolError::RecordTooLarge {
                len: payload.len(),
                limit,
            });
        }
        if let Err(e) = std::str::from_utf8(payload) {
            return Err(SpoolError::NotUtf8 {
                valid_up_to: e.valid_up_to(),
            });
        }

        let mut dropped = 0u64;
        if self.total_bytes + rec_len > self.cfg.max_bytes {
            // A fully acked active segment is kept for appending; give its space back first.
            if let Some(a) = &self.active {
                if !a.fresh && self.segs[&a.key].last_seq() <= self.low() {
                    let key = a.key;
                    self.remove_segment(key)?;
                }
            }
        }
        if self.total_bytes + rec_len > self.cfg.max_bytes {
            match self.cfg.when_full {
                WhenFull::DropNewest => return Ok(self.drop_newest()),
                WhenFull::DropOldest => {
                    let mut res = Ok(());
                    while self.total_bytes + rec_len > self.cfg.max_bytes {
                        match self.drop_oldest_segment() {
                            Ok(Some(n)) => dropped += n,
                            Ok(None) => break,
                            Err(e) => {
                                res = Err(e);
                                break;
                            }
                        }
                    }
                    self.maybe_log_drops();
                    res?;
                }
            }
        }

        self.scratch.clear();
        encode_record(seq, time_ms, payload, &mut self.scratch);
        let mut disk_full = false;
        loop {
            let (path, source) = match self.write_record(seq, time_ms, rec_len) {
                Ok(()) => break,
                Err(Unwritten::Failed(e)) => return Err(e),
                Err(Unwritten::DiskFull(path, source)) => (path, source),
            };
            if !disk_full {
                disk_full = true;
                self.on_disk_full(&source);
            }
            if self.cfg.when_full == WhenFull::DropNewest {
                return Ok(self.drop_newest());
            }
            // drop_oldest: unlinks still queued for the helper free space now; then the oldest
            // segment goes, and so on.
            if self.deleter.delete_pending_now() > 0 {
                continue;
            }
            let freed = self.drop_oldest_segment();
            if freed.is_ok() {
                // The space must be free before the retry.
                self.deleter.delete_pending_now();
            }
            match freed? {
                Some(n) => {
                    dropped += n;
                    self.maybe_log_drops();
                }
                None => {
                    self.next_seq = seq + 1;
                    self.not_stored += 1;
                    self.maybe_log_drops();
                    return Err(SpoolError::DiskFull { seq, path, source });
                }
            }
        }
        Ok(Appended::Stored {
            seq,
            dropped_oldest: dropped,
        })
    }

    fn drop_newest(&mut self) -> Appended {
        self.dropped_newest += 1;
        self.drop_log.newest += 1;
        self.maybe_log_drops();
        Appended::DroppedNewest
    }

    /// Counts a full file system and sizes new segments for the space that turned out to be
    /// there, so that `drop_oldest` frees it in steps of about an eighth.
    fn on_disk_full(&mut self, e: &io::Error) {
        self.disk_full += 1;
        self.drop_log.disk_full += 1;
        let size = segment_size_for(self.total_bytes);
        if size < self.segment_size {
            log::warn!(
                "spool: {}: file system full ({e}) with {} bytes spooled (max_bytes={}); new \
                 segments are {size} bytes",
                self.dir.display(),
                self.total_bytes,
                self.cfg.max_bytes
            );
            self.segment_size = size;
        }
    }

    /// Writes the encoded record in `scratch` (seq `seq`) to the active segment, rolling to a
    /// new one first if needed. On failure nothing of it stays in the file and no seq is used,
    /// unless the partial record cannot be removed (then the seq is used up).
    fn write_record(&mut self, seq: u64, time_ms: u64, rec_len: u64) -> Result<(), Unwritten> {
        let roll = match &self.active {
            None => true,
            Some(a) if a.fresh => false,
            Some(a) => {
                let b = self.segs[&a.key].bytes;
                b > 0 && b + rec_len > self.segment_size
            }
        };
        if roll {
            self.roll(seq).map_err(Unwritten::from)?;
        }

        let active = self.active.as_mut().expect("active segment after roll");
        let fresh = active.fresh;
        let offset = if fresh {
            0
        } else {
            self.segs[&active.key].bytes
        };
        if let Err(e) = active.file.write_all(&self.scratch) {
            let path = active.path.clone();
            // The cached reader may hold bytes of the partial record.
            self.reader = None;
            let undone = if fresh {
                self.active = None;
                fs::remove_file(&path)
            } else {
                active.file.set_len(offset)
            };
            if let Err(e2) = undone {
                // Part of the record may stay on disk: its seq must not be handed out again.
                log::error!(
                    "spool: cannot remove a partial record from {}: {e2}",
                    path.display()
                );
                self.next_seq = seq + 1;
            }
            return Err(if is_disk_full(&e) {
                Unwritten::DiskFull(path, e)
            } else {
                Unwritten::Failed(SpoolError::Io { path, source: e })
            });
        }
        self.next_seq = seq + 1;
        if fresh {
            active.fresh = false;
            self.segs.insert(seq, Segment::new(active.path.clone()));
            debug_assert_eq!(active.key, seq);
        }
        let key = active.key;
        let seg = self.segs.get_mut(&key).expect("active segment indexed");
        seg.push(seq, time_ms, offset);
        seg.bytes += rec_len;
        self.total_bytes += rec_len;
        self.live += 1;
        match self.cfg.fsync {
            FsyncPolicy::Always => {
                // Durable, then queued: the helper thread syncs (one sync covers every record
                // written before it starts) and then moves `sendable_end` past this seq. The
                // record is stored (its seq used): a failure here is no reason to write it
                // again.
                let a = self.active.as_ref().expect("active");
                match self
                    .deleter
                    .sync_durable(&a.path, || a.file.try_clone(), fresh, seq + 1)
                    .map_err(|e| Unwritten::Failed(io_err(&a.path)(e)))?
                {
                    Some(counted) => self.fsyncs += u64::from(counted) + u64::from(fresh),
                    None => {
                        self.fsyncs += 1 + u64::from(fresh);
                        self.durable_next = seq + 1;
                    }
                }
            }
            FsyncPolicy::Interval => {
                self.dirty = true;
                self.dir_dirty |= fresh;
                self.durable_next = seq + 1;
            }
        }
        Ok(())
    }

    /// Closes the active segment and creates a new one named `seq` (not indexed until its
    /// first record is written).
    fn roll(&mut self, seq: u64) -> Result<(), SpoolError> {
        if let Some(old) = self.active.take() {
            if self.dirty {
                // Under "interval" only the active file can be dirty: the helper thread syncs
                // it (the descriptor moves there) while the loop goes on.
                let Active { file, path, .. } = old;
                if self
                    .deleter
                    .sync_data(&path, move || Ok(file))
                    .map_err(io_err(&path))?
                {
                    self.fsyncs += 1;
                }
                self.dirty = false;
            }
        }
        let path = self.dir.join(segment_name(seq));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        preallocate(&file, self.segment_size);
        self.active = Some(Active {
            key: seq,
            file,
            path,
            fresh: true,
        });
        // The previous active segment may be fully acked already.
        self.delete_dead()
    }
}

/// Reserves a new segment's blocks at once (beyond its end: the size stays what was written,
/// so recovery reads what it always read). Appends then land in allocated extents, which
/// ext4 maps from its extent cache without `i_data_sem`; appending into a hole takes that lock
/// for writing, and the writeback of the same file (the helper's fdatasync, the kernel's
/// flusher) holds it across metadata reads that wait behind every other write in the disk's
/// queue: under a disk flood one append waited 372 ms on it. An optimisation only: a file
/// system without fallocate, or without the space, gets the blocks as before (and anything
/// half-reserved is given back).
fn preallocate(file: &std::fs::File, len: u64) {
    use std::os::fd::AsRawFd;
    let Ok(len) = libc::off_t::try_from(len) else {
        return;
    };
    // SAFETY: plain system call on an open descriptor.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len) };
    if r != 0 {
        let _ = file.set_len(0);
    }
}
