//! Spool identity, crafted files, a stalled disk and a full disk.

use crate::spool::state;
use crate::spool::*;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn cfg(max_bytes: u64, when_full: WhenFull) -> SpoolConfig {
    SpoolConfig {
        max_bytes,
        when_full,
        fsync: FsyncPolicy::Interval,
        fsync_interval_ms: 0,
        ..SpoolConfig::default()
    }
}

/// A reading as the gateway stores it: JSON text embedding the seq.
fn reading(seq: u64) -> String {
    format!("{{\"gateway\":\"gw\",\"seq\":{seq},\"source\":\"s1\",\"values\":{{\"t\":21.5,\"h\":40.25}}}}")
}

fn stored(r: Appended) -> u64 {
    match r {
        Appended::Stored { seq, .. } => seq,
        other => panic!("not stored: {other:?}"),
    }
}

fn read_all(sp: &mut Spool) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let n = out.len();
        sp.read_from(from, 100, &mut out).unwrap();
        if out.len() == n {
            return out;
        }
        from = out.last().unwrap().0 + 1;
    }
}

fn state_text(dir: &Path) -> String {
    fs::read_to_string(dir.join("state")).unwrap()
}

// ---- spool_id ----

#[test]
fn spool_id_is_made_once_and_persists_across_reopen() {
    let d = tempfile::tempdir().unwrap();
    let (sp, rec) = Spool::open(d.path(), SpoolConfig::default()).unwrap();
    let id = sp.spool_id().to_string();
    assert_eq!(id.len(), 32);
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{id}"
    );
    assert!(rec.new_spool_id);
    assert_eq!(rec.spool_id, id);
    assert_eq!(sp.stats().spool_id, id);
    // On disk at once, before any append, tick or flush.
    assert!(
        state_text(d.path()).contains(&format!(" id={id} ")),
        "{}",
        state_text(d.path())
    );
    drop(sp);
    let (mut sp, rec) = Spool::open(d.path(), SpoolConfig::default()).unwrap();
    assert_eq!((sp.spool_id(), rec.new_spool_id), (id.as_str(), false));
    stored(sp.append_with(0, reading).unwrap());
    sp.ack(1).unwrap();
    sp.tick().unwrap();
    sp.flush().unwrap();
    drop(sp);
    let (sp, _) = Spool::open(d.path(), SpoolConfig::default()).unwrap();
    assert_eq!(sp.spool_id(), id);
    drop(sp);

    // Another spool, and this one wiped: each a new id.
    let other = tempfile::tempdir().unwrap();
    let (sp2, _) = Spool::open(other.path(), SpoolConfig::default()).unwrap();
    assert_ne!(sp2.spool_id(), id);
    fs::remove_dir_all(d.path()).unwrap();
    let (sp3, rec3) = Spool::open(d.path(), SpoolConfig::default()).unwrap();
    assert!(rec3.new_spool_id);
    assert_ne!(sp3.spool_id(), id);
    assert_ne!(sp3.spool_id(), sp2.spool_id());
    assert_eq!(sp3.next_seq(), 1);
}

#[test]
fn old_format_state_is_upgraded_with_a_new_id_at_open() {
    let d = tempfile::tempdir().unwrap();
    {
        let (mut sp, _) = Spool::open(d.path(), SpoolConfig::default()).unwrap();
        for _ in 0..10 {
            stored(sp.append_with(0, reading).unwrap());
        }
        sp.ack(4).unwrap();
        sp.flush().unwrap();
    }
    // What the previous version wrote: v1, no id.
    let v1 = state::encode(&state::State {
        id: None,
        floor: 11,
        acked: 4,
    });
    assert!(
        v1.starts_with("zgate-spool-state v1 floor=11 acked=4 crc="),
        "{v1}"
    );
    fs::write(d.path().join("state"), &v1).unwrap();
    let (sp, rec) = Spool::open(d.path(), SpoolConfig::default()).unwrap();
    assert!(rec.new_spool_id);
    assert_eq!((rec.acked, rec.next_seq, rec.records), (4, 11, 10));
    // Written at once, keeping floor and ack.
    let text = state_text(d.path());
    assert!(
        text.starts_with(&format!(
            "zgate-spool-state v2 id={} floor=11 acked=4 crc=",
            sp.spool_id()
        )),
        "{text}"
    );
    let id = sp.spool_id().to_string();
    drop(sp);
    let (sp, rec) = Spool::open(d.path(), SpoolConfig::default()).unwrap();
    assert_eq!((sp.spool_id(), rec.new_spool_id), (id.as_str(), false));
}

// ---- crafted files ----

