//! The NATS side: a tokio runtime with one async-nats client. It ensures the stream and the
//! key-value bucket exist, publishes what the ROUTER thread hands it, reports each reading's
//! JetStream outcome back, serves `zgate.<gateway>.command` requests (a queue group
//! subscription per gateway connected here, so an unknown or offline gateway gives the
//! requester "no responders" at once) and keeps the bucket `zgate_gateways` current.
//!
//! Every publish is a future in one `FuturesUnordered`: its PubAck is awaited concurrently
//! with every other one (a PubAck's timeout starts when its future is first polled; awaited in
//! turn, lost acks would cost their timeouts one after another), without a task per reading.
//! The outcomes that completed together go to the ROUTER thread as one message: one wake of
//! that thread and one ack per gateway for the lot.

use crate::config::BridgeConfig;
use crate::kv::Bucket;
use crate::messages::{Outcome, ToNats, ToRouter};
use crate::subject;
use async_nats::jetstream::context::{ContextBuilder, PublishErrorKind};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// How long a publish waits for its PubAck before it counts as failed.
pub const PUBACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per reading before its failure is reported (each waits up to [`PUBACK_TIMEOUT`]);
/// the whole stays well below the ROUTER thread's in-flight timeout.
pub const PUBLISH_ATTEMPTS: u32 = 3;
/// The queue group of command subscriptions: one bridge answers each request.
pub const COMMAND_QUEUE: &str = "zgate-bridge";
/// Messages from the ROUTER thread taken per turn of the NATS side's loop.
const RECV_BATCH: usize = 256;
/// Readings published and awaiting their PubAck, at most, over all gateways (the raw
/// ceiling of docs/benchmarks.md is measured with as many). Beyond it the NATS side takes
/// nothing more from the ROUTER thread until PubAcks come back: more in flight would only
/// lengthen JetStream's queue until PubAcks time out, and every timeout is a publish made
/// again (throughput collapsed that way under overload: 3,400 acked/s of 14,800 sent).
/// Readings then wait in the channel ([`TO_NATS_CAPACITY`]); when that is full the ROUTER
/// thread publishes nothing more and acks nothing more, and gateways resend later.
pub const PUBLISH_WINDOW: usize = 1024;
/// Batches of outcomes (and commands) waiting for the ROUTER thread, at most.
pub const TO_ROUTER_CAPACITY: usize = 65_536;
/// Messages waiting for the NATS side, at most.
pub const TO_NATS_CAPACITY: usize = 65_536;

/// Connects to the cluster (retrying: a bridge may start before its cluster).
pub async fn connect(cfg: &BridgeConfig) -> anyhow::Result<async_nats::Client> {
    let mut opts = if cfg.nats.creds_file.is_empty() {
        async_nats::ConnectOptions::new()
    } else {
        async_nats::ConnectOptions::with_credentials_file(&cfg.nats.creds_file).await?
    };
    opts = opts
        .name(format!("zgate-bridge {}", cfg.bridge.id))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(|ev| async move { log::info!("NATS connection event={ev}") });
    let servers: Vec<async_nats::ServerAddr> = cfg
        .nats
        .servers
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    Ok(opts.connect(servers).await?)
}

