//! `cargo fuzz run spool_record`: the record decoder must never panic, whatever it accepts
//! must re-encode to the same bytes, and records built from the input with computed checksums
//! (any seq, any payload) must decode to what was encoded.
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
    // A record with valid checksums from the input: seq (any non-zero u64), time, payload.
    if data.len() >= 16 {
        let seq = u64::from_le_bytes(data[..8].try_into().unwrap()).max(1);
        let time = u64::from_le_bytes(data[8..16].try_into().unwrap());
        let payload = &data[16..data.len().min(16 + zgate::spool::MAX_PAYLOAD)];
        let mut enc = Vec::new();
        encode_record(seq, time, payload, &mut enc);
        let (rec, used) = decode_record(&enc).expect("a freshly encoded record decodes");
        assert_eq!((rec.seq, rec.time_ms, rec.payload, used), (seq, time, payload, enc.len()));
    }
});
