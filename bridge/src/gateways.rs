//! The ROUTER thread's state: every gateway's [`Flow`], the commands waiting for replies, and
//! how each message from a gateway or from the NATS side is handled. No event loop here:
//! [`crate::router_loop`] calls into it.

use crate::flow::{Flow, ReadingAction};
use crate::messages::{ToNats, ToRouter};
use crate::subject;
use bytes::Bytes;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::error::TrySendError;
use zgate::backend::{Received, Route, Router};
use zgate::limit::LogLimits;
use zgate::protocol;

/// How long a command waits for the gateway's reply before it is forgotten.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// An unconfirmed reading whose outcome never came back is forgotten after this long.
pub const INFLIGHT_TIMEOUT: Duration = Duration::from_secs(30);
/// After a connection closed, connected gateways are probed this long.
pub const PROBE_FOR: Duration = Duration::from_secs(2);

const LOG_BAD_MESSAGE: &str = "bad message from a gateway";
const LOG_NATS_BUSY: &str = "NATS side busy";
const LOG_NO_HELLO: &str = "reading before hello";

struct Gateway {
    flow: Flow,
    connected: bool,
    /// The fd of the connection its last verified message came from.
    fd: Option<i32>,
    /// Touched in this batch: an ack may be due.
    dirty: bool,
}

/// Counters, logged by the loop.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    /// Readings handed to the NATS side.
    pub published: u64,
    /// Readings JetStream confirmed.
    pub confirmed: u64,
    /// Readings whose publish failed.
    pub failed: u64,
    /// Acks that acknowledged readings no earlier ack covered.
    pub acks_advanced: u64,
    /// Readings dropped because `max_inflight` were unconfirmed (not acked: resent later).
    pub over_limit: u64,
}

/// The ROUTER thread's state.
pub struct Gateways {
    router: Router,
    to_nats: tokio::sync::mpsc::Sender<ToNats>,
    gateways: HashMap<String, Gateway>,
    /// (gateway, command id) → reply subject and when the command was sent.
    pending: HashMap<(String, String), (Option<String>, Instant)>,
    max_inflight: usize,
    bridge_id: String,
    run_id: u32,
    next_command: u64,
    probe_until: Option<Instant>,
    logs: LogLimits,
    /// What happened so far.
    pub counters: Counters,
}

fn random_run_id() -> u32 {
    use std::hash::BuildHasher;
    let h = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    (h ^ (h >> 32)) as u32
}

impl Gateways {
    /// The state around a bound [`Router`].
    pub fn new(
        router: Router,
        to_nats: tokio::sync::mpsc::Sender<ToNats>,
        max_inflight: usize,
        bridge_id: &str,
    ) -> Gateways {
        Gateways {
            router,
            to_nats,
            gateways: HashMap::new(),
            pending: HashMap::new(),
            max_inflight,
            bridge_id: bridge_id.to_string(),
            run_id: random_run_id(),
            next_command: 1,
            probe_until: None,
            logs: LogLimits::default(),
            counters: Counters::default(),
        }
    }

    /// The ROUTER.
    pub fn router(&mut self) -> &mut Router {
        &mut self.router
    }

