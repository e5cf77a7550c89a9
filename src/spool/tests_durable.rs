//! `fsync = "always"`: durable, then sendable. The `fdatasync` runs on the helper thread; a
//! reading becomes sendable ([`Spool::sendable_end`]) only after the sync that covers it.

use crate::spool::tests::{append_n, cfg, payload};
use crate::spool::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn always() -> SpoolConfig {
    cfg(1 << 20, WhenFull::DropOldest, FsyncPolicy::Always)
}

fn woken(sp: &Spool) -> Arc<AtomicUsize> {
    let n = Arc::new(AtomicUsize::new(0));
    let m = n.clone();
    sp.set_durable_waker(Box::new(move || {
        m.fetch_add(1, Ordering::SeqCst);
    }));
    n
}

#[test]
fn a_reading_is_sendable_only_after_its_sync() {
    let d = tempfile::tempdir().unwrap();
    let (mut sp, _) = Spool::open(d.path(), always()).unwrap();
    let wakes = woken(&sp);
    assert_eq!(sp.sendable_end(), 1);
    // The disk stalls: the helper blocks in its next operation.
    let hold = sp.deleter.hold();
    let seqs = append_n(&mut sp, 5, 40);
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(sp.next_seq(), 6);
    assert!(!sp.poll_durable());
    assert_eq!(sp.sendable_end(), 1, "nothing synced yet: nothing sendable");
    // A reader stops at the sendable end.
    let mut out = Vec::new();
    sp.read_range(1, sp.sendable_end(), 10, &mut out).unwrap();
    assert!(out.is_empty());
    drop(hold);
    sp.wait_for_deletions();
    assert!(wakes.load(Ordering::SeqCst) >= 1, "the waker was called");
    assert!(sp.poll_durable());
    assert_eq!(sp.sendable_end(), 6);
    sp.read_range(1, sp.sendable_end(), 10, &mut out).unwrap();
    let got: Vec<u64> = out.iter().map(|(s, _)| *s).collect();
    assert_eq!(got, seqs);
    assert_eq!(out[2].1, payload(3, 40));
}

#[test]
fn syncs_pending_behind_a_stalled_one_are_one_per_file() {
    let d = tempfile::tempdir().unwrap();
    let (mut sp, _) = Spool::open(d.path(), always()).unwrap();
    append_n(&mut sp, 1, 40);
    sp.wait_for_deletions();
    let base = sp.fsync_count();
    let hold = sp.deleter.hold();
    // The first append's sync is taken by the (blocked) helper; every later one is covered by
    // the one sync queued behind it.
    append_n(&mut sp, 100, 40);
    assert!(sp.helper_pending() <= 1, "{}", sp.helper_pending());
    assert!(sp.fsync_count() - base <= 2, "{}", sp.fsync_count() - base);
    drop(hold);
    sp.wait_for_deletions();
    sp.poll_durable();
    assert_eq!(
        sp.sendable_end(),
        sp.next_seq(),
        "the last sync covered every append"
    );
}

#[test]
fn read_range_leaves_the_cached_reader_before_the_first_record_it_did_not_take() {
    let d = tempfile::tempdir().unwrap();
    let (mut sp, _) = Spool::open(
        d.path(),
        cfg(1 << 20, WhenFull::DropOldest, FsyncPolicy::Interval),
    )
    .unwrap();
    append_n(&mut sp, 10, 30);
    let mut out = Vec::new();
    sp.read_range(1, 4, 100, &mut out).unwrap();
    assert_eq!(out.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3]);
    out.clear();
    sp.read_range(4, 8, 2, &mut out).unwrap();
    assert_eq!(out.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [4, 5]);
    out.clear();
    sp.read_range(6, u64::MAX, 100, &mut out).unwrap();
    assert_eq!(
        out.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [6, 7, 8, 9, 10]
    );
    assert_eq!(out[0].1, payload(6, 30));
}

#[test]
fn interval_readings_are_sendable_when_written() {
    let d = tempfile::tempdir().unwrap();
    let (mut sp, _) = Spool::open(
        d.path(),
        cfg(1 << 20, WhenFull::DropOldest, FsyncPolicy::Interval),
    )
    .unwrap();
    let _hold = sp.deleter.hold();
    append_n(&mut sp, 3, 30);
    assert_eq!(sp.sendable_end(), 4);
}

#[test]
fn reopen_after_a_crash_before_the_sync_keeps_the_written_records() {
    let d = tempfile::tempdir().unwrap();
    let (mut sp, _) = Spool::open(d.path(), always()).unwrap();
    let hold = sp.deleter.hold();
    append_n(&mut sp, 3, 30);
    // The process dies here (the OS keeps the page cache): leak the spool, release the
    // helper so the test can end.
    drop(hold);
    std::mem::forget(sp);
    let (mut sp, rec) = Spool::open(d.path(), always()).unwrap();
    assert_eq!(rec.next_seq, 4);
    assert_eq!(
        sp.sendable_end(),
        4,
        "what a restart finds on disk is sendable"
    );
    let mut out = Vec::new();
    sp.read_from(1, 10, &mut out).unwrap();
    assert_eq!(out.len(), 3);
}
