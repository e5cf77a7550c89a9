//! `loadgen`: the fleet benchmark of `make bench` (item F of docs/benchmarks.md).
//!
//! `loadgen bench --bridge target/release/zgate-bridge [--quick]` starts a 3-node JetStream
//! cluster on loopback (Debian's `nats-server`; ports in `procs.rs`), one bridge with an allow
//! list of fresh CURVE keys, and simulates 1,000 gateways in this process (libzmq DEALERs with
//! CURVE, protocol v1, `fleet.rs`). It measures, side by side in the same run:
//!
//! - the raw ceiling: one async-nats publisher putting the same 200-byte bodies with their
//!   `Nats-Msg-Id` straight into the R3 stream, `--inflight` (1,024) PubAcks outstanding; run
//!   before and after the bridge's steps, the mean of both;
//! - the maximum sustained readings/s through the bridge: paced steps, each rate 1.25 × the
//!   last, until acks stop keeping up (`Step::sustained`), then one step between; its ratio
//!   to the raw ceiling (goal ≥ 0.5);
//! - at half that maximum: gateway send → JetStream consumer receipt p50/p99 (an ordered push
//!   consumer in this process reads `values.t_ns`, the send time on the same clock) and the
//!   bridge's CPU per reading (utime + stime from /proc over acked readings);
//! - a fresh bridge's RSS with no gateway, 1,000 and 10,000 connected idle gateways (those
//!   beyond the first 1,000 are held by child processes, `loadgen idle`, within the open-file
//!   limit), per gateway (goal < 64 KiB).
//!
//! Rows go to stdout as JSON lines (`{"what", "result", "budget", "ok"}`, or `{"note"}`);
//! `bench_e2e` (item F) puts them in docs/benchmarks.md. Progress goes to stderr.

mod fleet;
mod js;
mod procs;

use fleet::{make_keys, read_keys, Fleet};
use procs::{bridge_config, cpu_s, raise_nofile, rss_kib, start_bridge, Cluster, BRIDGE_PORT};
use serde_json::json;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Opts {
    bridge: PathBuf,
    nats_server: String,
    quick: bool,
    gateways: usize,
    idle: Vec<usize>,
    inflight: usize,
    max_inflight: usize,
}

fn row(what: impl Into<String>, result: impl Into<String>, budget: &str, ok: Option<bool>) {
    let (what, result) = (what.into(), result.into());
    eprintln!("loadgen: {what}: {result}");
    println!(
        "{}",
        json!({"what": what, "result": result, "budget": budget, "ok": ok})
    );
}

fn note(text: impl Into<String>) {
    println!("{}", json!({ "note": text.into() }));
}

fn say(text: impl AsRef<str>) {
    eprintln!("loadgen: {}", text.as_ref());
}

fn main() {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("bench") => {
            let o = bench_opts(args);
            if let Err(e) = bench(&o) {
                row("fleet benchmark", format!("error: {e}"), "—", Some(false));
                std::process::exit(1);
            }
        }
        Some("raw") => {
            // The raw ceiling alone: cluster, stream (made here as the bridge makes it), one
            // publisher. For checking JetStream on a machine without a bridge.
            let o = bench_opts(args);
            if let Err(e) = raw_only(&o) {
                eprintln!("loadgen raw: {e}");
                std::process::exit(1);
            }
        }
        Some("idle") => {
            let a: Vec<String> = args.collect();
            if let Err(e) = idle_child(&a) {
                eprintln!("loadgen idle: {e}");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!(
                "usage: loadgen bench --bridge PATH [--nats-server PATH] [--quick] \
                 [--gateways N] [--idle N,N] [--inflight N]"
            );
            std::process::exit(2);
        }
    }
}

