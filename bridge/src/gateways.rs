//! The ROUTER thread's state: every gateway's [`Flow`], the commands waiting for replies, and
//! how each message from a gateway or from the NATS side is handled. No event loop here:
//! [`crate::router_loop`] calls into it.

use crate::flow::{Flow, ReadingAction};
use crate::messages::{Outcome, ToNats, ToRouter};
use crate::subject;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
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
    /// Its id (shared with every publish of its readings).
    id: Arc<str>,
    /// `zgate.<gateway>.reading.`
    reading_prefix: String,
    flow: Flow,
    connected: bool,
    /// The fd of the connection its last verified message came from.
    fd: Option<i32>,
    /// Touched in this batch: an ack may be due (and the slot is in `Gateways::dirty`).
    dirty: bool,
}

/// What the hot path reads of a reading's body; the rest is passed on untouched.
#[derive(Deserialize)]
struct ReadingHead<'a> {
    seq: Option<u64>,
    #[serde(borrow, default)]
    source: Option<Cow<'a, str>>,
}

/// A reading's seq and source without building the whole JSON value: `None` when the body
/// is not a JSON object of that shape (the caller then looks at it as a [`Value`]).
fn reading_head(body: &[u8]) -> Option<ReadingHead<'_>> {
    // serde would also take an array for a struct; a reading's body is an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(body).ok()
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
    /// Every gateway seen since the start, by slot (a slot is never reused: outcomes name it).
    slots: Vec<Gateway>,
    /// Gateway id → slot.
    index: HashMap<String, usize>,
    /// Slots touched since the last [`Gateways::flush_acks`].
    dirty: Vec<usize>,
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
            slots: Vec::new(),
            index: HashMap::new(),
            dirty: Vec::new(),
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

    /// The slot of gateway `id`, made on its first message.
    fn slot(&mut self, id: &str) -> usize {
        if let Some(&i) = self.index.get(id) {
            return i;
        }
        let i = self.slots.len();
        self.slots.push(Gateway {
            id: Arc::from(id),
            reading_prefix: subject::reading_prefix(id),
            flow: Flow::new(self.max_inflight, INFLIGHT_TIMEOUT),
            connected: false,
            fd: None,
            dirty: false,
        });
        self.index.insert(id.to_string(), i);
        i
    }

    /// A verified message from gateway `id` (over connection `fd`, when known): its slot,
    /// marked for the next [`Self::flush_acks`].
    fn heard(&mut self, id: &str, fd: Option<i32>) -> usize {
        let i = self.slot(id);
        if fd.is_some() {
            self.slots[i].fd = fd;
        }
        self.touch(i);
        i
    }

    /// Marks slot `i` for the next [`Self::flush_acks`].
    fn touch(&mut self, i: usize) {
        let gw = &mut self.slots[i];
        if !std::mem::replace(&mut gw.dirty, true) {
            self.dirty.push(i);
        }
    }

    /// Handles one message from a gateway.
    pub fn on_received(&mut self, r: Received, now: Instant) {
        if !self.router.sender_verified(&r) {
            return;
        }
        let Received {
            mut frames,
            user_id,
            fd,
            ..
        } = r;
        // Identity: with CURVE the key's registered id (sender_verified checked that the
        // routing id is that id); without CURVE nothing is authenticated and the routing
        // id is all there is.
        let id = match user_id {
            Some(u) if self.router.curve() => u,
            _ => match String::from_utf8(std::mem::take(&mut frames[0])) {
                Ok(s) => s,
                Err(_) => return self.bad(None, "routing id is not UTF-8"),
            },
        };
        if frames.len() != 3 {
            return self.bad(Some(&id), &format!("{} frames, expected 3", frames.len()));
        }
        let body = Bytes::from(frames.pop().unwrap_or_default());
        if frames[1] == protocol::KIND_READING.as_bytes() {
            if let Some(head) = reading_head(&body) {
                let i = self.heard(&id, fd);
                let source = head.source.unwrap_or_default();
                self.reading(i, head.seq, &source, body.clone(), now);
                return;
            }
        }
        let kind = String::from_utf8_lossy(&frames[1]).into_owned();
        let value: Value = match serde_json::from_slice(&body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return self.bad(Some(&id), &format!("{kind}: body is not a JSON object")),
        };
        let i = self.heard(&id, fd);
        let gw = &mut self.slots[i];
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
                // A body the fast path did not take (e.g. a source that is not a string).
                let seq = value.get("seq").and_then(Value::as_u64);
                let source = value.get("source").and_then(Value::as_str).unwrap_or("");
                self.reading(i, seq, source, body, now);
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

    /// A reading `seq` of slot `i`'s gateway: publish it, or not (see [`Flow::on_reading`]);
    /// one without a seq is a bad message.
    fn reading(&mut self, i: usize, seq: Option<u64>, source: &str, body: Bytes, now: Instant) {
        let Some(seq) = seq else {
            let id = self.slots[i].id.clone();
            return self.bad(Some(&id), "reading without seq");
        };
        let gw = &mut self.slots[i];
        match gw.flow.on_reading(seq, now) {
            ReadingAction::Publish { spool_id } => {
                let subject = subject::with_source(&gw.reading_prefix, source);
                let msg = ToNats::Publish {
                    slot: i,
                    gateway: gw.id.clone(),
                    spool_id: spool_id.clone(),
                    seq,
                    subject,
                    body,
                };
                match self.to_nats.try_send(msg) {
                    Ok(()) => self.counters.published += 1,
                    Err(e) => {
                        self.slots[i].flow.on_outcome(&spool_id, seq, false);
                        self.nats_busy(&e);
                    }
                }
            }
            ReadingAction::OverLimit => self.counters.over_limit += 1,
            ReadingAction::NoHello => {
                if self.logs.allow(LOG_NO_HELLO, now) {
                    let id = &self.slots[i].id;
                    log::warn!("reading before hello gateway={id} seq={seq}: not published, not acked (the gateway resends it after its hello)");
                }
            }
            ReadingAction::Duplicate | ReadingAction::InFlight => {}
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
            ToRouter::Outcomes(outcomes) => {
                for Outcome {
                    slot,
                    spool_id,
                    seq,
                    ok,
                } in outcomes
                {
                    if ok {
                        self.counters.confirmed += 1;
                    } else {
                        self.counters.failed += 1;
                    }
                    if let Some(gw) = self.slots.get_mut(slot) {
                        gw.flow.on_outcome(&spool_id, seq, ok);
                        self.touch(slot);
                    }
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
        let connected = self.index.get(gateway.as_str()).map(|&i| &self.slots[i]);
        if !connected.is_some_and(|g| g.connected) {
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
                    if let Some(&i) = self.index.get(gateway.as_str()) {
                        self.disconnected(i);
                    }
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
        for i in self.dirty.drain(..) {
            let gw = &mut self.slots[i];
            gw.dirty = false;
            let Some((seq, advanced)) = gw.flow.take_ack() else {
                continue;
            };
            if advanced {
                self.counters.acks_advanced += 1;
            }
            log::debug!("ack gateway={} seq={seq} advanced={advanced}", gw.id);
            if !send_ack(&self.router, &gw.id, seq) {
                lost.push(i);
            }
        }
        for i in lost {
            self.disconnected(i);
        }
    }

    /// Connections closed (their fds): a gateway whose messages came over one of them is
    /// disconnected, at once and without guessing. (A takeover of a routing id by ROUTER_HANDOVER
    /// does not close the old connection: libzmq only detaches its pipe; see [`Self::command`].)
    /// Gateways whose fd is unknown are probed for a while instead (libzmq removes a routing
    /// id shortly after the monitor event).
    pub fn connection_closed(&mut self, fds: &[i32], now: Instant) {
        let lost: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                let g = &self.slots[i];
                g.connected && g.fd.is_some_and(|fd| fds.contains(&fd))
            })
            .collect();
        for i in lost {
            self.slots[i].fd = None;
            self.disconnected(i);
        }
        if self.slots.iter().any(|g| g.connected && g.fd.is_none()) {
            self.probe_until = Some(now + PROBE_FOR);
            self.probe();
        }
    }

    /// Re-sends each connected gateway its last ack (which changes nothing at the gateway):
    /// EHOSTUNREACH says its connection is gone.
    fn probe(&mut self) {
        let mut lost = Vec::new();
        for (i, gw) in self.slots.iter().enumerate() {
            if !gw.connected || gw.fd.is_some() {
                continue;
            }
            let Some(seq) = gw.flow.last_ack() else {
                continue;
            };
            if !send_ack(&self.router, &gw.id, seq) {
                lost.push(i);
            }
        }
        for i in lost {
            self.disconnected(i);
        }
    }

    fn disconnected(&mut self, i: usize) {
        let Some(gw) = self.slots.get_mut(i) else {
            return;
        };
        if !std::mem::replace(&mut gw.connected, false) {
            return;
        }
        let id = gw.id.clone();
        let id = &*id;
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
        for gw in &mut self.slots {
            let (id, n) = (&gw.id, gw.flow.expire(now));
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
