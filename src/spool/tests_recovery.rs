//! Spool tests: start-up recovery from torn, corrupt and crafted files, and the decoder and
//! recovery fuzz loops.

use super::tests::*;
use crate::spool::record;
use crate::spool::*;
use std::fs;
use std::path::PathBuf;

/// Builds a spool with `n` records of `len` bytes, returns the dir and the segment bytes.
fn build_reference(n: u64, len: usize, c: SpoolConfig) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let (mut sp, _) = Spool::open(d.path(), c).unwrap();
    append_n(&mut sp, n, len);
    drop(sp); // no flush: like a crash
    d
}

#[test]
fn torn_tail_at_every_offset() {
    let len = 40usize;
    let rl = OVERHEAD + len;
    let n = 5u64;
    // The reference spool was flushed: its state file records next seq = n + 1.
    let reference = tempfile::tempdir().unwrap();
    {
        let (mut sp, _) = Spool::open(reference.path(), small()).unwrap();
        append_n(&mut sp, n, len);
        sp.flush().unwrap();
    }
    let seg = segments(reference.path()).pop().unwrap();
    let bytes = fs::read(&seg).unwrap();
    assert_eq!(bytes.len(), n as usize * rl);
    let name = seg.file_name().unwrap().to_owned();
    for with_state in [true, false] {
        for cut in 0..=bytes.len() {
            let d = fast_tempdir();
            if with_state {
                fs::copy(reference.path().join("state"), d.path().join("state")).unwrap();
            }
            fs::write(d.path().join(&name), &bytes[..cut]).unwrap();
            let (mut sp, rec) = Spool::open(d.path(), small()).unwrap();
            let whole = (cut / rl) as u64;
            assert_eq!(rec.records, whole, "cut {cut}");
            assert_eq!(rec.discarded_bytes, (cut % rl) as u64, "cut {cut}");
            assert_eq!(rec.segments, usize::from(whole > 0));
            // With the state file, no seq is reused even when records were cut off. Without
            // it (a power cut before any state write), numbering goes on after the last record
            // whose header survived (a torn record with an intact header keeps its seq).
            let torn_header = (cut % rl) >= record::HEADER_LEN;
            let expect = if with_state {
                n + 1
            } else {
                whole + 1 + u64::from(torn_header)
            };
            assert_eq!(rec.next_seq, expect, "cut {cut}: {rec:?}");
            let on_disk = fs::metadata(d.path().join(&name))
                .map(|m| m.len())
                .unwrap_or(0);
            assert_eq!(on_disk, whole * rl as u64);
            let all = read_all(&mut sp);
            assert_eq!(all.len() as u64, whole);
            for (seq, p) in &all {
                assert_eq!(*p, payload(*seq, len));
            }
            // An append after the cut writes cleanly and survives a reopen.
            let s = append_n(&mut sp, 1, len)[0];
            assert_eq!(s, rec.next_seq);
            drop(sp);
            let (mut sp, rec2) = Spool::open(d.path(), small()).unwrap();
            assert_eq!(
                (rec2.records, rec2.discarded_bytes),
                (whole + 1, 0),
                "cut {cut}"
            );
            assert!(rec2.next_seq > s);
            let all = read_all(&mut sp);
            assert_eq!(all.last().unwrap(), &(s, payload(s, len)));
        }
    }
}

#[test]
fn garbage_tail_is_cut_and_appends_continue() {
    let d = fast_tempdir();
    {
        let (mut sp, _) = Spool::open(d.path(), small()).unwrap();
        append_n(&mut sp, 3, 30);
        sp.flush().unwrap();
    }
    let seg = segments(d.path()).pop().unwrap();
    let mut b = fs::read(&seg).unwrap();
    let good = b.len();
    b.extend_from_slice(&[0xAB; 77]);
    b.extend_from_slice(&MAGIC_FOR_TEST);
    fs::write(&seg, &b).unwrap();
    let (mut sp, rec) = Spool::open(d.path(), small()).unwrap();
    assert_eq!((rec.records, rec.discarded_bytes, rec.next_seq), (3, 79, 4));
    assert_eq!(fs::metadata(&seg).unwrap().len() as usize, good);
    assert_eq!(append_n(&mut sp, 1, 30), vec![4]);
    drop(sp);
    let (mut sp, rec) = Spool::open(d.path(), small()).unwrap();
    assert_eq!((rec.records, rec.discarded_bytes), (4, 0));
    assert_eq!(read_all(&mut sp).len(), 4);
}