    /// Handles one message from a gateway.
    pub fn on_received(&mut self, r: Received, now: Instant) {
        if !self.router.sender_verified(&r) {
            return;
        }
        // Identity: with CURVE the key's registered id (sender_verified checked that the
        // routing id is that id); without CURVE nothing is authenticated and the routing
        // id is all there is.
        let id = match &r.user_id {
            Some(u) if self.router.curve() => u.clone(),
            _ => match String::from_utf8(r.frames[0].clone()) {
                Ok(s) => s,
                Err(_) => return self.bad(None, "routing id is not UTF-8"),
            },
        };
        if r.frames.len() != 3 {
            return self.bad(Some(&id), &format!("{} frames, expected 3", r.frames.len()));
        }
        let fd = r.fd;
        let kind = String::from_utf8_lossy(&r.frames[1]).into_owned();
        let body = Bytes::from(r.frames.into_iter().nth(2).unwrap_or_default());
        let value: Value = match serde_json::from_slice(&body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return self.bad(Some(&id), &format!("{kind}: body is not a JSON object")),
        };
        let max = self.max_inflight;
        let gw = self.gateways.entry(id.clone()).or_insert_with(|| Gateway {
            flow: Flow::new(max, INFLIGHT_TIMEOUT),
            connected: false,
            fd: None,
            dirty: false,
        });
        gw.dirty = true;
        if fd.is_some() {
            gw.fd = fd;
        }
        match kind.as_str() {
            protocol::KIND_HELLO => {
                let spool_id = value.get("spool_id").and_then(Value::as_str).unwrap_or("");
                let resume = value.get("resume_seq").and_then(Value::as_u64);
                if let Some(old) = gw.flow.on_hello(spool_id, resume) {
                    log::warn!("gateway={id} spool_id changed old={old:?} new={spool_id:?}: its seqs start again");
                }
                gw.connected = true;
                let s = |k: &str| {
                    value
                        .get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                };
                log::info!(
                    "gateway connected gateway={id} resume_seq={}",
                    resume.unwrap_or(0)
                );
                self.send_nats(ToNats::Connected {
                    gateway: id.clone(),
                    version: s("version"),
                    security: s("security"),
                    resume_seq: resume,
                });
                self.send_nats(ToNats::Event {
                    subject: subject::gateway_subject(&id, "hello"),
                    body,
                });
            }
            protocol::KIND_READING => {
                let Some(seq) = value.get("seq").and_then(Value::as_u64) else {
                    return self.bad(Some(&id), "reading without seq");
                };
                let source = value.get("source").and_then(Value::as_str).unwrap_or("");
                match gw.flow.on_reading(seq, now) {
                    ReadingAction::Publish { spool_id } => {
                        let subject = subject::reading_subject(&id, source);
                        let msg = ToNats::Publish {
                            gateway: id.clone(),
                            spool_id: spool_id.clone(),
                            seq,
                            subject,
                            body,
                        };
                        match self.to_nats.try_send(msg) {
                            Ok(()) => self.counters.published += 1,
                            Err(e) => {
                                if let Some(gw) = self.gateways.get_mut(&id) {
                                    gw.flow.on_outcome(&spool_id, seq, false);
                                }
                                self.nats_busy(&e);
                            }
                        }
                    }
                    ReadingAction::OverLimit => self.counters.over_limit += 1,
                    ReadingAction::NoHello => {
                        if self.logs.allow(LOG_NO_HELLO, now) {
                            log::warn!("reading before hello gateway={id} seq={seq}: not published, not acked (the gateway resends it after its hello)");
                        }
                    }
                    ReadingAction::Duplicate | ReadingAction::InFlight => {}
                }
            }
            protocol::KIND_STATS => {
                let resume = value.get("resume_seq").and_then(Value::as_u64);
                let spool = value.pointer("/spool/spool_id").and_then(Value::as_str);
                if let (Some(r), Some(s)) = (resume, spool) {
                    gw.flow.on_stats(s, r);
                }
                self.send_nats(ToNats::Seen {
                    gateway: id.clone(),
                    resume_seq: resume,
                });
                self.send_nats(ToNats::Event {
                    subject: subject::gateway_subject(&id, "stats"),
                    body,
                });
            }
            protocol::KIND_REPLY => {
                let cid = value
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                match self.pending.remove(&(id.clone(), cid.clone())) {
                    Some((Some(reply), _)) => self.send_nats(ToNats::Respond { reply, body }),
                    Some((None, _)) => {}
                    None => log::debug!("reply to no pending command gateway={id} id={cid}"),
                }
            }
            other => self.bad(Some(&id), &format!("unknown kind {other:?}")),
        }
    }

    fn bad(&mut self, gateway: Option<&str>, why: &str) {
        if self.logs.allow(LOG_BAD_MESSAGE, Instant::now()) {
            log::warn!(
                "message dropped gateway={} reason=\"{why}\"",
                gateway.unwrap_or("?")
            );
        }
    }

