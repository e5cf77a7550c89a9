//! The key-value bucket `zgate_gateways`: one key per gateway (its subject token), value
//! `{bridge, connected, since, last_seen, version, security, resume_seq}`, put on hello,
//! stats and disconnect. Updates are best effort (NATS may be down): each is one task; the
//! next event writes the whole value again. A disconnect is written only while the entry
//! still names this bridge, so a gateway that moved to another bridge stays "connected".

use crate::subject;
use async_nats::jetstream::{self, kv};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::mpsc;

/// The bucket's name.
pub const BUCKET: &str = "zgate_gateways";

/// One gateway's value in the bucket.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayEntry {
    /// The bridge holding (or that last held) its connection.
    pub bridge: String,
    /// Connected to that bridge now.
    pub connected: bool,
    /// When the current (or last) connection said hello, RFC 3339.
    pub since: String,
    /// When the gateway was last heard (hello or stats), RFC 3339.
    pub last_seen: String,
    /// `version` of its hello.
    pub version: String,
    /// `security` of its hello.
    pub security: String,
    /// Its latest `resume_seq` (hello or stats).
    pub resume_seq: Option<u64>,
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Writes waiting for the writer task, at most (a full queue drops the write: the next
/// hello, stats or disconnect writes the whole value again).
pub const WRITE_QUEUE: usize = 4096;

struct Write {
    gateway: String,
    entry: GatewayEntry,
    only_if_ours: bool,
}

/// The bucket and what this bridge last wrote per gateway. One writer task applies the
/// writes in order (a connect and the disconnect after it never swap).
#[derive(Clone)]
pub struct Bucket {
    bridge: String,
    entries: Arc<Mutex<HashMap<String, GatewayEntry>>>,
    tx: mpsc::Sender<Write>,
}

/// Opens the bucket, creating it when missing. The bucket's stream is created directly with
/// the settings async-nats gives a bucket of history 1 (its `create_key_value` first queries
/// account limits in a form nats-server 2.9 does not answer).
async fn open(js: &jetstream::Context, replicas: usize) -> Option<kv::Store> {
    if let Ok(s) = js.get_key_value(BUCKET).await {
        return Some(s);
    }
    let config = jetstream::stream::Config {
        name: format!("KV_{BUCKET}"),
        subjects: vec![format!("$KV.{BUCKET}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: replicas,
        discard: jetstream::stream::DiscardPolicy::New,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    if let Err(e) = js.get_or_create_stream(config).await {
        log::warn!("bucket {BUCKET} not available: {e}");
        return None;
    }
    match js.get_key_value(BUCKET).await {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("bucket {BUCKET} not available: {e}");
            None
        }
    }
}

async fn writer(
    js: jetstream::Context,
    replicas: usize,
    bridge: String,
    mut rx: mpsc::Receiver<Write>,
) {
    let mut store = open(&js, replicas).await;
    while let Some(w) = rx.recv().await {
        if store.is_none() {
            store = open(&js, replicas).await;
        }
        let Some(s) = &store else { continue };
        let key = subject::token(&w.gateway);
        let value: bytes::Bytes = serde_json::to_vec(&w.entry).unwrap_or_default().into();
        if w.only_if_ours {
            // Another bridge may hold the gateway by now: update only our own entry.
            let cur = match s.entry(key.clone()).await {
                Ok(Some(cur)) => cur,
                Ok(None) => continue,
                Err(e) => {
                    log::warn!("bucket read key={key}: {e}");
                    continue;
                }
            };
            let holder = serde_json::from_slice::<serde_json::Value>(&cur.value)
                .ok()
                .and_then(|v| v.get("bridge").and_then(|b| b.as_str()).map(str::to_string));
            if holder.as_deref() != Some(bridge.as_str()) {
                log::debug!("bucket key={key} held by {holder:?}: disconnect not written");
                continue;
            }
            if let Err(e) = s.update(key.clone(), value, cur.revision).await {
                log::warn!("bucket update key={key}: {e}");
            }
        } else if let Err(e) = s.put(key.clone(), value).await {
            log::warn!("bucket put key={key}: {e}");
        }
    }
}

impl Bucket {
    /// Starts the writer task (the bucket is created, when missing, on first write).
    pub fn start(js: jetstream::Context, replicas: usize, bridge: String) -> Bucket {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(writer(js, replicas, bridge.clone(), rx));
        Bucket {
            bridge,
            entries: Arc::default(),
            tx,
        }
    }

    fn write(&self, gateway: &str, only_if_ours: bool) {
        let Some(entry) = self.entries.lock().unwrap().get(gateway).cloned() else {
            return;
        };
        let w = Write {
            gateway: gateway.to_string(),
            entry,
            only_if_ours,
        };
        if self.tx.try_send(w).is_err() {
            log::warn!("bucket write queue full: gateway={gateway} not written now");
        }
    }

    /// A hello.
    pub fn connected(
        &self,
        gateway: &str,
        version: String,
        security: String,
        resume_seq: Option<u64>,
    ) {
        let t = now();
        let e = GatewayEntry {
            bridge: self.bridge.clone(),
            connected: true,
            since: t.clone(),
            last_seen: t,
            version,
            security,
            resume_seq,
        };
        self.entries.lock().unwrap().insert(gateway.to_string(), e);
        self.write(gateway, false);
    }

    /// A stats message.
    pub fn seen(&self, gateway: &str, resume_seq: Option<u64>) {
        {
            let mut m = self.entries.lock().unwrap();
            let Some(e) = m.get_mut(gateway) else { return };
            e.last_seen = now();
            if resume_seq.is_some() {
                e.resume_seq = resume_seq;
            }
        }
        self.write(gateway, false);
    }

    /// The gateway's connection to this bridge is gone.
    pub fn disconnected(&self, gateway: &str) {
        {
            let mut m = self.entries.lock().unwrap();
            let Some(e) = m.get_mut(gateway) else { return };
            e.connected = false;
        }
        self.write(gateway, true);
    }
}
