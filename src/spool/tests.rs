//! Spool tests: append, read, ack, reopen, fsync policies, configuration; the helpers the
//! other spool test files share.

use crate::spool::*;
use std::fs;
use std::path::{Path, PathBuf};

pub(super) fn cfg(max_bytes: u64, when_full: WhenFull, fsync: FsyncPolicy) -> SpoolConfig {
    SpoolConfig {
        max_bytes,
        when_full,
        fsync,
        fsync_interval_ms: 0,
        ..SpoolConfig::default()
    }
}

pub(super) fn small() -> SpoolConfig {
    // segment size = clamp(32 KiB / 8, 4 KiB, ..) = 4 KiB
    cfg(32 * 1024, WhenFull::DropOldest, FsyncPolicy::Interval)
}

/// Deterministic text payload of `len` bytes embedding the seq (the spool stores UTF-8).
pub(super) fn payload(seq: u64, len: usize) -> Vec<u8> {
    let mut v = format!("{seq:016x}").into_bytes();
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(b' ' + (x % 95) as u8);
    }
    v.truncate(len);
    v
}

pub(super) fn append_n(sp: &mut Spool, n: u64, len: usize) -> Vec<u64> {
    (0..n)
        .map(|_| match sp.append_with(0, |s| payload(s, len)).unwrap() {
            Appended::Stored { seq, .. } => seq,
            Appended::DroppedNewest => panic!("unexpected drop"),
        })
        .collect()
}

pub(super) fn append_t(sp: &mut Spool, len: usize) -> u64 {
    let seq = sp.next_seq();
    match sp
        .append_with(1_000_000 + seq, |s| payload(s, len))
        .unwrap()
    {
        Appended::Stored { seq, .. } => seq,
        Appended::DroppedNewest => panic!("unexpected drop"),
    }
}

pub(super) fn read_all(sp: &mut Spool) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let n = out.len();
        sp.read_from(from, 13, &mut out).unwrap();
        if out.len() == n {
            return out;
        }
        from = out.last().unwrap().0 + 1;
    }
}

pub(super) fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// For the loops that open hundreds of spools: a tmpfs directory when there is one (fsync is
/// free there; these tests check parsing and recovery logic, not durability), else the default.
pub(super) fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// xorshift64*; deterministic, no rand crate.
pub(super) struct Rng(pub(super) u64);
impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn round_trip_append_read_ack() {
    let d = tempfile::tempdir().unwrap();
    let (mut sp, rec) = Spool::open(d.path(), small()).unwrap();
    assert_eq!(
        rec,
        Recovery {
            segments: 0,
            records: 0,
            discarded_bytes: 0,
            next_seq: 1,
            acked: 0,
            corrupt_records: 0,
            spool_id: sp.spool_id().to_string(),
            new_spool_id: true,
            disk: rec.disk,
        }
    );
    assert_eq!(sp.next_seq(), 1);
    assert_eq!(sp.first_unacked(), None);
    let seqs: Vec<u64> = (0..10).map(|_| append_t(&mut sp, 50)).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    let all = read_all(&mut sp);
    assert_eq!(all.len(), 10);
    for (seq, p) in &all {
        assert_eq!(*p, payload(*seq, 50));
    }
    let st = sp.stats();
    assert_eq!(st.readings, 10);
    assert_eq!(st.oldest_unacked_ms, Some(1_000_001));
    assert_eq!(st.bytes, 10 * (OVERHEAD as u64 + 50));
    assert_eq!(sp.ack(5).unwrap(), 5);
    assert_eq!(sp.ack(5).unwrap(), 0);
    assert_eq!(sp.ack(3).unwrap(), 0);
    assert_eq!(sp.acked(), 5);
    assert_eq!(sp.first_unacked(), Some(6));
    assert_eq!(sp.stats().oldest_unacked_ms, Some(1_000_006));
    let mut out = Vec::new();
    sp.read_from(1, 100, &mut out).unwrap();
    assert_eq!(
        out.iter().map(|r| r.0).collect::<Vec<_>>(),
        (6..=10).collect::<Vec<_>>()
    );
    // Clamped to next_seq - 1.
    assert_eq!(sp.ack(1000).unwrap(), 5);
    assert_eq!(sp.acked(), 10);
    let st = sp.stats();
    assert_eq!(
        (st.readings, st.oldest_unacked_ms, st.next_seq),
        (0, None, 11)
    );
    assert_eq!(sp.first_unacked(), None);
    out.clear();
    sp.read_from(0, 100, &mut out).unwrap();
    assert!(out.is_empty());
}

