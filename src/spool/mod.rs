//! Reliable delivery: an append-only on-disk spool of readings (issue 3).
//!
//! Every reading is appended here before it is queued for sending, and leaves only when a
//! cumulative ack covers its seq (or when the spool is full and `drop_oldest` discards it).
//! Layout of the spool directory:
//!
//! * `NNNNNNNNNNNNNNNNNNNN.seg`: segment files, named by the seq of their first record
//!   (20 digits, so names sort by seq). Records are only ever appended; a segment is unlinked
//!   once every record in it is acked (or dropped). Nothing is rewritten.
//! * `state`: one line holding the next seq (as of its last write) and the last persisted ack, replaced
//!   atomically (temp file + fsync + rename + directory fsync).
//!
//! See `docs/design.md` for the format, the recovery algorithm and the exact crash guarantees.

mod deleter;
mod record;
mod scan;
mod state;
#[cfg(test)]
mod tests;

pub use crate::spool::record::{
    decode_header, decode_record, encode_record, DecodeError, Header, Record, HEADER_LEN,
    MAX_PAYLOAD, OVERHEAD,
};

use crate::spool::deleter::Deleter;
use crate::spool::scan::{Item, Scanner};
use crate::spool::state::{State, STATE_FILE, STATE_TMP};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Smallest accepted `max_bytes`.
pub const MIN_MAX_BYTES: u64 = 4096;
const MIN_SEGMENT: u64 = 4 * 1024;
const MAX_SEGMENT: u64 = 4 * 1024 * 1024;
/// A seek mark (seq, time, offset) is kept in memory every this many bytes of a segment.
const MARK_STRIDE: u64 = 16 * 1024;
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);
const SEGMENT_EXT: &str = ".seg";

/// Default `[spool] replay_max_per_s`: far above what serial sensors produce (a 115200-baud
/// port carries at most ~600 short lines/s), low enough that a backlog drain leaves the CPU
/// to commands (docs/benchmarks.md: unpaced, a 1,000,000-reading drain kept both cores busy
/// and command latency p99 went to 2.5–3.9 ms, 6 ms with the gateway on one core).
pub const DEFAULT_REPLAY_MAX_PER_S: u32 = 20_000;

/// `[spool]` configuration.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Upper bound on the total size of the segment files, in bytes (default 64 MiB).
    pub max_bytes: u64,
    /// What to discard when an append would exceed `max_bytes` (default `drop_oldest`).
    pub when_full: WhenFull,
    /// When appended data is forced to stable storage (default `interval`).
    pub fsync: FsyncPolicy,
    /// Period of the fsync under `fsync = "interval"`, and the minimum period between two
    /// writes of the persisted ack (default 1000).
    pub fsync_interval_ms: u64,
    /// Seconds without an ack, while readings are unacked, before they are sent again
    /// (default 10). Used by the gateway, not by the spool itself.
    pub retransmit_s: u64,
    /// Most readings per second read back from the spool (a backlog after an outage, or a
    /// retransmission); 0: no limit (default 20000). Readings that find no backlog go out
    /// directly and are not paced. Used by the gateway, not by the spool itself.
    pub replay_max_per_s: u32,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            max_bytes: 64 * 1024 * 1024,
            when_full: WhenFull::default(),
            fsync: FsyncPolicy::default(),
            fsync_interval_ms: 1000,
            retransmit_s: 10,
            replay_max_per_s: DEFAULT_REPLAY_MAX_PER_S,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the oldest segment(s), counting their unacked readings as dropped.
    #[default]
    DropOldest,
    /// Refuse the new reading (it gets no seq).
    DropNewest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// fsync every append before it returns (and the directory on segment create/delete).
    Always,
    /// fsync from [`Spool::tick`] when something was written since the last fsync.
    #[default]
    Interval,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "spool I/O error on {}: {source}; check that gateway.data_dir is on a mounted, \
         writable, not-full file system and that zgate's user may read and write it",
        path.display()
    )]
    Io { path: PathBuf, source: io::Error },
    #[error("invalid [spool] configuration: {reason}")]
    InvalidConfig { reason: String },
    #[error(
        "reading of {len} payload bytes is larger than the spool accepts ({limit} bytes); \
         send smaller readings or raise spool.max_bytes"
    )]
    RecordTooLarge { len: usize, limit: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored (written to the OS; also fsynced under `fsync = "always"`). `dropped_oldest`
    /// unacked readings were discarded to make room.
    Stored { seq: u64, dropped_oldest: u64 },
    /// The spool is full and `when_full = "drop_newest"`: not stored, no seq consumed.
    DroppedNewest,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Total size of the segment files.
    pub bytes: u64,
    /// Stored readings not yet acked (nor dropped).
    pub readings: u64,
    /// `time_ms` of the oldest unacked reading.
    pub oldest_unacked_ms: Option<u64>,
    pub dropped_oldest: u64,
    pub dropped_newest: u64,
    pub next_seq: u64,
    pub acked: u64,
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    seq: u64,
    time_ms: u64,
    offset: u64,
}

