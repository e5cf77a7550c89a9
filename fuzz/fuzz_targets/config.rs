//! The configuration parser and validator (TOML, serde, file/line/key errors).
#![no_main]

use libfuzzer_sys::fuzz_target;
use zgate::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(text, "fuzz.toml") {
        // Errors point into the text (or at line 0 when unknown).
        assert!(e.line <= text.lines().count() + 1, "{e}");
        let _ = e.to_string();
    }
});
