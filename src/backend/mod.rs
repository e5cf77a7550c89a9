//! The reference backend: `zgate backend --bind ENDPOINT`.
//!
//! A ROUTER socket that gateways connect to. Every message received is printed as one JSON
//! line on stdout: the message's JSON body with `"kind"` added (and `"gateway"` for replies),
//! e.g. `{"kind":"reading","gateway":"gw-01","seq":1,...}`. Readings are deduplicated per
//! gateway and spool (by seq; a new `spool_id` in a hello starts a fresh ledger) and
//! acknowledged cumulatively after they were written to stdout. Every hello is answered at
//! once with an ack of `resume_seq - 1`; the ROUTER sets ZMQ_ROUTER_HANDOVER and ZMTP
//! heartbeats (docs/protocol.md, "What a backend must do"). A reading made while the
//! gateway's clock was not synchronised is printed with `"time_corrected"` once a synced
//! `hello`/`stats` of its boot is known, or later as a `time_corrected` line ([`Redater`]).
//!
//! Commands are read from stdin, one JSON line each:
//! `{"gateway":"gw-01","command":{"id":"c-1","target":"relay1","action":"toggle"}}`
//! (an `id` is generated when missing: `b-<8 hex chars, random per run>-<n>`, so a restarted
//! backend never reuses an id the gateway remembers). Every line a read of stdin completes is
//! sent at once (several piped lines do not wait for more input). The ROUTER sets
//! ZMQ_ROUTER_MANDATORY: a command for a gateway that is not connected is not dropped
//! silently but reported. Errors are printed as `{"kind":"error",...}` lines (and logged).
//! Binding a non-loopback endpoint without CURVE logs an `INSECURE` warning.
//!
//! With `--secret-key FILE --allow DIR` the backend is a CURVE server. Its ZAP handler (a REP
//! socket on `inproc://zeromq.zap.01`, served in the same poll loop) accepts a gateway only
//! when its public key is one of the `DIR/<gateway-id>.pub` files, and names the connection
//! with that id (the ZAP user id). Every message whose routing id differs from that user id
//! is dropped and logged: a gateway cannot speak as another one, and commands are not sent to
//! a routing id last seen with another gateway's key. Rejections go to the log (stderr) with
//! the peer's address, with one log limit per kind of rejection.

mod ledger;
mod redate;
mod stdin;
mod zap;

pub use ledger::{is_spool_id, GatewayLedger};
pub use redate::{true_time_ms, Redater};
pub use stdin::LineReader;
pub use zap::{allowed_ids, zap_decide, Zap, ZapDecision, ZAP_DOMAIN, ZAP_ENDPOINT};

use crate::limit::LogLimits;
use crate::protocol;
use crate::security;
use crate::sources::zmq::{recv_monitor_event, MonitorEvent};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

/// ZMTP heartbeat interval of the ROUTER (the gateway uses the same).
pub const HEARTBEAT_IVL_MS: i32 = 10_000;
/// A connection that sent nothing, heartbeats included, for this long is dropped.
pub const HEARTBEAT_TIMEOUT_MS: i32 = 30_000;

/// How `zgate backend` runs.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// The endpoint the ROUTER binds.
    pub bind: String,
    /// Acknowledge readings (turn off to test a backend that never acknowledges). A hello is
    /// answered either way, with an ack of `resume_seq - 1`, which acknowledges no reading the
    /// gateway still holds.
    pub ack: bool,
    /// CURVE server secret key file (Z85, under the key rule of [`security::check_key_file`]).
    /// Requires `allow_dir`.
    pub secret_key: Option<PathBuf>,
    /// Directory of `<gateway-id>.pub` files: the gateways allowed to connect.
    pub allow_dir: Option<PathBuf>,
}

/// Who last spoke under a routing id (CURVE only).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// The key registered under this id.
    Verified,
    /// A key registered under another id (the user id).
    Impersonated(String),
}

