//! System calls of a running process, counted per thread and kind.
//!
//! With `perf trace -s` when perf can trace (the kernel's syscall tracepoints, counted in the
//! kernel: about a µs per call), otherwise with `strace -ff` (one output file per thread).
//! strace stops the traced thread at every system call, which makes each call cost tens of
//! µs more; its counts stay exact, but a slower loop may find more lines per wake than it
//! would untraced (fewer calls per reading). The row names the tool. `BENCH_TRACER=strace`
//! forces strace; `BENCH_TRACE=<dir>` keeps strace's output (`<dir>/t.<tid>`) or perf's
//! summary (`<dir>/perf.txt`).

use crate::process::tasks;
use crate::Res;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// System call name → number of calls.
pub type Kinds = BTreeMap<String, u64>;

/// One traced thread: its name (`/proc/<pid>/task/<tid>/comm`) and its calls.
pub struct ThreadCalls {
    pub tid: u32,
    pub comm: String,
    pub calls: Kinds,
}

/// The tracing tool.
#[derive(Clone, Copy, PartialEq)]
pub enum Tool {
    Perf,
    Strace,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::Perf => "perf trace",
            Tool::Strace => "strace",
        }
    }
}

pub struct Tracer {
    child: Child,
    dir: tempfile::TempDir,
    pid: u32,
    comms: BTreeMap<u32, String>,
    pub tool: Tool,
}

