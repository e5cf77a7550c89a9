//! Reliable delivery: an append-only on-disk spool of readings.
//!
//! Every reading is appended here before it is queued for sending, and leaves only when a
//! cumulative ack covers its seq (or when the spool is full and `drop_oldest` discards it).
//! Layout of the spool directory:
//!
//! * `NNNNNNNNNNNNNNNNNNNN.seg`: segment files, named by the seq of their first record
//!   (20 digits, so names sort by seq). Records are only ever appended; a segment is unlinked
//!   once every record in it is acked (or dropped). Nothing is rewritten.
//! * `state`: one line holding the spool's random identity (`spool_id`), the next seq (as of
//!   its last write) and the last persisted ack, replaced atomically (temp file + fsync +
//!   rename + directory fsync).
//!
//! See `docs/design.md` for the format, the recovery algorithm and the exact crash guarantees.

mod append;
mod config;
mod deleter;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod index;
mod read;
mod record;
mod recovery;
mod scan;
mod state;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_budget;
#[cfg(test)]
mod tests_disk;
#[cfg(test)]
mod tests_durable;
#[cfg(test)]
mod tests_recovery;

pub use crate::spool::config::{FsyncPolicy, SpoolConfig, WhenFull, DEFAULT_REPLAY_MAX_PER_S};
pub use crate::spool::record::{
    decode_header, decode_record, encode_record, DecodeError, Header, Record, HEADER_LEN,
    MAX_PAYLOAD, MAX_SEQ, OVERHEAD,
};

pub use crate::spool::error::SpoolError;

use crate::spool::deleter::Deleter;
use crate::spool::error::{io_err, is_disk_full};
use crate::spool::index::Segment;
use crate::spool::read::CachedReader;
use crate::spool::state::{State, STATE_FILE};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Smallest accepted `max_bytes`.
pub const MIN_MAX_BYTES: u64 = 4096;
const MIN_SEGMENT: u64 = 4 * 1024;
const MAX_SEGMENT: u64 = 4 * 1024 * 1024;
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);
const SEGMENT_EXT: &str = ".seg";

/// Space on the file system holding the spool (statvfs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes an unprivileged process may still allocate (`f_bavail`).
    pub avail_bytes: u64,
    /// Size of the file system (`f_blocks`).
    pub total_bytes: u64,
}

/// statvfs of `path`.
pub fn disk_space(path: &Path) -> io::Result<DiskSpace> {
    let v = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    let frag = v.fragment_size() as u64;
    Ok(DiskSpace {
        avail_bytes: (v.blocks_available() as u64).saturating_mul(frag),
        total_bytes: (v.blocks() as u64).saturating_mul(frag),
    })
}

/// What [`Spool::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segment files kept.
    pub segments: usize,
    /// Valid records found (acked or not).
    pub records: u64,
    /// Bytes that are not valid records: cut off torn/corrupt tails, deleted segments without
    /// any valid record, and corrupt regions skipped inside a segment (those stay in the file
    /// and are reported again at the next start).
    pub discarded_bytes: u64,
    /// Seq the next append gets.
    pub next_seq: u64,
    /// Persisted ack (every seq <= this is treated as acked).
    pub acked: u64,
    /// Records with valid checksums but contents no spool writes (a payload that is not
    /// UTF-8, a seq above [`MAX_SEQ`]); skipped, their bytes counted in `discarded_bytes`.
    pub corrupt_records: u64,
    /// The spool's identity (32 lowercase hex characters).
    pub spool_id: String,
    /// True if the spool got a new `spool_id` at this start: a new spool, or a `state` file
    /// that was missing, corrupt or written by a zgate without spool ids.
    pub new_spool_id: bool,
    /// The file system's space at start (None if statvfs failed).
    pub disk: Option<DiskSpace>,
}

/// What [`Spool::append_with`] did with a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored (written to the OS; under `fsync = "always"` its sync is queued: it becomes
    /// sendable later, see [`Spool::sendable_end`]). `dropped_oldest`
    /// unacked readings were discarded to make room.
    Stored {
        /// The reading's seq.
        seq: u64,
        /// Unacked readings deleted (oldest segments) to make room for it.
        dropped_oldest: u64,
    },
    /// The spool (its `max_bytes`, or the file system) is full and
    /// `when_full = "drop_newest"`: not stored, no seq consumed.
    DroppedNewest,
}