/// One received message and what libzmq knows about its sender.
struct Received {
    frames: Vec<Vec<u8>>,
    user_id: Option<String>,
    peer: Option<String>,
}

/// The peer address of a socket fd owned by libzmq, if it is still open.
fn peer_of_fd(fd: i32) -> Option<String> {
    use std::os::fd::FromRawFd;
    if fd < 0 {
        return None;
    }
    // SAFETY: the fd is only borrowed: ManuallyDrop never closes it. If libzmq closed it
    // meanwhile, peer_addr fails (or names whatever reuses it: used for a log line only).
    let stream = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    stream.peer_addr().ok().map(|a| a.to_string())
}

/// The reference backend: a ROUTER socket, its ZAP handler and the per-gateway ledgers.
pub struct Backend {
    socket: zmq::Socket,
    ledgers: HashMap<Vec<u8>, GatewayLedger>,
    /// Dates readings made while a gateway's clock was not synchronised.
    redate: Redater,
    opts: BackendOptions,
    /// Random per run: generated command ids never repeat those of an earlier run, which the
    /// gateway would answer from its cache (or refuse) instead of executing.
    run_id: u32,
    next_command: u64,
    zap: Option<Zap>,
    monitor: zmq::Socket,
    routes: HashMap<Vec<u8>, Route>,
    /// Peer addresses of accepted connections, by fd (for handshake failure logs).
    accepted: HashMap<i32, String>,
    /// A handshake failure waiting for its DISCONNECTED event (which names the fd).
    failed_handshake: Option<String>,
    /// One log limit per kind of rejection: a flood of one kind (a gateway with a wrong
    /// server key retrying several times a second) never hides another (an impersonation).
    logs: LogLimits,
}

/// Log-limit kind of handshakes that failed before authentication.
pub const LOG_HANDSHAKE_FAILED: &str = "connection rejected (handshake failed)";
/// Log-limit kind of messages whose routing id is not the id their key is registered under.
pub const LOG_IMPERSONATION: &str = "message rejected (impersonation)";
/// Log-limit kind of commands that could not be sent.
pub const LOG_NOT_SENT: &str = "command not sent";

/// 32 random bits (std's hasher keys are seeded from the OS's random source).
fn random_run_id() -> u32 {
    use std::hash::BuildHasher;
    let h = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    (h ^ (h >> 32)) as u32
}

fn print_line(v: &Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) is not a reason to stop acking; ignore write errors.
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

