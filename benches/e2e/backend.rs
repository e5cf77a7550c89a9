//! The harness as backend: a ROUTER on tcp loopback that acks, times readings (`t=` of the
//! writer) and replies, and counts distinct line numbers for the backlog case.

use crate::process::Gw;
use crate::pty::now_ns;
use crate::{Opts, Res};
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// The harness as backend

pub struct Backend {
    pub sock: zmq::Socket,
    pub _ctx: zmq::Context,
    pub endpoint: String,
    pub gw: Option<Vec<u8>>,
    pub hello: bool,
    pub readings: u64,
    pub max_n: i64,
    pub max_seq: u64,
    pub last_rx: Option<Instant>,
    pub first_rx: Option<Instant>,
    /// Latency samples (ns), recorded while `record` is true.
    pub lat: Vec<u64>,
    pub record: bool,
    /// Command id → receive time (ns) of its reply.
    pub replies: HashMap<String, u64>,
    /// Backlog case: a bit per line number `n` received, the number of distinct ones, and
    /// when the last missing one arrived (retransmits make `readings` count duplicates).
    /// Replies with `ok: false` (a refused command would never change the GPIO file).
    pub refused: u64,
    pub seen: Vec<u64>,
    pub track: u64,
    pub distinct: u64,
    pub complete_at: Option<Instant>,
}

impl Backend {
    pub fn bind(endpoint: &str) -> Res<Backend> {
        let ctx = zmq::Context::new();
        let sock = ctx.socket(zmq::ROUTER).map_err(|e| e.to_string())?;
        sock.set_linger(0).map_err(|e| e.to_string())?;
        sock.bind(endpoint)
            .map_err(|e| format!("bind {endpoint}: {e}"))?;
        let endpoint = sock
            .get_last_endpoint()
            .map_err(|e| e.to_string())?
            .map_err(|_| "endpoint".to_string())?;
        Ok(Backend {
            sock,
            _ctx: ctx,
            endpoint,
            gw: None,
            hello: false,
            readings: 0,
            max_n: -1,
            max_seq: 0,
            last_rx: None,
            first_rx: None,
            lat: Vec::new(),
            record: false,
            replies: HashMap::new(),
            refused: 0,
            seen: Vec::new(),
            track: 0,
            distinct: 0,
            complete_at: None,
        })
    }

    /// Waits up to `timeout` for messages, handles all that are available, acks. Returns how
    /// many messages were handled.
    pub fn poll(&mut self, timeout: Duration) -> usize {
        let mut n = 0;
        let mut items = [self.sock.as_poll_item(zmq::POLLIN)];
        if zmq::poll(&mut items, timeout.as_millis() as i64).unwrap_or(0) == 0 {
            return 0;
        }
        while let Ok(frames) = self.sock.recv_multipart(zmq::DONTWAIT) {
            let at = now_ns();
            n += 1;
            self.handle(frames, at);
            if n >= 4096 {
                break;
            }
        }
        if n > 0 && self.max_seq > 0 {
            if let Some(gw) = &self.gw {
                let body = format!("{{\"seq\":{}}}", self.max_seq);
                let _ = self
                    .sock
                    .send_multipart([&gw[..], b"ack", body.as_bytes()], zmq::DONTWAIT);
            }
        }
        n
    }

    pub fn handle(&mut self, frames: Vec<Vec<u8>>, at: u64) {
        if frames.len() != 3 {
            return;
        }
        let now = Instant::now();
        self.last_rx = Some(now);
        self.first_rx.get_or_insert(now);
        if self.gw.is_none() {
            self.gw = Some(frames[0].clone());
        }
        match &frames[1][..] {
            b"hello" => {
                // A new peer (or the same one restarted) introduces itself: acks go to it.
                self.hello = true;
                self.gw = Some(frames[0].clone());
            }
            b"reading" => {
                // Typed: the harness's own CPU per reading is a competitor of
                // the gateway's on this 2-core machine, so it parses only what it uses.
                let Ok(body) = serde_json::from_slice::<ReadingBody>(&frames[2]) else {
                    return;
                };
                self.readings += 1;
                self.max_seq = self.max_seq.max(body.seq);
                if let Some(n) = body.values.n {
                    self.max_n = self.max_n.max(n);
                    let (w, b) = (n as usize / 64, 1u64 << (n as usize % 64));
                    if let Some(word) = self.seen.get_mut(w) {
                        if *word & b == 0 {
                            *word |= b;
                            self.distinct += 1;
                            if self.distinct == self.track {
                                self.complete_at = Some(now);
                            }
                        }
                    }
                }
                if self.record {
                    if let Some(t) = body.values.t {
                        self.lat.push(at.saturating_sub(t));
                    }
                }
            }
            b"reply" => {
                let Ok(body) = serde_json::from_slice::<Value>(&frames[2]) else {
                    return;
                };
                if let Some(id) = body.get("id").and_then(Value::as_str) {
                    self.replies.insert(id.to_string(), at);
                }
                if body.get("ok").and_then(Value::as_bool) == Some(false) {
                    self.refused += 1;
                }
            }
            _ => {}
        }
    }

    pub fn wait_hello(&mut self, timeout: Duration) -> Res<()> {
        let deadline = Instant::now() + timeout;
        while !self.hello {
            if Instant::now() > deadline {
                return Err("no hello from the gateway".into());
            }
            self.poll(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Receives until `n` readings in total arrived, or nothing came for `quiet`.
    pub fn recv_until(&mut self, n: u64, quiet: Duration) {
        let mut last = Instant::now();
        while self.readings < n && last.elapsed() < quiet {
            if self.poll(Duration::from_millis(20)) > 0 {
                last = Instant::now();
            }
        }
    }

    /// Counts distinct line numbers `0..n` from now on (`distinct`, `complete_at`).
    pub fn track_distinct(&mut self, n: u64) {
        self.seen = vec![0; (n as usize).div_ceil(64)];
        self.track = n;
        self.distinct = 0;
        self.complete_at = None;
    }

    pub fn command(&self, id: &str, target: &str, value: u8) {
        let body = format!(
            "{{\"id\":\"{id}\",\"target\":\"{target}\",\"action\":\"set\",\"value\":{value}}}"
        );
        if let Some(gw) = &self.gw {
            let _ = self
                .sock
                .send_multipart([&gw[..], b"command", body.as_bytes()], 0);
        }
    }
}

/// The fields of a `reading` the harness uses (`n`, `t`: the writer's line number and send
/// time; absent in other readings).
#[derive(serde::Deserialize)]
pub struct ReadingBody {
    pub seq: u64,
    pub values: ReadingValues,
}

#[derive(serde::Deserialize)]
pub struct ReadingValues {
    pub n: Option<i64>,
    pub t: Option<u64>,
}

pub fn free_tcp_endpoint() -> Res<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = l.local_addr().map_err(|e| e.to_string())?.port();
    Ok(format!("tcp://127.0.0.1:{port}"))
}

/// Starts a backend on a fresh loopback port and a gateway dialling it; waits for `hello`.
pub fn setup(o: &Opts, valgrind: bool) -> Res<(Backend, Gw)> {
    let mut be = Backend::bind("tcp://127.0.0.1:*")?;
    let gw = Gw::start(o, &be.endpoint, valgrind)?;
    let t = if valgrind { 120 } else { 10 };
    be.wait_hello(Duration::from_secs(t))
        .map_err(|e| format!("{e}; log: {}", gw.log_tail()))?;
    gw.wait_serial_open(Duration::from_secs(t))?;
    Ok((be, gw))
}