#[test]
fn read_from_respects_max_and_appends_to_out() {
    let d = tempfile::tempdir().unwrap();
    let (mut sp, _) = Spool::open(d.path(), small()).unwrap();
    append_n(&mut sp, 20, 10);
    let mut out = vec![(0, vec![])];
    sp.read_from(5, 3, &mut out).unwrap();
    assert_eq!(
        out.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![0, 5, 6, 7]
    );
    sp.read_from(8, 0, &mut out).unwrap();
    assert_eq!(out.len(), 4);
    // Interleaved appends and reads with the cached reader at the end of the active segment.
    let mut out = Vec::new();
    sp.read_from(1, 100, &mut out).unwrap();
    assert_eq!(out.len(), 20);
    append_n(&mut sp, 2, 10);
    out.clear();
    sp.read_from(21, 100, &mut out).unwrap();
    assert_eq!(out.iter().map(|r| r.0).collect::<Vec<_>>(), vec![21, 22]);
    // Going backwards works too.
    out.clear();
    sp.read_from(2, 1, &mut out).unwrap();
    assert_eq!(out[0], (2, payload(2, 10)));
}

#[test]
fn seq_continues_after_reopen() {
    let d = tempfile::tempdir().unwrap();
    {
        let (mut sp, _) = Spool::open(d.path(), small()).unwrap();
        append_n(&mut sp, 5, 20);
        sp.flush().unwrap();
    }
    let (mut sp, rec) = Spool::open(d.path(), small()).unwrap();
    assert_eq!((rec.next_seq, rec.records, rec.segments), (6, 5, 1));
    assert_eq!(sp.next_seq(), 6);
    // Crash (no flush, like kill -9): every appended record is on disk, and the seq goes on
    // right after the highest one: no gap, no reuse.
    append_n(&mut sp, 3, 20);
    drop(sp);
    let (mut sp, rec) = Spool::open(d.path(), small()).unwrap();
    assert_eq!(rec.records, 8);
    assert_eq!(rec.next_seq, 9, "{rec:?}");
    let s = append_n(&mut sp, 1, 20)[0];
    assert_eq!(s, rec.next_seq);
    let all = read_all(&mut sp);
    assert_eq!(
        all.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6, 7, 8, s]
    );
}

#[test]
fn seq_continues_after_everything_acked_and_deleted() {
    for flush in [true, false] {
        let d = tempfile::tempdir().unwrap();
        let last;
        {
            let (mut sp, _) = Spool::open(d.path(), small()).unwrap();
            let seqs = append_n(&mut sp, 200, 100); // ~130 B each: several 4 KiB segments
            last = *seqs.last().unwrap();
            assert!(segments(d.path()).len() > 3);
            assert_eq!(sp.ack(last).unwrap(), 200);
            // The active segment stays (it takes the next appends); every other one is gone.
            sp.wait_for_deletions();
            assert_eq!(segments(d.path()).len(), 1);
            // Append until a roll: the fully-acked active one is deleted then.
            while segments(d.path())
                .iter()
                .any(|p| p.ends_with(format!("{:020}.seg", 1)))
            {
                append_n(&mut sp, 1, 100);
                sp.wait_for_deletions();
            }
            let n = sp.next_seq() - 1;
            sp.ack(n).unwrap();
            if flush {
                sp.flush().unwrap();
            } else {
                sp.tick().unwrap();
            }
        }
        let seg_names = segments(d.path());
        let (sp, rec) = Spool::open(d.path(), small()).unwrap();
        assert!(rec.next_seq > last, "{rec:?}");
        assert_eq!(sp.stats().readings, 0);
        assert_eq!(seg_names.len(), 1);
        if flush {
            let want = rec.acked + 1;
            assert_eq!(rec.next_seq, want);
        }
        // Delete every segment: the state file alone keeps the seq.
        drop(sp);
        for p in segments(d.path()) {
            fs::remove_file(p).unwrap();
        }
        let (sp, rec2) = Spool::open(d.path(), small()).unwrap();
        assert_eq!(rec2.next_seq, rec.next_seq);
        assert_eq!(sp.stats().bytes, 0);
    }
}

