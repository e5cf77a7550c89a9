//! The processes of the fleet benchmark: a 3-node JetStream cluster (Debian's `nats-server`)
//! on loopback, the bridge under test, and what /proc says about them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Loopback ports of the benchmark's cluster (client, cluster routes, monitoring: base + node
/// index 1..=3) and bridge. Away from the tests' (which take free ports or 14221..16223).
pub const CLIENT_BASE: u16 = 24220;
pub const ROUTE_BASE: u16 = 26220;
pub const MONITOR_BASE: u16 = 28220;
pub const BRIDGE_PORT: u16 = 25555;

/// A child that is killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc, String> {
        let f = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let f2 = f.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(|e| format!("cannot start {name} ({cmd:?}): {e}"))?;
        Ok(Proc {
            name: name.into(),
            child,
            log,
        })
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
    /// Fails with the log's tail when the process has exited.
    pub fn check(&mut self) -> Result<(), String> {
        if self.alive() {
            Ok(())
        } else {
            Err(format!(
                "{} exited; its log:\n{}",
                self.name,
                self.log_tail()
            ))
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The three nodes `n1`..`n3` of cluster `zgate` (the configuration docs/fleet.md shows).
pub struct Cluster {
    pub nodes: Vec<Proc>,
}

impl Cluster {
    pub fn servers(&self) -> Vec<String> {
        (1..=3)
            .map(|i| format!("nats://127.0.0.1:{}", CLIENT_BASE + i))
            .collect()
    }

    pub fn start(nats_server: &str, dir: &Path) -> Result<Cluster, String> {
        let routes = (1..=3)
            .map(|i| format!("nats-route://127.0.0.1:{}", ROUTE_BASE + i))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for i in 1..=3u16 {
            let conf = dir.join(format!("n{i}.conf"));
            let text = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: zgate, listen: 127.0.0.1:{}, routes: [{routes}] }}\n",
                CLIENT_BASE + i,
                MONITOR_BASE + i,
                dir.join(format!("n{i}")).display(),
                ROUTE_BASE + i,
            );
            std::fs::write(&conf, text).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(nats_server);
            cmd.arg("-c").arg(&conf);
            nodes.push(Proc::spawn(
                &format!("nats-server n{i}"),
                cmd,
                dir.join(format!("n{i}.log")),
            )?);
        }
        let c = Cluster { nodes };
        // Ready when every node knows the JetStream meta leader.
        let t = Instant::now();
        loop {
            let ready = (1..=3).all(|i| {
                http_get(MONITOR_BASE + i, "/jsz")
                    .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["meta_cluster"]["leader"].as_str().map(|s| !s.is_empty()))
                    .unwrap_or(false)
            });
            if ready {
                return Ok(c);
            }
            if t.elapsed() > Duration::from_secs(30) {
                let logs = c.nodes.iter().map(Proc::log_tail).collect::<Vec<_>>();
                return Err(format!(
                    "the cluster elected no meta leader within 30 s (ports {}..{} in use?):\n{}",
                    CLIENT_BASE + 1,
                    CLIENT_BASE + 3,
                    logs.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The body of `GET path` from the monitoring port, or None.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Writes the bridge's configuration (the keys of `zgate-bridge config-template`).
pub fn bridge_config(dir: &Path, servers: &[String], max_inflight: usize) -> PathBuf {
    let servers = servers
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "[bridge]\nid = \"bench-bridge\"\nbind = \"tcp://127.0.0.1:{BRIDGE_PORT}\"\n\
         secret_key_file = \"{}\"\nallow_dir = \"{}\"\ninsecure = false\n\
         max_inflight = {max_inflight}\n\n\
         [nats]\nservers = [{servers}]\ncreds_file = \"\"\nstream = \"ZGATE\"\nreplicas = 3\n\
         duplicate_window_s = 3600\n",
        dir.join("server.key").display(),
        dir.join("allow").display(),
    );
    let path = dir.join("bridge.toml");
    std::fs::write(&path, text).expect("writing bridge.toml");
    path
}

pub fn start_bridge(bin: &Path, config: &Path, log: PathBuf) -> Result<Proc, String> {
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg("--config").arg(config);
    cmd.env(
        "RUST_LOG",
        std::env::var("LOADGEN_BRIDGE_LOG").unwrap_or_else(|_| "warn".into()),
    );
    Proc::spawn("zgate-bridge", cmd, log)
}

/// VmRSS of a process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// utime + stime of a process (all threads), in seconds.
pub fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (children inherit it); returns it.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    r.rlim_cur
}
