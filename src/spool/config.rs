//! `[spool]` configuration.

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

/// `[spool] when_full`: what an append does when `max_bytes` (or the file system) is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the oldest segment(s), counting their unacked readings as dropped.
    #[default]
    DropOldest,
    /// Refuse the new reading (it gets no seq).
    DropNewest,
}

/// `[spool] fsync`: when appended readings are forced to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// fsync every append before it returns (and the directory on segment create/delete).
    Always,
    /// fsync from [`Spool::tick`](crate::spool::Spool::tick) when something was written since the last fsync.
    #[default]
    Interval,
}
