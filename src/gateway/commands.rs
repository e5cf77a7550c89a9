//! Commands from the backend: duplicate detection, the rate limit, replies.
//!
//! [`Commands`] decides whether a command body runs at all. Executing it (an output, a serial
//! write) is the interpreter's job; it reports the outcome with [`Commands::finish`] or, for
//! serial writes that complete later, [`Commands::write_queued`] and
//! [`Commands::write_finished`]. Every answer leaves as an [`Effect::Send`] of a `reply`.
//!
//! Each remembered id keeps a digest of its command: the same id with the same command is a
//! retry (answered as before, never executed twice); the same id with a different command is
//! refused, so a backend that reuses ids (after a restart, say) learns of it instead of
//! getting someone else's `ok: true` for a command that never ran.
//!
//! Every answer that is remembered is also handed out as an [`Effect::RememberReply`], which
//! the interpreter appends to the command log on disk (`command_log`); at start the log's
//! entries come back through [`Commands::restore`], so ids and replies survive a restart.

use super::effect::{Effect, Effects};
use crate::limit::{LogLimits, RateLimiter, Verdict};
use crate::protocol::{self, Command, Message, StableDigest};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// How many recent command ids are remembered for duplicate detection.
pub const REPLY_CACHE: usize = 1024;

/// What a remembered command id was sent with, to tell a retry from a reused id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyDigest {
    /// A body that parsed: [`Command::digest`] (target and action, so retries that differ
    /// only in JSON spelling, such as `"value": 1` and `"value": true`, still match).
    Command(u64),
    /// A body that was refused as unparsable: a digest of its bytes.
    Unparsed(u64),
}

impl BodyDigest {
    /// The digest of a refused body's bytes (a [`StableDigest`], so it can be kept on disk).
    pub fn of_bytes(body: &[u8]) -> BodyDigest {
        let mut h = StableDigest::new();
        h.bytes(body);
        BodyDigest::Unparsed(h.finish())
    }
}

/// What is remembered of one command id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedReply {
    /// The reply sent, or `None` while the command is in progress.
    pub reply: Option<Message>,
    /// What the command was.
    pub body: BodyDigest,
}

/// Replies to the last [`REPLY_CACHE`] command ids.
#[derive(Debug, Default)]
pub struct ReplyCache {
    map: HashMap<String, CachedReply>,
    order: VecDeque<String>,
}

impl ReplyCache {
    /// What is remembered of `id`.
    pub fn get(&self, id: &str) -> Option<&CachedReply> {
        self.map.get(id)
    }

