//! The command log: the answered command ids, their digests and replies, on disk in
//! `<data_dir>/commands.log`, so a backend that retries a command across a gateway restart
//! gets the original reply and the command does not run twice.
//!
//! [`Commands`] decides; this module only stores. The file is an
//! 8-byte header followed by records (little-endian):
//!
//! ```text
//! file header  "ZGCMDL1\n"
//! record:
//!   offset size field
//!        0    2 magic     0x5A 0xC3
//!        2    4 len       payload length, <= MAX_PAYLOAD
//!        6  len payload   id_len u8, id, digest kind u8 (0 command, 1 unparsed body),
//!                         digest u64, reply body (UTF-8 JSON, the rest)
//!    6+len    4 crc       CRC-32 (IEEE) of bytes 0..6+len
//! ```
//!
//! Each answer is one record appended with one `write` (no fsync on the loop). A torn last
//! record (power cut mid-write) or a corrupt one is skipped with a warning: the records after
//! a corrupt one are found again by their magic and checksum. Later records of an id replace
//! earlier ones, and only the newest [`REPLY_CACHE`] ids are kept, exactly as in memory.
//!
//! Durability: [`CommandLog::tick`] (on the spool's interval tick) hands an `fdatasync` of
//! the file to this module's helper thread, and [`CommandLog::flush`] syncs at shutdown. A
//! power cut can thus forget the ids answered since the last completed sync: at most
//! `[spool] fsync_interval_ms` plus the time the sync takes.
//!
//! Size: when the file holds more than 2 × [`REPLY_CACHE`] records, [`CommandLog::compact`]
//! writes the remembered entries to `commands.log.tmp` and appends go on there; the helper
//! syncs it and renames it over `commands.log` (then syncs the directory). A power cut
//! before the rename leaves the old file, which holds every entry up to the compaction.
//! Opening a file with bad bytes or too many records compacts it at once.

use super::commands::{BodyDigest, CachedReply, Commands, REPLY_CACHE};
use crate::protocol::{self, MAX_ID_LEN};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The log's file name in `data_dir`.
pub const FILE_NAME: &str = "commands.log";
/// The first bytes of the file (format version 1).
pub const FILE_HEADER: &[u8; 8] = b"ZGCMDL1\n";
/// First two bytes of every record.
pub const MAGIC: [u8; 2] = [0x5A, 0xC3];
/// Bytes of a record around its payload.
pub const OVERHEAD: usize = 10;
/// Largest payload written or read (a reply to a 16 KiB command is far smaller).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// More records than this in the file make it compacted.
pub const COMPACT_AFTER: usize = 2 * REPLY_CACHE;

/// Why the command log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CommandLogError {
    /// The file could not be read or created (permissions, a read-only or failing disk).
    #[error(
        "command log {path}: {source} (check that the gateway's user can write gateway.data_dir)"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Appends the record of `id` → `entry` to `out`; `false` (nothing appended) when the entry
/// has no reply or does not fit the format.
pub fn encode(id: &str, entry: &CachedReply, out: &mut Vec<u8>) -> bool {
    let Some(reply) = &entry.reply else {
        return false;
    };
    let (kind, digest) = match entry.body {
        BodyDigest::Command(d) => (0u8, d),
        BodyDigest::Unparsed(d) => (1u8, d),
    };
    let len = 1 + id.len() + 1 + 8 + reply.body.len();
    if id.len() > MAX_ID_LEN || len > MAX_PAYLOAD {
        return false;
    }
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.push(id.len() as u8);
    out.extend_from_slice(id.as_bytes());
    out.push(kind);
    out.extend_from_slice(&digest.to_le_bytes());
    out.extend_from_slice(reply.body.as_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    true
}

/// Why the bytes at a position are not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the record does (a torn write at the end of the file).
    Incomplete,
    /// Not a record: bad magic, length, checksum or contents.
    Corrupt,
}