#[test]
fn read_streams_across_segments() {
    let d = tempfile::tempdir().unwrap();
    let (mut sp, _) = Spool::open(
        d.path(),
        cfg(1 << 20, WhenFull::DropOldest, FsyncPolicy::Interval),
    )
    .unwrap();
    assert_eq!(sp.segment_size(), 128 * 1024);
    append_n(&mut sp, 4000, 100); // 130 B records, 1008 per segment: 4 segments
    assert_eq!(segments(d.path()).len(), 4);
    let all = read_all(&mut sp);
    assert_eq!(all.len(), 4000);
    for (i, (seq, p)) in all.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert_eq!(*p, payload(*seq, 100));
    }
    // Random access (seeks via marks) and reads crossing a segment boundary.
    for from in [1, 2, 500, 1008, 1009, 2017, 3999, 4000, 3, 1] {
        let mut out = Vec::new();
        sp.read_from(from, 1500, &mut out).unwrap();
        let want: Vec<u64> = (from..=4000).take(1500).collect();
        assert_eq!(
            out.iter().map(|r| r.0).collect::<Vec<_>>(),
            want,
            "from {from}"
        );
    }
    let mut out = Vec::new();
    sp.read_from(4001, 10, &mut out).unwrap();
    assert!(out.is_empty());
}

#[test]
fn acked_segments_are_deleted() {
    let d = tempfile::tempdir().unwrap();
    let (mut sp, _) = Spool::open(d.path(), small()).unwrap();
    append_n(&mut sp, 128, 98); // 128 B records: 32 per 4 KiB segment -> 4 segments
    sp.wait_for_deletions();
    assert_eq!(segments(d.path()).len(), 4);
    assert_eq!(sp.stats().bytes, 128 * 128);
    assert_eq!(sp.ack(31).unwrap(), 31);
    sp.wait_for_deletions();
    assert_eq!(segments(d.path()).len(), 4);
    assert_eq!(sp.ack(32).unwrap(), 1);
    sp.wait_for_deletions();
    assert_eq!(segments(d.path()).len(), 3);
    assert_eq!(sp.stats().bytes, 96 * 128);
    assert_eq!(sp.ack(100).unwrap(), 68);
    sp.wait_for_deletions();
    assert_eq!(segments(d.path()).len(), 1);
    sp.wait_for_deletions();
    assert_eq!(
        segments(d.path())[0].file_name().unwrap(),
        "00000000000000000097.seg"
    );
    assert_eq!(sp.stats().readings, 28);
    assert_eq!(sp.stats().oldest_unacked_ms, Some(0));
}

#[test]
fn persisted_ack_survives_crash() {
    let d = tempfile::tempdir().unwrap();
    {
        let (mut sp, _) = Spool::open(d.path(), small()).unwrap();
        append_n(&mut sp, 10, 10);
        sp.ack(4).unwrap();
        sp.tick().unwrap(); // fsync_interval_ms = 0: the ack is persisted now
        sp.ack(7).unwrap(); // not persisted (crash before the next tick)
    }
    let (mut sp, rec) = Spool::open(d.path(), small()).unwrap();
    assert_eq!(rec.acked, 4);
    assert_eq!(sp.stats().readings, 6);
    assert_eq!(sp.first_unacked(), Some(5));
    // The resent records count as acked after the next ack.
    assert_eq!(sp.ack(8).unwrap(), 4);
    assert_eq!(sp.stats().readings, 2);
}

#[test]
fn fsync_always_syncs_every_append() {
    let d = tempfile::tempdir().unwrap();
    let mut c = small();
    c.fsync = FsyncPolicy::Always;
    let (mut sp, _) = Spool::open(d.path(), c).unwrap();
    append_n(&mut sp, 1, 10); // state reservation (2) + file (1) + new segment dir (1)
    sp.wait_for_deletions();
    let base = sp.fsync_count();
    for i in 1..=20 {
        append_n(&mut sp, 1, 10);
        assert_eq!(sp.fsync_count(), base + i);
        // Each sync done before the next append: none covers another.
        sp.wait_for_deletions();
        sp.poll_durable();
        assert_eq!(sp.sendable_end(), sp.next_seq());
    }
    sp.tick().unwrap();
    assert_eq!(sp.fsync_count(), base + 20, "nothing left to sync");
}