fn bench_opts(mut args: impl Iterator<Item = String>) -> Opts {
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let mut o = Opts {
        bridge: PathBuf::from("target/release/zgate-bridge"),
        nats_server: if std::path::Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server".into()
        } else {
            "nats-server".into()
        },
        quick,
        gateways: 1000,
        idle: vec![1000, 10_000],
        inflight: 1024,
        max_inflight: 1024,
    };
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--bridge" => o.bridge = val().into(),
            "--nats-server" => o.nats_server = val(),
            "--quick" => o.quick = true,
            "--gateways" => o.gateways = val().parse().expect("--gateways N"),
            "--idle" => {
                o.idle = val()
                    .split(',')
                    .map(|v| v.parse().expect("--idle N,N"))
                    .collect()
            }
            "--inflight" => o.inflight = val().parse().expect("--inflight N"),
            other => panic!("unknown argument {other:?}"),
        }
    }
    if o.quick && o.idle == [1000, 10_000] {
        o.idle = vec![1000, 2000];
    }
    o
}

fn bench(o: &Opts) -> Result<(), String> {
    let t0 = Instant::now();
    let nofile = raise_nofile();
    let tmp = tempfile::Builder::new()
        .prefix("zgate-fleet-bench")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let dir = tmp.path();
    let allow = dir.join("allow");
    let keys_file = dir.join("gateways.keys");
    let most = o
        .idle
        .iter()
        .copied()
        .chain([o.gateways])
        .max()
        .unwrap_or(0);
    let keys = make_keys(most, &keys_file)?;
    // The allow list holds the first `gateways` keys; the rest are added before the idle
    // run that needs them.
    fleet_allow(&keys[..o.gateways], &allow)?;
    let (server_key, server_pub) = zgate::security::keygen(&dir.join("server"))?;
    let _ = server_key;
    let server_pub = zgate::security::load_public_key(&server_pub)?;
    let endpoint = format!("tcp://127.0.0.1:{BRIDGE_PORT}");

    say("starting the 3-node cluster");
    let cluster = Cluster::start(&o.nats_server, dir)?;
    let servers = cluster.servers();
    let config = bridge_config(dir, &servers, o.max_inflight);
    let mut bridge = start_bridge(&o.bridge, &config, dir.join("bridge.log"))?;
    say(format!("connecting {} gateways", o.gateways));
    let t = Instant::now();
    let mut fleet = Fleet::connect(
        &endpoint,
        &server_pub,
        &keys[..o.gateways],
        Duration::from_secs(180),
    )
    .map_err(|e| format!("{e}; bridge log:\n{}", bridge.log_tail()))?;
    let connect_s = t.elapsed().as_secs_f64();
    let rt = js::runtime();
    let replicas = rt.block_on(js::wait_stream(&servers, "ZGATE", Duration::from_secs(30)))?;
    say(format!(
        "{} gateways connected in {connect_s:.1} s; stream ZGATE has {replicas} replicas",
        fleet.len()
    ));

    let (raw_secs, step_secs) = if o.quick { (3.0, 3.0) } else { (10.0, 8.0) };
    let raw1 = rt.block_on(js::raw_ceiling(
        &servers, o.gateways, o.inflight, raw_secs, 1, t0,
    ))?;
    say(format!("raw ceiling (before): {:.0}/s", raw1.per_s));

    // Paced steps up to the rate the bridge no longer sustains.
    let cap = (o.max_inflight as u64 * 3) / 4;
    let mut rate = (raw1.per_s / 4.0).max(500.0).round();
    let (mut best, mut first_fail): (Option<f64>, Option<f64>) = (None, None);
    let mut steps = Vec::new();
    let max_steps = if o.quick { 6 } else { 12 };
    for _ in 0..max_steps {
        bridge.check()?;
        let (b0, l0, w0) = (
            cpu_s(bridge.pid()),
            cpu_s(std::process::id()),
            Instant::now(),
        );
        let s = fleet.run_paced(rate, step_secs, cap, t0);
        let wall = w0.elapsed().as_secs_f64();
        let (bcpu, lcpu) = (
            100.0 * (cpu_s(bridge.pid()) - b0) / wall,
            100.0 * (cpu_s(std::process::id()) - l0) / wall,
        );
        let drained = fleet.drain(Duration::from_secs(60), t0);
        let ok = s.sustained() && drained;
        say(format!(
            "step {rate:.0}/s: acked {:.0}/s, backlog at end {}, capped {}, CPU bridge {bcpu:.0} % \
             loadgen {lcpu:.0} % → {}",
            s.acked_per_s,
            s.backlog,
            s.capped,
            if ok { "sustained" } else { "not sustained" }
        ));
        steps.push(format!(
            "{rate:.0}{} (bridge {bcpu:.0} % of a core)",
            if ok { "✓" } else { "✗" }
        ));
        if !drained {
            return Err(format!(
                "the bridge did not ack everything within 60 s after the {rate:.0}/s step \
                 ({} of {} acked, readings resent every 5 s without progress); bridge log:\n{}",
                fleet.acked,
                fleet.sent,
                bridge.log_tail()
            ));
        }
        if ok {
            best = Some(rate);
            match first_fail {
                // One step between the best and the first failure, then stop.
                Some(f) if f / rate < 1.1 => break,
                Some(f) => rate = ((rate + f) / 2.0).round(),
                None => rate = (rate * 1.25).round(),
            }
        } else {
            first_fail = Some(rate);
            match best {
                Some(b) if rate / b < 1.1 || o.quick => break,
                Some(b) => rate = ((rate + b) / 2.0).round(),
                None => rate = (rate / 2.0).round(),
            }
        }
    }
    let paced = best.ok_or("no step was sustained")?;
    // Closed loop, the raw publisher's in-flight count: as a fleet replaying its spools.
    let (b0, w0) = (cpu_s(bridge.pid()), Instant::now());
    let windowed = fleet.run_window(o.inflight as u64, raw_secs, cap, t0);
    let wcpu = 100.0 * (cpu_s(bridge.pid()) - b0) / w0.elapsed().as_secs_f64();
    if !fleet.drain(Duration::from_secs(60), t0) {
        return Err("the bridge did not ack every reading of the closed-loop run".into());
    }
    say(format!(
        "closed loop, {} unacked: {windowed:.0}/s",
        o.inflight
    ));
    let raw2 = rt.block_on(js::raw_ceiling(
        &servers, o.gateways, o.inflight, raw_secs, 2, t0,
    ))?;
    say(format!("raw ceiling (after): {:.0}/s", raw2.per_s));
    let raw = (raw1.per_s + raw2.per_s) / 2.0;
    row(
        format!(
            "fleet: raw ceiling, one async-nats publisher straight into the R3 stream, \
             {} PubAcks in flight, 200-byte bodies with Nats-Msg-Id ({} s before and after \
             the bridge's runs)",
            o.inflight, raw_secs
        ),
        format!(
            "{raw:.0} msg/s (before {:.0}, after {:.0}; {} publish errors{})",
            raw1.per_s,
            raw2.per_s,
            raw1.errors + raw2.errors,
            raw1.first_error
                .or(raw2.first_error)
                .map(|e| format!(", the first: {e}"))
                .unwrap_or_default()
        ),
        "—",
        None,
    );
    row(
        format!(
            "fleet: {} gateways (CURVE DEALERs, one process) → one bridge → R3 stream: \
             maximum sustained readings/s, closed loop with {} readings unacked in total (the \
             raw publisher's PubAcks in flight; as gateways replaying their spools), {raw_secs} s",
            o.gateways, o.inflight
        ),
        format!("{windowed:.0} readings/s (bridge {wcpu:.0} % of a core)"),
        "—",
        None,
    );
    let ratio = windowed / raw;
    row(
        "fleet: maximum through the bridge / raw ceiling (same PubAcks in flight)",
        format!("{ratio:.2}"),
        "≥ 0.5",
        Some(ratio >= 0.5),
    );
    row(
        format!(
            "fleet: {} gateways, paced (open loop, as live sensors): highest rate whose acks \
             kept up (acked = sent, backlog ≤ 1 s) in steps of {step_secs} s: {}",
            o.gateways,
            steps.join(", ")
        ),
        format!(
            "{paced:.0} readings/s ({:.2} of the raw ceiling)",
            paced / raw
        ),
        "—",
        None,
    );

    // Latency and CPU at half the maximum (paced: half of it must be a rate the bridge
    // sustains paced, else half the paced maximum).
    let (half, of) = if windowed / 2.0 <= paced {
        ((windowed / 2.0).round(), "half the maximum")
    } else {
        (
            (paced / 2.0).round(),
            "half the paced maximum (half the closed-loop one is above it)",
        )
    };
    let lat = js::Latency::start(servers.clone(), "ZGATE".into(), t0);
    let t = Instant::now();
    while !lat.ready.load(std::sync::atomic::Ordering::SeqCst) {
        if t.elapsed() > Duration::from_secs(20) {
            return Err(format!(
                "latency consumer not ready: {:?}",
                lat.finish().err()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    fleet.run_paced(half, 2.0, cap, t0);
    let lat_secs = if o.quick { 4.0 } else { 15.0 };
    lat.record.store(true, std::sync::atomic::Ordering::SeqCst);
    let (cpu0, acked0) = (cpu_s(bridge.pid()), fleet.acked);
    let s = fleet.run_paced(half, lat_secs, cap, t0);
    let (cpu1, acked1) = (cpu_s(bridge.pid()), fleet.acked);
    lat.record.store(false, std::sync::atomic::Ordering::SeqCst);
    fleet.drain(Duration::from_secs(60), t0);
    let mut samples = lat.finish()?;
    samples.sort_unstable();
    if samples.is_empty() {
        return Err("the latency consumer received no reading".into());
    }
    let pct = |p: f64| {
        samples[((p / 100.0 * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1]
    };
    let ms = |ns: u64| format!("{:.1} ms", ns as f64 / 1e6);
    row(
        format!(
            "fleet: at {of} ({half:.0} readings/s paced, {} gateways, {lat_secs} s): \
             gateway send → JetStream consumer receipt, p50 / p99 / max ({} readings)",
            o.gateways,
            samples.len()
        ),
        format!(
            "{} / {} / {} (acked {:.0}/s, backlog at end {})",
            ms(pct(50.0)),
            ms(pct(99.0)),
            ms(*samples.last().unwrap()),
            s.acked_per_s,
            s.backlog
        ),
        "—",
        None,
    );
    let per = (cpu1 - cpu0) / (acked1 - acked0).max(1) as f64;
    row(
        format!(
            "fleet: bridge CPU per reading at {half:.0} readings/s (utime + stime, all threads)"
        ),
        format!(
            "{:.1} µs ({:.2} s CPU for {} readings; {:.0} % of a core)",
            per * 1e6,
            cpu1 - cpu0,
            acked1 - acked0,
            100.0 * (cpu1 - cpu0) / lat_secs
        ),
        "—",
        None,
    );
    drop(fleet);
    drop(bridge);

    idle_rss(
        o,
        dir,
        &keys,
        &allow,
        &config,
        &endpoint,
        &server_pub,
        &keys_file,
        nofile,
    )?;
    drop(cluster);
    note(format!(
        "Fleet rows: a 3-node cluster of {} on loopback (file storage), the bridge, \
         the simulated gateways and the raw publisher share the machine's {} cores. The \
         maximum is the highest paced rate at which the bridge's acks kept up with what was \
         sent (every reading sent was acked, i.e. JetStream confirmed it, within about a \
         second); the raw publisher measures what JetStream alone accepts from one client.",
        sh(&format!("{} --version", o.nats_server)),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    Ok(())
}

fn raw_only(o: &Opts) -> Result<(), String> {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cluster = Cluster::start(&o.nats_server, tmp.path())?;
    let servers = cluster.servers();
    let rt = js::runtime();
    rt.block_on(js::create_stream(&servers, "ZGATE", 3))?;
    let secs = if o.quick { 3.0 } else { 10.0 };
    let r = rt.block_on(js::raw_ceiling(
        &servers, o.gateways, o.inflight, secs, 1, t0,
    ))?;
    row(
        format!(
            "raw ceiling, {} PubAcks in flight, R3, {secs} s",
            o.inflight
        ),
        format!(
            "{:.0} msg/s ({} errors: {:?})",
            r.per_s, r.errors, r.first_error
        ),
        "—",
        None,
    );
    Ok(())
}

/// A fresh bridge's RSS with no gateway, then with each count of `o.idle` connected idle
/// gateways (after the hello; ZMTP heartbeats only).
#[allow(clippy::too_many_arguments)]
fn idle_rss(
    o: &Opts,
    dir: &std::path::Path,
    keys: &[fleet::GwKey],
    allow: &std::path::Path,
    config: &std::path::Path,
    endpoint: &str,
    server_pub: &str,
    keys_file: &std::path::Path,
    nofile: u64,
) -> Result<(), String> {
    fleet_allow(keys, allow)?;
    let mut bridge = start_bridge(&o.bridge, config, dir.join("bridge-idle.log"))?;
    std::thread::sleep(Duration::from_secs(3));
    bridge.check()?;
    let base = rss_kib(bridge.pid());
    row(
        "fleet: bridge RSS, started, no gateway connected",
        format!("{:.1} MiB", base as f64 / 1024.0),
        "—",
        None,
    );
    // This process holds up to 1,000; children (`loadgen idle`) hold the rest, each within
    // the open-file limit (a DEALER takes two descriptors: its TCP socket and its mailbox).
    let per_child = ((nofile as usize).saturating_sub(200) / 2).clamp(100, 5000);
    let mut here: Option<Fleet> = None;
    let mut children = Vec::new();
    let mut have = 0usize;
    let mut heard = 0usize;
    for &n in &o.idle {
        let t = Instant::now();
        while have < n {
            if here.is_none() {
                let k = n.min(1000);
                let f =
                    Fleet::connect_partial(endpoint, server_pub, &keys[..k], IDLE_CONNECT, true)?;
                heard += f.heard();
                here = Some(f);
                have = k;
                continue;
            }
            let k = (n - have).min(per_child);
            let mut child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
                .args(["idle", endpoint, server_pub])
                .arg(keys_file)
                .args([have.to_string(), k.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| e.to_string())?;
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            match line
                .strip_prefix("ready ")
                .and_then(|n| n.trim().parse::<usize>().ok())
            {
                Some(got) => heard += got,
                None => {
                    return Err(format!(
                        "idle child for {k} gateways failed; bridge log:\n{}",
                        bridge.log_tail()
                    ))
                }
            }
            children.push(child);
            have += k;
        }
        let took = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(3));
        bridge.check()?;
        let rss = rss_kib(bridge.pid());
        let per = rss.saturating_sub(base) as f64 / heard.max(1) as f64;
        let short = if heard < n {
            format!("; only {heard} of {n} were answered within {IDLE_CONNECT:?}")
        } else {
            String::new()
        };
        row(
            format!("fleet: bridge RSS with {n} connected idle gateways (CURVE; connected in {took:.0} s{short})"),
            format!(
                "{:.1} MiB: {per:.1} KiB per gateway above the empty bridge ({:.1} KiB with it)",
                rss as f64 / 1024.0,
                rss as f64 / heard.max(1) as f64
            ),
            "< 64 KiB per gateway",
            Some(per < 64.0),
        );
    }
    for mut c in children {
        drop(c.stdin.take());
        let _ = c.wait();
    }
    drop(here);
    Ok(())
}

/// Writes `allow/<id>.pub` for each key.
fn fleet_allow(keys: &[fleet::GwKey], allow: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(allow).map_err(|e| e.to_string())?;
    for k in keys {
        let p = allow.join(format!("{}.pub", k.id));
        if !p.exists() {
            std::fs::write(&p, format!("{}\n", k.public)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// `loadgen idle ENDPOINT SERVER_PUBLIC KEYS_FILE FIRST COUNT`: connects gateways
/// FIRST..FIRST+COUNT of the keys file, prints `ready` once the bridge answered every hello,
/// and holds them until its stdin closes.
fn idle_child(a: &[String]) -> Result<(), String> {
    let [endpoint, server_pub, keys_file, first, count] = a else {
        return Err("usage: loadgen idle ENDPOINT SERVER_PUBLIC KEYS_FILE FIRST COUNT".into());
    };
    raise_nofile();
    let keys = read_keys(keys_file.as_ref())?;
    let first: usize = first.parse().map_err(|_| "FIRST")?;
    let count: usize = count.parse().map_err(|_| "COUNT")?;
    let keys = keys.get(first..first + count).ok_or("not that many keys")?;
    let fleet = Fleet::connect_partial(endpoint, server_pub, keys, IDLE_CONNECT, true)?;
    println!("ready {}", fleet.heard());
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// How long the idle gateways of one process may take to be answered.
const IDLE_CONNECT: Duration = Duration::from_secs(240);

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
