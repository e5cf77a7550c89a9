//! Serial line parsers: kv, json and raw, on arbitrary bytes. The first byte picks the format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zgate::config::LineFormat;
use zgate::protocol::{parse_line, MAX_LINE};

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
        assert!(!values.is_empty() || format == LineFormat::Json);
        // Every reading must serialise back to JSON.
        let _ = serde_json::to_string(&values).expect("values serialise");
    }
});