    /// Remembers `entry` for `id` (replacing what was remembered, without renewing its place
    /// in line); the oldest id is forgotten beyond [`REPLY_CACHE`].
    pub fn insert(&mut self, id: &str, entry: CachedReply) {
        if self.map.insert(id.to_string(), entry).is_none() {
            self.order.push_back(id.to_string());
            if self.order.len() > REPLY_CACHE {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    /// Every remembered id and its entry, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &CachedReply)> {
        self.order
            .iter()
            .filter_map(|id| self.map.get(id).map(|e| (id.as_str(), e)))
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The error of a command whose id is remembered with a different command.
pub fn reused_id_error(id: &str) -> String {
    format!(
        "id {id:?} was reused with a different command: not executed (command ids must be \
         unique; the gateway remembers the last {REPLY_CACHE})"
    )
}

/// The command state machine (see the module doc).
#[derive(Debug)]
pub struct Commands {
    replies: ReplyCache,
    rate: RateLimiter,
    max_per_s: u32,
    /// Serial writes in progress: write token → command id and digest.
    pending_writes: HashMap<u64, (String, Option<BodyDigest>)>,
    next_write_token: u64,
    logs: LogLimits,
    /// The gateway is shutting down: new commands are refused, not remembered.
    stopping: bool,
    /// Commands answered `ok: true`.
    pub ok: u64,
    /// Commands answered `ok: false`.
    pub failed: u64,
    /// Backend messages that were not a valid ack or command.
    pub bad_messages: u64,
}

impl Commands {
    /// `[commands] max_per_s`.
    pub fn new(max_per_s: u32, now: Instant) -> Commands {
        Commands {
            replies: ReplyCache::default(),
            rate: RateLimiter::new(max_per_s, now),
            max_per_s,
            pending_writes: HashMap::new(),
            next_write_token: 1,
            logs: LogLimits::default(),
            stopping: false,
            ok: 0,
            failed: 0,
            bad_messages: 0,
        }
    }

    /// The gateway is shutting down: from now on a new command is refused with a reply and
    /// not remembered, so the backend may send it again (same id) once the gateway is back. A
    /// pulse started now would be cut short at exit, and a reply could miss the flush.
    pub fn set_stopping(&mut self) {
        self.stopping = true;
    }

    /// Remembers the answered commands of an earlier run (the command log, oldest first), as
    /// if they had been answered in this one; the counters do not change.
    pub fn restore(&mut self, entries: impl IntoIterator<Item = (String, CachedReply)>) {
        for (id, entry) in entries {
            self.replies.insert(&id, entry);
        }
    }

    /// Every remembered id that has its reply, oldest first (what the command log keeps).
    pub fn remembered(&self) -> impl Iterator<Item = (&str, &CachedReply)> {
        self.replies.iter().filter(|(_, e)| e.reply.is_some())
    }

    /// A `command` body. Returns the command to execute; `None` when it was answered here:
    /// a duplicate id (answered as before, never executed twice), an id reused with a
    /// different command, the rate limit, or a body that does not parse. A command returned
    /// is remembered as in progress until [`Commands::finish`] (or
    /// [`Commands::write_finished`]) answers it.
    pub fn on_command(&mut self, body: &[u8], now: Instant, fx: &mut Effects) -> Option<Command> {
        // Size and nesting limits are checked before serde_json sees the body.
        let parsed = protocol::parse_command(body);
        let (id, digest) = match &parsed {
            Ok(c) => (Some(c.id.as_str()), BodyDigest::Command(c.digest())),
            Err(e) => (e.id.as_deref(), BodyDigest::of_bytes(body)),
        };
        if let Some(id) = id {
            if let Some(prev) = self.replies.get(id) {
                if prev.body != digest {
                    self.failed += 1;
                    let msg = reused_id_error(id);
                    if self.logs.allow("command id reused", now) {
                        log::warn!("command refused id={id} error=\"{msg}\"");
                    }
                    fx.push(Effect::Send(protocol::reply_err(id, &msg)));
                    return None;
                }
                let reply = prev.reply.clone();
                self.log_duplicate(id, reply.is_some(), now);
                if let Some(reply) = reply {
                    fx.push(Effect::Send(reply));
                }
                return None;
            }
        }
        // Shutdown and the rate limit come after the duplicate check (a retry of an executed
        // command is answered as before) and are not remembered (the same id may be retried).
        if self.stopping {
            self.failed += 1;
            let msg = "gateway is shutting down: not executed; send it again (same id) once                        the gateway is back";
            if self.logs.allow("command during shutdown", now) {
                log::warn!("command refused id={} error=\"{msg}\"", id.unwrap_or("-"));
            }
            if let Some(id) = id {
                fx.push(Effect::Send(protocol::reply_err(id, msg)));
            }
            return None;
        }
        if !self.rate.try_take(now) {
            self.failed += 1;
            let msg = format!("rate limit exceeded (max_per_s={})", self.max_per_s);
            if self.logs.allow("command rate limit", now) {
                log::warn!("command refused id={} error=\"{msg}\"", id.unwrap_or("-"));
            }
            if let Some(id) = id {
                fx.push(Effect::Send(protocol::reply_err(id, &msg)));
            }
            return None;
        }
        match parsed {
            Ok(cmd) => {
                let pending = CachedReply {
                    reply: None,
                    body: digest,
                };
                self.replies.insert(&cmd.id, pending);
                Some(cmd)
            }
            Err(e) => {
                self.failed += 1;
                if self.logs.allow("bad command", now) {
                    log::warn!(
                        "command refused id={} error=\"{}\"",
                        e.id.as_deref().unwrap_or("-"),
                        e.message
                    );
                }
                if let Some(id) = e.id {
                    self.answer(&id, Some(digest), protocol::reply_err(&id, &e.message), fx);
                }
                None
            }
        }
    }

    /// The INFO line of a retried id, limited like every other repeated line (a backend that
    /// retries in a tight loop must not flood the log); its summary is at INFO too.
    fn log_duplicate(&mut self, id: &str, answered: bool, now: Instant) {
        const KIND: &str = "duplicate command";
        let what = if answered {
            "not executed again, answered as before"
        } else {
            "still in progress, answered when done"
        };
        match self.logs.check(KIND, now) {
            Verdict::Log => log::info!("{KIND} id={id}: {what}"),
            Verdict::LogAfter(n) => {
                log::info!("{KIND}: suppressed={n} similar messages in the last minute");
                log::info!("{KIND} id={id}: {what}");
            }
            Verdict::Suppress => {}
        }
    }

    /// The outcome of command `id` (returned by [`Commands::on_command`]): answered and
    /// remembered.
    pub fn finish(&mut self, id: &str, result: Result<(), String>, now: Instant, fx: &mut Effects) {
        let body = self.replies.get(id).map(|e| e.body);
        self.finish_as(id, body, result, now, fx);
    }

    fn finish_as(
        &mut self,
        id: &str,
        body: Option<BodyDigest>,
        result: Result<(), String>,
        now: Instant,
        fx: &mut Effects,
    ) {
        let reply = match result {
            Ok(()) => {
                self.ok += 1;
                protocol::reply_ok(id)
            }
            Err(e) => {
                self.failed += 1;
                if self.logs.allow("command failed", now) {
                    log::warn!("command refused id={id} error=\"{e}\"");
                }
                protocol::reply_err(id, &e)
            }
        };
        self.answer(id, body, reply, fx);
    }

    /// Sends `reply` and remembers it with the command's digest, in memory and in the
    /// command log (`None`: a command that did not come through [`Commands::on_command`];
    /// answered, not remembered). The log entry goes first, so a reply that left was
    /// handed to the disk before.
    fn answer(&mut self, id: &str, body: Option<BodyDigest>, reply: Message, fx: &mut Effects) {
        if let Some(body) = body {
            let entry = CachedReply {
                reply: Some(reply.clone()),
                body,
            };
            self.replies.insert(id, entry.clone());
            fx.push(Effect::RememberReply {
                id: id.to_string(),
                entry,
            });
        }
        fx.push(Effect::Send(reply));
    }

    /// The token for the next serial write.
    pub fn next_write_token(&mut self) -> u64 {
        let t = self.next_write_token;
        self.next_write_token += 1;
        t
    }

    /// Command `id` queued a serial write with `token`: its reply follows
    /// [`Commands::write_finished`]; a retry meanwhile is neither executed nor answered.
    pub fn write_queued(&mut self, token: u64, id: &str) {
        // The entry was made by on_command just before; the digest travels with the token
        // in case 1024 newer ids push it out of the cache before the write ends.
        let body = self.replies.get(id).map(|e| e.body);
        self.pending_writes.insert(token, (id.to_string(), body));
    }

    /// The serial write `token` ended. Returns the command id, if the token was known.
    pub fn write_finished(
        &mut self,
        token: u64,
        result: Result<(), String>,
        now: Instant,
        fx: &mut Effects,
    ) -> Option<String> {
        let (id, body) = self.pending_writes.remove(&token)?;
        self.finish_as(&id, body, result, now, fx);
        Some(id)
    }

    /// A backend message without exactly two frames.
    pub fn on_bad_frames(&mut self, frames: usize, now: Instant) {
        self.bad_messages += 1;
        if self.logs.allow("bad backend message", now) {
            log::warn!("backend message ignored: expected 2 frames (kind, JSON), got {frames}");
        }
    }

    /// An `ack` whose body did not parse.
    pub fn on_bad_ack(&mut self, error: &dyn std::fmt::Display, now: Instant) {
        self.bad_messages += 1;
        if self.logs.allow("bad ack", now) {
            log::warn!("backend ack ignored: {error}");
        }
    }

    /// A backend message of an unknown kind: a command-like body with an id gets an answer;
    /// otherwise a log line.
    pub fn on_unknown_kind(&mut self, kind: &[u8], body: &[u8], now: Instant, fx: &mut Effects) {
        self.bad_messages += 1;
        let kind = String::from_utf8_lossy(kind)
            .chars()
            .take(32)
            .collect::<String>();
        let id = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string));
        let msg = format!("unknown message kind {kind:?} (expected ack or command)");
        match id {
            Some(id) => {
                self.failed += 1;
                fx.push(Effect::Send(protocol::reply_err(&id, &msg)));
            }
            None => {
                if self.logs.allow("unknown kind", now) {
                    log::warn!("backend message ignored: {msg}");
                }
            }
        }
    }

    /// Sets `[commands] max_per_s` (a configuration reload): a full bucket of the new size.
    pub fn set_max_per_s(&mut self, max_per_s: u32, now: Instant) {
        self.rate = RateLimiter::new(max_per_s, now);
        self.max_per_s = max_per_s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_cache_evicts_oldest() {
        let mut c = ReplyCache::default();
        for i in 0..(REPLY_CACHE + 5) {
            let entry = CachedReply {
                reply: None,
                body: BodyDigest::Unparsed(i as u64),
            };
            c.insert(&format!("c{i}"), entry);
        }
        assert!(c.get("c0").is_none());
        assert!(c.get("c4").is_none());
        assert!(c.get("c5").is_some());
        assert_eq!(c.len(), REPLY_CACHE);
    }

    /// The replies sent; every remembered answer must have gone to the log first.
    fn sent(fx: &mut Effects) -> Vec<String> {
        let mut logged: Option<String> = None;
        let mut out = Vec::new();
        for e in fx.drain() {
            match e {
                Effect::RememberReply { id, entry } => {
                    assert!(logged.is_none(), "two log entries for one reply");
                    assert_eq!(entry.reply.as_ref().map(|m| m.kind), Some("reply"));
                    logged = Some(entry.reply.unwrap().body);
                    assert!(logged.as_ref().unwrap().contains(&format!("{id:?}")));
                }
                Effect::Send(m) => {
                    if let Some(body) = logged.take() {
                        assert_eq!(body, m.body, "the logged reply is the one sent");
                    }
                    out.push(m.body)
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(logged.is_none(), "logged but not sent");
        out
    }

    /// A repeated id is answered with the first reply and neither executed nor counted again,
    /// whether the first attempt succeeded or was refused.
    #[test]
    fn duplicate_commands_execute_and_count_once() {
        let t0 = Instant::now();
        let mut c = Commands::new(100, t0);
        let mut fx = Effects::default();
        let toggle = br#"{"id":"c-1","target":"relay1","action":"toggle"}"#;
        let cmd = c.on_command(toggle, t0, &mut fx).expect("first: executed");
        c.finish(&cmd.id, Ok(()), t0, &mut fx);
        assert!(
            c.on_command(toggle, t0, &mut fx).is_none(),
            "second: not executed"
        );
        let bad = br#"{"id":"c-2","target":"relay1","action":"set","value":7}"#;
        assert!(c.on_command(bad, t0, &mut fx).is_none());
        assert!(c.on_command(bad, t0, &mut fx).is_none());
        assert_eq!((c.ok, c.failed), (1, 1));
        let r = sent(&mut fx);
        assert_eq!(r.len(), 4, "{r:?}");
        assert_eq!(r[0], r[1]);
        assert_eq!(r[2], r[3]);
        assert!(r[2].contains("\"ok\":false"), "{}", r[2]);
    }

    /// The same id with a different command is refused and nothing runs; the id keeps its
    /// first command (a retry of it is still answered from the cache, a third body refused).
    /// A retry that spells the same command differently (`1` and `true`) is a retry.
    #[test]
    fn reused_id_with_a_different_command_is_refused() {
        let t0 = Instant::now();
        let mut c = Commands::new(100, t0);
        let mut fx = Effects::default();
        let set1 = br#"{"id":"c-1","target":"relay1","action":"set","value":1}"#;
        let cmd = c.on_command(set1, t0, &mut fx).expect("first: executed");
        c.finish(&cmd.id, Ok(()), t0, &mut fx);
        let first = sent(&mut fx);
        assert_eq!(first, vec![r#"{"id":"c-1","ok":true}"#.to_string()]);

        let reused = [
            &br#"{"id":"c-1","target":"relay1","action":"set","value":0}"#[..],
            br#"{"id":"c-1","target":"relay2","action":"set","value":1}"#,
            br#"{"id":"c-1","target":"relay1","action":"pulse","value":{"ms":100}}"#,
            br#"{"id":"c-1","target":"relay1","action":"set","value":1e400}"#,
        ];
        for body in reused {
            assert!(c.on_command(body, t0, &mut fx).is_none(), "not executed");
            let r = sent(&mut fx);
            assert_eq!(r.len(), 1, "{r:?}");
            let v: Value = serde_json::from_str(&r[0]).unwrap();
            assert_eq!(v["ok"], false, "{v}");
            let err = v["error"].as_str().unwrap();
            assert!(err.contains("reused with a different command"), "{err}");
        }
        assert_eq!((c.ok, c.failed), (1, reused.len() as u64));

        let same = br#"{"value":true,"action":"set","target":"relay1","id":"c-1"}"#;
        assert!(
            c.on_command(same, t0, &mut fx).is_none(),
            "a retry: not executed"
        );
        assert_eq!(sent(&mut fx), first, "answered as before");
        assert_eq!((c.ok, c.failed), (1, reused.len() as u64));
    }

    /// A refused body is remembered by its bytes: the same bytes get the same refusal, a
    /// different (even valid) command under its id is refused as a reused id.
    #[test]
    fn reused_id_of_a_refused_command_is_refused() {
        let t0 = Instant::now();
        let mut c = Commands::new(100, t0);
        let mut fx = Effects::default();
        let bad = br#"{"id":"b-1","target":"relay1","action":"set","value":7}"#;
        assert!(c.on_command(bad, t0, &mut fx).is_none());
        let r1 = sent(&mut fx);
        assert!(c.on_command(bad, t0, &mut fx).is_none());
        assert_eq!(sent(&mut fx), r1);
        let good = br#"{"id":"b-1","target":"relay1","action":"set","value":1}"#;
        assert!(c.on_command(good, t0, &mut fx).is_none(), "not executed");
        let r = sent(&mut fx);
        assert!(r[0].contains("reused with a different command"), "{r:?}");
    }

    /// A different command under the id of a write in progress is refused at once; the
    /// write's own reply still comes when it ends, and is what a true retry gets later.
    #[test]
    fn reused_id_of_a_pending_write_is_refused() {
        let t0 = Instant::now();
        let mut c = Commands::new(100, t0);
        let mut fx = Effects::default();
        let body = br#"{"id":"w-1","target":"port1","action":"write","value":"hi"}"#;
        let other = br#"{"id":"w-1","target":"port1","action":"write","value":"RESET"}"#;
        let cmd = c.on_command(body, t0, &mut fx).unwrap();
        let token = c.next_write_token();
        c.write_queued(token, &cmd.id);
        assert!(c.on_command(other, t0, &mut fx).is_none());
        let r = sent(&mut fx);
        assert!(r[0].contains("reused with a different command"), "{r:?}");
        c.write_finished(token, Ok(()), t0, &mut fx);
        assert!(c.on_command(body, t0, &mut fx).is_none());
        let r = sent(&mut fx);
        assert_eq!(r, vec![r#"{"id":"w-1","ok":true}"#.to_string(); 2]);
    }

    /// A write whose id left the cache while it ran (1024 newer ids) is still answered and
    /// remembered with its own command.
    #[test]
    fn pending_write_keeps_its_digest_past_eviction() {
        let t0 = Instant::now();
        let mut c = Commands::new(u32::MAX, t0);
        let mut fx = Effects::default();
        let body = br#"{"id":"w-1","target":"port1","action":"write","value":"hi"}"#;
        let cmd = c.on_command(body, t0, &mut fx).unwrap();
        let token = c.next_write_token();
        c.write_queued(token, &cmd.id);
        for i in 0..REPLY_CACHE {
            let b = format!(r#"{{"id":"x-{i}","target":"relay1","action":"toggle"}}"#);
            let x = c.on_command(b.as_bytes(), t0, &mut fx).unwrap();
            c.finish(&x.id, Ok(()), t0, &mut fx);
        }
        assert!(c.replies.get("w-1").is_none(), "pushed out");
        fx.drain();
        c.write_finished(token, Ok(()), t0, &mut fx);
        assert_eq!(sent(&mut fx).len(), 1);
        let other = br#"{"id":"w-1","target":"port1","action":"write","value":"RESET"}"#;
        assert!(c.on_command(other, t0, &mut fx).is_none());
        assert!(sent(&mut fx)[0].contains("reused with a different command"));
    }

    /// A serial write in progress: a retry is not executed and not answered; the reply comes
    /// once, when the write ends, and is the answer to later retries.
    #[test]
    fn pending_write_answers_once_when_done() {
        let t0 = Instant::now();
        let mut c = Commands::new(100, t0);
        let mut fx = Effects::default();
        let body = br#"{"id":"w-1","target":"port1","action":"write","value":"hi"}"#;
        let cmd = c.on_command(body, t0, &mut fx).unwrap();
        let token = c.next_write_token();
        c.write_queued(token, &cmd.id);
        assert!(c.on_command(body, t0, &mut fx).is_none());
        assert!(fx.is_empty());
        assert_eq!(c.write_finished(token + 1, Ok(()), t0, &mut fx), None);
        assert_eq!(
            c.write_finished(token, Ok(()), t0, &mut fx).as_deref(),
            Some("w-1")
        );
        assert!(c.on_command(body, t0, &mut fx).is_none());
        let r = sent(&mut fx);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], r[1]);
        assert_eq!(c.ok, 1);
    }

    /// Over the rate: refused with a reply, not remembered (a later retry runs).
    #[test]
    fn rate_limit_refuses_and_forgets() {
        let t0 = Instant::now();
        let mut c = Commands::new(2, t0);
        let mut fx = Effects::default();
        let body = |i: u32| format!(r#"{{"id":"r-{i}","target":"relay1","action":"toggle"}}"#);
        assert!(c.on_command(body(1).as_bytes(), t0, &mut fx).is_some());
        assert!(c.on_command(body(2).as_bytes(), t0, &mut fx).is_some());
        assert!(c.on_command(body(3).as_bytes(), t0, &mut fx).is_none());
        let r = sent(&mut fx);
        assert!(r[0].contains("rate limit exceeded (max_per_s=2)"), "{r:?}");
        let later = t0 + std::time::Duration::from_secs(1);
        assert!(c.on_command(body(3).as_bytes(), later, &mut fx).is_some());
    }

    /// During shutdown: a new command is refused and forgotten (a retry after the restart
    /// runs); a retry of one answered before is answered as before.
    #[test]
    fn shutdown_refuses_new_commands_and_forgets_them() {
        let t0 = Instant::now();
        let mut c = Commands::new(10, t0);
        let mut fx = Effects::default();
        let body = |i: u32| format!(r#"{{"id":"s-{i}","target":"relay1","action":"toggle"}}"#);
        let cmd = c.on_command(body(1).as_bytes(), t0, &mut fx).unwrap();
        c.finish(&cmd.id, Ok(()), t0, &mut fx);
        let before = sent(&mut fx);
        c.set_stopping();
        assert!(c.on_command(body(2).as_bytes(), t0, &mut fx).is_none());
        let r = sent(&mut fx);
        assert!(
            r[0].contains("shutting down") && r[0].contains(r#""ok":false"#),
            "{r:?}"
        );
        assert!(c.on_command(body(1).as_bytes(), t0, &mut fx).is_none());
        assert_eq!(sent(&mut fx), before, "answered as before");
        assert!(c.remembered().all(|(id, _)| id != "s-2"), "not remembered");
        let mut fresh = Commands::new(10, t0);
        fresh.restore(c.remembered().map(|(i, e)| (i.to_string(), e.clone())));
        assert!(fresh.on_command(body(2).as_bytes(), t0, &mut fx).is_some());
    }

    #[test]
    fn unknown_kind_with_an_id_is_answered() {
        let t0 = Instant::now();
        let mut c = Commands::new(10, t0);
        let mut fx = Effects::default();
        c.on_unknown_kind(b"frobnicate", br#"{"id":"x-1"}"#, t0, &mut fx);
        c.on_unknown_kind(b"frobnicate", b"not json", t0, &mut fx);
        let r = sent(&mut fx);
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("unknown message kind"), "{r:?}");
        assert_eq!((c.bad_messages, c.failed), (2, 1));
    }
}