fn segment_of(records: &[(u64, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (seq, p) in records {
        encode_record(*seq, 0, p, &mut b);
    }
    b
}

#[test]
fn seq_above_max_seq_with_valid_crcs_is_corrupt_not_an_overflow() {
    for bad in [u64::MAX, MAX_SEQ + 1] {
        let d = tempfile::tempdir().unwrap();
        let (r1, r2, r3) = (reading(1), reading(2), reading(3));
        let file = segment_of(&[
            (1, r1.as_bytes()),
            (bad, b"{}"),
            (2, r2.as_bytes()),
            (3, r3.as_bytes()),
            (bad, b"{}"),
        ]);
        fs::write(d.path().join("00000000000000000001.seg"), &file).unwrap();
        let (mut sp, rec) = Spool::open(d.path(), SpoolConfig::default()).unwrap();
        assert_eq!((rec.records, rec.corrupt_records, rec.next_seq), (3, 2, 4));
        assert_eq!(rec.discarded_bytes, 2 * (OVERHEAD as u64 + 2));
        let seqs: Vec<u64> = read_all(&mut sp).iter().map(|r| r.0).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(stored(sp.append_with(0, reading).unwrap()), 4);
        assert_eq!(sp.ack(u64::MAX).unwrap(), 4);
        assert_eq!(sp.first_unacked(), None);
    }
}

#[test]
fn state_with_values_out_of_range_is_corrupt_not_an_overflow() {
    for (floor, acked) in [
        (1, u64::MAX),
        (u64::MAX, 0),
        (MAX_SEQ + 2, 0),
        (5, MAX_SEQ + 1),
    ] {
        let d = tempfile::tempdir().unwrap();
        let r1 = reading(1);
        fs::write(
            d.path().join("00000000000000000001.seg"),
            segment_of(&[(1, r1.as_bytes())]),
        )
        .unwrap();
        let line = state::encode(&state::State {
            id: Some(*b"00112233445566778899aabbccddeeff"),
            floor,
            acked,
        });
        fs::write(d.path().join("state"), line).unwrap();
        let (mut sp, rec) = Spool::open(d.path(), SpoolConfig::default()).unwrap();
        // Corrupt: resend everything, continue above the highest seq on disk, new identity.
        assert_eq!(
            (rec.acked, rec.next_seq),
            (0, 2),
            "floor={floor} acked={acked}"
        );
        assert!(rec.new_spool_id);
        assert_eq!(stored(sp.append_with(0, reading).unwrap()), 2);
    }
}

#[test]
fn the_last_seq_there_is_ends_appends_with_an_error() {
    let d = tempfile::tempdir().unwrap();
    let r = reading(MAX_SEQ);
    fs::write(
        d.path().join("00000000000000000001.seg"),
        segment_of(&[(MAX_SEQ, r.as_bytes())]),
    )
    .unwrap();
    let (mut sp, rec) = Spool::open(d.path(), SpoolConfig::default()).unwrap();
    assert_eq!(rec.next_seq, MAX_SEQ + 1);
    assert_eq!(read_all(&mut sp).len(), 1);
    let e = sp.append_with(0, reading).unwrap_err();
    assert!(matches!(e, SpoolError::SeqsExhausted { .. }), "{e}");
    assert_eq!(sp.ack(u64::MAX).unwrap(), 1);
}

#[test]
fn payload_that_is_not_utf8_is_corrupt_and_nobody_waits_for_it() {
    let d = tempfile::tempdir().unwrap();
    let mut bad = reading(3).into_bytes();
    bad[5] = 0xFF;
    let bad_last = [0xC3u8, 0x28]; // an invalid two-byte sequence
    let (r1, r2, r4, r5) = (reading(1), reading(2), reading(4), reading(5));
    let file = segment_of(&[
        (1, r1.as_bytes()),
        (2, r2.as_bytes()),
        (3, &bad),
        (4, r4.as_bytes()),
        (5, r5.as_bytes()),
        (6, &bad_last),
    ]);
    fs::write(d.path().join("00000000000000000001.seg"), &file).unwrap();
    let (mut sp, rec) = Spool::open(d.path(), SpoolConfig::default()).unwrap();
    assert_eq!((rec.records, rec.corrupt_records), (4, 2));
    // Seq 6 is on disk (corrupt): it is not handed out again.
    assert_eq!(rec.next_seq, 7);
    let seqs: Vec<u64> = read_all(&mut sp).iter().map(|r| r.0).collect();
    assert_eq!(seqs, [1, 2, 4, 5]);
    assert_eq!(sp.stats().readings, 4);
    assert_eq!(sp.stats().corrupt_records, 2);
    // The backend acks 2 (it cannot have 3): the next one to send is 4, not 3.
    assert_eq!(sp.ack(2).unwrap(), 2);
    assert_eq!(sp.first_unacked(), Some(4));
    assert_eq!(sp.ack(5).unwrap(), 2);
    assert_eq!(sp.first_unacked(), None);
    // And the spool never writes such a record itself.
    let e = sp.append_with(0, |_| vec![b'a', 0xFF]).unwrap_err();
    assert!(matches!(e, SpoolError::NotUtf8 { .. }), "{e}");
    assert_eq!(stored(sp.append_with(0, reading).unwrap()), 7);
}

// ---- a stalled disk ----

/// Open descriptors of this process on files under `dir`.
fn fds_under(dir: &Path) -> usize {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.starts_with(dir))
        .count()
}

#[test]
fn a_stalled_disk_holds_helper_work_and_descriptors_bounded_and_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    let (mut sp, _) = Spool::open(&dir, cfg(8 << 20, WhenFull::DropOldest)).unwrap();
    sp.deleter.set_stall_after(Duration::from_millis(50));
    stored(sp.append_with(0, reading).unwrap());
    // The disk stalls: the helper blocks in its next operation (the sync the tick queues).
    let hold = sp.deleter.hold();
    sp.tick().unwrap();
    for _ in 0..1000 {
        let seq = stored(sp.append_with(0, reading).unwrap());
        sp.ack(seq - 1).unwrap(); // and a state write every tick
        sp.tick().unwrap();
    }
    assert!(
        sp.helper_pending() <= 3,
        "pending helper work: {} (one sync, one directory sync, one state write at most)",
        sp.helper_pending()
    );
    // The active segment's own descriptor, the one being synced, one queued duplicate.
    let fds = fds_under(&dir);
    assert!(fds <= 4, "{fds} descriptors open on spool files");
    std::thread::sleep(Duration::from_millis(120));
    let st = sp.stats();
    assert!(st.disk_stalled, "{st:?}");
    assert_eq!(st.disk_stalls, 1);
    sp.tick().unwrap();
    assert_eq!(sp.stats().disk_stalls, 1, "one stall, counted once");
    drop(hold);
    sp.wait_for_deletions();
    let st = sp.stats();
    assert!(!st.disk_stalled);
    assert_eq!(st.disk_stalls, 1);
    sp.flush().unwrap();
    drop(sp);
    let (_, rec) = Spool::open(&dir, cfg(8 << 20, WhenFull::DropOldest)).unwrap();
    assert_eq!((rec.records, rec.acked, rec.next_seq), (1001, 1000, 1002));
}

