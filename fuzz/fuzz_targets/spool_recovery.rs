//! `cargo fuzz run spool_recovery`: arbitrary bytes as a segment file (optionally preceded by a
//! valid record, so the scanner gets past the first bytes); `Spool::open` must not panic nor
//! fail, reading back must return only records that pass their checksum, and the spool must
//! stay usable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use zgate::spool::{decode_record, encode_record, Spool, SpoolConfig};

fn scratch_dir() -> PathBuf {
    let base = std::env::var_os("ZGATE_FUZZ_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("zgate-fuzz-spool-{}", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut file = Vec::new();
    if data.first().is_some_and(|b| b & 1 == 1) {
        encode_record(1, 0, b"prefix", &mut file);
    }
    file.extend_from_slice(data);
    std::fs::write(dir.join("00000000000000000001.seg"), &file).unwrap();

    let (mut spool, rec) = Spool::open(&dir, SpoolConfig::default()).expect("open must not fail");
    assert!(rec.next_seq >= 1);
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let n = out.len();
        spool.read_from(from, 64, &mut out).expect("read");
        if out.len() == n {
            break;
        }
        from = out.last().unwrap().0 + 1;
    }
    for w in out.windows(2) {
        assert!(w[0].0 < w[1].0, "seq order");
    }
    let next = spool.next_seq();
    assert!(out.iter().all(|(s, _)| *s < next));
    spool.append_with(0, |s| s.to_le_bytes().to_vec()).expect("append after recovery");
    let _ = spool.stats();
    drop(spool);
    let (_, rec2) = Spool::open(&dir, SpoolConfig::default()).expect("reopen");
    assert_eq!(rec2.records, rec.records + 1);
    let _ = decode_record(data);
    let _ = std::fs::remove_dir_all(&dir);
});