/// Whether strace can be run (it is installed by `benches/setup`).
pub fn strace_available() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `perf trace` can trace here (perf installed, tracepoints readable).
pub fn perf_available() -> bool {
    if std::env::var("BENCH_TRACER").is_ok_and(|v| v == "strace") {
        return false;
    }
    Command::new("perf")
        .args(["trace", "-s", "-o", "/dev/null", "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn traced(task: &Path) -> bool {
    crate::process::status_field(&task.join("status"), "TracerPid").is_some_and(|t| t != 0)
}

impl Tracer {
    /// Attaches to every thread of `pid` with perf if it can, else strace; returns once all
    /// of them are traced.
    pub fn attach(pid: u32) -> Res<Tracer> {
        if perf_available() {
            Tracer::attach_perf(pid)
        } else {
            Tracer::attach_strace(pid)
        }
    }

    fn attach_perf(pid: u32) -> Res<Tracer> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let child = Command::new("perf")
            .args(["trace", "-s", "-o"])
            .arg(dir.path().join("perf.txt"))
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start perf: {e}"))?;
        let mut t = Tracer {
            child,
            dir,
            pid,
            comms: BTreeMap::new(),
            tool: Tool::Perf,
        };
        // perf gives no sign once its events are open; it takes well under a second.
        thread::sleep(Duration::from_millis(1500));
        if let Ok(Some(s)) = t.child.try_wait() {
            return Err(format!("perf trace exited: {s}"));
        }
        t.names();
        Ok(t)
    }

    fn attach_strace(pid: u32) -> Res<Tracer> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let child = Command::new("strace")
            .args(["-ff", "-qq", "-o"])
            .arg(dir.path().join("t"))
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start strace: {e}"))?;
        let mut t = Tracer {
            child,
            dir,
            pid,
            comms: BTreeMap::new(),
            tool: Tool::Strace,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let tasks = tasks(pid);
            if !tasks.is_empty() && tasks.iter().all(|t| traced(t)) {
                break;
            }
            if Instant::now() > deadline {
                return Err("strace did not attach to every thread within 10 s (ptrace \
                            refused? see /proc/sys/kernel/yama/ptrace_scope)"
                    .into());
            }
            if let Ok(Some(s)) = t.child.try_wait() {
                return Err(format!("strace exited: {s}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
        t.names();
        Ok(t)
    }

    /// Remembers the names of the traced process's threads (read while they live).
    fn names(&mut self) {
        for task in tasks(self.pid) {
            let Some(tid) = task
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
            else {
                continue;
            };
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            self.comms.insert(tid, comm.trim().to_string());
        }
    }

    /// Detaches (SIGINT to strace) and counts the calls of every thread, loop thread first.
    pub fn stop(mut self) -> Res<Vec<ThreadCalls>> {
        self.names();
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        let _ = self.child.wait();
        let mut out = Vec::new();
        if self.tool == Tool::Perf {
            let path = self.dir.path().join("perf.txt");
            let text = std::fs::read_to_string(&path).map_err(|e| format!("perf: {e}"))?;
            if let Some(keep) = std::env::var_os("BENCH_TRACE") {
                let _ = std::fs::create_dir_all(&keep);
                let _ = std::fs::write(Path::new(&keep).join("perf.txt"), &text);
            }
            for (tid, calls) in count_perf(&text) {
                out.push(ThreadCalls {
                    tid,
                    comm: self.comms.get(&tid).cloned().unwrap_or_else(|| "?".into()),
                    calls,
                });
            }
            out.sort_by_key(|t| (t.tid != self.pid, t.tid));
            return Ok(out);
        }
        let entries = std::fs::read_dir(self.dir.path()).map_err(|e| e.to_string())?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(tid) = name.strip_prefix("t.").and_then(|t| t.parse::<u32>().ok()) else {
                continue;
            };
            let text = std::fs::read_to_string(e.path()).map_err(|e| e.to_string())?;
            if let Some(keep) = std::env::var_os("BENCH_TRACE") {
                let to = Path::new(&keep).join(&name);
                let _ = std::fs::create_dir_all(&keep);
                std::fs::write(&to, &text).map_err(|e| format!("{}: {e}", to.display()))?;
            }
            out.push(ThreadCalls {
                tid,
                comm: self.comms.get(&tid).cloned().unwrap_or_else(|| "?".into()),
                calls: count(&text),
            });
        }
        out.sort_by_key(|t| (t.tid != self.pid, t.tid));
        Ok(out)
    }
}

/// Counts the calls in one thread's strace output by name. A line is one call
/// (`name(args) = ret`, or `name(args <detached ...>` at the end); signals (`---`) and exits
/// (`+++`) are not calls.
pub fn count(text: &str) -> Kinds {
    let mut k = Kinds::new();
    for line in text.lines() {
        let Some((name, _)) = line.split_once('(') else {
            continue;
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue;
        }
        *k.entry(name.to_string()).or_default() += 1;
    }
    k
}

/// Reads `perf trace -s` output: a section per thread (` comm (tid), N events, P%`), then a
/// table whose rows start with the call's name and its count.
pub fn count_perf(text: &str) -> Vec<(u32, Kinds)> {
    let mut out: Vec<(u32, Kinds)> = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.ends_with('%') && l.contains(" events, ") {
            let tid = l
                .rsplit_once(" (")
                .or_else(|| l.split_once(" ("))
                .and_then(|(_, r)| r.split_once(')'))
                .and_then(|(t, _)| t.parse().ok());
            if let Some(tid) = tid {
                out.push((tid, Kinds::new()));
            }
            continue;
        }
        let mut f = l.split_whitespace();
        let (Some(name), Some(calls)) = (f.next(), f.next()) else {
            continue;
        };
        let (Ok(calls), Some((_, kinds))) = (calls.parse::<u64>(), out.last_mut()) else {
            continue;
        };
        if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            *kinds.entry(name.to_string()).or_default() += calls;
        }
    }
    out
}

/// Adds `b` into `a`.
pub fn merge(a: &mut Kinds, b: &Kinds) {
    for (name, n) in b {
        *a.entry(name.clone()).or_default() += n;
    }
}

/// "12.3: read 3.00, write 2.00, …": calls per reading in all, then by kind, most first
/// (kinds under 0.005 per reading are summed as "other").
pub fn per_reading(k: &Kinds, readings: u64) -> String {
    let n = readings.max(1) as f64;
    let total: u64 = k.values().sum();
    let mut kinds: Vec<(&String, &u64)> = k.iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let mut s = format!("{:.2}:", total as f64 / n);
    let mut other = 0;
    let mut first = true;
    for (name, c) in kinds {
        if (*c as f64) / n < 0.005 {
            other += c;
            continue;
        }
        let _ = write!(
            s,
            "{} {name} {:.2}",
            if first { "" } else { "," },
            *c as f64 / n
        );
        first = false;
    }
    if other > 0 {
        let _ = write!(s, ", other {:.3}", other as f64 / n);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_calls_not_signals() {
        let text = "epoll_wait(3, [], 32, 10) = 0\n\
                    read(7, \"t=1 n=2\\n\", 4096) = 8\n\
                    --- SIGINT {si_signo=SIGINT} ---\n\
                    read(7, 0x1, 4096) = -1 EAGAIN (Resource temporarily unavailable)\n\
                    epoll_wait(3,  <detached ...>\n\
                    +++ exited with 0 +++\n";
        let k = count(text);
        assert_eq!(k.get("read"), Some(&2));
        assert_eq!(k.get("epoll_wait"), Some(&2));
        assert_eq!(k.len(), 2);
        assert_eq!(per_reading(&k, 2), "2.00: epoll_wait 1.00, read 1.00");
    }

    #[test]
    fn reads_perf_summaries_per_thread() {
        let text = "\n Summary of events:\n\n zgate (100), 40 events, 80.0%\n\n   \
                    syscall            calls  errors  total       min       avg       max       stddev\n   \
                                       (msec)    (msec)    (msec)    (msec)        (%)\n   \
                    --------------- --------  ------ -------- --------- --------- ---------     ------\n   \
                    epoll_pwait           15      0    10.0     0.001     0.5     2.0      3.05%\n   \
                    getpid                 5      0     0.4     0.001     0.005   0.023      8.85%\n\n \
                    ZMQbg/IO/0 (101), 10 events, 20.0%\n\n   \
                    sendto                 5      0     0.4     0.001     0.005   0.023      8.85%\n";
        let t = count_perf(text);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].0, 100);
        assert_eq!(t[0].1.get("epoll_pwait"), Some(&15));
        assert_eq!(t[0].1.get("getpid"), Some(&5));
        assert_eq!(t[0].1.len(), 2);
        assert_eq!(t[1].0, 101);
        assert_eq!(t[1].1.get("sendto"), Some(&5));
    }
}
