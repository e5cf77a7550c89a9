//! Commands from the backend: duplicate detection, the rate limit, replies.
//!
//! [`Commands`] decides whether a command body runs at all. Executing it (an output, a serial
//! write) is the interpreter's job; it reports the outcome with [`Commands::finish`] or, for
//! serial writes that complete later, [`Commands::write_queued`] and
//! [`Commands::write_finished`]. Every answer leaves as an [`Effect::Send`] of a `reply`.

use super::effect::{Effect, Effects};
use crate::limit::{LogLimits, RateLimiter};
use crate::protocol::{self, Command, Message};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// How many recent command ids are remembered for duplicate detection.
pub const REPLY_CACHE: usize = 1024;

/// What is remembered of one command id.
#[derive(Debug, Clone)]
pub struct CachedReply {
    /// The reply sent, or `None` while the command is in progress.
    pub reply: Option<Message>,
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

    /// Remembers `entry` for `id`; the oldest id is forgotten beyond [`REPLY_CACHE`].
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

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The command state machine (see the module doc).
#[derive(Debug)]
pub struct Commands {
    replies: ReplyCache,
    rate: RateLimiter,
    max_per_s: u32,
    /// Serial writes in progress: write token → command id.
    pending_writes: HashMap<u64, String>,
    next_write_token: u64,
    logs: LogLimits,
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
            ok: 0,
            failed: 0,
            bad_messages: 0,
        }
    }

    /// A `command` body. Returns the command to execute; `None` when it was answered here:
    /// a duplicate id (answered as before, never executed twice), the rate limit, or a body
    /// that does not parse.
    pub fn on_command(&mut self, body: &[u8], now: Instant, fx: &mut Effects) -> Option<Command> {
        // Size and nesting limits are checked before serde_json sees the body.
        let parsed = protocol::parse_command(body);
        let id = match &parsed {
            Ok(c) => Some(c.id.as_str()),
            Err(e) => e.id.as_deref(),
        };
        if let Some(id) = id {
            if let Some(prev) = self.replies.get(id) {
                log::info!("duplicate command id={id}: not executed again");
                if let Some(reply) = prev.reply.clone() {
                    fx.push(Effect::Send(reply));
                }
                return None;
            }
        }
        // The rate limit comes after the duplicate check (a retry of an executed command is
        // answered as before) and is not remembered (the same id may be retried later).
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
            Ok(cmd) => Some(cmd),
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
                    self.answer(&id, protocol::reply_err(&id, &e.message), fx);
                }
                None
            }
        }
    }

    /// The outcome of command `id`: answered and remembered.
    pub fn finish(&mut self, id: &str, result: Result<(), String>, now: Instant, fx: &mut Effects) {
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
        self.answer(id, reply, fx);
    }

    fn answer(&mut self, id: &str, reply: Message, fx: &mut Effects) {
        self.replies.insert(
            id,
            CachedReply {
                reply: Some(reply.clone()),
            },
        );
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
        self.pending_writes.insert(token, id.to_string());
        self.replies.insert(id, CachedReply { reply: None });
    }

    /// The serial write `token` ended. Returns the command id, if the token was known.
    pub fn write_finished(
        &mut self,
        token: u64,
        result: Result<(), String>,
        now: Instant,
        fx: &mut Effects,
    ) -> Option<String> {
        let id = self.pending_writes.remove(&token)?;
        self.finish(&id, result, now, fx);
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
            c.insert(&format!("c{i}"), CachedReply { reply: None });
        }
        assert!(c.get("c0").is_none());
        assert!(c.get("c4").is_none());
        assert!(c.get("c5").is_some());
        assert_eq!(c.len(), REPLY_CACHE);
    }

    fn sent(fx: &mut Effects) -> Vec<String> {
        fx.drain()
            .into_iter()
            .map(|e| match e {
                Effect::Send(m) => m.body,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
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