#[test]
fn fsync_interval_syncs_on_tick_when_dirty() {
    let d = tempfile::tempdir().unwrap();
    let (mut sp, _) = Spool::open(d.path(), small()).unwrap();
    append_n(&mut sp, 1, 10);
    let base = sp.fsync_count(); // the seq reservation's state write
    append_n(&mut sp, 50, 10);
    assert_eq!(sp.fsync_count(), base, "no fsync in append under interval");
    sp.tick().unwrap();
    assert_eq!(
        sp.fsync_count(),
        base + 2,
        "segment file + directory (new segment)"
    );
    sp.wait_for_deletions(); // the helper did them (a sync still queued would cover the next)
    sp.tick().unwrap();
    assert_eq!(sp.fsync_count(), base + 2, "clean: no fsync");
    append_n(&mut sp, 1, 10);
    sp.tick().unwrap();
    assert_eq!(sp.fsync_count(), base + 3);
    sp.flush().unwrap();
    assert_eq!(sp.fsync_count(), base + 5, "flush: state file + directory");
}

#[test]
fn interval_tick_hands_its_syncs_and_state_write_to_the_helper() {
    let d = tempfile::tempdir().unwrap();
    let (mut sp, _) = Spool::open(d.path(), small()).unwrap();
    append_n(&mut sp, 200, 100); // several 4 KiB segments: rolls hand over closed segments
    sp.ack(150).unwrap();
    sp.tick().unwrap();
    // Everything tick() queued is done once the helper's queue is empty.
    sp.wait_for_deletions();
    let text = fs::read_to_string(d.path().join("state")).unwrap();
    assert!(text.contains(" acked=150 "), "{text}");
    // The synced data is all there after a "crash" (no flush).
    drop(sp);
    let (mut sp, rec) = Spool::open(d.path(), small()).unwrap();
    assert_eq!(
        (rec.acked, rec.next_seq, rec.discarded_bytes),
        (150, 201, 0)
    );
    assert_eq!(read_all(&mut sp).len(), 50);
}

#[test]
fn oldest_unacked_time_follows_acks_and_marks() {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(8 << 20, WhenFull::DropOldest, FsyncPolicy::Interval); // 1 MiB segments
    let (mut sp, _) = Spool::open(d.path(), c.clone()).unwrap();
    for _ in 0..5000 {
        append_t(&mut sp, 200); // 1.15 MB: crosses a segment and many 64 KiB marks
    }
    for a in [1, 2, 283, 284, 285, 999, 4000, 4999] {
        sp.ack(a).unwrap();
        assert_eq!(
            sp.stats().oldest_unacked_ms,
            Some(1_000_000 + a + 1),
            "ack {a}"
        );
        assert_eq!(sp.stats().readings, 5000 - a);
    }
    sp.tick().unwrap();
    drop(sp);
    let (sp, _) = Spool::open(d.path(), c).unwrap();
    assert_eq!(sp.stats().oldest_unacked_ms, Some(1_005_000));
}

#[test]
fn bad_config_and_oversized_records_are_errors() {
    let d = tempfile::tempdir().unwrap();
    let e = Spool::open(
        d.path(),
        cfg(100, WhenFull::DropOldest, FsyncPolicy::Always),
    );
    assert!(matches!(e, Err(SpoolError::InvalidConfig { .. })));
    let (mut sp, _) = Spool::open(
        d.path(),
        cfg(8 << 20, WhenFull::DropOldest, FsyncPolicy::Interval),
    )
    .unwrap();
    let e = sp.append_with(0, |_| vec![0; MAX_PAYLOAD + 1]).unwrap_err();
    assert!(matches!(e, SpoolError::RecordTooLarge { .. }), "{e}");
    assert_eq!(sp.next_seq(), 1);
    assert!(matches!(
        sp.append_with(0, |_| vec![0; MAX_PAYLOAD]).unwrap(),
        Appended::Stored { .. }
    ));
}

#[test]
fn unreadable_dir_is_an_io_error() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let e = Spool::open(&file.join("spool"), SpoolConfig::default())
        .err()
        .unwrap();
    assert!(matches!(e, SpoolError::Io { .. }), "{e}");
    assert!(e.to_string().contains("gateway.data_dir"));
}

