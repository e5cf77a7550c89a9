//! `cargo fuzz run spool_record`: the record decoder must never panic, and whatever it accepts
//! must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zgate::spool::{decode_record, encode_record, OVERHEAD};

fuzz_target!(|data: &[u8]| {
    // Decode a stream of records the way the scanner does: on error, advance one byte.
    let mut rest = data;
    while !rest.is_empty() {
        match decode_record(rest) {
            Ok((rec, used)) => {
                assert!(used <= rest.len());
                assert_eq!(used, OVERHEAD + rec.payload.len());
                let mut re = Vec::new();
                encode_record(rec.seq, rec.time_ms, rec.payload, &mut re);
                assert_eq!(&re[..], &rest[..used]);
                rest = &rest[used..];
            }
            Err(_) => rest = &rest[1..],
        }
    }
});