impl Backend {
    /// Creates the ROUTER (and with CURVE the ZAP handler, bound first) and binds it.
    pub fn new(ctx: &zmq::Context, opts: BackendOptions) -> Result<Backend, anyhow::Error> {
        use anyhow::Context as _;
        let socket = ctx.socket(zmq::ROUTER)?;
        socket.set_router_mandatory(true)?;
        // A gateway that reconnects (its link froze, its heartbeat gave up) comes back with
        // the same routing id while the old pipe may still be alive here: without handover
        // the ROUTER keeps the stale pipe and silently ignores the new connection.
        socket.set_router_handover(true)?;
        // ZMTP heartbeats, as the gateway's: a dead link is found and its pipe dropped.
        socket.set_heartbeat_ivl(HEARTBEAT_IVL_MS)?;
        socket.set_heartbeat_timeout(HEARTBEAT_TIMEOUT_MS)?;
        socket.set_linger(1000)?;
        let zap = match (&opts.secret_key, &opts.allow_dir) {
            (Some(key), Some(dir)) => {
                security::require_curve().map_err(anyhow::Error::msg)?;
                let pair = security::load_secret_key(key).map_err(anyhow::Error::msg)?;
                let meta = std::fs::metadata(dir)
                    .with_context(|| format!("allow list directory {}", dir.display()))?;
                anyhow::ensure!(meta.is_dir(), "{} is not a directory", dir.display());
                // The ZAP handler exists before the socket can accept anyone.
                let zap = Zap::bind(ctx, dir.clone())
                    .with_context(|| format!("binding the ZAP handler {ZAP_ENDPOINT}"))?;
                socket.set_curve_server(true)?;
                socket.set_curve_secretkey(&pair.secret_bytes())?;
                socket.set_zap_domain(ZAP_DOMAIN)?;
                log::info!(
                    "CURVE on: backend public key {} (gateways set it as backend.server_public_key); allow list {}",
                    pair.public,
                    dir.display()
                );
                Some(zap)
            }
            (None, None) => {
                if !security::endpoint_is_local(&opts.bind) {
                    log::warn!(
                        "INSECURE: bind={} without CURVE: the link is plaintext and \
                         unauthenticated; anyone who can reach this port can read readings, \
                         send readings as any gateway id and receive its commands; start with \
                         --secret-key FILE --allow DIR (see {})",
                        opts.bind,
                        security::SECURITY_DOC
                    );
                }
                None
            }
            _ => anyhow::bail!("--secret-key and --allow go together"),
        };
        let monitor_ep = format!("inproc://zgate-backend-monitor-{}", std::process::id());
        socket.monitor(
            &monitor_ep,
            (zmq::SocketEvent::ACCEPTED as u16
                | zmq::SocketEvent::DISCONNECTED as u16
                | zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL as u16
                | zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL as u16
                | zmq::SocketEvent::HANDSHAKE_FAILED_AUTH as u16) as i32,
        )?;
        let monitor = ctx.socket(zmq::PAIR)?;
        monitor.connect(&monitor_ep)?;
        socket
            .bind(&opts.bind)
            .with_context(|| format!("cannot bind {}", opts.bind))?;
        Ok(Backend {
            socket,
            ledgers: HashMap::new(),
            redate: Redater::default(),
            opts,
            run_id: random_run_id(),
            next_command: 1,
            zap,
            monitor,
            routes: HashMap::new(),
            accepted: HashMap::new(),
            failed_handshake: None,
            logs: LogLimits::default(),
        })
    }

    fn curve(&self) -> bool {
        self.zap.is_some()
    }

    /// The ROUTER socket.
    pub fn socket(&self) -> &zmq::Socket {
        &self.socket
    }