#[test]
fn foreign_files_and_corrupt_state_are_tolerated() {
    let d = tempfile::tempdir().unwrap();
    {
        let (mut sp, _) = Spool::open(d.path(), small()).unwrap();
        append_n(&mut sp, 10, 10);
        sp.ack(3).unwrap();
        sp.flush().unwrap();
    }
    fs::write(d.path().join("README"), b"hello").unwrap();
    fs::write(d.path().join("state.tmp"), b"half").unwrap();
    fs::write(d.path().join("00000000000000000099.seg"), b"").unwrap();
    let (_, rec) = Spool::open(d.path(), small()).unwrap();
    assert_eq!(
        (rec.records, rec.next_seq, rec.acked, rec.segments),
        (10, 11, 3, 1)
    );
    assert!(!d.path().join("state.tmp").exists());
    assert!(!d.path().join("00000000000000000099.seg").exists());
    fs::write(
        d.path().join("state"),
        b"zgate-spool-state v1 floor=1 acked=9 crc=00000000\n",
    )
    .unwrap();
    let (sp, rec) = Spool::open(d.path(), small()).unwrap();
    // Corrupt state: resend everything, continue above the highest seq on disk.
    assert_eq!(rec.acked, 0);
    assert_eq!(rec.next_seq, 11);
    assert_eq!(sp.stats().readings, 10);
}

#[test]
fn config_defaults_and_names() {
    use serde::de::IntoDeserializer;
    use serde::Deserialize;
    let c = SpoolConfig::default();
    assert_eq!(c.max_bytes, 64 * 1024 * 1024);
    assert_eq!(c.fsync_interval_ms, 1000);
    assert_eq!(segment_size_for(c.max_bytes), 4 * 1024 * 1024);
    assert_eq!(segment_size_for(32 * 1024), 4096);
    let de = |s: &str| -> Result<WhenFull, serde::de::value::Error> {
        WhenFull::deserialize(s.into_deserializer())
    };
    assert_eq!(de("drop_oldest").unwrap(), WhenFull::DropOldest);
    assert_eq!(de("drop_newest").unwrap(), WhenFull::DropNewest);
    assert!(de("DropOldest").is_err());
    let f = |s: &str| -> Result<FsyncPolicy, serde::de::value::Error> {
        FsyncPolicy::deserialize(s.into_deserializer())
    };
    assert_eq!(f("always").unwrap(), FsyncPolicy::Always);
    assert_eq!(f("interval").unwrap(), FsyncPolicy::Interval);
}

/// 1,000,000 records appended and read back (run with `cargo test -- --ignored`).
#[test]
#[ignore]
fn million_records_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(1 << 30, WhenFull::DropOldest, FsyncPolicy::Interval);
    let (mut sp, _) = Spool::open(d.path(), c.clone()).unwrap();
    for i in 0..1_000_000u64 {
        append_n(&mut sp, 1, 200);
        if i % 100_000 == 0 {
            sp.tick().unwrap();
        }
    }
    sp.flush().unwrap();
    drop(sp);
    let (mut sp, rec) = Spool::open(d.path(), c).unwrap();
    assert_eq!(
        (rec.records, rec.next_seq, rec.discarded_bytes),
        (1_000_000, 1_000_001, 0)
    );
    let mut next = 1;
    let mut out = Vec::with_capacity(1000);
    loop {
        out.clear();
        sp.read_from(next, 1000, &mut out).unwrap();
        if out.is_empty() {
            break;
        }
        for (seq, p) in &out {
            assert_eq!(*seq, next);
            assert_eq!(p[..16], *format!("{seq:016x}").as_bytes());
            next += 1;
        }
        sp.ack(next - 1).unwrap();
    }
    assert_eq!(next, 1_000_001);
    assert_eq!(sp.stats().readings, 0);
}

/// Reading a segment back does not touch its access time: under `relatime` a read after a
/// write would otherwise dirty the inode (a metadata write per backlog read-back).
#[test]
fn reads_do_not_update_the_access_time() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let (mut sp, _) = Spool::open(d.path(), small()).unwrap();
    append_n(&mut sp, 10, 10);
    let seg = segments(d.path()).remove(0);
    // An access time older than the modification time: relatime would update it on a read.
    let old = nix::sys::time::TimeSpec::new(1_000_000, 0);
    let mtime = fs::metadata(&seg).unwrap().mtime();
    nix::sys::stat::utimensat(
        None,
        &seg,
        &old,
        &nix::sys::time::TimeSpec::new(mtime, 0),
        nix::sys::stat::UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    assert_eq!(read_all(&mut sp).len(), 10);
    sp.stats(); // time_of reads too
    assert_eq!(fs::metadata(&seg).unwrap().atime(), 1_000_000);
}