/// In-memory index of one segment file: which seqs it holds (as inclusive runs; one run unless
/// corruption or a restart left gaps) and sparse seek marks.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    bytes: u64,
    runs: Vec<(u64, u64)>,
    marks: Vec<Mark>,
}

impl Segment {
    fn new(path: PathBuf) -> Segment {
        Segment {
            path,
            bytes: 0,
            runs: Vec::new(),
            marks: Vec::new(),
        }
    }
    fn first_seq(&self) -> u64 {
        self.runs.first().map_or(0, |r| r.0)
    }
    fn last_seq(&self) -> u64 {
        self.runs.last().map_or(0, |r| r.1)
    }
    fn push(&mut self, seq: u64, time_ms: u64, offset: u64) {
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
    fn count_in(&self, lo: u64, hi: u64) -> u64 {
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
    fn first_above(&self, low: u64) -> Option<u64> {
        self.runs
            .iter()
            .find(|r| r.1 > low)
            .map(|r| r.0.max(low + 1))
    }
    fn contains(&self, seq: u64) -> bool {
        let i = self.runs.partition_point(|r| r.1 < seq);
        self.runs.get(i).is_some_and(|r| r.0 <= seq)
    }
    /// The last mark at or before `seq` (the first mark if none).
    fn mark_for(&self, seq: u64) -> Mark {
        let i = self.marks.partition_point(|m| m.seq <= seq);
        self.marks[i.saturating_sub(1)]
    }
}

struct Active {
    key: u64,
    file: File,
    path: PathBuf,
    /// Created but no record written yet (not in the index).
    fresh: bool,
}

struct CachedReader {
    key: u64,
    sc: Scanner,
    /// The reader is positioned after the record with this seq.
    last: u64,
}

#[derive(Default)]
struct DropLog {
    last: Option<Instant>,
    oldest: u64,
    newest: u64,
}

/// The spool. Single-threaded; all methods are meant to be called from the event loop.
pub struct Spool {
    dir: PathBuf,
    dir_handle: File,
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
    dirty: bool,
    dir_dirty: bool,
    ack_dirty: bool,
    last_state_write: Option<Instant>,
    fsyncs: u64,
    reader: Option<CachedReader>,
    drop_log: DropLog,
    scratch: Vec<u8>,
    /// Declared last: dropped after everything else, it waits for queued unlinks.
    deleter: Deleter,
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
    /// Opens (creating `dir` if needed) and recovers the spool. Only real I/O errors fail;
    /// invalid contents are cut off or skipped and reported in [`Recovery::discarded_bytes`].
    pub fn open(dir: &Path, cfg: SpoolConfig) -> Result<(Spool, Recovery), SpoolError> {
        if cfg.max_bytes < MIN_MAX_BYTES {
            return Err(SpoolError::InvalidConfig {
                reason: format!(
                    "max_bytes = {} is too small; use at least {MIN_MAX_BYTES}",
                    cfg.max_bytes
                ),
            });
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let dir_handle = File::open(dir).map_err(io_err(dir))?;
        let tmp = dir.join(STATE_TMP);
        match fs::remove_file(&tmp) {
            Ok(()) => log::debug!("spool: removed leftover {}", tmp.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&tmp)(e)),
        }
        let state_path = dir.join(STATE_FILE);
        let loaded = state::load(dir).map_err(io_err(&state_path))?;

        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            match name.to_str().and_then(parse_segment_name) {
                Some(n) => names.push((n, entry.path())),
                None if name == STATE_FILE => {}
                None => log::debug!("spool: ignoring {}", entry.path().display()),
            }
        }
        names.sort();
        let had_segment_files = !names.is_empty();

        let mut rec = Recovery::default();
        let mut segs = BTreeMap::new();
        let mut last_seq = 0u64;
        let mut max_seen = 0u64;
        let mut dir_changed = false;
        for (_, path) in names {
            let file = File::open(&path).map_err(io_err(&path))?;
            let mut sc = Scanner::new(file, 0).map_err(io_err(&path))?;
            let mut seg = Segment::new(path.clone());
            let mut accepted = 0u64;
            let mut valid_end = 0u64;
            let mut out_of_order = 0u64;
            let end = loop {
                match sc.next().map_err(io_err(&path))? {
                    Item::Record {
                        rec: r,
                        offset,
                        len,
                    } => {
                        if r.seq > last_seq {
                            seg.push(r.seq, r.time_ms, offset);
                            last_seq = r.seq;
                            accepted += len;
                            valid_end = offset + len;
                            rec.records += 1;
                        } else {
                            out_of_order += 1;
                            max_seen = max_seen.max(r.seq);
                        }
                    }
                    Item::Garbage => {}
                    Item::End { offset, tail } => break offset + tail,
                }
            };
            max_seen = max_seen.max(sc.max_bad_seq);
            drop(sc);
            let discarded = end - accepted;
            rec.discarded_bytes += discarded;
            if seg.runs.is_empty() {
                log::warn!(
                    "spool: {}: no valid record in {end} bytes; deleting the segment",
                    path.display()
                );
                fs::remove_file(&path).map_err(io_err(&path))?;
                dir_changed = true;
                continue;
            }
            if valid_end < end {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(valid_end).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
                log::warn!(
                    "spool: {}: cut off a torn or corrupt tail of {} bytes (file was {end} bytes)",
                    path.display(),
                    end - valid_end
                );
            }
            let skipped = discarded - (end - valid_end);
            if skipped > 0 {
                log::warn!(
                    "spool: {}: skipped {skipped} corrupt bytes inside the segment \
                     ({out_of_order} out-of-order records)",
                    path.display()
                );
            }
            seg.bytes = valid_end;
            segs.insert(seg.first_seq(), seg);
        }
        max_seen = max_seen.max(last_seq);

        let (floor, acked, persisted) = match loaded {
            state::Loaded::Ok(s) => (s.floor, s.acked, true),
            state::Loaded::Missing if !had_segment_files => (1, 0, false),
            state::Loaded::Missing => {
                log::warn!(
                    "spool: {} is missing but segments exist; resuming above the highest seq \
                     on disk and resending everything stored",
                    state_path.display()
                );
                (max_seen + 1, 0, false)
            }
            state::Loaded::Corrupt(why) => {
                log::error!(
                    "spool: {} is corrupt ({why}); resuming above the highest seq on disk and \
                     resending everything stored",
                    state_path.display()
                );
                (max_seen + 1, 0, false)
            }
        };
        // Seqs stay contiguous across restarts: a backend that acks the highest contiguous seq
        // must never wait for a seq that was skipped. After kill -9 every appended record is
        // on disk (write(2) returned), so `max_seen + 1` is exact; `floor` (the exact next seq
        // saved by the last state write) and the persisted ack cover fully deleted spools.
        let next_seq = floor.max(max_seen + 1).max(acked + 1).max(1);
        let acked = acked.min(next_seq - 1);

        let active = match segs.iter().next_back() {
            Some((&key, seg)) => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&seg.path)
                    .map_err(io_err(&seg.path))?;
                Some(Active {
                    key,
                    file,
                    path: seg.path.clone(),
                    fresh: false,
                })
            }
            None => None,
        };
        let total_bytes = segs.values().map(|s| s.bytes).sum();
        let live = segs.values().map(|s| s.count_in(acked, u64::MAX)).sum();
        let deleter = Deleter::new(dir.to_path_buf(), cfg.fsync == FsyncPolicy::Always);
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            dir_handle,
            segment_size: segment_size_for(cfg.max_bytes),
            cfg,
            segs,
            active,
            next_seq,
            seq_floor: if persisted { floor } else { 0 },
            acked,
            dropped_upto: 0,
            total_bytes,
            live,
            dropped_oldest: 0,
            dropped_newest: 0,
            dirty: false,
            dir_dirty: false,
            ack_dirty: false,
            last_state_write: None,
            fsyncs: 0,
            reader: None,
            drop_log: DropLog::default(),
            scratch: Vec::new(),
            deleter,
        };
        if dir_changed {
            spool.sync_dir()?;
        }
        spool.delete_dead()?;
        rec.segments = spool.segs.len();
        rec.next_seq = spool.next_seq;
        rec.acked = spool.acked;
        log::info!(
            "spool: {}: {} segments, {} records ({} unacked), {} bytes discarded, next seq {}, \
             acked {}",
            dir.display(),
            rec.segments,
            rec.records,
            spool.live,
            rec.discarded_bytes,
            rec.next_seq,
            rec.acked
        );
        Ok((spool, rec))
    }

    /// The seq the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The highest acked seq (cumulative).
    pub fn acked(&self) -> u64 {
        self.acked
    }

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

    /// Number of fsync calls issued (files, directory and state), for tests and diagnostics.
    pub fn fsync_count(&self) -> u64 {
        self.fsyncs
    }

    /// Records at or below this seq are gone: acked or dropped.
    fn low(&self) -> u64 {
        self.acked.max(self.dropped_upto)
    }

    /// Assigns the next seq, builds the payload with it, stores it. On return the record has
    /// been handed to the kernel with write(2) (and fsynced under `fsync = "always"`).
    ///
    /// `build` may return a borrow of a caller's buffer (`&[u8]`), so the caller keeps the
    /// payload for the outbox without a copy.
    pub fn append_with<P: AsRef<[u8]>>(
        &mut self,
        time_ms: u64,
        build: impl FnOnce(u64) -> P,
    ) -> Result<Appended, SpoolError> {
        let seq = self.next_seq;
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
                WhenFull::DropNewest => {
                    self.dropped_newest += 1;
                    self.drop_log.newest += 1;
                    self.maybe_log_drops();
                    return Ok(Appended::DroppedNewest);
                }
                WhenFull::DropOldest => {
                    let mut res = Ok(());
                    while self.total_bytes + rec_len > self.cfg.max_bytes {
                        let Some((&key, seg)) = self.segs.iter().next() else {
                            break;
                        };
                        let n = seg.count_in(self.low(), u64::MAX);
                        let last = seg.last_seq();
                        if let Err(e) = self.remove_segment(key) {
                            res = Err(e);
                            break;
                        }
                        self.live -= n;
                        dropped += n;
                        self.dropped_upto = self.dropped_upto.max(last);
                    }
                    self.dropped_oldest += dropped;
                    self.drop_log.oldest += dropped;
                    self.maybe_log_drops();
                    res?;
                }
            }
        }

        let roll = match &self.active {
            None => true,
            Some(a) if a.fresh => false,
            Some(a) => {
                let b = self.segs[&a.key].bytes;
                b > 0 && b + rec_len > self.segment_size
            }
        };
        if roll {
            self.roll(seq)?;
        }

        self.scratch.clear();
        encode_record(seq, time_ms, payload, &mut self.scratch);
        let active = self.active.as_mut().expect("active segment after roll");
        let fresh = active.fresh;
        let offset = if fresh {
            0
        } else {
            self.segs[&active.key].bytes
        };
        // The seq is consumed even if the write fails: part of the record may be on disk.
        self.next_seq = seq + 1;
        if let Err(e) = active.file.write_all(&self.scratch) {
            let path = active.path.clone();
            self.reader = None;
            if fresh {
                self.active = None;
                let _ = fs::remove_file(&path);
            } else {
                let _ = active.file.set_len(offset);
            }
            return Err(SpoolError::Io { path, source: e });
        }
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
                let a = self.active.as_ref().expect("active");
                a.file.sync_data().map_err(io_err(&a.path))?;
                self.fsyncs += 1;
                if fresh {
                    self.sync_dir()?;
                }
            }
            FsyncPolicy::Interval => {
                self.dirty = true;
                self.dir_dirty |= fresh;
            }
        }
        Ok(Appended::Stored {
            seq,
            dropped_oldest: dropped,
        })
    }

    /// Closes the active segment and creates a new one named `seq` (not indexed until its
    /// first record is written).
    fn roll(&mut self, seq: u64) -> Result<(), SpoolError> {
        if let Some(old) = self.active.take() {
            if self.dirty {
                // Under "interval" only the active file can be dirty: the helper thread syncs
                // it (the descriptor moves there) while the loop goes on.
                self.deleter
                    .sync_data(old.file, old.path.clone())
                    .map_err(io_err(&old.path))?;
                self.fsyncs += 1;
                self.dirty = false;
            }
        }
        let path = self.dir.join(segment_name(seq));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        self.active = Some(Active {
            key: seq,
            file,
            path,
            fresh: true,
        });
        // The previous active segment may be fully acked already.
        self.delete_dead()
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
            floor: floor.max(self.next_seq),
            acked: self.acked,
        };
        if inline {
            state::store(&self.dir, &self.dir_handle, &s)
        } else {
            self.deleter.store_state(s)
        }
        .map_err(io_err(&self.dir.join(STATE_FILE)))?;
        self.fsyncs += 2;
        self.seq_floor = s.floor;
        self.ack_dirty = false;
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
        self.ack_dirty = true;
        self.delete_dead()?;
        Ok(newly)
    }

    /// Lowest stored seq that is neither acked nor dropped.
    pub fn first_unacked(&self) -> Option<u64> {
        let low = self.low();
        self.segs.values().find_map(|s| s.first_above(low))
    }

    /// `time_ms` of the oldest unacked record. Costs no I/O when that record starts a segment
    /// or sits on a seek mark; else one read of at most one mark stride (16 KiB).
    fn oldest_unacked_ms(&self) -> Option<u64> {
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
                Item::Record { .. } | Item::Garbage => {}
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
        let mut want = from.max(self.low() + 1);
        let mut got = 0usize;
        while got < max {
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
                    Item::Record { rec, .. } => {
                        if rec.seq <= r.last {
                            continue;
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
                    Item::Garbage => {}
                    Item::End { .. } => {
                        // Continue with the next segment (always makes progress).
                        want = want.max(seg.last_seq() + 1);
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Call from a timer every `fsync_interval_ms`: under `fsync = "interval"` fsyncs the
    /// active segment (and the directory) if written since the last fsync; persists the ack
    /// if it changed (at most once per `fsync_interval_ms`); logs pending drop counts.
    ///
    /// The fsyncs and the `state` write are handed to the spool's helper thread (each one can
    /// take milliseconds, too long for the loop); `tick()` itself does no blocking I/O. An error
    /// the helper met since the previous tick is returned from this one.
    pub fn tick(&mut self) -> Result<(), SpoolError> {
        if self.cfg.fsync == FsyncPolicy::Interval {
            self.sync_pending(false)?;
        }
        let every = Duration::from_millis(self.cfg.fsync_interval_ms);
        if self.ack_dirty && !matches!(self.last_state_write, Some(t) if t.elapsed() < every) {
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
                } else {
                    let dup = a.file.try_clone().map_err(io_err(&a.path))?;
                    self.deleter
                        .sync_data(dup, a.path.clone())
                        .map_err(io_err(&a.path))?;
                }
                self.fsyncs += 1;
            }
            self.dirty = false;
        }
        if self.dir_dirty {
            if inline {
                self.sync_dir()?;
            } else {
                self.deleter.sync_dir().map_err(io_err(&self.dir))?;
                self.fsyncs += 1;
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
        self.dirty |= earlier.is_some() && self.active.is_some();
        self.sync_pending(true)?;
        self.write_state(self.next_seq, true)?;
        let (o, n) = (self.drop_log.oldest, self.drop_log.newest);
        if o + n > 0 {
            self.drop_log.last = None;
            self.maybe_log_drops();
        }
        match earlier {
            Some((path, source)) => Err(SpoolError::Io { path, source }),
            None => Ok(()),
        }
    }

    fn maybe_log_drops(&mut self) {
        let d = &mut self.drop_log;
        if d.oldest + d.newest == 0 || d.last.is_some_and(|t| t.elapsed() < DROP_LOG_EVERY) {
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
        SpoolStats {
            bytes: self.total_bytes,
            readings: self.live,
            oldest_unacked_ms: self.oldest_unacked_ms(),
            dropped_oldest: self.dropped_oldest,
            dropped_newest: self.dropped_newest,
            next_seq: self.next_seq,
            acked: self.acked,
        }
    }
}
