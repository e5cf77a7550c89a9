//! The JetStream side of the benchmark (async-nats on a current-thread tokio runtime): the raw
//! ceiling (one publisher straight into the stream) and the latency consumer.

use crate::fleet::{json_u64, reading_body};
use async_nats::jetstream::{self, consumer, stream};
use futures::stream::{FuturesUnordered, StreamExt};
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn addrs(servers: &[String]) -> Result<Vec<async_nats::ServerAddr>, String> {
    servers
        .iter()
        .map(|s| s.parse().map_err(|e| format!("NATS server {s}: {e}")))
        .collect()
}

async fn connect(servers: &[String]) -> Result<jetstream::Context, String> {
    let client = async_nats::connect(addrs(servers)?)
        .await
        .map_err(|e| format!("NATS connect {servers:?}: {e}"))?;
    Ok(jetstream::new(client))
}

/// Waits until the stream exists (the bridge creates it); returns its replica count.
pub async fn wait_stream(
    servers: &[String],
    name: &str,
    timeout: Duration,
) -> Result<usize, String> {
    let js = connect(servers).await?;
    let t = Instant::now();
    loop {
        match js.get_stream(name).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(|e| e.to_string())?;
                return Ok(info.config.num_replicas);
            }
            Err(e) if t.elapsed() > timeout => {
                return Err(format!("stream {name} not there after {timeout:?}: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Creates the stream as the bridge does when it is missing (`raw` mode only).
pub async fn create_stream(servers: &[String], name: &str, replicas: usize) -> Result<(), String> {
    let js = connect(servers).await?;
    js.get_or_create_stream(stream::Config {
        name: name.into(),
        subjects: vec![
            "zgate.*.reading.>".into(),
            "zgate.*.hello".into(),
            "zgate.*.stats".into(),
        ],
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(3600),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("creating stream {name}: {e}"))?;
    Ok(())
}

/// What the raw publisher measured.
pub struct Raw {
    pub per_s: f64,
    pub errors: u64,
    /// The first error's text.
    pub first_error: Option<String>,
}

/// One publisher, `inflight` PubAcks outstanding at all times (polled concurrently), the
/// loadgen's reading bodies for `gateways` gateways in turn, each with its `Nats-Msg-Id`
/// (`<gateway>:<spool_id>:<seq>`, a spool id of its own so none is a duplicate), for `secs`.
/// Rate: PubAcks per second after the first second.
pub async fn raw_ceiling(
    servers: &[String],
    gateways: usize,
    inflight: usize,
    secs: f64,
    run: u32,
    t0: Instant,
) -> Result<Raw, String> {
    let js = connect(servers).await?;
    let spool = format!("{:032x}", 0xaaaa_0000u64 + run as u64);
    let mut pending = FuturesUnordered::new();
    let mut body = String::with_capacity(256);
    let (mut n, mut acked, mut errors) = (0u64, 0u64, 0u64);
    let mut first_error: Option<String> = None;
    let mut failed = |e: String, errors: &mut u64| {
        *errors += 1;
        first_error.get_or_insert(e);
    };
    let start = Instant::now();
    let mut mark: Option<(Instant, u64)> = None;
    while start.elapsed().as_secs_f64() < secs {
        while pending.len() < inflight {
            let gw = format!("lg-{:05}", (n as usize % gateways) + 1);
            let seq = n / gateways as u64 + 1;
            reading_body(&mut body, &gw, seq, t0.elapsed().as_nanos() as u64);
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("{gw}:{spool}:{seq}").as_str());
            let subject = format!("zgate.{gw}.reading.s");
            match js
                .publish_with_headers(subject, h, body.clone().into())
                .await
            {
                Ok(f) => pending.push(f.into_future()),
                Err(e) => failed(e.to_string(), &mut errors),
            }
            n += 1;
        }
        match pending.next().await {
            Some(Ok(_)) => acked += 1,
            Some(Err(e)) => failed(e.to_string(), &mut errors),
            None => {}
        }
        if mark.is_none() && start.elapsed() >= Duration::from_secs(1) {
            mark = Some((Instant::now(), acked));
        }
    }
    let (m_t, m_acked) = mark.unwrap_or((start, 0));
    let per_s = (acked - m_acked) as f64 / m_t.elapsed().as_secs_f64().max(1e-3);
    // Let the rest complete so the next run starts on a quiet stream.
    while let Some(r) = pending.next().await {
        if let Err(e) = r {
            failed(e.to_string(), &mut errors);
        }
    }
    Ok(Raw {
        per_s,
        errors,
        first_error,
    })
}

/// The latency consumer: an ordered push consumer on the stream's readings from now on. While
/// `record` is set it stores, per reading received, the time since its `values.t_ns` (ns);
/// it stops when `stop` is set.
pub struct Latency {
    pub record: Arc<AtomicBool>,
    pub stop: Arc<AtomicBool>,
    pub samples: Arc<Mutex<Vec<u64>>>,
    pub ready: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Latency {
    pub fn start(servers: Vec<String>, stream_name: String, t0: Instant) -> Latency {
        let record = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (r, s, rd, sm) = (record.clone(), stop.clone(), ready.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            runtime().block_on(async move {
                let client = async_nats::connect(addrs(&servers)?)
                    .await
                    .map_err(|e| e.to_string())?;
                let js = jetstream::new(client.clone());
                let st: stream::Stream = js
                    .get_stream(&stream_name)
                    .await
                    .map_err(|e| e.to_string())?;
                let c = st
                    .create_consumer(consumer::push::OrderedConfig {
                        deliver_subject: client.new_inbox(),
                        filter_subject: "zgate.*.reading.>".into(),
                        deliver_policy: consumer::DeliverPolicy::New,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("latency consumer: {e}"))?;
                let mut msgs = c.messages().await.map_err(|e| e.to_string())?;
                rd.store(true, Ordering::SeqCst);
                while !s.load(Ordering::Relaxed) {
                    let m =
                        match tokio::time::timeout(Duration::from_millis(200), msgs.next()).await {
                            Ok(Some(Ok(m))) => m,
                            Ok(Some(Err(_))) | Err(_) => continue,
                            Ok(None) => break,
                        };
                    let now = t0.elapsed().as_nanos() as u64;
                    if r.load(Ordering::Relaxed) {
                        if let Some(t) = json_u64(&m.payload, b"\"t_ns\":") {
                            sm.lock().unwrap().push(now.saturating_sub(t));
                        }
                    }
                }
                Ok(())
            })
        });
        Latency {
            record,
            stop,
            samples,
            ready,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> Result<Vec<u64>, String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| "latency consumer panicked".to_string())??;
        }
        let v = std::mem::take(&mut *self.samples.lock().unwrap());
        Ok(v)
    }
}