    fn nats_busy(&mut self, e: &TrySendError<ToNats>) {
        if self.logs.allow(LOG_NATS_BUSY, Instant::now()) {
            let why = match e {
                TrySendError::Full(_) => "its queue is full",
                TrySendError::Closed(_) => "it stopped",
            };
            log::warn!("NATS side busy ({why}): readings are not published now and not acked; gateways resend them");
        }
    }

    /// Control messages (connect state, events, replies) must not be lost quietly.
    fn send_nats(&mut self, m: ToNats) {
        if let Err(e) = self.to_nats.try_send(m) {
            self.nats_busy(&e);
        }
    }

    /// Handles one message from the NATS side.
    pub fn on_nats(&mut self, m: ToRouter, now: Instant) {
        match m {
            ToRouter::Outcome {
                gateway,
                spool_id,
                seq,
                ok,
            } => {
                if ok {
                    self.counters.confirmed += 1;
                } else {
                    self.counters.failed += 1;
                }
                if let Some(gw) = self.gateways.get_mut(&gateway) {
                    gw.flow.on_outcome(&spool_id, seq, ok);
                    gw.dirty = true;
                }
            }
            ToRouter::Command {
                gateway,
                body,
                reply,
            } => self.command(gateway, body, reply, now),
        }
    }

    /// Sends a command to a gateway connected here, and remembers where its reply goes.
    ///
    /// Refused (with an `ok: false` answer) when the gateway is not connected, or when its
    /// routing id last carried another key's message (a peer with another allowed key took the
    /// id over: ROUTER_HANDOVER hands an id to the newest connection that claims it). libzmq
    /// tells nothing when such a takeover happens, only the taker's first message shows it: a
    /// command sent between a silent takeover and that message reaches the taker. Closing
    /// that window needs the routing id of a connection at its handshake, which the ROUTER does
    /// not expose.
    fn command(&mut self, gateway: String, body: Bytes, reply: Option<String>, now: Instant) {
        let mut cmd = match serde_json::from_slice::<Value>(&body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return self.refuse(reply, Value::Null, "command body is not a JSON object"),
        };
        if cmd.get("id").is_none() {
            cmd["id"] = Value::String(format!(
                "{}-{:08x}-{}",
                self.bridge_id, self.run_id, self.next_command
            ));
            self.next_command += 1;
        }
        let cid = cmd["id"].clone();
        let Some(cid_str) = cid.as_str().map(str::to_string) else {
            return self.refuse(reply, cid, "command id must be a string");
        };
        if !self.gateways.get(&gateway).is_some_and(|g| g.connected) {
            return self.refuse(
                reply,
                cid,
                &format!(
                    "gateway {gateway} is not connected to bridge {}",
                    self.bridge_id
                ),
            );
        }
        if let Some(Route::Impersonated(by)) = self.router.route(gateway.as_bytes()) {
            let why =
                format!("routing id {gateway} was last used with the key of {by} (impersonation)");
            return self.refuse(reply, cid, &why);
        }
        match self.router.send(
            gateway.as_bytes(),
            protocol::KIND_COMMAND,
            cmd.to_string().as_bytes(),
        ) {
            Ok(()) => {
                self.pending.insert((gateway, cid_str), (reply, now));
            }
            Err(e) => {
                let why = match e {
                    zmq::Error::EHOSTUNREACH => format!("gateway {gateway} is not connected"),
                    zmq::Error::EAGAIN => {
                        format!("gateway {gateway} is not reading (its queue is full)")
                    }
                    e => e.to_string(),
                };
                if e == zmq::Error::EHOSTUNREACH {
                    self.disconnected(&gateway);
                }
                self.refuse(reply, cid, &why);
            }
        }
    }

    fn refuse(&mut self, reply: Option<String>, id: Value, why: &str) {
        log::warn!("command refused id={id} reason=\"{why}\"");
        if let Some(reply) = reply {
            let body = json!({"id": id, "ok": false, "error": why}).to_string();
            self.send_nats(ToNats::Respond {
                reply,
                body: Bytes::from(body),
            });
        }
    }

