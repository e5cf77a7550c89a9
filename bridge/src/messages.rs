//! What the ROUTER thread and the NATS side tell each other, over bounded channels.

use bytes::Bytes;
use std::sync::Arc;

/// ROUTER thread → NATS side (a bounded tokio channel; the ROUTER thread never waits on it:
/// a reading that finds it full is not published and not acked, the gateway resends it).
#[derive(Debug)]
pub enum ToNats {
    /// Publish a reading to JetStream and report its [`ToRouter::Outcome`].
    Publish {
        /// The gateway's slot on the ROUTER thread (handed back with the outcome).
        slot: usize,
        /// Gateway id (the authenticated one).
        gateway: Arc<str>,
        /// The spool the seq belongs to.
        spool_id: Arc<str>,
        /// The reading's seq.
        seq: u64,
        /// `zgate.<gateway>.reading.<source>`.
        subject: String,
        /// The body exactly as the gateway sent it.
        body: Bytes,
    },
    /// Publish a hello or stats body into the stream (best effort: not spooled anywhere).
    Event {
        /// `zgate.<gateway>.hello` or `.stats`.
        subject: String,
        /// The body as received.
        body: Bytes,
    },
    /// A gateway said hello on this bridge: serve its commands, record it in the bucket.
    Connected {
        /// Gateway id.
        gateway: String,
        /// `version` of its hello.
        version: String,
        /// `security` of its hello.
        security: String,
        /// `resume_seq` of its hello.
        resume_seq: Option<u64>,
    },
    /// A gateway's stats arrived (bucket: last_seen, resume_seq).
    Seen {
        /// Gateway id.
        gateway: String,
        /// `resume_seq` of its stats.
        resume_seq: Option<u64>,
    },
    /// A gateway's connection to this bridge is gone: stop serving its commands.
    Disconnected {
        /// Gateway id.
        gateway: String,
    },
    /// Answer a command request.
    Respond {
        /// The request's reply subject.
        reply: String,
        /// The gateway's reply body (or the bridge's error).
        body: Bytes,
    },
}

/// JetStream's answer to a [`ToNats::Publish`].
#[derive(Debug)]
pub struct Outcome {
    /// The gateway's slot, as in the publish.
    pub slot: usize,
    /// The spool the seq belongs to.
    pub spool_id: Arc<str>,
    /// The reading's seq.
    pub seq: u64,
    /// Confirmed: a PubAck (duplicate included).
    pub ok: bool,
}

/// NATS side → ROUTER thread (a bounded calloop channel).
#[derive(Debug)]
pub enum ToRouter {
    /// Outcomes of publishes, as many as completed together (one wake of the ROUTER thread
    /// and one ack per gateway for the lot).
    Outcomes(Vec<Outcome>),
    /// A command request for a gateway.
    Command {
        /// Gateway id.
        gateway: String,
        /// The command body.
        body: Bytes,
        /// Where the reply goes (none: fire and forget).
        reply: Option<String>,
    },
}
