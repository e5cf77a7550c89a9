//! The reference backend: `zgate backend --bind ENDPOINT`.
//!
//! A ROUTER socket that gateways connect to. Every message received is printed as one JSON
//! line on stdout: the message's JSON body with `"kind"` added (and `"gateway"` for replies),
//! e.g. `{"kind":"reading","gateway":"gw-01","seq":1,...}`. Readings are deduplicated per
//! gateway (by seq) and acknowledged cumulatively after they were written to stdout.
//!
//! Commands are read from stdin, one JSON line each:
//! `{"gateway":"gw-01","command":{"id":"c-1","target":"relay1","action":"toggle"}}`
//! (an `id` is generated when missing). Errors are printed as `{"kind":"error",...}` lines.

use crate::protocol;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;

/// Out-of-order seqs remembered per gateway before the oldest are forgotten.
const MAX_PENDING_SEQS: usize = 100_000;

#[derive(Debug, Clone)]
pub struct BackendOptions {
    pub bind: String,
    /// Send acks (turn off to test a backend that never acknowledges).
    pub ack: bool,
}

/// Per-gateway delivery state: every seq ≤ `high` was received; `ahead` holds seqs > high+1.
#[derive(Debug, Default)]
pub struct GatewayLedger {
    pub high: u64,
    pub ahead: BTreeSet<u64>,
    pub started: bool,
    pub received: u64,
    pub duplicates: u64,
}

impl GatewayLedger {
    /// Records a reading; returns false for a duplicate.
    pub fn receive(&mut self, seq: u64) -> bool {
        if !self.started {
            // First contact without a hello: take the stream from here.
            self.started = true;
            self.high = seq.saturating_sub(1);
        }
        if seq <= self.high || self.ahead.contains(&seq) {
            self.duplicates += 1;
            return false;
        }
        self.received += 1;
        if seq == self.high + 1 {
            self.high = seq;
            while self.ahead.remove(&(self.high + 1)) {
                self.high += 1;
            }
        } else {
            self.ahead.insert(seq);
            while self.ahead.len() > MAX_PENDING_SEQS {
                self.ahead.pop_first();
            }
        }
        true
    }

    /// The gateway says everything below `resume` is acked or dropped: skip the gap.
    pub fn resume(&mut self, resume: u64) {
        self.started = true;
        if resume > self.high + 1 {
            self.high = resume - 1;
            self.ahead.retain(|&s| s > resume - 1);
            while self.ahead.remove(&(self.high + 1)) {
                self.high += 1;
            }
        }
    }
}

pub struct Backend {
    socket: zmq::Socket,
    ledgers: HashMap<Vec<u8>, GatewayLedger>,
    opts: BackendOptions,
    next_command: u64,
}

fn print_line(v: &Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) is not a reason to stop acking; ignore write errors.
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

impl Backend {
    pub fn new(ctx: &zmq::Context, opts: BackendOptions) -> Result<Backend, zmq::Error> {
        let socket = ctx.socket(zmq::ROUTER)?;
        socket.set_router_mandatory(true)?;
        socket.set_linger(1000)?;
        socket.bind(&opts.bind)?;
        Ok(Backend {
            socket,
            ledgers: HashMap::new(),
            opts,
            next_command: 1,
        })
    }

    pub fn socket(&self) -> &zmq::Socket {
        &self.socket
    }

    /// Polls the socket and stdin until interrupted.
    pub fn run(&mut self) -> Result<(), zmq::Error> {
        let stdin = std::io::stdin();
        let stdin_fd = stdin.as_raw_fd();
        let mut stdin_open = true;
        let mut lines = stdin.lock().lines();
        loop {
            let mut items = vec![self.socket.as_poll_item(zmq::POLLIN)];
            if stdin_open {
                items.push(zmq::PollItem::from_fd(stdin_fd, zmq::POLLIN));
            }
            zmq::poll(&mut items, -1)?;
            let sock_ready = items[0].is_readable();
            let stdin_ready = stdin_open && (items[1].is_readable() || items[1].is_error());
            drop(items);
            if sock_ready {
                self.drain()?;
            }
            if stdin_ready {
                match lines.next() {
                    Some(Ok(line)) => self.command_line(&line),
                    Some(Err(e)) => {
                        print_line(&json!({"kind": "error", "error": format!("stdin: {e}")}));
                        stdin_open = false;
                    }
                    None => stdin_open = false,
                }
            }
        }
    }

    /// Receives everything available, then acks each gateway once.
    pub fn drain(&mut self) -> Result<(), zmq::Error> {
        let mut to_ack: Vec<Vec<u8>> = Vec::new();
        loop {
            let frames = match self.socket.recv_multipart(zmq::DONTWAIT) {
                Ok(f) => f,
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => return Err(e),
            };
            if let Some(id) = self.handle_message(frames) {
                if !to_ack.contains(&id) {
                    to_ack.push(id);
                }
            }
        }
        if self.opts.ack {
            for id in to_ack {
                let high = self.ledgers.get(&id).map_or(0, |l| l.high);
                let body = json!({"seq": high}).to_string();
                self.send(&id, protocol::KIND_ACK, &body);
            }
        }
        Ok(())
    }

    fn send(&self, id: &[u8], kind: &str, body: &str) {
        let r = self
            .socket
            .send(id, zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|_| self.socket.send(kind, zmq::SNDMORE | zmq::DONTWAIT))
            .and_then(|_| self.socket.send(body, zmq::DONTWAIT));
        if let Err(e) = r {
            print_line(&json!({
                "kind": "error",
                "gateway": String::from_utf8_lossy(id),
                "error": format!("cannot send {kind}: {e} (is the gateway connected?)"),
            }));
        }
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
        if matches!(kind.as_str(), "hello" | "stats") {
            if let Some(resume) = value.get("resume_seq").and_then(Value::as_u64) {
                ledger.resume(resume);
            }
        }
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
        if command.get("id").is_none() {
            command["id"] = Value::String(format!("b-{}", self.next_command));
            self.next_command += 1;
        }
        self.send(
            gateway.as_bytes(),
            protocol::KIND_COMMAND,
            &command.to_string(),
        );
    }

    pub fn ledger(&self, gateway: &str) -> Option<&GatewayLedger> {
        self.ledgers.get(gateway.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_acks_contiguous_and_dedupes() {
        let mut l = GatewayLedger::default();
        assert!(l.receive(1));
        assert!(l.receive(2));
        assert!(!l.receive(2));
        assert!(l.receive(4));
        assert_eq!(l.high, 2, "gap at 3 holds the ack back");
        assert!(l.receive(3));
        assert_eq!(l.high, 4);
        assert!(!l.receive(4));
        assert_eq!(l.duplicates, 2);
        assert_eq!(l.received, 4);
    }

    #[test]
    fn ledger_resume_skips_dropped_gap() {
        let mut l = GatewayLedger::default();
        l.receive(1);
        l.receive(10);
        l.receive(11);
        assert_eq!(l.high, 1);
        l.resume(10);
        assert_eq!(l.high, 11);
        l.resume(5);
        assert_eq!(l.high, 11);
    }

    #[test]
    fn first_contact_without_hello_starts_at_first_seq() {
        let mut l = GatewayLedger::default();
        assert!(l.receive(500));
        assert_eq!(l.high, 500);
    }
}
