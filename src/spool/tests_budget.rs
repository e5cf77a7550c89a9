//! Spool tests: a full `max_bytes` budget under `drop_oldest` and `drop_newest`.

use super::tests::*;
use crate::spool::*;

fn fill_exact(sp: &mut Spool) {
    // 32 KiB max, 4 KiB segments, 128 B records: exactly 256 fit.
    for _ in 0..256 {
        match sp.append_with(0, |s| payload(s, 98)).unwrap() {
            Appended::Stored { dropped_oldest, .. } => assert_eq!(dropped_oldest, 0),
            Appended::DroppedNewest => panic!("dropped too early"),
        }
    }
    assert_eq!(sp.stats().bytes, 32 * 1024);
}

#[test]
fn drop_oldest_counts_exactly() {
    let d = tempfile::tempdir().unwrap();
    let (mut sp, _) = Spool::open(d.path(), small()).unwrap();
    fill_exact(&mut sp);
    sp.ack(10).unwrap();
    let r = sp.append_with(7, |s| payload(s, 98)).unwrap();
    // The oldest segment (seqs 1..=32) goes: 22 of its records were unacked.
    assert_eq!(
        r,
        Appended::Stored {
            seq: 257,
            dropped_oldest: 22
        }
    );
    let st = sp.stats();
    assert_eq!((st.dropped_oldest, st.dropped_newest), (22, 0));
    assert_eq!(st.readings, 256 - 10 - 22 + 1);
    assert_eq!(sp.first_unacked(), Some(33));
    let all = read_all(&mut sp);
    assert_eq!(all.first().unwrap().0, 33);
    assert_eq!(all.len() as u64, st.readings);
    // Keep appending: every 32 appends drop one whole segment of 32 unacked records.
    for i in 0..64u64 {
        let r = sp.append_with(0, |s| payload(s, 98)).unwrap();
        let want = if i == 31 || i == 63 { 32 } else { 0 };
        match r {
            Appended::Stored { dropped_oldest, .. } => assert_eq!(dropped_oldest, want, "i {i}"),
            _ => panic!(),
        }
    }
    let st = sp.stats();
    assert_eq!(st.dropped_oldest, 22 + 32 + 32);
    assert!(st.bytes <= 32 * 1024);
    // Acking a dropped range counts nothing twice.
    let first = sp.first_unacked().unwrap();
    assert_eq!(sp.ack(first - 1).unwrap(), 0);
    assert_eq!(sp.ack(first).unwrap(), 1);
}

#[test]
fn drop_oldest_can_drop_the_active_segment() {
    let d = tempfile::tempdir().unwrap();
    // 8 KiB max, 4 KiB segments; 3000-byte payloads: two records fill the spool.
    let (mut sp, _) = Spool::open(
        d.path(),
        cfg(8192, WhenFull::DropOldest, FsyncPolicy::Always),
    )
    .unwrap();
    append_n(&mut sp, 2, 3000);
    let r = sp.append_with(0, |s| payload(s, 3000)).unwrap();
    assert_eq!(
        r,
        Appended::Stored {
            seq: 3,
            dropped_oldest: 1
        }
    );
    // 6030 bytes: dropping segment [2] is not enough, the active segment [3] goes too.
    let r = sp.append_with(0, |s| payload(s, 6000)).unwrap();
    assert_eq!(
        r,
        Appended::Stored {
            seq: 4,
            dropped_oldest: 2
        }
    );
    assert_eq!(sp.stats().readings, 1);
    assert!(matches!(
        sp.append_with(0, |s| payload(s, 9000)),
        Err(SpoolError::RecordTooLarge { len: 9000, .. })
    ));
    assert_eq!(sp.next_seq(), 5);
    let all = read_all(&mut sp);
    assert_eq!(all, vec![(4, payload(4, 6000))]);
}

#[test]
fn drop_newest_refuses_without_consuming_a_seq() {
    let d = tempfile::tempdir().unwrap();
    let mut c = small();
    c.when_full = WhenFull::DropNewest;
    let (mut sp, _) = Spool::open(d.path(), c).unwrap();
    fill_exact(&mut sp);
    for _ in 0..5 {
        let mut built = None;
        let r = sp
            .append_with(0, |s| {
                built = Some(s);
                payload(s, 98)
            })
            .unwrap();
        assert_eq!(r, Appended::DroppedNewest);
        assert_eq!(built, Some(257));
    }
    let st = sp.stats();
    assert_eq!(
        (
            st.dropped_newest,
            st.dropped_oldest,
            st.readings,
            st.next_seq
        ),
        (5, 0, 256, 257)
    );
    // Acking the first segment frees it; appends work again, with the next seq.
    sp.ack(32).unwrap();
    let r = sp.append_with(0, |s| payload(s, 98)).unwrap();
    assert_eq!(
        r,
        Appended::Stored {
            seq: 257,
            dropped_oldest: 0
        }
    );
    // A fully acked *active* segment is reclaimed when full.
    sp.ack(257).unwrap();
    assert_eq!(sp.stats().readings, 0);
    // Record 257's acked bytes stay on disk (in the active segment) until that segment is
    // deleted, so 255 more fit, not 256.
    for _ in 0..255 {
        assert!(matches!(
            sp.append_with(0, |s| payload(s, 98)).unwrap(),
            Appended::Stored { .. }
        ));
    }
    assert_eq!(
        sp.append_with(0, |s| payload(s, 98)).unwrap(),
        Appended::DroppedNewest
    );
    assert_eq!(sp.stats().dropped_newest, 6);
}