const MAGIC_FOR_TEST: [u8; 2] = [0x5A, 0xD1];

#[test]
fn corruption_inside_an_older_segment_is_skipped() {
    let len = 98; // 128-byte records, 32 per segment
    let reference = build_reference(100, len, small());
    let segs = segments(reference.path());
    assert_eq!(segs.len(), 4);
    // Flip one payload byte of record 10 (in segment 1) and overwrite the header of record 40
    // (segment 2) with garbage.
    let mut b = fs::read(&segs[0]).unwrap();
    b[9 * 128 + 40] ^= 0x01;
    fs::write(&segs[0], &b).unwrap();
    let mut b = fs::read(&segs[1]).unwrap();
    b[7 * 128..7 * 128 + 10].copy_from_slice(&[0xFF; 10]);
    fs::write(&segs[1], &b).unwrap();
    let (mut sp, rec) = Spool::open(reference.path(), small()).unwrap();
    assert_eq!(rec.records, 98);
    assert_eq!(rec.discarded_bytes, 256);
    assert_eq!(rec.segments, 4);
    // Not truncated: the valid records after the corruption are kept.
    assert_eq!(fs::metadata(&segs[0]).unwrap().len(), 32 * 128);
    let all = read_all(&mut sp);
    let seqs: Vec<u64> = all.iter().map(|r| r.0).collect();
    let want: Vec<u64> = (1..=100).filter(|s| *s != 10 && *s != 40).collect();
    assert_eq!(seqs, want);
    assert_eq!(sp.stats().readings, 98);
    // Exact counts across the gaps.
    assert_eq!(sp.ack(50).unwrap(), 48);
    assert!(rec.next_seq > 100);
}

#[test]
fn random_bit_flips_never_panic_and_only_valid_records_come_back() {
    let len = 60;
    let reference = build_reference(150, len, small()); // 3 segments
    let names: Vec<PathBuf> = fs::read_dir(reference.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let originals: Vec<(PathBuf, Vec<u8>)> = names
        .iter()
        .map(|p| (p.clone(), fs::read(p).unwrap()))
        .collect();
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    for round in 0..150 {
        let d = fast_tempdir();
        for (p, b) in &originals {
            let mut b = b.clone();
            if !b.is_empty() {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(b.len() as u64) as usize;
                    b[i] ^= 1 << rng.below(8);
                }
                if rng.below(4) == 0 {
                    let cut = rng.below(b.len() as u64) as usize;
                    b.truncate(cut);
                }
            }
            fs::write(d.path().join(p.file_name().unwrap()), &b).unwrap();
        }
        let (mut sp, rec) = Spool::open(d.path(), small()).unwrap();
        assert!(
            rec.next_seq > 150 || rec.next_seq > rec.acked,
            "round {round}"
        );
        let all = read_all(&mut sp);
        let mut prev = 0;
        for (seq, p) in &all {
            assert!(*seq > prev, "round {round}: order");
            prev = *seq;
            assert!(*seq <= 150, "round {round}: seq {seq}");
            assert_eq!(*p, payload(*seq, len), "round {round}: seq {seq}");
        }
        assert_eq!(all.len() as u64, sp.stats().readings, "round {round}");
        // Appending and re-opening still work.
        append_n(&mut sp, 2, len);
        drop(sp);
        let (_, rec2) = Spool::open(d.path(), small()).unwrap();
        assert!(rec2.records >= 2, "round {round}");
    }
}

