//! Item 5, binary size: the stripped release binary, aarch64 (`cross/build aarch64`) and
//! host.

use crate::report::Report;
use crate::Opts;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn bench_size(o: &Opts, r: &mut Report) {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let arm = PathBuf::from(&target).join("aarch64-unknown-linux-gnu/release/zgate");
    let stripped = |bin: &Path, strip: &str| -> Option<u64> {
        let tmp = std::env::temp_dir().join(format!("zgate-size-{}", std::process::id()));
        let size = std::fs::copy(bin, &tmp)
            .ok()
            .and_then(|_| Command::new(strip).arg(&tmp).status().ok())
            .filter(|s| s.success())
            .and_then(|_| std::fs::metadata(&tmp).ok())
            .map(|m| m.len());
        let _ = std::fs::remove_file(&tmp);
        size
    };
    let size_row = |r: &mut Report, label: String, size: Option<u64>, bin: &Path| match size {
        Some(b) => r.check(
            "5",
            label,
            format!("{:.2} MiB ({b} bytes)", b as f64 / 1048576.0),
            "< 4 MiB",
            b < 4 * 1048576,
        ),
        None => r.fail(
            "5",
            "binary size",
            format!("cannot strip {}", bin.display()),
        ),
    };
    if arm.exists() {
        // The cross build can be older than the tree: say when it was made.
        let built = std::fs::metadata(&arm)
            .and_then(|m| m.modified())
            .ok()
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_default();
        size_row(
            r,
            format!("stripped binary size, aarch64 (`cross/build aarch64`, built {built})"),
            stripped(&arm, "aarch64-linux-gnu-strip"),
            &arm,
        );
    } else {
        r.row(
            "5",
            "stripped binary size, aarch64",
            format!("n/a: no {} (run `cross/build aarch64`)", arm.display()),
        );
    }
    size_row(
        r,
        "stripped binary size, x86_64 host".into(),
        stripped(&o.zgate, "strip"),
        &o.zgate,
    );
}