    /// Sends every due ack (one per gateway touched since the last call).
    pub fn flush_acks(&mut self) {
        let mut lost = Vec::new();
        for (id, gw) in self.gateways.iter_mut().filter(|(_, g)| g.dirty) {
            gw.dirty = false;
            let Some((seq, advanced)) = gw.flow.take_ack() else {
                continue;
            };
            if advanced {
                self.counters.acks_advanced += 1;
            }
            log::debug!("ack gateway={id} seq={seq} advanced={advanced}");
            if !send_ack(&self.router, id, seq) {
                lost.push(id.clone());
            }
        }
        for id in lost {
            self.disconnected(&id);
        }
    }

    /// Connections closed (their fds): a gateway whose messages came over one of them is
    /// disconnected, at once and without guessing. (A takeover of a routing id by ROUTER_HANDOVER
    /// does not close the old connection: libzmq only detaches its pipe; see [`Self::command`].)
    /// Gateways whose fd is unknown are probed for a while instead (libzmq removes a routing
    /// id shortly after the monitor event).
    pub fn connection_closed(&mut self, fds: &[i32], now: Instant) {
        let lost: Vec<String> = self
            .gateways
            .iter()
            .filter(|(_, g)| g.connected && g.fd.is_some_and(|fd| fds.contains(&fd)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in lost {
            if let Some(g) = self.gateways.get_mut(&id) {
                g.fd = None;
            }
            self.disconnected(&id);
        }
        if self
            .gateways
            .values()
            .any(|g| g.connected && g.fd.is_none())
        {
            self.probe_until = Some(now + PROBE_FOR);
            self.probe();
        }
    }

    /// Re-sends each connected gateway its last ack (which changes nothing at the gateway):
    /// EHOSTUNREACH says its connection is gone.
    fn probe(&mut self) {
        let mut lost = Vec::new();
        for (id, gw) in self
            .gateways
            .iter()
            .filter(|(_, g)| g.connected && g.fd.is_none())
        {
            let Some(seq) = gw.flow.last_ack() else {
                continue;
            };
            if !send_ack(&self.router, id, seq) {
                lost.push(id.clone());
            }
        }
        for id in lost {
            self.disconnected(&id);
        }
    }

    fn disconnected(&mut self, id: &str) {
        let Some(gw) = self.gateways.get_mut(id) else {
            return;
        };
        if !std::mem::replace(&mut gw.connected, false) {
            return;
        }
        log::info!("gateway disconnected gateway={id}");
        self.send_nats(ToNats::Disconnected {
            gateway: id.to_string(),
        });
        let ids: Vec<_> = self
            .pending
            .keys()
            .filter(|(g, _)| g == id)
            .cloned()
            .collect();
        for key in ids {
            if let Some((reply, _)) = self.pending.remove(&key) {
                let why = format!("gateway {id} disconnected before replying");
                self.refuse(reply, Value::String(key.1), &why);
            }
        }
    }

    /// Periodic work: probes, expired commands and unconfirmed readings.
    pub fn tick(&mut self, now: Instant) {
        if self.probe_until.is_some_and(|t| now < t) {
            self.probe();
        } else {
            self.probe_until = None;
        }
        let expired: Vec<_> = self
            .pending
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= COMMAND_TIMEOUT)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            self.pending.remove(&key);
        }
        for (id, gw) in self.gateways.iter_mut() {
            let n = gw.flow.expire(now);
            if n > 0 {
                log::warn!("gateway={id} {n} readings had no JetStream outcome within {INFLIGHT_TIMEOUT:?}: forgotten, published again when the gateway resends them");
            }
        }
    }
}

/// Sends `id` an ack of `seq`; false when the ROUTER no longer has a route to it
/// (EHOSTUNREACH: its connection is gone). Other send errors leave it connected.
fn send_ack(router: &Router, id: &str, seq: u64) -> bool {
    let body = json!({ "seq": seq }).to_string();
    !matches!(
        router.send(id.as_bytes(), protocol::KIND_ACK, body.as_bytes()),
        Err(zmq::Error::EHOSTUNREACH)
    )
}
