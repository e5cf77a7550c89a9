//! Start-up recovery: [`Spool::open`] scans the segment files, cuts torn tails, skips corrupt
//! records, restores seqs and the ack from `state`, and gives a new spool its identity. See
//! `docs/design.md`, "Start-up recovery".

use crate::spool::deleter::Deleter;
use crate::spool::index::Segment;
use crate::spool::scan::{Item, Scanner};
use crate::spool::state::{self, ID_LEN, STATE_FILE, STATE_TMP};
use crate::spool::{
    disk_space, io_err, is_disk_full, parse_segment_name, segment_size_for, Active, DropLog,
    FsyncPolicy, Recovery, Spool, SpoolConfig, SpoolError, MAX_SEQ, MIN_MAX_BYTES,
};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

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
        // Highest seq seen on disk, also in records not kept; never above MAX_SEQ (the scanner
        // treats higher ones as corrupt), so `max_seen + 1` cannot overflow.
        let mut max_seen = 0u64;
        let mut dir_changed = false;
        for (_, path) in names {
            let file = File::open(&path).map_err(io_err(&path))?;
            let mut sc = Scanner::new(file, 0).map_err(io_err(&path))?;
            let mut seg = Segment::new(path.clone());
            let mut accepted = 0u64;
            let mut valid_end = 0u64;
            let mut out_of_order = 0u64;
            let mut corrupt = 0u64;
            let mut first_corrupt = None;
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
                    Item::Invalid { seq, .. } => {
                        corrupt += 1;
                        first_corrupt.get_or_insert(seq);
                    }
                    Item::Garbage => {}
                    Item::End { offset, tail } => break offset + tail,
                }
            };
            max_seen = max_seen.max(sc.max_bad_seq);
            drop(sc);
            rec.corrupt_records += corrupt;
            if let Some(seq) = first_corrupt {
                log::warn!(
                    "spool: {}: {corrupt} records (the first seq={seq}) have valid checksums \
                     but contents no spool writes (a payload that is not UTF-8, or a seq above \
                     {MAX_SEQ}): corrupt, skipped",
                    path.display()
                );
            }
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
                     ({out_of_order} out-of-order records, {corrupt} corrupt records)",
                    path.display()
                );
            }
            seg.bytes = valid_end;
            segs.insert(seg.first_seq(), seg);
        }
        max_seen = max_seen.max(last_seq);

        let (floor, acked, persisted, id) = match loaded {
            state::Loaded::Ok(s) => (s.floor, s.acked, true, s.id),
            state::Loaded::Missing if !had_segment_files => (1, 0, false, None),
            state::Loaded::Missing => {
                log::warn!(
                    "spool: {} is missing but segments exist; resuming above the highest seq \
                     on disk and resending everything stored, under a new spool_id",
                    state_path.display()
                );
                (max_seen.saturating_add(1), 0, false, None)
            }
            state::Loaded::Corrupt(why) => {
                log::error!(
                    "spool: {} is corrupt ({why}); resuming above the highest seq on disk and \
                     resending everything stored, under a new spool_id",
                    state_path.display()
                );
                (max_seen.saturating_add(1), 0, false, None)
            }
        };
        let new_spool_id = id.is_none();
        let id = match id {
            Some(id) => id,
            None => state::new_id().map_err(io_err(Path::new("/dev/urandom")))?,
        };
        let spool_id = String::from_utf8(id.to_vec()).expect("hex id");
        debug_assert_eq!(spool_id.len(), ID_LEN);
        if new_spool_id && persisted {
            log::info!(
                "spool: {} has no spool_id (written by an older zgate); this spool is now \
                 spool_id={spool_id}",
                state_path.display()
            );
        } else if new_spool_id {
            log::info!("spool: {}: new spool_id={spool_id}", dir.display());
        }
        // Seqs stay contiguous across restarts: a backend that acks the highest contiguous seq
        // must never wait for a seq that was skipped. After kill -9 every appended record is
        // on disk (write(2) returned), so `max_seen + 1` is exact; `floor` (the exact next seq
        // saved by the last state write) and the persisted ack cover fully deleted spools.
        // `state` values and seqs on disk are at most MAX_SEQ (+ 1 for the floor): no overflow.
        let next_seq = floor
            .max(max_seen.saturating_add(1))
            .max(acked.saturating_add(1))
            .max(1);
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
        let total_bytes: u64 = segs.values().map(|s| s.bytes).sum();
        let live = segs.values().map(|s| s.count_in(acked, u64::MAX)).sum();

        // A max_bytes the file system cannot hold: the disk fills before the budget does. That
        // works (a full disk is handled like a full budget) but frees space a whole segment at
        // a time, so segments are sized for the space there is.
        let disk = match disk_space(dir) {
            Ok(d) => Some(d),
            Err(e) => {
                log::debug!("spool: statvfs {}: {e}", dir.display());
                None
            }
        };
        let mut budget = cfg.max_bytes;
        if let Some(d) = disk {
            let room = total_bytes.saturating_add(d.avail_bytes);
            if cfg.max_bytes > room {
                log::warn!(
                    "spool: max_bytes={} exceeds the room on {}'s file system: {} bytes free \
                     + {total_bytes} bytes spooled = {room} (file system size {}); when the \
                     disk fills, when_full={:?} applies; lower spool.max_bytes or give \
                     data_dir more space",
                    cfg.max_bytes,
                    dir.display(),
                    d.avail_bytes,
                    d.total_bytes,
                    cfg.when_full
                );
                budget = room;
            }
        }

        let deleter = Deleter::new(dir.to_path_buf(), cfg.fsync == FsyncPolicy::Always);
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            dir_handle,
            spool_id: spool_id.clone(),
            segment_size: segment_size_for(budget),
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
            disk_full: 0,
            not_stored: 0,
            corrupt_records: rec.corrupt_records,
            dirty: false,
            dir_dirty: false,
            state_dirty: false,
            last_state_write: None,
            fsyncs: 0,
            durable_next: next_seq,
            reader: None,
            drop_log: DropLog::default(),
            scratch: Vec::new(),
            deleter,
        };
        if dir_changed {
            spool.sync_dir()?;
        }
        spool.delete_dead()?;
        if new_spool_id {
            // The id is on disk before anyone sees it (hello, stats). A full disk does not stop
            // the start: the write is retried by tick() (and flush()).
            match spool.write_state(spool.next_seq, true) {
                Ok(()) => spool.last_state_write = None,
                Err(SpoolError::Io { source, .. }) if is_disk_full(&source) => {
                    log::warn!(
                        "spool: cannot write {} (disk full: {source}); spool_id={spool_id} is \
                         kept in memory and written as soon as there is room",
                        state_path.display()
                    );
                    spool.disk_full += 1;
                    spool.state_dirty = true;
                }
                Err(e) => return Err(e),
            }
        }
        rec.segments = spool.segs.len();
        rec.next_seq = spool.next_seq;
        rec.acked = spool.acked;
        rec.spool_id = spool_id;
        rec.new_spool_id = new_spool_id;
        rec.disk = disk;
        log::info!(
            "spool: {}: spool_id={} {} segments, {} records ({} unacked), {} bytes discarded \
             ({} corrupt records), next seq {}, acked {}",
            dir.display(),
            rec.spool_id,
            rec.segments,
            rec.records,
            spool.live,
            rec.discarded_bytes,
            rec.corrupt_records,
            rec.next_seq,
            rec.acked
        );
        Ok((spool, rec))
    }
}