// ---- a full disk ----

/// A tmpfs of `size` mounted on a new temporary directory, unmounted on drop. None (and a
/// line saying the test is skipped) when not root or mounting is not allowed.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str, test: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("{test}: skipped: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("{test}: skipped: mount -t tmpfs failed (no CAP_SYS_ADMIN?)");
            return None;
        }
        Some(Tmpfs { path, _dir: dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

/// Fills the file system under `dir` with one file until ENOSPC.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
    }
    path
}

#[test]
fn full_disk_under_drop_oldest_keeps_storing_the_newest_readings() {
    let Some(fs_) = Tmpfs::mount("200k", "full_disk_under_drop_oldest") else {
        return;
    };
    let dir = fs_.path.join("spool");
    let c = cfg(64 << 20, WhenFull::DropOldest);
    let (mut sp, rec) = Spool::open(&dir, c.clone()).unwrap();
    let disk = rec.disk.expect("statvfs");
    assert!(disk.avail_bytes <= 200 * 1024 && disk.avail_bytes < c.max_bytes);
    // Segments sized for the space there is, not for max_bytes.
    assert!(sp.segment_size() <= 200 * 1024 / 8, "{}", sp.segment_size());
    let id = sp.spool_id().to_string();
    for i in 1..=3000u64 {
        let r = sp.append_with(i, reading);
        assert_eq!(stored(r.unwrap()), i);
        if i % 100 == 0 {
            sp.tick().unwrap();
        }
    }
    let st = sp.stats();
    assert!(st.disk_full > 0, "{st:?}");
    assert!(st.dropped_oldest > 0, "{st:?}");
    assert_eq!(st.not_stored, 0);
    assert!(st.disk_avail_bytes.is_some());
    sp.flush().unwrap();
    drop(sp);
    let (mut sp, rec) = Spool::open(&dir, c).unwrap();
    assert_eq!(sp.spool_id(), id);
    assert_eq!(
        (rec.discarded_bytes, rec.next_seq),
        (0, 3001),
        "no torn record"
    );
    let all = read_all(&mut sp);
    let first = all[0].0;
    assert!(all.len() > 500, "{} readings kept", all.len());
    for (i, (seq, p)) in all.iter().enumerate() {
        assert_eq!(*seq, first + i as u64, "contiguous");
        assert_eq!(p, reading(*seq).as_bytes());
    }
    assert_eq!(all.last().unwrap().0, 3000);
}

