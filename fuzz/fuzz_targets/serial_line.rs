//! Serial line parsers: kv, json and raw, on arbitrary bytes. The first byte picks the format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zgate::config::LineFormat;
use zgate::protocol::{parse_line, reading_body, MAX_LINE};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, line)) = data.split_first() else {
        return;
    };
    // The serial framer never hands over more than MAX_LINE bytes.
    let line = &line[..line.len().min(MAX_LINE)];
    let format = match selector % 3 {
        0 => LineFormat::Kv,
        1 => LineFormat::Json,
        _ => LineFormat::Raw,
    };
    if let Ok(values) = parse_line(format, line) {
        // The hand-written JSON text must be a JSON object (kv and raw: never empty), and
        // a reading body built from it must be valid JSON too.
        let map = match serde_json::from_str::<serde_json::Value>(values.as_json()) {
            Ok(serde_json::Value::Object(m)) => m,
            other => panic!("values are not a JSON object: {other:?} from {:?}", values.as_json()),
        };
        assert!(!map.is_empty() || format == LineFormat::Json);
        let body = reading_body("gw", 1, "port", "2026-11-28T00:00:00.000Z", &values);
        let _: serde_json::Value = serde_json::from_str(&body).expect("reading body is JSON");
    }
});