#[test]
fn decoder_fuzz_loop() {
    let mut rng = Rng(42);
    let mut valid = Vec::new();
    encode_record(7, 123, b"hello world, a payload", &mut valid);
    let (r, used) = decode_record(&valid).unwrap();
    assert_eq!(
        (r.seq, r.time_ms, r.payload, used),
        (7, 123, &b"hello world, a payload"[..], valid.len())
    );
    let mut oks = 0;
    for i in 0..100_000u32 {
        let buf: Vec<u8> = match i % 3 {
            0 => (0..rng.below(120)).map(|_| rng.next() as u8).collect(),
            1 => {
                // Mutated valid record (some mutations keep it valid).
                let mut b = valid.clone();
                for _ in 0..rng.below(3) {
                    let j = rng.below(b.len() as u64) as usize;
                    b[j] ^= 1 << rng.below(8);
                }
                b.truncate(rng.below(b.len() as u64 + 1) as usize);
                b
            }
            _ => {
                // Valid header with a random length claim and random tail.
                let mut b = Vec::new();
                encode_record(rng.below(1 << 40) + 1, rng.next(), &[], &mut b);
                b.truncate(HEADER_LEN);
                let l = rng.next() as u32 & 0x01FF_FFFF;
                b[2..6].copy_from_slice(&l.to_le_bytes());
                let h = crc32fast::hash(&b[..22]);
                b[22..26].copy_from_slice(&h.to_le_bytes());
                b.extend((0..rng.below(64)).map(|_| rng.next() as u8));
                b
            }
        };
        match decode_record(&buf) {
            Ok((r, used)) => {
                oks += 1;
                assert!(used <= buf.len());
                let mut re = Vec::new();
                encode_record(r.seq, r.time_ms, r.payload, &mut re);
                assert_eq!(re, buf[..used]);
            }
            Err(DecodeError::Incomplete { needed }) => assert!(needed > buf.len()),
            Err(DecodeError::TooLarge { len }) => assert!(len > MAX_PAYLOAD as u64),
            Err(_) => {}
        }
    }
    assert!(oks > 100, "{oks}");
}

/// Same body as fuzz/fuzz_targets/spool_recovery.rs, on deterministic random segment files
/// built from valid records, mutations, truncations and junk.
#[test]
fn recovery_fuzz_loop() {
    let mut rng = Rng(7);
    for round in 0..300 {
        let d = fast_tempdir();
        let mut file = Vec::new();
        let mut seq = 1 + rng.below(3);
        for _ in 0..rng.below(12) {
            match rng.below(5) {
                0 => file.extend((0..rng.below(80)).map(|_| rng.next() as u8)),
                1 => file.extend_from_slice(&[0x5A, 0xD1]),
                _ => {
                    // Mostly text; now and then bytes that are not UTF-8 (valid CRCs, corrupt).
                    let text = rng.below(4) != 0;
                    let p: Vec<u8> = (0..rng.below(50))
                        .map(|_| {
                            if text {
                                b'a' + (rng.next() % 26) as u8
                            } else {
                                rng.next() as u8
                            }
                        })
                        .collect();
                    encode_record(seq, rng.next(), &p, &mut file);
                    seq += 1 + rng.below(2) * rng.below(4); // sometimes a gap
                    if rng.below(6) == 0 {
                        seq = seq.saturating_sub(3).max(1); // sometimes out of order
                    }
                }
            }
        }
        for _ in 0..rng.below(4) {
            if !file.is_empty() {
                let i = rng.below(file.len() as u64) as usize;
                file[i] ^= 1 << rng.below(8);
            }
        }
        if rng.below(3) == 0 {
            file.truncate(rng.below(file.len() as u64 + 1) as usize);
        }
        fs::write(d.path().join("00000000000000000001.seg"), &file).unwrap();
        let (mut sp, rec) = Spool::open(d.path(), SpoolConfig::default()).unwrap();
        let all = read_all(&mut sp);
        assert_eq!(all.len() as u64, rec.records, "round {round}");
        for w in all.windows(2) {
            assert!(w[0].0 < w[1].0, "round {round}");
        }
        assert!(all.iter().all(|(s, _)| *s < sp.next_seq()));
        sp.append_with(0, |s| s.to_string()).unwrap();
        drop(sp);
        let (_, rec2) = Spool::open(d.path(), SpoolConfig::default()).unwrap();
        assert_eq!(rec2.records, rec.records + 1, "round {round}");
    }
}

/// The structured body of the fuzz target (records with valid CRCs built from the input,
/// crafted seqs, payloads that are not UTF-8, crafted `state`) on deterministic random inputs.
#[test]
fn structured_recovery_fuzz_loop() {
    let mut rng = Rng(0xC0FF_EE00_1234_5678);
    for round in 0..400 {
        let d = fast_tempdir();
        let len = rng.below(600) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if let Some(b) = data.first_mut() {
            *b &= !1; // the structured mode
        }
        let r = std::panic::catch_unwind(|| fuzzing::check_recovery(d.path(), &data));
        assert!(r.is_ok(), "round {round}: input {data:02x?}");
    }
}