/// The spool's counters, for the gateway's `stats` message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// The spool's identity: 32 lowercase hex characters, made when the spool was created.
    pub spool_id: String,
    /// Total size of the segment files.
    pub bytes: u64,
    /// Stored readings not yet acked (nor dropped).
    pub readings: u64,
    /// `time_ms` of the oldest unacked reading.
    pub oldest_unacked_ms: Option<u64>,
    /// Unacked readings deleted with their segment to make room (`when_full = "drop_oldest"`),
    /// since start.
    pub dropped_oldest: u64,
    /// Readings refused because the spool was full (`when_full = "drop_newest"`), since start.
    pub dropped_newest: u64,
    /// The seq the next stored reading gets.
    pub next_seq: u64,
    /// Highest acked seq: every seq up to it is acked (0: none yet).
    pub acked: u64,
    /// Appends (and `state` writes) that found the file system full (ENOSPC or EDQUOT); each
    /// then applied `when_full` like a full `max_bytes`.
    pub disk_full: u64,
    /// Readings that got a seq but could not be stored: the disk was full with nothing left
    /// to free ([`SpoolError::DiskFull`]).
    pub not_stored: u64,
    /// The spool's helper thread has been in one fsync, unlink or `state` write for at least
    /// 5 s: the disk is stalled.
    pub disk_stalled: bool,
    /// Helper operations that took at least 5 s since start.
    pub disk_stalls: u64,
    /// Records found corrupt despite valid checksums (see [`Recovery::corrupt_records`]), at
    /// start and while reading.
    pub corrupt_records: u64,
    /// Bytes still free for zgate on the spool's file system (None if statvfs failed).
    pub disk_avail_bytes: Option<u64>,
}

struct Active {
    key: u64,
    file: File,
    path: PathBuf,
    /// Created but no record written yet (not in the index).
    fresh: bool,
}

#[derive(Default)]
struct DropLog {
    last: Option<Instant>,
    oldest: u64,
    newest: u64,
    /// Disk-full events since the last report.
    disk_full: u64,
}

/// The spool. Single-threaded; all methods are meant to be called from the event loop.
pub struct Spool {
    dir: PathBuf,
    dir_handle: File,
    spool_id: String,
    cfg: SpoolConfig,
    segment_size: u64,
    segs: BTreeMap<u64, Segment>,
    active: Option<Active>,
    next_seq: u64,
    /// Persisted reservation floor (0 = none persisted yet in this run).
    seq_floor: u64,
    acked: u64,
    dropped_upto: u64,
    total_bytes: u64,
    live: u64,
    dropped_oldest: u64,
    dropped_newest: u64,
    disk_full: u64,
    not_stored: u64,
    corrupt_records: u64,
    dirty: bool,
    dir_dirty: bool,
    /// The `state` file is behind: the ack moved, or a write failed (it is retried).
    state_dirty: bool,
    last_state_write: Option<Instant>,
    fsyncs: u64,
    /// Every seq below this is on disk and may be sent: `next_seq` under `fsync =
    /// "interval"`; under `"always"`, what the helper thread's syncs have covered so far (see
    /// [`Spool::sendable_end`]).
    durable_next: u64,
    reader: Option<CachedReader>,
    drop_log: DropLog,
    scratch: Vec<u8>,
    /// Declared last: dropped after everything else, it waits for queued unlinks.
    deleter: Deleter,
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_EXT)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn segment_name(seq: u64) -> String {
    format!("{seq:020}{SEGMENT_EXT}")
}

/// Segment size for a given `max_bytes`: clamp(max_bytes / 8, 4 KiB, 4 MiB).
pub fn segment_size_for(max_bytes: u64) -> u64 {
    (max_bytes / 8).clamp(MIN_SEGMENT, MAX_SEGMENT)
}

impl Spool {
    /// The seq the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Readings below this seq may be sent. Under `fsync = "interval"` that is every stored
    /// reading (`next_seq`). Under `fsync = "always"` a reading is durable before it is sent:
    /// `append_with` only writes it and asks the helper thread for the `fdatasync`, and the
    /// seq moves on when [`Spool::poll_durable`] sees the sync done (the waker set with
    /// [`Spool::set_durable_waker`] says when to look).
    pub fn sendable_end(&self) -> u64 {
        self.durable_next
    }