/// Decodes the record at the start of `buf`: the id, its entry and the bytes it takes.
pub fn decode(buf: &[u8]) -> Result<(String, CachedReply, usize), DecodeError> {
    if buf.len() < 2 {
        return Err(match buf.first() {
            Some(&b) if b != MAGIC[0] => DecodeError::Corrupt,
            _ => DecodeError::Incomplete,
        });
    }
    if buf[..2] != MAGIC {
        return Err(DecodeError::Corrupt);
    }
    if buf.len() < 6 {
        return Err(DecodeError::Incomplete);
    }
    let len = u32::from_le_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
    if !(10..=MAX_PAYLOAD).contains(&len) {
        return Err(DecodeError::Corrupt);
    }
    let total = len + OVERHEAD;
    if buf.len() < total {
        return Err(DecodeError::Incomplete);
    }
    let body = &buf[..6 + len];
    let crc = u32::from_le_bytes([buf[6 + len], buf[7 + len], buf[8 + len], buf[9 + len]]);
    if crc32fast::hash(body) != crc {
        return Err(DecodeError::Corrupt);
    }
    let p = &buf[6..6 + len];
    let id_len = p[0] as usize;
    if id_len == 0 || id_len > MAX_ID_LEN || 1 + id_len + 9 > len {
        return Err(DecodeError::Corrupt);
    }
    let id = std::str::from_utf8(&p[1..1 + id_len]).map_err(|_| DecodeError::Corrupt)?;
    let at = 1 + id_len;
    let mut d = [0u8; 8];
    d.copy_from_slice(&p[at + 1..at + 9]);
    let digest = u64::from_le_bytes(d);
    let body = match p[at] {
        0 => BodyDigest::Command(digest),
        1 => BodyDigest::Unparsed(digest),
        _ => return Err(DecodeError::Corrupt),
    };
    let reply = std::str::from_utf8(&p[at + 9..]).map_err(|_| DecodeError::Corrupt)?;
    let entry = CachedReply {
        reply: Some(protocol::Message {
            kind: protocol::KIND_REPLY,
            body: reply.to_string(),
        }),
        body,
    };
    Ok((id.to_string(), entry, total))
}

/// What a scan of the file found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// The valid records, in file order.
    pub entries: Vec<(String, CachedReply)>,
    /// Bytes skipped as corrupt (between valid records).
    pub corrupt_bytes: usize,
    /// Bytes of an incomplete last record (a torn write).
    pub torn_bytes: usize,
    /// The file did not start with [`FILE_HEADER`] (then nothing in it is used).
    pub bad_header: bool,
}

/// Reads every valid record of a log file's contents (see the module doc). Never panics.
pub fn scan(data: &[u8]) -> Scan {
    let mut s = Scan::default();
    if data.is_empty() {
        return s;
    }
    if !data.starts_with(FILE_HEADER) {
        s.bad_header = true;
        s.corrupt_bytes = data.len();
        return s;
    }
    let mut off = FILE_HEADER.len();
    while off < data.len() {
        match decode(&data[off..]) {
            Ok((id, entry, n)) => {
                s.entries.push((id, entry));
                off += n;
            }
            Err(e) => {
                // The next position where a whole record decodes; none: the rest is a torn
                // tail (if it decodes as incomplete) or corrupt.
                let next = (off + 1..data.len())
                    .find(|&at| data[at..].starts_with(&MAGIC) && decode(&data[at..]).is_ok());
                match next {
                    Some(at) => {
                        s.corrupt_bytes += at - off;
                        off = at;
                    }
                    None => {
                        if e == DecodeError::Incomplete {
                            s.torn_bytes = data.len() - off;
                        } else {
                            s.corrupt_bytes += data.len() - off;
                        }
                        break;
                    }
                }
            }
        }
    }
    s
}