/// Ensures the stream exists, retrying with backoff (during a Raft election JetStream
/// answers "stream not found" for a stream that exists) whenever `wake` is notified.
async fn ensure_stream(js: jetstream::Context, cfg: BridgeConfig, wake: Arc<Notify>) {
    let config = stream::Config {
        name: cfg.nats.stream.clone(),
        subjects: subject::STREAM_SUBJECTS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        num_replicas: cfg.nats.replicas,
        duplicate_window: Duration::from_secs(cfg.nats.duplicate_window_s),
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let mut first = true;
    loop {
        let mut backoff = Duration::from_millis(100);
        loop {
            match js.get_or_create_stream(config.clone()).await {
                Ok(_) if first => {
                    log::info!(
                        "stream ready stream={} replicas={}",
                        cfg.nats.stream,
                        cfg.nats.replicas
                    );
                    first = false;
                    break;
                }
                Ok(_) => {
                    log::debug!("stream checked stream={}", cfg.nats.stream);
                    break;
                }
                Err(e) => {
                    log::warn!(
                        "stream {} not ready: {e}; retrying in {backoff:?}",
                        cfg.nats.stream
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        wake.notified().await;
        // At most one attempt per second however often publishes report "stream not found".
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs the NATS side until the channel from the ROUTER thread closes.
pub async fn run(
    cfg: BridgeConfig,
    client: async_nats::Client,
    mut rx: mpsc::Receiver<ToNats>,
    to_router: calloop::channel::SyncSender<ToRouter>,
) {
    let max_acks = TO_NATS_CAPACITY;
    let js = ContextBuilder::new()
        .timeout(PUBACK_TIMEOUT)
        .max_ack_inflight(max_acks)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let wake = Arc::new(Notify::new());
    tokio::spawn(ensure_stream(js.clone(), cfg.clone(), wake.clone()));
    let bucket = Bucket::start(js.clone(), cfg.nats.replicas, cfg.bridge.id.clone());
    let mut commands: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut publishing = FuturesUnordered::new();
    let mut batch = Vec::with_capacity(RECV_BATCH);
    loop {
        let room = PUBLISH_WINDOW.saturating_sub(publishing.len());
        let m = tokio::select! {
            Some(first) = publishing.next(), if !publishing.is_empty() => {
                let mut done = vec![first];
                while let Some(Some(o)) = publishing.next().now_or_never() {
                    done.push(o);
                }
                if to_router.try_send(ToRouter::Outcomes(done)).is_err() {
                    log::warn!("outcomes not delivered to the ROUTER thread (queue full); those readings are published again when resent");
                }
                continue;
            }
            n = rx.recv_many(&mut batch, RECV_BATCH.min(room)), if room > 0 => {
                if n == 0 {
                    break;
                }
                batch.drain(..)
            }
        };
        for m in m {
            match m {
                ToNats::Publish {
                    slot,
                    gateway,
                    spool_id,
                    seq,
                    subject,
                    body,
                } => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(
                        "Nats-Msg-Id",
                        subject::msg_id(&gateway, &spool_id, seq).as_str(),
                    );
                    let (js, wake) = (&js, &wake);
                    publishing.push(async move {
                        let ok = publish_reading(js, wake, subject, headers, body).await;
                        if !ok {
                            log::debug!("publish failed gateway={gateway} seq={seq}");
                        }
                        Outcome {
                            slot,
                            spool_id,
                            seq,
                            ok,
                        }
                    });
                }
                ToNats::Event { subject, body } => {
                    let js = js.clone();
                    tokio::spawn(async move {
                        let r = match js.publish(subject.clone(), body).await {
                            Ok(ack) => ack.await.map(|_| ()),
                            Err(e) => Err(e),
                        };
                        if let Err(e) = r {
                            log::debug!("event not stored subject={subject}: {e}");
                        }
                    });
                }
                ToNats::Connected {
                    gateway,
                    version,
                    security,
                    resume_seq,
                } => {
                    if !commands.contains_key(&gateway) {
                        let h = tokio::spawn(serve_commands(
                            client.clone(),
                            gateway.clone(),
                            to_router.clone(),
                        ));
                        commands.insert(gateway.clone(), h);
                    }
                    bucket.connected(&gateway, version, security, resume_seq);
                }
                ToNats::Seen {
                    gateway,
                    resume_seq,
                } => bucket.seen(&gateway, resume_seq),
                ToNats::Disconnected { gateway } => {
                    if let Some(h) = commands.remove(&gateway) {
                        // Dropping the subscriber unsubscribes: requests get "no responders".
                        h.abort();
                    }
                    bucket.disconnected(&gateway);
                }
                ToNats::Respond { reply, body } => {
                    if let Err(e) = client.publish(reply, body).await {
                        log::warn!("command reply not sent: {e}");
                    }
                }
            }
        }
    }
}

/// Publishes one reading and awaits its PubAck; retried (same `Nats-Msg-Id`, so a publish
/// that was stored but whose PubAck was lost comes back as a duplicate) [`PUBLISH_ATTEMPTS`]
/// times with backoff. During a Raft election JetStream answers "stream not found" for about
/// as long as the election lasts; retrying here saves the gateway's `retransmit_s`. True when
/// JetStream confirmed it.
async fn publish_reading(
    js: &jetstream::Context,
    wake: &Notify,
    subject: String,
    headers: async_nats::HeaderMap,
    body: Bytes,
) -> bool {
    let mut backoff = Duration::from_millis(250);
    for attempt in 1..=PUBLISH_ATTEMPTS {
        let r = match js
            .publish_with_headers(subject.clone(), headers.clone(), body.clone())
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match r {
            Ok(_) => return true,
            Err(e) => {
                if e.kind() == PublishErrorKind::StreamNotFound {
                    wake.notify_one();
                }
                log::debug!("publish attempt {attempt} failed subject={subject}: {e}");
            }
        }
        if attempt < PUBLISH_ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    false
}

/// Forwards requests on `zgate.<gateway>.command` to the ROUTER thread.
async fn serve_commands(
    client: async_nats::Client,
    gateway: String,
    to_router: calloop::channel::SyncSender<ToRouter>,
) {
    let subject = subject::gateway_subject(&gateway, "command");
    let mut sub = match client
        .queue_subscribe(subject.clone(), COMMAND_QUEUE.to_string())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot subscribe subject={subject}: {e}");
            return;
        }
    };
    log::debug!("serving commands subject={subject}");
    while let Some(msg) = sub.next().await {
        let reply = msg.reply.map(|r| r.to_string());
        let cmd = ToRouter::Command {
            gateway: gateway.clone(),
            body: msg.payload,
            reply: reply.clone(),
        };
        if to_router.try_send(cmd).is_err() {
            if let Some(reply) = reply {
                let body = Bytes::from(r#"{"ok":false,"error":"bridge busy: command queue full"}"#);
                let _ = client.publish(reply, body).await;
            }
        }
    }
}
