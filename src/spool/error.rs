//! [`SpoolError`]: why the spool could not open, store a reading or write its state.

use crate::spool::MAX_SEQ;
use std::io;
use std::path::{Path, PathBuf};

/// Why the spool could not open, store a reading or write its state. Each message says
/// what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation on the spool directory failed.
    #[error(
        "spool I/O error on {}: {source}; check that gateway.data_dir is on a mounted, \
         writable, not-full file system and that zgate's user may read and write it",
        path.display()
    )]
    Io {
        /// The file or directory operated on.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A `[spool]` setting is out of range.
    #[error("invalid [spool] configuration: {reason}")]
    InvalidConfig {
        /// Which setting and what is accepted.
        reason: String,
    },
    /// One reading's payload is larger than a record may be.
    #[error(
        "reading of {len} payload bytes is larger than the spool accepts ({limit} bytes); \
         send smaller readings or raise spool.max_bytes"
    )]
    RecordTooLarge {
        /// The payload's size in bytes.
        len: usize,
        /// The largest payload accepted, in bytes.
        limit: u64,
    },
    /// The file system is full even with every older segment freed (or, under
    /// `drop_oldest`, with nothing left to free): the reading got `seq` (its payload was built
    /// with it) but is not on disk. The seq is used up; a caller that can still send the
    /// reading (from memory) should, else its seq is a gap that `resume_seq` announces.
    #[error(
        "disk full: reading seq {seq} could not be stored in {} ({source}) even with every \
         older spooled reading freed; free space on gateway.data_dir's file system",
        path.display()
    )]
    DiskFull {
        /// The seq the reading got (used up).
        seq: u64,
        /// The segment file the append was for.
        path: PathBuf,
        /// ENOSPC or EDQUOT.
        source: io::Error,
    },
    /// Every seq up to [`MAX_SEQ`] is used; only crafted state or segment files get here.
    #[error(
        "the spool in {} has used every seq up to {MAX_SEQ} (its state or segments were \
         crafted); move that directory away to start a new spool",
        dir.display()
    )]
    SeqsExhausted {
        /// The spool directory.
        dir: PathBuf,
    },
    /// A reading's payload is not UTF-8 text.
    #[error(
        "reading payload is not UTF-8 (valid up to byte {valid_up_to}); the spool stores text \
         only"
    )]
    NotUtf8 {
        /// Length of the payload's valid UTF-8 prefix, in bytes.
        valid_up_to: usize,
    },
}

impl SpoolError {
    /// The seq of a reading that was not stored for lack of disk space
    /// ([`SpoolError::DiskFull`]).
    pub fn unstored_seq(&self) -> Option<u64> {
        match self {
            SpoolError::DiskFull { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}

/// ENOSPC or EDQUOT: the file system (or the user's quota) is full.
pub(super) fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}