/// Work waiting for the helper thread: a set, not a queue (a newer sync request replaces an
/// older one that has not started), so a stalled disk cannot make it grow.
#[derive(Default)]
struct Pending {
    sync: Option<File>,
    /// Rename the first path over the second, then sync the directory.
    rename: Option<(PathBuf, PathBuf)>,
    busy: bool,
    renames_done: u64,
    error: Option<String>,
    stop: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Does one batch of taken work (on the helper, or on the loop at shutdown).
fn do_work(sync: Option<File>, rename: Option<(PathBuf, PathBuf)>) -> Result<(), String> {
    if let Some(f) = sync {
        f.sync_data()
            .map_err(|e| format!("command log fdatasync failed: {e}"))?;
    }
    if let Some((from, to)) = rename {
        fs::rename(&from, &to).map_err(|e| {
            format!(
                "command log rename {} -> {} failed: {e}",
                from.display(),
                to.display()
            )
        })?;
        if let Some(dir) = to.parent() {
            sync_dir(dir).map_err(|e| format!("command log directory fsync failed: {e}"))?;
        }
    }
    Ok(())
}

fn helper(shared: Arc<Shared>) {
    loop {
        let mut p = shared.lock();
        while p.sync.is_none() && p.rename.is_none() && !p.stop {
            p = shared.cv.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        if p.sync.is_none() && p.rename.is_none() {
            return;
        }
        let (sync, rename) = (p.sync.take(), p.rename.take());
        let renamed = rename.is_some();
        p.busy = true;
        drop(p);
        let result = do_work(sync, rename);
        if let Err(e) = &result {
            log::error!("{e}");
        }
        let mut p = shared.lock();
        p.busy = false;
        p.renames_done += u64::from(renamed);
        if let Err(e) = result {
            p.error = Some(e);
        }
        shared.cv.notify_all();
    }
}

/// The open command log (see the module doc).
pub struct CommandLog {
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    /// Records in the file appended to (for the compaction threshold).
    records: usize,
    /// Appended since the last sync request.
    dirty: bool,
    /// Compact before the next append (bad bytes found at open).
    needs_compaction: bool,
    /// Compact once the file holds more records than this.
    compact_at: usize,
    renames_requested: u64,
    buf: Vec<u8>,
    shared: Arc<Shared>,
    /// Appends that failed (the entry is then remembered in memory only).
    pub errors: u64,
}

impl CommandLog {
    /// Opens (or creates) `<dir>/commands.log` and returns it with the entries it holds,
    /// oldest first. Bad bytes are skipped with a warning and make the file rewritten at the
    /// first [`CommandLog::compact`]; only an I/O error fails.
    pub fn open(dir: &Path) -> Result<(CommandLog, Vec<(String, CachedReply)>), CommandLogError> {
        let path = dir.join(FILE_NAME);
        let tmp = dir.join(format!("{FILE_NAME}.tmp"));
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CommandLogError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(err(dir))?;
        // A compaction that did not reach its rename: the old file has every entry it had.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(&tmp)(e)),
            _ => {}
        }
        let mut data = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut data).map_err(err(&path))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&path)(e)),
        }
        let s = scan(&data);
        let bad = s.corrupt_bytes + s.torn_bytes;
        if bad > 0 {
            log::warn!(
                "command log {}: ignored bad_bytes={bad} (torn_tail={} corrupt={} bad_header={}); \
                 kept records={}; the ids in the bad bytes are forgotten",
                path.display(),
                s.torn_bytes,
                s.corrupt_bytes,
                s.bad_header,
                s.entries.len()
            );
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(err(&path))?;
        if data.is_empty() {
            file.write_all(FILE_HEADER).map_err(err(&path))?;
        }
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            cv: Condvar::new(),
        });
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("command-log".into())
            .spawn(move || helper(worker))
            .map_err(err(&path))?;
        let log = CommandLog {
            path,
            tmp,
            file,
            records: s.entries.len(),
            dirty: false,
            needs_compaction: bad > 0 || s.entries.len() > COMPACT_AFTER,
            compact_at: COMPACT_AFTER,
            renames_requested: 0,
            buf: Vec::new(),
            shared,
            errors: 0,
        };
        Ok((log, s.entries))
    }

    /// Opens the log in `dir` and restores its entries into `commands`; a file with bad
    /// bytes or too many records is rewritten now (start-up may block).
    pub fn open_into(dir: &Path, commands: &mut Commands) -> Result<CommandLog, CommandLogError> {
        let (mut log, entries) = CommandLog::open(dir)?;
        let n = entries.len();
        commands.restore(entries);
        if log.needs_compaction {
            log.compact(commands.remembered());
            log.flush();
        }
        log::info!(
            "command log {} opened records={n} remembered={}",
            log.path.display(),
            commands.remembered().count()
        );
        Ok(log)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records in the file appended to.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Appends `id` → `entry` with one `write` (page cache; synced by [`CommandLog::tick`]).
    /// Returns whether the log wants [`CommandLog::compact`] now.
    pub fn append(&mut self, id: &str, entry: &CachedReply) -> Result<bool, io::Error> {
        self.buf.clear();
        if encode(id, entry, &mut self.buf) {
            self.file
                .write_all(&self.buf)
                .inspect_err(|_| self.errors += 1)?;
            self.records += 1;
            self.dirty = true;
        }
        Ok(self.wants_compaction())
    }

    /// Whether the file should be rewritten (too many records, or bad bytes from open) and no
    /// earlier rewrite is still waiting for its rename.
    pub fn wants_compaction(&self) -> bool {
        (self.needs_compaction || self.records > self.compact_at)
            && self.shared.lock().renames_done == self.renames_requested
    }

    /// Whether appends wait for a sync.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Rewrites the log with `entries` (the remembered ids, oldest first): written to the temp
    /// file now, which appends then go to; synced and renamed over the log by the helper. An
    /// error leaves the log as it was (logged).
    pub fn compact<'a>(&mut self, entries: impl Iterator<Item = (&'a str, &'a CachedReply)>) {
        self.buf.clear();
        self.buf.extend_from_slice(FILE_HEADER);
        let mut n = 0;
        for (id, entry) in entries {
            n += usize::from(encode(id, entry, &mut self.buf));
        }
        let written = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.tmp)
            .and_then(|mut f| f.write_all(&self.buf).map(|_| f))
            .and_then(|f| {
                let for_helper = f.try_clone()?;
                Ok((f, for_helper))
            });
        let (file, for_helper) = match written {
            Ok(files) => files,
            Err(e) => {
                self.errors += 1;
                log::error!(
                    "command log compaction failed path={} error=\"{e}\"; the log keeps growing \
                     until a later one works",
                    self.tmp.display()
                );
                // Not again before as many records again have come.
                self.needs_compaction = false;
                self.compact_at = self.records + REPLY_CACHE;
                return;
            }
        };
        log::info!(
            "command log compacted records_before={} records={n}",
            self.records
        );
        self.file = file;
        self.records = n;
        self.dirty = false;
        self.needs_compaction = false;
        self.compact_at = COMPACT_AFTER;
        self.renames_requested += 1;
        let mut p = self.shared.lock();
        p.sync = Some(for_helper);
        p.rename = Some((self.tmp.clone(), self.path.clone()));
        self.shared.cv.notify_all();
    }

    /// The interval tick: hands an `fdatasync` of the appends since the last one to the
    /// helper (nothing when nothing was appended). Returns an error the helper met since the
    /// last tick.
    pub fn tick(&mut self) -> Result<(), String> {
        if self.dirty {
            match self.file.try_clone() {
                Ok(f) => {
                    self.dirty = false;
                    let mut p = self.shared.lock();
                    // A pending sync of an earlier tick is covered by this one.
                    p.sync = Some(f);
                    self.shared.cv.notify_all();
                }
                Err(e) => return Err(format!("command log: cannot hand over a sync: {e}")),
            }
        }
        match self.shared.lock().error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Shutdown: does the helper's waiting work here, waits (up to 5 s) for the one it is
    /// doing, then syncs the file. Errors are logged.
    pub fn flush(&mut self) {
        let (sync, rename) = {
            let mut p = self.shared.lock();
            (p.sync.take(), p.rename.take())
        };
        let renamed = rename.is_some();
        if let Err(e) = do_work(sync, rename) {
            log::error!("{e}");
        }
        {
            let mut p = self.shared.lock();
            p.renames_done += u64::from(renamed);
            let (p2, _) = self
                .shared
                .cv
                .wait_timeout_while(p, Duration::from_secs(5), |p| p.busy)
                .unwrap_or_else(|e| e.into_inner());
            p = p2;
            p.error = None;
        }
        if let Err(e) = self.file.sync_data() {
            log::error!("command log fdatasync at shutdown failed: {e}");
        }
        self.dirty = false;
    }
}

impl Drop for CommandLog {
    fn drop(&mut self) {
        // The helper ends once its work is done; it is not joined (a stalled disk must not
        // hold up the exit).
        self.shared.lock().stop = true;
        self.shared.cv.notify_all();
    }
}

#[cfg(test)]
#[path = "command_log_tests.rs"]
mod tests;
