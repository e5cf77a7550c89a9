//! `cargo fuzz run spool_recovery`: a segment file (and maybe a `state` file) built from the
//! input: mostly records whose checksums are computed, so crafted contents (seq `u64::MAX`,
//! payloads that are not UTF-8, out-of-order and duplicate seqs, a `state` with values out of
//! range) reach the recovery logic, mixed with junk, bit flips and a truncation; or, when the
//! first byte is odd, raw bytes after one valid record. `Spool::open` must neither fail nor
//! panic, only acceptable records may come back, and the spool must stay usable. The checks
//! are `zgate::spool::fuzzing::check_recovery`, which the unit tests also run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

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
    zgate::spool::fuzzing::check_recovery(&dir, data);
    let _ = std::fs::remove_dir_all(&dir);
});
