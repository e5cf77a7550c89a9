//! The reference backend: `zgate backend --bind ENDPOINT`.
//!
//! A ROUTER socket that gateways connect to. Every message received is printed as one JSON
//! line on stdout: the message's JSON body with `"kind"` added (and `"gateway"` for replies),
//! e.g. `{"kind":"reading","gateway":"gw-01","seq":1,...}`. Readings are deduplicated per
//! gateway and spool (by seq; a new `spool_id` in a hello starts a fresh ledger) and
//! acknowledged cumulatively after they were written to stdout. Every hello is answered at
//! once with an ack of `resume_seq - 1`; the ROUTER sets ZMQ_ROUTER_HANDOVER and ZMTP
//! heartbeats (docs/protocol.md, "What a backend must do").
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
mod router;
mod stdin;
mod zap;

pub use ledger::{is_spool_id, GatewayLedger};
pub use router::{
    Received, Route, Router, RouterOptions, HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS,
    LOG_HANDSHAKE_FAILED, LOG_IMPERSONATION,
};
pub use stdin::LineReader;
pub use zap::{
    allowed_ids, zap_decide, AllowList, Zap, ZapDecision, ALLOW_LIST_MAX_AGE, ZAP_DOMAIN,
    ZAP_ENDPOINT,
};

use crate::protocol;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

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

/// The reference backend: a ROUTER socket, its ZAP handler and the per-gateway ledgers.
pub struct Backend {
    router: Router,
    ledgers: HashMap<Vec<u8>, GatewayLedger>,
    opts: BackendOptions,
    /// Random per run: generated command ids never repeat those of an earlier run, which the
    /// gateway would answer from its cache (or refuse) instead of executing.
    run_id: u32,
    next_command: u64,
}

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
        anyhow::ensure!(
            opts.secret_key.is_some() == opts.allow_dir.is_some(),
            "--secret-key and --allow go together"
        );
        let router = Router::new(
            ctx,
            &RouterOptions {
                bind: opts.bind.clone(),
                secret_key: opts.secret_key.clone(),
                allow_dir: opts.allow_dir.clone(),
                curve_hint: "start with --secret-key FILE --allow DIR".into(),
            },
            "backend",
        )?;
        Ok(Backend {
            router,
            ledgers: HashMap::new(),
            opts,
            run_id: random_run_id(),
            next_command: 1,
        })
    }

    /// The ROUTER socket.
    pub fn socket(&self) -> &zmq::Socket {
        self.router.socket()
    }

    /// Polls the socket and stdin until interrupted.
    pub fn run(&mut self) -> Result<(), zmq::Error> {
        let stdin_fd = std::io::stdin().as_raw_fd();
        let mut stdin_open = true;
        let mut stdin_lines = LineReader::default();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let mut items = vec![
                self.router.socket().as_poll_item(zmq::POLLIN),
                self.router.monitor().as_poll_item(zmq::POLLIN),
            ];
            if let Some(zap) = self.router.zap_socket() {
                items.push(zap.as_poll_item(zmq::POLLIN));
            }
            let stdin_index = items.len();
            if stdin_open {
                items.push(zmq::PollItem::from_fd(stdin_fd, zmq::POLLIN));
            }
            zmq::poll(&mut items, -1)?;
            let sock_ready = items[0].is_readable();
            let monitor_ready = items[1].is_readable();
            let zap_ready = self.router.curve() && items[2].is_readable();
            let stdin_ready =
                stdin_open && (items[stdin_index].is_readable() || items[stdin_index].is_error());
            drop(items);
            if zap_ready {
                self.router.serve_zap()?;
            }
            if monitor_ready {
                self.router.drain_monitor()?;
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

    /// Receives everything available, then acks each gateway once.
    pub fn drain(&mut self) -> Result<(), zmq::Error> {
        let mut to_ack: Vec<Vec<u8>> = Vec::new();
        while let Some(received) = self.router.recv_message()? {
            if !self.router.sender_verified(&received) {
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

    fn send(&self, id: &[u8], kind: &str, body: &str) -> Result<(), zmq::Error> {
        self.router.send(id, kind, body.as_bytes())
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
        if self.router.logs().allow(LOG_NOT_SENT, Instant::now()) {
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
        let obj = value.as_object_mut()?;
        let mut out = serde_json::Map::new();
        out.insert("kind".into(), Value::String(kind));
        if !obj.contains_key("gateway") {
            out.insert("gateway".into(), Value::String(gateway));
        }
        out.extend(std::mem::take(obj));
        print_line(&Value::Object(out));
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
        if let Some(Route::Impersonated(by)) = self.router.route(gateway.as_bytes()) {
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
mod tests {
    use super::*;

    #[test]
    fn router_sends_heartbeats() {
        let ctx = zmq::Context::new();
        let b = Backend::new(
            &ctx,
            BackendOptions {
                bind: "tcp://127.0.0.1:*".into(),
                ack: true,
                ..Default::default()
            },
        )
        .unwrap();
        // (ZMQ_ROUTER_HANDOVER cannot be read back: tests/py/test_backend_link.py checks it.)
        let s = b.socket();
        assert_eq!(s.get_heartbeat_ivl().unwrap(), HEARTBEAT_IVL_MS);
        assert_eq!(s.get_heartbeat_timeout().unwrap(), HEARTBEAT_TIMEOUT_MS);
    }
}