    /// Takes in what the helper thread has made durable; true if [`Spool::sendable_end`]
    /// moved. Costs one uncontended lock.
    pub fn poll_durable(&mut self) -> bool {
        let d = self.deleter.durable().min(self.next_seq);
        if d > self.durable_next {
            self.durable_next = d;
            true
        } else {
            false
        }
    }

    /// Sets what the helper thread calls (on its own thread) when readings became durable
    /// under `fsync = "always"`: the loop's cue to call [`Spool::poll_durable`].
    pub fn set_durable_waker(&self, wake: Box<dyn Fn() + Send>) {
        self.deleter.set_waker(wake);
    }

    /// Blocks the helper thread in its next operation until the guard is dropped (tests: a
    /// stalled disk).
    #[cfg(test)]
    pub(crate) fn hold_helper(&self) -> impl Drop {
        self.deleter.hold()
    }

    /// The highest acked seq (cumulative).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The spool's identity: 32 lowercase hex characters, random, made when the spool was
    /// created and kept in its `state` file. A wiped or replaced `data_dir` gets a new one, so
    /// a backend can tell its seqs from those of the spool it replaced.
    pub fn spool_id(&self) -> &str {
        &self.spool_id
    }

    /// The spool directory (`data_dir/spool`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Target size of one segment file.
    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segs.len() + usize::from(self.active.as_ref().is_some_and(|a| a.fresh))
    }

    /// Number of fsync calls issued (files, directory and state) on this thread or queued to
    /// the helper thread, for tests and diagnostics. A sync requested while one of the same
    /// file is still queued is covered by it and not counted.
    pub fn fsync_count(&self) -> u64 {
        self.fsyncs
    }

    /// Work items waiting for the helper thread (unlinks, syncs, `state` write), not counting
    /// the one it is doing. At most one sync per segment file, one directory sync and one
    /// `state` write, however long the disk stalls.
    pub fn helper_pending(&self) -> usize {
        self.deleter.status().pending
    }

    /// True when [`Spool::tick`] has work: data or a `state` write (an ack, or a write that
    /// failed and is retried) not yet handed to the disk, or helper work whose outcome the
    /// next tick must look at. A caller that arms its tick timer only after appends and acks
    /// should re-arm it after a tick while this holds.
    pub fn wants_tick(&self) -> bool {
        self.dirty || self.dir_dirty || self.state_dirty || self.deleter.busy()
    }

    /// Records at or below this seq are gone: acked or dropped.
    fn low(&self) -> u64 {
        self.acked.max(self.dropped_upto)
    }

    /// Forgets a segment and queues its file for unlinking (see `deleter.rs`).
    fn remove_segment(&mut self, key: u64) -> Result<(), SpoolError> {
        let Some(seg) = self.segs.remove(&key) else {
            return Ok(());
        };
        if self.active.as_ref().is_some_and(|a| a.key == key) {
            // Close our descriptor before the unlink.
            self.active = None;
            self.dirty = false;
        }
        if self.reader.as_ref().is_some_and(|r| r.key == key) {
            self.reader = None;
        }
        if let Err(e) = self.deleter.delete(seg.path.clone()) {
            let path = seg.path.clone();
            self.segs.insert(key, seg);
            return Err(SpoolError::Io { path, source: e });
        }
        self.total_bytes -= seg.bytes;
        Ok(())
    }

    /// Unlinks every leading segment whose records are all acked or dropped, except the
    /// active one (it keeps taking appends until it is full).
    fn delete_dead(&mut self) -> Result<(), SpoolError> {
        let low = self.low();
        let active = self.active.as_ref().map(|a| a.key);
        while let Some((&key, seg)) = self.segs.iter().next() {
            if seg.last_seq() > low || Some(key) == active {
                break;
            }
            self.remove_segment(key)?;
        }
        Ok(())
    }

    fn sync_dir(&mut self) -> Result<(), SpoolError> {
        self.dir_handle.sync_all().map_err(io_err(&self.dir))?;
        self.fsyncs += 1;
        self.dir_dirty = false;
        Ok(())
    }

    /// Writes the `state` file (temp file, fsync, rename, directory fsync): `inline`, or
    /// queued to the helper thread, which writes it after everything queued before.
    fn write_state(&mut self, floor: u64, inline: bool) -> Result<(), SpoolError> {
        // Invariant: the persisted floor is above every seq handed out.
        let s = State {
            id: Some(self.spool_id.as_bytes().try_into().expect("32 hex chars")),
            floor: floor.max(self.next_seq),
            acked: self.acked,
        };
        let res = if inline {
            state::store(&self.dir, &self.dir_handle, &s)
        } else {
            self.deleter.store_state(s)
        };
        if let Err(e) = res {
            // Retried by the next tick() (and flush()).
            self.state_dirty = true;
            return Err(io_err(&self.dir.join(STATE_FILE))(e));
        }
        self.fsyncs += 2;
        self.seq_floor = s.floor;
        self.state_dirty = false;
        self.last_state_write = Some(Instant::now());
        Ok(())
    }

    /// Cumulative ack: every stored reading with seq <= `seq` is acked. Returns how many
    /// readings became acked. Seqs <= the current ack are ignored; seqs >= next_seq are clamped
    /// to next_seq - 1. Fully acked segments (except the active one) are unlinked. The ack
    /// itself is persisted lazily by [`Spool::tick`] / [`Spool::flush`].
    pub fn ack(&mut self, seq: u64) -> Result<u64, SpoolError> {
        let seq = seq.min(self.next_seq - 1);
        if seq <= self.acked {
            return Ok(0);
        }
        let low = self.low();
        let newly: u64 = if seq > low {
            self.segs
                .range(..=seq)
                .map(|(_, s)| s.count_in(low, seq))
                .sum()
        } else {
            0
        };
        self.acked = seq;
        self.live -= newly;
        self.state_dirty = true;
        self.delete_dead()?;
        Ok(newly)
    }

    /// Lowest stored seq that is neither acked nor dropped.
    pub fn first_unacked(&self) -> Option<u64> {
        let low = self.low();
        self.segs.values().find_map(|s| s.first_above(low))
    }

    /// Call from a timer every `fsync_interval_ms`: under `fsync = "interval"` fsyncs the
    /// active segment (and the directory) if written since the last fsync; persists the ack
    /// if it changed (at most once per `fsync_interval_ms`); logs pending drop counts.
    ///
    /// The fsyncs and the `state` write are handed to the spool's helper thread (each one can
    /// take milliseconds, too long for the loop); `tick()` itself does no blocking I/O. An error
    /// the helper met since the previous tick is returned from this one.
    pub fn tick(&mut self) -> Result<(), SpoolError> {
        self.deleter.status(); // counts and logs a stalled disk
        if let Some(full) = self.deleter.take_state_failure() {
            self.state_dirty = true;
            if full {
                self.disk_full += 1;
                self.drop_log.disk_full += 1;
            }
        }
        if self.cfg.fsync == FsyncPolicy::Interval {
            self.sync_pending(false)?;
        }
        let every = Duration::from_millis(self.cfg.fsync_interval_ms);
        if self.state_dirty && !matches!(self.last_state_write, Some(t) if t.elapsed() < every) {
            self.write_state(self.seq_floor, false)?;
        }
        self.maybe_log_drops();
        match self.deleter.take_error() {
            Some((path, source)) => Err(SpoolError::Io { path, source }),
            None => Ok(()),
        }
    }

    /// fsyncs the active segment if written since the last sync, and the directory if a
    /// segment was created: `inline`, or queued to the helper thread.
    fn sync_pending(&mut self, inline: bool) -> Result<(), SpoolError> {
        if self.dirty {
            if let Some(a) = &self.active {
                if inline {
                    a.file.sync_data().map_err(io_err(&a.path))?;
                    self.fsyncs += 1;
                } else if self
                    .deleter
                    .sync_data(&a.path, || a.file.try_clone())
                    .map_err(io_err(&a.path))?
                {
                    // Not counted when a sync of the file is still queued: that one covers
                    // this data, and a stalled disk does not pile up descriptors.
                    self.fsyncs += 1;
                }
            }
            self.dirty = false;
        }
        if self.dir_dirty {
            if inline {
                self.sync_dir()?;
            } else {
                if self.deleter.sync_dir().map_err(io_err(&self.dir))? {
                    self.fsyncs += 1;
                }
                self.dir_dirty = false;
            }
        }
        Ok(())
    }

    /// Blocks until the background unlinks of deleted segments are done.
    pub fn wait_for_deletions(&self) {
        self.deleter.wait();
    }

    /// Waits for the helper thread (pending unlinks and queued syncs), fsyncs everything now
    /// on the calling thread, and persists the ack and the exact next seq (so a restart after
    /// a flush skips no seqs). Call on shutdown; it costs three to five fsyncs.
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        self.deleter.wait();
        // A sync the helper thread failed is retried by these inline ones (they cover it),
        // and still reported.
        let earlier = self.deleter.take_error();
        self.deleter.take_state_failure(); // written again below
        self.dirty |= earlier.is_some() && self.active.is_some();
        self.sync_pending(true)?;
        self.poll_durable();
        let written = self.write_state(self.next_seq, true);
        if matches!(&written, Err(SpoolError::Io { source, .. }) if is_disk_full(source)) {
            self.disk_full += 1;
            self.drop_log.disk_full += 1;
        }
        let d = &self.drop_log;
        if d.oldest + d.newest + d.disk_full > 0 {
            self.drop_log.last = None;
            self.maybe_log_drops();
        }
        written?;
        match earlier {
            Some((path, source)) => Err(SpoolError::Io { path, source }),
            None => Ok(()),
        }
    }

    fn maybe_log_drops(&mut self) {
        let d = &mut self.drop_log;
        if d.oldest + d.newest + d.disk_full == 0
            || d.last.is_some_and(|t| t.elapsed() < DROP_LOG_EVERY)
        {
            return;
        }
        if d.disk_full > 0 {
            log::warn!(
                "spool: disk full: {} times since the last report, at {} bytes spooled \
                 (max_bytes {}): when_full={:?} dropped {} oldest and {} newest readings, {} \
                 readings not stored (totals: disk_full={} dropped_oldest={} dropped_newest={} \
                 not_stored={}); free space on {}'s file system or lower spool.max_bytes",
                d.disk_full,
                self.total_bytes,
                self.cfg.max_bytes,
                self.cfg.when_full,
                d.oldest,
                d.newest,
                self.not_stored,
                self.disk_full,
                self.dropped_oldest,
                self.dropped_newest,
                self.not_stored,
                self.dir.display()
            );
            d.disk_full = 0;
            d.oldest = 0;
            d.newest = 0;
            d.last = Some(Instant::now());
            return;
        }
        log::warn!(
            "spool full ({} bytes, max_bytes {}): dropped {} oldest and {} newest readings since \
             the last report (totals: {} oldest, {} newest)",
            self.total_bytes,
            self.cfg.max_bytes,
            d.oldest,
            d.newest,
            self.dropped_oldest,
            self.dropped_newest
        );
        d.oldest = 0;
        d.newest = 0;
        d.last = Some(Instant::now());
    }

    /// Current statistics. `oldest_unacked_ms` may read up to 16 KiB from disk (see
    /// `oldest_unacked_ms`); call it at the stats interval, not per reading.
    pub fn stats(&self) -> SpoolStats {
        let helper = self.deleter.status();
        SpoolStats {
            spool_id: self.spool_id.clone(),
            bytes: self.total_bytes,
            readings: self.live,
            oldest_unacked_ms: self.oldest_unacked_ms(),
            dropped_oldest: self.dropped_oldest,
            dropped_newest: self.dropped_newest,
            next_seq: self.next_seq,
            acked: self.acked,
            disk_full: self.disk_full,
            not_stored: self.not_stored,
            disk_stalled: helper.stalled,
            disk_stalls: helper.stalls,
            corrupt_records: self.corrupt_records,
            disk_avail_bytes: disk_space(&self.dir).ok().map(|d| d.avail_bytes),
        }
    }

    /// Space on the spool's file system now (statvfs).
    pub fn disk_space(&self) -> Result<DiskSpace, SpoolError> {
        disk_space(&self.dir).map_err(io_err(&self.dir))
    }
}