#[test]
fn full_disk_under_drop_newest_refuses_new_readings_until_acks_free_space() {
    let Some(fs_) = Tmpfs::mount("200k", "full_disk_under_drop_newest") else {
        return;
    };
    let dir = fs_.path.join("spool");
    let c = cfg(64 << 20, WhenFull::DropNewest);
    let (mut sp, _) = Spool::open(&dir, c.clone()).unwrap();
    let mut kept = 0u64;
    let mut refused = 0u64;
    for i in 1..=3000u64 {
        match sp.append_with(i, reading).unwrap() {
            Appended::Stored { seq, .. } => {
                kept += 1;
                assert_eq!(seq, kept, "no seq consumed by a refused reading");
            }
            Appended::DroppedNewest => refused += 1,
        }
    }
    assert!(refused > 0 && kept > 500, "kept {kept}, refused {refused}");
    let st = sp.stats();
    assert_eq!((st.dropped_newest, st.not_stored), (refused, 0));
    assert!(st.disk_full > 0);
    // Acks free whole segments: new readings fit again.
    sp.ack(kept).unwrap();
    sp.wait_for_deletions();
    assert_eq!(stored(sp.append_with(0, reading).unwrap()), kept + 1);
    sp.flush().unwrap();
    drop(sp);
    let (mut sp, rec) = Spool::open(&dir, c).unwrap();
    assert_eq!(
        (rec.discarded_bytes, rec.acked, rec.next_seq),
        (0, kept, kept + 2)
    );
    assert_eq!(read_all(&mut sp).len(), 1);
}

#[test]
fn full_disk_with_nothing_to_free_is_not_stored_and_state_writes_are_retried() {
    let Some(fs_) = Tmpfs::mount("200k", "full_disk_with_nothing_to_free") else {
        return;
    };
    let dir = fs_.path.join("spool");
    let c = cfg(64 << 20, WhenFull::DropOldest);
    let (mut sp, _) = Spool::open(&dir, c.clone()).unwrap();
    for _ in 0..3 {
        stored(sp.append_with(0, reading).unwrap());
    }
    sp.tick().unwrap();
    sp.wait_for_deletions();
    // Something else fills the disk.
    let filler = fill(&fs_.path);

    // The ack's state write fails for lack of space and stays pending.
    sp.ack(2).unwrap();
    sp.tick().unwrap();
    sp.wait_for_deletions();
    for _ in 0..3 {
        assert!(sp.wants_tick(), "a failed state write is retried");
        sp.tick().unwrap();
        sp.wait_for_deletions();
    }
    assert!(sp.stats().disk_full >= 1);
    assert!(!state_text(&dir).contains(" acked=2 "));

    // Room again: the state is written at the next tick.
    fs::remove_file(&filler).unwrap();
    sp.tick().unwrap();
    sp.wait_for_deletions();
    assert!(
        state_text(&dir).contains(" acked=2 "),
        "{}",
        state_text(&dir)
    );
    drop(sp);

    // A new spool on a disk that fills before its first reading: nothing to free.
    let dir = fs_.path.join("spool2");
    let (mut sp, _) = Spool::open(&dir, c.clone()).unwrap();
    let filler = fill(&fs_.path);
    let e = sp.append_with(0, reading).unwrap_err();
    assert!(matches!(e, SpoolError::DiskFull { seq: 1, .. }), "{e}");
    assert_eq!(e.unstored_seq(), Some(1));
    let st = sp.stats();
    assert_eq!((st.not_stored, st.disk_full), (1, 1));
    assert_eq!(
        sp.next_seq(),
        2,
        "the seq is used: the caller may still send the reading"
    );
    assert!(segments(&dir).is_empty(), "no partial segment left");
    // Shutdown cannot write the state either; it is kept for later.
    assert!(sp.flush().is_err());
    assert!(sp.wants_tick());
    fs::remove_file(&filler).unwrap();
    sp.tick().unwrap();
    sp.wait_for_deletions();
    assert!(!sp.wants_tick());
    assert_eq!(stored(sp.append_with(0, reading).unwrap()), 2);
    drop(sp);
    let (_, rec) = Spool::open(&dir, c).unwrap();
    assert_eq!((rec.discarded_bytes, rec.records, rec.next_seq), (0, 1, 3));
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect()
}