    /// Polls the socket and stdin until interrupted.
    pub fn run(&mut self) -> Result<(), zmq::Error> {
        let stdin_fd = std::io::stdin().as_raw_fd();
        let mut stdin_open = true;
        let mut stdin_lines = LineReader::default();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let mut items = vec![
                self.socket.as_poll_item(zmq::POLLIN),
                self.monitor.as_poll_item(zmq::POLLIN),
            ];
            if let Some(zap) = &self.zap {
                items.push(zap.socket.as_poll_item(zmq::POLLIN));
            }
            let stdin_index = items.len();
            if stdin_open {
                items.push(zmq::PollItem::from_fd(stdin_fd, zmq::POLLIN));
            }
            zmq::poll(&mut items, -1)?;
            let sock_ready = items[0].is_readable();
            let monitor_ready = items[1].is_readable();
            let zap_ready = self.zap.is_some() && items[2].is_readable();
            let stdin_ready =
                stdin_open && (items[stdin_index].is_readable() || items[stdin_index].is_error());
            drop(items);
            if zap_ready {
                if let Some(zap) = &self.zap {
                    zap.serve(&mut self.logs)?;
                }
            }
            if monitor_ready {
                self.drain_monitor()?;
            }
            if sock_ready {
                self.drain()?;
            }
            if stdin_ready {
                // One read: poll said the fd is readable, so it does not block. Every line it
                // completes is handled now.
                let (lines, eof) = match nix::unistd::read(stdin_fd, &mut chunk) {
                    Ok(0) => (stdin_lines.finish().into_iter().collect(), true),
                    Ok(n) => (stdin_lines.feed(&chunk[..n]), false),
                    Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => (vec![], false),
                    Err(e) => {
                        print_line(&json!({"kind": "error", "error": format!("stdin: {e}")}));
                        (vec![], true)
                    }
                };
                for line in lines {
                    match line {
                        Ok(line) => self.command_line(&line),
                        Err(e) => print_line(&json!({"kind": "error", "error": e})),
                    }
                }
                stdin_open = !eof;
            }
        }
    }

    /// Logs handshake failures (e.g. a peer without CURVE, or with the wrong server key).
    fn drain_monitor(&mut self) -> Result<(), zmq::Error> {
        while let Some(MonitorEvent { event, value, .. }) = recv_monitor_event(&self.monitor)? {
            use zmq::SocketEvent as E;
            match event {
                E::ACCEPTED => {
                    let fd = value as i32;
                    let peer = peer_of_fd(fd).unwrap_or_else(|| "unknown".into());
                    self.accepted.insert(fd, peer);
                }
                E::HANDSHAKE_FAILED_PROTOCOL => {
                    self.failed_handshake = Some(format!(
                        "protocol error {value:#x}: a peer without CURVE, or one using the \
                         wrong server public key"
                    ));
                }
                E::HANDSHAKE_FAILED_NO_DETAIL => {
                    self.failed_handshake = Some(format!(
                        "errno {value}: peer closed during the handshake or uses another \
                         security mechanism"
                    ));
                }
                // Logged by the ZAP handler, with the reason.
                E::HANDSHAKE_FAILED_AUTH => self.failed_handshake = None,
                E::DISCONNECTED => {
                    let peer = self.accepted.remove(&(value as i32));
                    if let Some(why) = self.failed_handshake.take() {
                        if self.logs.allow(LOG_HANDSHAKE_FAILED, Instant::now()) {
                            log::warn!(
                                "connection rejected peer={} reason=\"handshake failed: {why}\"",
                                peer.as_deref().unwrap_or("unknown")
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Receives one multipart message with the sender's ZAP user id and address.
    fn recv_message(&self) -> Result<Option<Received>, zmq::Error> {
        let mut frames = Vec::new();
        let mut user_id = None;
        let mut peer = None;
        loop {
            let mut msg = match self.socket.recv_msg(zmq::DONTWAIT) {
                Ok(m) => m,
                Err(zmq::Error::EAGAIN) if frames.is_empty() => return Ok(None),
                Err(e) => return Err(e),
            };
            if frames.len() == 1 {
                // The first frame the peer sent (after the routing id ROUTER adds).
                user_id = msg.gets("User-Id").map(str::to_string);
                peer = msg.gets("Peer-Address").map(str::to_string);
            }
            let more = msg.get_more();
            frames.push(msg.to_vec());
            if !more {
                return Ok(Some(Received {
                    frames,
                    user_id,
                    peer,
                }));
            }
        }
    }

    /// With CURVE: true when the routing id is the id the sender's key is registered under.
    fn sender_verified(&mut self, r: &Received) -> bool {
        if !self.curve() {
            return true;
        }
        let Some(id) = r.frames.first() else {
            return false;
        };
        let user = r.user_id.as_deref().unwrap_or("");
        if user.as_bytes() == id.as_slice() {
            self.routes.insert(id.clone(), Route::Verified);
            return true;
        }
        self.routes
            .insert(id.clone(), Route::Impersonated(user.to_string()));
        if self.logs.allow(LOG_IMPERSONATION, Instant::now()) {
            log::warn!(
                "message rejected peer={} reason=\"routing id {:?} but the key is registered as {:?} (impersonation)\"",
                r.peer.as_deref().unwrap_or("unknown"),
                String::from_utf8_lossy(id),
                user
            );
        }
        false
    }

    /// Receives everything available, then acks each gateway once.
    pub fn drain(&mut self) -> Result<(), zmq::Error> {
        let mut to_ack: Vec<Vec<u8>> = Vec::new();
        while let Some(received) = self.recv_message()? {
            if !self.sender_verified(&received) {
                continue;
            }
            if let Some(id) = self.handle_message(received.frames) {
                if !to_ack.contains(&id) {
                    to_ack.push(id);
                }
            }
        }
        if self.opts.ack {
            for id in to_ack {
                let seq = self.ledgers.get(&id).map_or(0, GatewayLedger::ack_seq);
                self.send_ack(&id, seq);
            }
        }
        Ok(())
    }

    fn send_ack(&mut self, id: &[u8], seq: u64) {
        let body = json!({ "seq": seq }).to_string();
        if let Err(e) = self.send(id, protocol::KIND_ACK, &body) {
            self.not_sent(id, "ack", &e);
        }
    }

    /// Sends one message without blocking. With ZMQ_ROUTER_MANDATORY a routing id with no
    /// connection fails with EHOSTUNREACH instead of being dropped silently.
    fn send(&self, id: &[u8], kind: &str, body: &str) -> Result<(), zmq::Error> {
        self.socket
            .send(id, zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|_| self.socket.send(kind, zmq::SNDMORE | zmq::DONTWAIT))
            .and_then(|_| self.socket.send(body, zmq::DONTWAIT))
    }

    /// Prints (stdout) and logs (stderr, rate-limited) a message that could not be sent.
    fn not_sent(&mut self, id: &[u8], what: &str, e: &zmq::Error) {
        let gateway = String::from_utf8_lossy(id);
        let why = match e {
            zmq::Error::EHOSTUNREACH => format!("gateway {gateway} is not connected"),
            zmq::Error::EAGAIN => {
                format!("gateway {gateway} is not reading (its queue here is full)")
            }
            e => format!("{e}"),
        };
        let error = format!("{what} not sent: {why}");
        if self.logs.allow(LOG_NOT_SENT, Instant::now()) {
            log::warn!("{error}");
        }
        print_line(&json!({"kind": "error", "gateway": gateway, "error": error}));
    }

    /// Prints one message; returns the gateway id when a reading needs an ack.
    fn handle_message(&mut self, frames: Vec<Vec<u8>>) -> Option<Vec<u8>> {
        if frames.len() != 3 {
            print_line(
                &json!({"kind": "error", "error": format!("expected 3 frames (id, kind, JSON), got {}", frames.len())}),
            );
            return None;
        }
        let [id, kind, body] = <[Vec<u8>; 3]>::try_from(frames).ok()?;
        let gateway = String::from_utf8_lossy(&id).into_owned();
        let kind = String::from_utf8_lossy(&kind).into_owned();
        let mut value: Value = match serde_json::from_slice(&body) {
            Ok(Value::Object(m)) => Value::Object(m),
            _ => {
                print_line(
                    &json!({"kind": "error", "gateway": gateway, "error": format!("{kind}: body is not a JSON object")}),
                );
                return None;
            }
        };
        let ledger = self.ledgers.entry(id.clone()).or_default();
        let resume = value.get("resume_seq").and_then(Value::as_u64);
        if kind == protocol::KIND_HELLO {
            let spool_id = match value.get("spool_id") {
                None => Some(""),
                Some(Value::String(s)) if is_spool_id(s) => Some(s.as_str()),
                Some(_) => None,
            };
            match spool_id {
                Some(spool_id) => {
                    if let Some(old) = ledger.hello(spool_id, resume) {
                        log::warn!(
                            "gateway={gateway} spool_id changed old={old:?} new={spool_id:?}: \
                             its spool was replaced (new storage or a wiped data_dir) and its \
                             seqs start again; starting a fresh ledger, readings from \
                             resume_seq={} on are new",
                            resume.unwrap_or(0)
                        );
                    }
                }
                None => {
                    // Keep the ledger as it is; the hello is still answered.
                    print_line(&json!({"kind": "error", "gateway": gateway,
                        "error": "hello: spool_id must be a string of 32 hex characters; ignored"}));
                    let spool_id = ledger.spool_id.clone().unwrap_or_default();
                    ledger.hello(&spool_id, resume);
                }
            }
            // Answered at once, acks on or not: any message from the backend tells the
            // gateway that this connection is heard.
            let seq = ledger.ack_seq();
            self.send_ack(&id, seq);
        } else if kind == protocol::KIND_STATS {
            if let Some(resume) = resume {
                ledger.resume(resume);
            }
        }
        let ledger = self.ledgers.entry(id.clone()).or_default();
        let mut ack = None;
        if kind == "reading" {
            let Some(seq) = value.get("seq").and_then(Value::as_u64) else {
                print_line(
                    &json!({"kind": "error", "gateway": gateway, "error": "reading without seq"}),
                );
                return None;
            };
            ack = Some(id.clone());
            if !ledger.receive(seq) {
                log::debug!("duplicate reading gateway={gateway} seq={seq}");
                return ack;
            }
        }
        let mut corrections = Vec::new();
        if kind == protocol::KIND_READING {
            let ledger = self.ledgers.get(&id).and_then(|l| l.spool_id.clone());
            if let Some(t) = self
                .redate
                .on_reading(&id, &ledger.unwrap_or_default(), &value)
            {
                value["time_corrected"] = Value::String(t);
            }
        } else if kind == protocol::KIND_HELLO || kind == protocol::KIND_STATS {
            corrections = self.redate.on_status(&id, &value);
        }
        let obj = value.as_object_mut()?;
        let mut out = serde_json::Map::new();
        out.insert("kind".into(), Value::String(kind));
        if !obj.contains_key("gateway") {
            out.insert("gateway".into(), Value::String(gateway));
        }
        out.extend(std::mem::take(obj));
        print_line(&Value::Object(out));
        corrections.iter().for_each(print_line);
        ack
    }

    /// Handles one stdin line: `{"gateway": ID, "command": {...}}`.
    pub fn command_line(&mut self, line: &str) {
        if line.trim().is_empty() {
            return;
        }
        let parsed: Result<Value, _> = serde_json::from_str(line);
        let (gateway, mut command) = match parsed {
            Ok(v) => match (
                v.get("gateway").and_then(Value::as_str),
                v.get("command").filter(|c| c.is_object()),
            ) {
                (Some(g), Some(c)) => (g.to_string(), c.clone()),
                _ => {
                    print_line(
                        &json!({"kind": "error", "error": "stdin line must be {\"gateway\": ID, \"command\": {...}}"}),
                    );
                    return;
                }
            },
            Err(e) => {
                print_line(
                    &json!({"kind": "error", "error": format!("stdin line is not JSON: {e}")}),
                );
                return;
            }
        };
        if let Some(Route::Impersonated(by)) = self.routes.get(gateway.as_bytes()) {
            print_line(&json!({
                "kind": "error",
                "gateway": gateway,
                "error": format!("command not sent: routing id {gateway} was last used with the key of {by} (impersonation)"),
            }));
            return;
        }
        if command.get("id").is_none() {
            command["id"] = Value::String(format!("b-{:08x}-{}", self.run_id, self.next_command));
            self.next_command += 1;
        }
        if let Err(e) = self.send(
            gateway.as_bytes(),
            protocol::KIND_COMMAND,
            &command.to_string(),
        ) {
            let what = format!("command {}", command["id"]);
            self.not_sent(gateway.as_bytes(), &what, &e);
        }
    }

    /// The ledger of `gateway`, once it sent something.
    pub fn ledger(&self, gateway: &str) -> Option<&GatewayLedger> {
        self.ledgers.get(gateway.as_bytes())
    }
}

#[cfg(test)]
mod tests;
