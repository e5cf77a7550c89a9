//! Counters and the `stats` message.

use super::commands::Commands;
use super::delivery::SpoolView;
use super::link::Link;
use super::ports::PortState;
use crate::protocol::{self, Message};
use crate::spool::SpoolStats;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// Counters kept by the interpreter (the state machines keep their own: retransmits in
/// `Delivery`, connects in `Link`, command outcomes in `Commands`).
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Readings stored in the spool.
    pub readings: u64,
    /// Readings acked by the backend.
    pub acked: u64,
    /// Readings dropped by the spool's `when_full` policy.
    pub dropped: u64,
    /// Spool operations that failed.
    pub spool_errors: u64,
    /// Control messages (replies, stats) dropped because the outbox was full.
    pub dropped_control: u64,
    /// Acks refused because they were above the highest seq sent on the connection.
    pub bad_acks: u64,
}

/// Everything one `stats` message reports.
pub struct StatsInput<'a> {
    /// `gateway.id`.
    pub gateway: &'a str,
    /// Time since start.
    pub uptime: Duration,
    /// Messages queued in the outbox, and its bound.
    pub outbox: (usize, usize),
    /// Messages handed to libzmq.
    pub sent: u64,
    /// The interpreter's counters.
    pub counters: &'a Counters,
    /// Times unacked readings were sent again.
    pub retransmits: u64,
    /// The link's counters.
    pub link: &'a Link,
    /// The command counters.
    pub commands: &'a Commands,
    /// The spool's counters and cursor.
    pub spool: SpoolStats,
    /// The spool's cursor.
    pub view: SpoolView,
    /// Serial ports by name.
    pub ports: &'a BTreeMap<String, PortState>,
    /// Modbus poll counters: bus → device → counters.
    pub modbus: Map<String, Value>,
    /// Wall-clock time now, in ms since the epoch.
    pub now_ms: u64,
    /// `clock`, `boot_id`, `mono_ms`, merged into the top level.
    pub clock: Value,
    /// Readings not sent, per reading source (report on change).
    pub suppressed: BTreeMap<String, u64>,
}

/// Builds the `stats` message.
pub fn stats_message(s: &StatsInput<'_>) -> Message {
    let ports: Map<String, Value> = s
        .ports
        .iter()
        .map(|(name, p)| {
            (
                name.clone(),
                json!({
                    "connected": p.connected,
                    "bad_lines": p.bad_lines,
                    "overlong_lines": p.overlong_lines,
                    "disconnects": p.disconnects,
                }),
            )
        })
        .collect();
    let bad_lines: Map<String, Value> = s
        .ports
        .iter()
        .map(|(n, p)| (n.clone(), json!(p.bad_lines)))
        .collect();
    let c = s.counters;
    let sp = &s.spool;
    let mut body = json!({
        "gateway": s.gateway,
        "time": protocol::now_rfc3339(),
        "uptime_s": s.uptime.as_secs(),
        "outbox": s.outbox.0,
        "outbox_max": s.outbox.1,
        "resume_seq": s.view.resume_seq(),
        "counters": {
            "readings": c.readings,
            "sent": s.sent,
            "acked": c.acked,
            "dropped": c.dropped,
            "bad_lines": bad_lines,
            "commands_ok": s.commands.ok,
            "commands_failed": s.commands.failed,
            "reconnects": s.link.reconnects,
            "retransmits": s.retransmits,
            "bad_messages": s.commands.bad_messages,
            "dropped_control": c.dropped_control,
            "spool_errors": c.spool_errors,
            "unheard_connections": s.link.unheard_connections,
            "bad_acks": c.bad_acks,
            "suppressed": s.suppressed,
        },
        "spool": {
            "spool_id": sp.spool_id,
            "bytes": sp.bytes,
            "readings": sp.readings,
            "oldest_unacked_age_s": sp.oldest_unacked_ms.map(|t| s.now_ms.saturating_sub(t) / 1000),
            "dropped_oldest": sp.dropped_oldest,
            "dropped_newest": sp.dropped_newest,
            "next_seq": sp.next_seq,
            "acked": sp.acked,
            "disk_full": sp.disk_full,
            "not_stored": sp.not_stored,
            "disk_avail_bytes": sp.disk_avail_bytes,
            "disk_stalled": sp.disk_stalled,
            "disk_stalls": sp.disk_stalls,
            "corrupt_records": sp.corrupt_records,
        },
        "serial": ports,
        "modbus": s.modbus,
    });
    if let (Some(b), Some(c)) = (body.as_object_mut(), s.clock.as_object()) {
        b.extend(c.clone());
    }
    Message::new(protocol::KIND_STATS, &body)
}
