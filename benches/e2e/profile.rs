//! Where a process's CPU goes, by binary: `perf record` samples of one process (all its
//! threads) for a while, then `perf report --sort dso`. Used by item 9 to show which share of
//! each forwarder's CPU per reading is its own code and which is the kernel and libzmq, which
//! both forwarders pay alike.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running `perf record` of one process.
pub struct Recording {
    child: Child,
    out: tempfile::TempPath,
}

/// Starts sampling `pid` for `secs` seconds; None when perf cannot record here.
pub fn record(pid: u32, secs: u64) -> Option<Recording> {
    let out = tempfile::NamedTempFile::new().ok()?.into_temp_path();
    let child = Command::new("perf")
        .args(["record", "-q", "-F", "1999", "-p", &pid.to_string(), "-o"])
        .arg(&*out)
        .args(["--", "sleep", &secs.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some(Recording { child, out })
}

/// The share (0..1) of the samples in each binary, largest first.
pub type Shares = Vec<(String, f64)>;

impl Recording {
    /// Waits for the recording to end and reads the shares by binary.
    pub fn finish(mut self) -> Option<Shares> {
        if !self.child.wait().ok()?.success() {
            return None;
        }
        report(&self.out)
    }
}

fn report(data: &Path) -> Option<Shares> {
    let out = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "-g",
            "none",
            "--sort",
            "dso",
            "-i",
        ])
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let shares: Shares = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (pct, dso) = l.split_once('%')?;
            Some((
                dso.trim().to_string(),
                pct.trim().parse::<f64>().ok()? / 100.0,
            ))
        })
        .collect();
    (!shares.is_empty()).then_some(shares)
}

/// The total share of the binaries whose name satisfies `pick`.
pub fn share_of(shares: &Shares, pick: impl Fn(&str) -> bool) -> f64 {
    shares.iter().filter(|(d, _)| pick(d)).map(|(_, s)| s).sum()
}

/// The kernel's samples (`[kernel.kallsyms]`, and `[unknown]` frames, which perf gives for
/// kernel entry code it cannot name) and libzmq's (any build of it).
pub fn kernel_or_libzmq(dso: &str) -> bool {
    dso.starts_with("[kernel") || dso == "[unknown]" || dso.starts_with("libzmq")
}

/// One line of shares: `kernel 63%, libzmq 15%, zgate 12%, …` (the four largest).
pub fn describe(shares: &Shares) -> String {
    shares
        .iter()
        .take(4)
        .map(|(d, s)| {
            let name = d.trim_start_matches('[').trim_end_matches(']');
            let name = name.strip_suffix(".kallsyms").unwrap_or(name);
            let name = name.split(".so").next().unwrap_or(name);
            let name = name.split('-').next().unwrap_or(name);
            format!("{name} {:.0}%", s * 100.0)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_by_binary() {
        let s: Shares = vec![
            ("[kernel.kallsyms]".into(), 0.6),
            ("libzmq.so.5.2.4".into(), 0.15),
            ("zgate".into(), 0.12),
            ("libc.so.6".into(), 0.09),
            ("libzmq-2f02442c.so.5.2.5".into(), 0.01),
        ];
        assert!((share_of(&s, kernel_or_libzmq) - 0.76).abs() < 1e-9);
        assert_eq!(describe(&s), "kernel 60%, libzmq 15%, zgate 12%, libc 9%");
    }
}
