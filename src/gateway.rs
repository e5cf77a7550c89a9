//! The gateway: one calloop loop that owns the backend socket, the serial ports, the GPIO
//! lines and the timers, and the state that ties them together.
//!
//! Flow: serial lines and GPIO edges become `reading` messages in the outbox; the
//! [`ZmqSource`] sends them when the socket is writable. Commands from the backend are
//! executed on the loop thread (GPIO writes, timers for pulses, buffered serial writes) and
//! answered with a `reply` once they took effect. Nothing here blocks: every I/O is
//! non-blocking and every queue is bounded.

use crate::config::{Config, Edge as EdgeSetting, LineFormat};
use crate::hw::{GpioBackend, HwError, InputChange, Level};
use crate::protocol::{self, Action, Command, Message, Values};
use crate::sd_notify;
use crate::security;
use crate::sources::serial::{SerialEvent, SerialHandle, SerialSource, WriteError};
use crate::sources::zmq::{OutboxHandle, ZmqEvent, ZmqSource};
use crate::spool::{Appended, Spool, SpoolError};
use calloop::signals::{Signal, Signals};
use calloop::timer::{TimeoutAction, Timer};
use calloop::{EventLoop, LoopHandle, RegistrationToken};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Errors that stop the gateway from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("ZeroMQ error while {what}: {source}")]
    Zmq {
        what: &'static str,
        #[source]
        source: zmq::Error,
    },
    #[error(transparent)]
    Hw(#[from] HwError),
    #[error("cannot open serial port {name}: {source}")]
    Serial {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("event loop error: {0}")]
    Loop(String),
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("link security: {0}")]
    Security(String),
}

fn zerr(what: &'static str) -> impl FnOnce(zmq::Error) -> GatewayError {
    move |source| GatewayError::Zmq { what, source }
}

fn lerr<E: std::fmt::Display>(e: E) -> GatewayError {
    GatewayError::Loop(e.to_string())
}

const CONN_CHECK_MIN: Duration = Duration::from_secs(1);
const CONN_CHECK_MAX: Duration = Duration::from_secs(30);

/// How many recent command ids are remembered for duplicate detection.
pub const REPLY_CACHE: usize = 1024;

/// A token bucket: a burst of `capacity`, refilled at `rate` per second.
#[derive(Debug)]
pub struct RateLimiter {
    capacity: f64,
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(per_second: u32, now: Instant) -> RateLimiter {
        RateLimiter::with_burst(per_second, per_second, now)
    }

    /// `per_second` tokens per second, at most `burst` saved up (both at least 1).
    pub fn with_burst(per_second: u32, burst: u32, now: Instant) -> RateLimiter {
        let capacity = f64::from(burst.max(1));
        RateLimiter {
            capacity,
            rate: f64::from(per_second.max(1)),
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
    }

    /// Whole tokens available now.
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.tokens as usize
    }

    /// Spends `n` tokens (at most what [`RateLimiter::available`] returned).
    pub fn take(&mut self, n: usize) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }

    /// How long until `n` tokens (capped at the burst) are available.
    pub fn time_until(&self, n: usize) -> Duration {
        let want = (n as f64).min(self.capacity);
        Duration::from_secs_f64(((want - self.tokens) / self.rate).max(0.0))
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Repeat period of the "readings faster than replay_max_per_s" warning.
const PACE_WARN_EVERY: Duration = Duration::from_secs(3600);

/// Readings moved from the spool into the outbox per step (and per paced-replay timer).
const REPLAY_BATCH: usize = 256;

/// Allows a burst of log lines per minute for one kind of problem, then summarises.
#[derive(Debug)]
pub struct LogLimiter {
    window: Instant,
    count: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter {
            window: Instant::now(),
            count: 0,
            suppressed: 0,
        }
    }
}

impl LogLimiter {
    const BURST: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(60);

    /// True when a line may be logged now. After a suppressed stretch, the next allowed line
    /// is preceded by a summary.
    pub fn allow(&mut self, what: &str) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window) >= Self::WINDOW {
            if self.suppressed > 0 {
                log::warn!(
                    "{what}: suppressed={} similar messages in the last minute",
                    self.suppressed
                );
            }
            self.window = now;
            self.count = 0;
            self.suppressed = 0;
        }
        if self.count < Self::BURST {
            self.count += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// Replies to the last [`REPLY_CACHE`] command ids; `None` while the command is in progress.
#[derive(Default)]
struct ReplyCache {
    map: HashMap<String, Option<Message>>,
    order: VecDeque<String>,
}

impl ReplyCache {
    fn get(&self, id: &str) -> Option<&Option<Message>> {
        self.map.get(id)
    }
    fn insert(&mut self, id: &str, reply: Option<Message>) {
        if self.map.insert(id.to_string(), reply).is_none() {
            self.order.push_back(id.to_string());
            if self.order.len() > REPLY_CACHE {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

struct InputState {
    name: String,
    edge: EdgeSetting,
    debounce: Duration,
    level: Level,
    changed_at: Option<Instant>,
    recheck: Option<RegistrationToken>,
}

struct OutputState {
    pin: u8,
    level: Level,
    max_pulse_ms: u64,
    /// Level to restore and the timer that restores it, while a pulse runs.
    pulse: Option<(Level, RegistrationToken)>,
}

struct PortState {
    handle: SerialHandle,
    format: LineFormat,
    line_ending: String,
    allow_binary: bool,
    bad_lines: u64,
    overlong_lines: u64,
    disconnects: u64,
    connected: bool,
    limiter: LogLimiter,
}

/// Counters reported in `stats`.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub readings: u64,
    pub acked: u64,
    pub dropped: u64,
    pub retransmits: u64,
    pub spool_errors: u64,
    pub commands_ok: u64,
    pub commands_failed: u64,
    pub connects: u64,
    pub reconnects: u64,
    pub bad_messages: u64,
    pub dropped_control: u64,
}

/// Everything the loop's callbacks share.
pub struct Gateway {
    cfg: Config,
    handle: LoopHandle<'static, Gateway>,
    outbox: OutboxHandle,
    zmq_token: RegistrationToken,
    gpio: Box<dyn GpioBackend>,
    inputs: HashMap<u8, InputState>,
    outputs: HashMap<String, OutputState>,
    ports: BTreeMap<String, PortState>,
    /// Reading sources removed on shutdown.
    reader_tokens: Vec<RegistrationToken>,
    pending_writes: HashMap<u64, String>,
    next_write_token: u64,
    replies: ReplyCache,
    spool: Spool,
    /// The next seq to move from the spool into the outbox.
    next_send: u64,
    /// A one-shot spool tick (fsync / ack persistence) is scheduled.
    tick_armed: bool,
    /// `[spool] replay_max_per_s`: paces readings read back from the spool (None: no limit).
    replay: Option<RateLimiter>,
    /// A one-shot timer will continue a paced replay.
    replay_armed: bool,
    /// Start of the current stats interval and `counters.readings` then (reading rate).
    ingest_mark: (Instant, u64),
    /// When the "readings faster than replay_max_per_s" warning was last logged.
    pace_warned: Option<Instant>,
    /// When the ack last advanced, readings were last rewound, or a reading was queued while
    /// none was outstanding: the start of the `retransmit_s` wait.
    ack_progress: Instant,
    command_rate: RateLimiter,
    pub counters: Counters,
    started: Instant,
    shutdown_deadline: Option<Instant>,
    handshake_failures: LogLimiter,
    disconnects: LogLimiter,
    /// Delay of the next connection check (see `arm_connection_check`); doubles up to 30 s
    /// while no handshake succeeds.
    conn_check_delay: Duration,
    /// The pending one-shot connection check, if any.
    conn_check: Option<RegistrationToken>,
    command_errors: LogLimiter,
    drops: LogLimiter,
    // Last field: the context outlives the socket inside the loop's ZmqSource.
    _ctx: zmq::Context,
}

/// Builds the DEALER socket that dials out to the backend, with CURVE when configured
/// (not yet connected: [`ZmqSource::connect`] connects it once the monitor is attached).
pub fn backend_socket(ctx: &zmq::Context, cfg: &Config) -> Result<zmq::Socket, GatewayError> {
    let b = &cfg.backend;
    // The config parser enforces the endpoint policy; checked again here for callers that
    // build a Config by hand.
    if !b.curve() && !b.insecure && !security::endpoint_is_local(&b.endpoint) {
        return Err(GatewayError::Security(format!(
            "key backend.endpoint: {} is not loopback and the link is not encrypted: set \
             backend.server_public_key and backend.secret_key_file, or backend.insecure = true",
            b.endpoint
        )));
    }
    let s = ctx
        .socket(zmq::DEALER)
        .map_err(zerr("creating the socket"))?;
    if let (Some(server), Some(secret_file)) = (&b.server_public_key, &b.secret_key_file) {
        security::require_curve().map_err(GatewayError::Security)?;
        let server = security::z85_decode_key(server)
            .map_err(|e| GatewayError::Security(format!("backend.server_public_key: {e}")))?;
        let pair = security::load_secret_key(secret_file).map_err(GatewayError::Security)?;
        s.set_curve_serverkey(&server)
            .map_err(zerr("setting ZMQ_CURVE_SERVERKEY"))?;
        s.set_curve_publickey(&pair.public_bytes())
            .map_err(zerr("setting ZMQ_CURVE_PUBLICKEY"))?;
        s.set_curve_secretkey(&pair.secret_bytes())
            .map_err(zerr("setting ZMQ_CURVE_SECRETKEY"))?;
        log::info!(
            "CURVE on: gateway public key {} (this is what the backend's allow list needs, as {}.pub)",
            pair.public,
            cfg.gateway.id
        );
        if b.insecure {
            log::warn!("backend.insecure = true has no effect: CURVE is configured");
        }
    } else if b.insecure_link() {
        log::warn!(
            "INSECURE: backend.insecure = true: the link to {} is plaintext and \
             unauthenticated; anyone on the network path can read and forge readings and \
             commands (see docs/security.md)",
            b.endpoint
        );
    }
    s.set_identity(cfg.gateway.id.as_bytes())
        .map_err(zerr("setting the routing id"))?;
    // Queue only to completed connections: while the backend is away, messages wait in our
    // bounded outbox (and later the spool), not in libzmq's pipes.
    s.set_immediate(true)
        .map_err(zerr("setting ZMQ_IMMEDIATE"))?;
    s.set_sndhwm(1000).map_err(zerr("setting ZMQ_SNDHWM"))?;
    s.set_linger(0).map_err(zerr("setting ZMQ_LINGER"))?;
    s.set_reconnect_ivl(100)
        .map_err(zerr("setting ZMQ_RECONNECT_IVL"))?;
    s.set_reconnect_ivl_max(5000)
        .map_err(zerr("setting ZMQ_RECONNECT_IVL_MAX"))?;
    s.set_maxmsgsize(b.max_msg_size)
        .map_err(zerr("setting ZMQ_MAXMSGSIZE"))?;
    s.set_heartbeat_ivl(10_000)
        .map_err(zerr("setting ZMQ_HEARTBEAT_IVL"))?;
    s.set_heartbeat_timeout(30_000)
        .map_err(zerr("setting ZMQ_HEARTBEAT_TIMEOUT"))?;
    Ok(s)
}

impl Gateway {
    /// Sets up every source in `event_loop` and returns the loop's shared state.
    pub fn new(
        cfg: Config,
        event_loop: &EventLoop<'static, Gateway>,
    ) -> Result<Gateway, GatewayError> {
        let handle = event_loop.handle();
        // First, before any thread exists (libzmq's I/O threads, rppal's interrupt threads):
        // Signals blocks SIGINT/SIGTERM in this thread, and threads inherit the mask.
        let signals = Signals::new(&[Signal::SIGINT, Signal::SIGTERM]).map_err(lerr)?;
        handle
            .insert_source(signals, |event, _, gw: &mut Gateway| {
                log::info!("signal received signal={:?}: shutting down", event.signal());
                gw.begin_shutdown();
            })
            .map_err(lerr)?;

        let ctx = zmq::Context::new();
        let socket = backend_socket(&ctx, &cfg)?;
        let mut zsource = ZmqSource::new(&ctx, socket, cfg.backend.outbox_max)
            .map_err(zerr("creating the socket monitor"))?;
        zsource
            .connect(&cfg.backend.endpoint)
            .map_err(zerr("connecting to the backend endpoint"))?;
        let outbox = zsource.handle();
        let zmq_token = handle
            .insert_source(zsource, |event, _, gw: &mut Gateway| gw.on_zmq(event))
            .map_err(lerr)?;

        let spool_dir = cfg.gateway.data_dir.join("spool");
        // Spool::open logs what it recovered (segments, records, discarded bytes, next seq).
        let (spool, _recovery) = Spool::open(&spool_dir, cfg.spool.clone())?;

        let crate::sources::gpio::OpenGpio {
            backend: gpio,
            events: gpio_events,
            levels,
        } = crate::sources::gpio::open(&cfg.gpio)?;
        let mut reader_tokens = Vec::new();
        reader_tokens.push(
            handle
                .insert_source(gpio_events, |edge, _, gw: &mut Gateway| gw.on_edge(edge))
                .map_err(lerr)?,
        );
        let inputs = cfg
            .gpio
            .input
            .iter()
            .map(|i| {
                (
                    i.pin,
                    InputState {
                        name: i.name.clone(),
                        edge: i.edge,
                        debounce: Duration::from_millis(i.debounce_ms),
                        level: levels[&i.pin],
                        changed_at: None,
                        recheck: None,
                    },
                )
            })
            .collect::<HashMap<_, _>>();
        let outputs = cfg
            .gpio
            .output
            .iter()
            .map(|o| {
                (
                    o.name.clone(),
                    OutputState {
                        pin: o.pin,
                        level: levels[&o.pin],
                        max_pulse_ms: o.max_pulse_ms,
                        pulse: None,
                    },
                )
            })
            .collect();

        let mut ports = BTreeMap::new();
        for sc in &cfg.serial {
            let source = SerialSource::new(&sc.name, &sc.path, sc.baud).map_err(|source| {
                GatewayError::Serial {
                    name: sc.name.clone(),
                    source,
                }
            })?;
            let port_handle = source.handle();
            let name = sc.name.clone();
            reader_tokens.push(
                handle
                    .insert_source(source, move |event, _, gw: &mut Gateway| {
                        gw.on_serial(&name, event)
                    })
                    .map_err(lerr)?,
            );
            ports.insert(
                sc.name.clone(),
                PortState {
                    handle: port_handle,
                    format: sc.format,
                    line_ending: sc.line_ending.clone(),
                    allow_binary: sc.allow_binary,
                    bad_lines: 0,
                    overlong_lines: 0,
                    disconnects: 0,
                    connected: false,
                    limiter: LogLimiter::default(),
                },
            );
        }

        let retransmit = Duration::from_secs(cfg.spool.retransmit_s);
        handle
            .insert_source(
                Timer::from_duration(retransmit),
                move |_, _, gw: &mut Gateway| {
                    gw.check_retransmit();
                    TimeoutAction::ToDuration(retransmit)
                },
            )
            .map_err(lerr)?;

        let interval = Duration::from_secs(cfg.gateway.stats_interval_s);
        handle
            .insert_source(
                Timer::from_duration(interval),
                move |_, _, gw: &mut Gateway| {
                    gw.send_stats();
                    gw.check_replay_pace();
                    TimeoutAction::ToDuration(interval)
                },
            )
            .map_err(lerr)?;

        let max_per_s = cfg.commands.max_per_s;
        // Burst: a tenth of a second's worth (at least one batch, or the rate if smaller).
        let replay = match cfg.spool.replay_max_per_s {
            0 => None,
            rate => Some(RateLimiter::with_burst(
                rate,
                (rate / 10).max(rate.min(REPLAY_BATCH as u32)),
                Instant::now(),
            )),
        };
        log::info!(
            "gateway starting id={} endpoint={} security={} inputs={} outputs={} serial={} gpio={:?}",
            cfg.gateway.id,
            cfg.backend.endpoint,
            if cfg.backend.curve() { "curve" } else { "none" },
            cfg.gpio.input.len(),
            cfg.gpio.output.len(),
            cfg.serial.len(),
            cfg.gpio.backend
        );
        let mut gw = Gateway {
            cfg,
            handle,
            outbox,
            zmq_token,
            gpio,
            inputs,
            outputs,
            ports,
            reader_tokens,
            pending_writes: HashMap::new(),
            next_write_token: 1,
            replies: ReplyCache::default(),
            next_send: spool.first_unacked().unwrap_or(spool.next_seq()),
            spool,
            tick_armed: false,
            replay,
            replay_armed: false,
            ingest_mark: (Instant::now(), 0),
            pace_warned: None,
            ack_progress: Instant::now(),
            command_rate: RateLimiter::new(max_per_s, Instant::now()),
            counters: Counters::default(),
            started: Instant::now(),
            shutdown_deadline: None,
            handshake_failures: LogLimiter::default(),
            disconnects: LogLimiter::default(),
            conn_check_delay: CONN_CHECK_MIN,
            conn_check: None,
            command_errors: LogLimiter::default(),
            drops: LogLimiter::default(),
            _ctx: ctx,
        };
        // Until the first handshake is reported (see `arm_connection_check`).
        gw.arm_connection_check();
        Ok(gw)
    }

    /// Runs until SIGINT/SIGTERM and the shutdown flush are done.
    pub fn run(cfg: Config) -> Result<(), GatewayError> {
        let mut event_loop: EventLoop<'static, Gateway> = EventLoop::try_new().map_err(lerr)?;
        let mut gw = Gateway::new(cfg, &event_loop)?;
        // Under systemd (Type=notify): ready once every source is set up, and a watchdog ping
        // from a loop timer, so a stuck loop gets the service restarted.
        if let Err(e) = sd_notify::ready() {
            log::warn!("sd_notify READY=1 failed: {e}");
        }
        if let Some(timeout) = sd_notify::watchdog_interval() {
            let period = sd_notify::ping_period(timeout);
            log::info!(
                "systemd watchdog timeout_ms={} ping_ms={}",
                timeout.as_millis(),
                period.as_millis()
            );
            event_loop
                .handle()
                .insert_source(Timer::immediate(), move |_, _, _: &mut Gateway| {
                    if let Err(e) = sd_notify::watchdog() {
                        log::warn!("sd_notify WATCHDOG=1 failed: {e}");
                    }
                    TimeoutAction::ToDuration(period)
                })
                .map_err(lerr)?;
        }
        let signal = event_loop.get_signal();
        event_loop
            .run(None, &mut gw, |gw| {
                if gw.finished() {
                    signal.stop();
                }
            })
            .map_err(lerr)?;
        gw.finish();
        Ok(())
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn outbox(&self) -> &OutboxHandle {
        &self.outbox
    }

    /// True once shutdown was requested and the outbox is flushed or the flush time is up.
    pub fn finished(&self) -> bool {
        match self.shutdown_deadline {
            Some(deadline) => self.outbox.is_empty() || Instant::now() >= deadline,
            None => false,
        }
    }

    /// Stops reading sensors and starts the bounded flush of the outbox.
    pub fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        let flush = Duration::from_millis(self.cfg.backend.shutdown_flush_ms);
        self.shutdown_deadline = Some(Instant::now() + flush);
        if let Err(e) = sd_notify::stopping() {
            log::warn!("sd_notify STOPPING=1 failed: {e}");
        }
        for token in self.reader_tokens.drain(..) {
            self.handle.remove(token);
        }
        // Wake the loop at the deadline even if nothing else happens.
        if let Err(e) = self
            .handle
            .insert_source(Timer::from_duration(flush), |_, _, _| TimeoutAction::Drop)
        {
            log::error!("cannot arm the shutdown timer: {e}");
        }
        log::info!(
            "shutdown: flushing outbox queued={} for up to {} ms",
            self.outbox.len(),
            flush.as_millis()
        );
    }

    /// Logs what is left and lets libzmq hand queued frames to the kernel before exit.
    pub fn finish(&mut self) {
        let left = self.outbox.len();
        if left > 0 {
            log::warn!("shutdown: messages not delivered count={left}");
        }
        // Frames already accepted by libzmq may use what is left of the flush time (at least
        // a moment) to reach the wire; closing the socket does not wait, the process exit does.
        let left_ms = self.shutdown_deadline.map_or(0, |d| {
            d.saturating_duration_since(Instant::now()).as_millis()
        });
        self.outbox
            .set_close_linger(left_ms.min(i32::MAX as u128) as i32);
        self.handle.remove(self.zmq_token);
        if let Err(e) = self.spool.flush() {
            log::error!("spool flush at shutdown failed: {e}");
        }
        log::info!(
            "gateway stopped readings={} sent={} acked={}",
            self.counters.readings,
            self.outbox.sent(),
            self.counters.acked
        );
    }

    fn hello(&self) -> Message {
        Message::new(
            protocol::KIND_HELLO,
            &json!({
                "gateway": self.cfg.gateway.id,
                "protocol": protocol::PROTOCOL_VERSION,
                "version": env!("CARGO_PKG_VERSION"),
                "inputs": self.cfg.inputs(),
                "outputs": self.cfg.outputs(),
                "serial": self.cfg.serial_names(),
                "resume_seq": self.resume_seq(),
                "security": if self.cfg.backend.curve() { "curve" } else { "none" },
                "insecure": self.cfg.backend.insecure_link(),
            }),
        )
    }

    /// The lowest seq the gateway may still send; everything below is acked or dropped.
    fn resume_seq(&self) -> u64 {
        self.spool
            .first_unacked()
            .unwrap_or_else(|| self.spool.next_seq())
    }

    /// Queues a control message (reply, stats). Readings never take their places (see
    /// `Outbox::push_control`); if even those are full, the message is dropped and counted.
    fn send(&mut self, m: Message) {
        let kind = m.kind;
        if self.outbox.with(|o| o.push_control(m)).is_err() {
            self.counters.dropped_control += 1;
            if self.drops.allow("outbox full") {
                log::warn!(
                    "outbox full max={}: {kind} message dropped",
                    self.cfg.backend.outbox_max
                );
            }
        }
    }

    /// Stores a reading in the spool, then lets the outbox take it if it has room.
    fn emit_reading(&mut self, source: &str, values: &Values) {
        let now = std::time::SystemTime::now();
        let time_ms = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let time = humantime::format_rfc3339_millis(now).to_string();
        let gateway = &self.cfg.gateway.id;
        let mut body = String::new();
        let buf = &mut body;
        let appended = self.spool.append_with(time_ms, move |seq| {
            let buf = buf; // moved: the closure is FnOnce and may return a borrow of it
            protocol::write_reading_body(buf, gateway, seq, source, &time, values);
            buf.as_bytes()
        });
        match appended {
            Ok(Appended::Stored {
                seq,
                dropped_oldest,
            }) => {
                self.counters.readings += 1;
                self.counters.dropped += dropped_oldest;
                // Fast path: nothing older waits in the spool, so the reading goes straight
                // into the outbox without being read back from disk.
                if self.next_send == seq {
                    self.start_retransmit_clock(seq);
                    let m = Message {
                        kind: protocol::KIND_READING,
                        body,
                    };
                    if self.outbox.push(m).is_ok() {
                        self.next_send = seq + 1;
                    }
                }
            }
            Ok(Appended::DroppedNewest) => {
                self.counters.dropped += 1;
                if self.drops.allow("spool full") {
                    log::warn!(
                        "spool full max_bytes={}: reading from {source} dropped (when_full = drop_newest)",
                        self.cfg.spool.max_bytes
                    );
                }
            }
            Err(e) => {
                self.counters.spool_errors += 1;
                if self.drops.allow("spool error") {
                    log::error!("spool append failed: {e}: reading from {source} lost");
                }
            }
        }
        self.arm_spool_tick();
        self.fill_outbox();
    }

    /// Schedules a check of the backend connection after `conn_check_delay` (1 s, doubling up to
    /// 30 s): the source reconnects if libzmq gave up after a protocol error, and reports the
    /// connection if it is up but its handshake event was lost
    /// ([`OutboxHandle::request_connection_check`]). The check re-arms itself while no
    /// connection is reported, so no lost event can leave the gateway waiting forever; once
    /// connected, no timer runs (idle cost).
    fn arm_connection_check(&mut self) {
        let delay = self.conn_check_delay;
        self.conn_check_delay = (delay * 2).min(CONN_CHECK_MAX);
        match self
            .handle
            .insert_source(Timer::from_duration(delay), |_, _, gw: &mut Gateway| {
                gw.conn_check = None;
                gw.outbox.request_connection_check();
                if !gw.outbox.is_connected() {
                    gw.arm_connection_check();
                }
                TimeoutAction::Drop
            }) {
            Ok(t) => self.conn_check = Some(t),
            Err(e) => log::error!("cannot arm the connection check: {e}"),
        }
    }

    /// Schedules one spool tick (interval fsync, ack persistence) if none is pending. One-shot,
    /// so an idle gateway has no spool wake-ups.
    fn arm_spool_tick(&mut self) {
        if self.tick_armed {
            return;
        }
        let interval = Duration::from_millis(self.cfg.spool.fsync_interval_ms);
        match self
            .handle
            .insert_source(Timer::from_duration(interval), |_, _, gw: &mut Gateway| {
                gw.tick_armed = false;
                if let Err(e) = gw.spool.tick() {
                    gw.counters.spool_errors += 1;
                    log::error!("spool tick failed: {e}");
                }
                TimeoutAction::Drop
            }) {
            Ok(_) => self.tick_armed = true,
            Err(e) => log::error!("cannot arm the spool timer: {e}"),
        }
    }

    /// Moves readings from the spool into the outbox while it has room, in seq order.
    fn fill_outbox(&mut self) {
        let room = self.outbox.peek(|o| o.room());
        if room == 0 || self.next_send >= self.spool.next_seq() {
            return;
        }
        let mut want = room.min(REPLAY_BATCH);
        if let Some(limit) = &mut self.replay {
            let available = limit.available(Instant::now());
            if available == 0 {
                self.arm_replay_timer();
                return;
            }
            want = want.min(available);
            limit.take(want);
        }
        self.start_retransmit_clock(self.next_send);
        let mut batch = Vec::new();
        if let Err(e) = self.spool.read_from(self.next_send, want, &mut batch) {
            self.counters.spool_errors += 1;
            if self.drops.allow("spool read") {
                log::error!("spool read failed from seq={}: {e}", self.next_send);
            }
            return;
        }
        if batch.is_empty() {
            // Everything from next_send on was acked or dropped meanwhile.
            self.next_send = self.spool.next_seq();
            return;
        }
        let mut next_send = self.next_send;
        self.outbox.with(|o| {
            for (seq, payload) in batch {
                match String::from_utf8(payload) {
                    Ok(body) => {
                        let m = Message {
                            kind: protocol::KIND_READING,
                            body,
                        };
                        if o.push_back(m).is_err() {
                            break;
                        }
                    }
                    Err(_) => log::error!("spool record seq={seq} is not UTF-8: skipped"),
                }
                next_send = seq + 1;
            }
        });
        self.next_send = next_send;
    }

    /// From the stats timer: warns when readings arrived, over the last stats interval, at
    /// least as fast as `[spool] replay_max_per_s` lets them out of the spool. Then a backlog
    /// (after any outage) can never shrink: every new reading queues behind it. Logged once,
    /// then at most once an hour while it lasts.
    fn check_replay_pace(&mut self) {
        let now = Instant::now();
        let (t0, r0) = std::mem::replace(&mut self.ingest_mark, (now, self.counters.readings));
        let limit = self.cfg.spool.replay_max_per_s;
        let secs = now.duration_since(t0).as_secs_f64();
        if limit == 0 || secs <= 0.0 {
            return;
        }
        let rate = (self.counters.readings - r0) as f64 / secs;
        if rate < f64::from(limit)
            || self
                .pace_warned
                .is_some_and(|t| now.duration_since(t) < PACE_WARN_EVERY)
        {
            return;
        }
        self.pace_warned = Some(now);
        log::warn!(
            "readings arrive at {rate:.0}/s, at least [spool] replay_max_per_s = {limit}: a \
             backlog (now {} readings) cannot drain; set replay_max_per_s well above the \
             reading rate, or 0 for no limit",
            self.spool.next_seq().saturating_sub(self.next_send)
        );
    }

    /// Continues a paced replay (`[spool] replay_max_per_s`) once a batch worth of tokens is
    /// available. One-shot: no timer runs when nothing waits in the spool.
    fn arm_replay_timer(&mut self) {
        let Some(limit) = &self.replay else { return };
        if self.replay_armed {
            return;
        }
        let delay = limit.time_until(REPLAY_BATCH).max(Duration::from_millis(1));
        match self
            .handle
            .insert_source(Timer::from_duration(delay), |_, _, gw: &mut Gateway| {
                gw.replay_armed = false;
                gw.fill_outbox();
                TimeoutAction::Drop
            }) {
            Ok(_) => self.replay_armed = true,
            Err(e) => log::error!("cannot arm the replay timer: {e}"),
        }
    }

    /// Readings from `from` on are about to be queued for sending. If no earlier reading is
    /// unacked, nothing was outstanding until now: the `retransmit_s` wait starts here, not
    /// at the last ack (which may be long ago: an idle gateway would otherwise resend a new
    /// reading at the next retransmit check, before the backend had `retransmit_s` to ack it).
    fn start_retransmit_clock(&mut self, from: u64) {
        if self
            .spool
            .first_unacked()
            .map_or(true, |first| first >= from)
        {
            self.ack_progress = Instant::now();
        }
    }

    /// Sends unacked readings again from the oldest, in seq order: queued readings leave the
    /// outbox first so that nothing is reordered.
    fn rewind(&mut self) {
        self.outbox
            .with(|o| o.retain(|m| m.kind != protocol::KIND_READING));
        self.next_send = self.resume_seq();
        self.ack_progress = Instant::now();
        self.fill_outbox();
    }

    /// From the retransmit timer: when readings were sent and no ack came for `retransmit_s`,
    /// the unacked ones are sent again.
    fn check_retransmit(&mut self) {
        let unacked_sent = self
            .spool
            .first_unacked()
            .is_some_and(|first| first < self.next_send);
        let quiet = self.ack_progress.elapsed() >= Duration::from_secs(self.cfg.spool.retransmit_s);
        if unacked_sent && quiet && self.counters.connects > 0 {
            self.counters.retransmits += 1;
            log::info!(
                "no ack for {} s: resending unacked readings from seq={}",
                self.cfg.spool.retransmit_s,
                self.resume_seq()
            );
            self.rewind();
        }
    }

    fn send_stats(&mut self) {
        let ports: Map<String, Value> = self
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
        let bad_lines: Map<String, Value> = self
            .ports
            .iter()
            .map(|(n, p)| (n.clone(), json!(p.bad_lines)))
            .collect();
        let sp = self.spool.stats();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let c = &self.counters;
        let body = json!({
            "gateway": self.cfg.gateway.id,
            "time": protocol::now_rfc3339(),
            "uptime_s": self.started.elapsed().as_secs(),
            "outbox": self.outbox.len(),
            "outbox_max": self.cfg.backend.outbox_max,
            "resume_seq": self.resume_seq(),
            "counters": {
                "readings": c.readings,
                "sent": self.outbox.sent(),
                "acked": c.acked,
                "dropped": c.dropped,
                "bad_lines": bad_lines,
                "commands_ok": c.commands_ok,
                "commands_failed": c.commands_failed,
                "reconnects": c.reconnects,
                "retransmits": c.retransmits,
                "bad_messages": c.bad_messages,
                "dropped_control": c.dropped_control,
                "spool_errors": c.spool_errors,
            },
            "spool": {
                "bytes": sp.bytes,
                "readings": sp.readings,
                "oldest_unacked_age_s": sp.oldest_unacked_ms.map(|t| now_ms.saturating_sub(t) / 1000),
                "dropped_oldest": sp.dropped_oldest,
                "dropped_newest": sp.dropped_newest,
                "next_seq": sp.next_seq,
                "acked": sp.acked,
            },
            "serial": ports,
        });
        self.send(Message::new(protocol::KIND_STATS, &body));
    }

    fn on_zmq(&mut self, event: ZmqEvent) {
        match event {
            ZmqEvent::Connected => {
                self.counters.connects += 1;
                self.conn_check_delay = CONN_CHECK_MIN;
                if let Some(t) = self.conn_check.take() {
                    self.handle.remove(t);
                }
                if self.counters.connects > 1 {
                    self.counters.reconnects += 1;
                }
                log::info!(
                    "backend connected endpoint={} connects={}",
                    self.cfg.backend.endpoint,
                    self.counters.connects
                );
                // Unacked readings go again, in order, after the hello.
                self.rewind();
                let hello = self.hello();
                if self.outbox.with(|o| o.push_hello(hello)).is_err() {
                    self.counters.dropped_control += 1;
                    log::warn!("outbox full: hello dropped (control reserve taken)");
                }
            }
            ZmqEvent::Disconnected => {
                // Rate-limited: a failing handshake (e.g. a wrong key) disconnects repeatedly.
                if self.disconnects.allow("backend disconnected") {
                    log::warn!(
                        "backend disconnected endpoint={}",
                        self.cfg.backend.endpoint
                    );
                }
                // libzmq does not retry after a protocol error (e.g. an oversized frame):
                // check a little later and reconnect if it gave up.
                if self.conn_check.is_none() {
                    self.arm_connection_check();
                }
            }
            ZmqEvent::HandshakeFailed(why) => {
                if self.handshake_failures.allow("backend handshake failed") {
                    let hint = if self.cfg.backend.curve() {
                        "; check that backend.server_public_key is the backend's public key, \
                         that the backend has CURVE on, and that this gateway's public key is \
                         in the backend's allow list as <gateway id>.pub"
                    } else {
                        "; this gateway has no CURVE keys: if the backend uses CURVE, set \
                         backend.server_public_key and backend.secret_key_file"
                    };
                    log::error!("backend handshake failed: {why}{hint}");
                }
            }
            ZmqEvent::Drained => self.fill_outbox(),
            ZmqEvent::Message(frames) => self.on_backend_message(frames),
            ZmqEvent::TooManyFrames { frames } => {
                self.counters.bad_messages += 1;
                if self.command_errors.allow("bad backend message") {
                    log::warn!(
                        "backend message ignored: expected 2 frames (kind, JSON), got {frames}"
                    );
                }
            }
        }
    }

    fn on_backend_message(&mut self, frames: Vec<Vec<u8>>) {
        let [kind, body] = match <[Vec<u8>; 2]>::try_from(frames) {
            Ok(f) => f,
            Err(frames) => {
                self.counters.bad_messages += 1;
                if self.command_errors.allow("bad backend message") {
                    log::warn!(
                        "backend message ignored: expected 2 frames (kind, JSON), got {}",
                        frames.len()
                    );
                }
                return;
            }
        };
        match kind.as_slice() {
            b"ack" => match protocol::parse_ack(&body) {
                Ok(seq) => self.on_ack(seq),
                Err(e) => {
                    self.counters.bad_messages += 1;
                    if self.command_errors.allow("bad ack") {
                        log::warn!("backend ack ignored: {e}");
                    }
                }
            },
            b"command" => self.on_command(&body),
            other => {
                self.counters.bad_messages += 1;
                let kind = String::from_utf8_lossy(other)
                    .chars()
                    .take(32)
                    .collect::<String>();
                // A command-like body with an id gets an answer; otherwise a log line.
                let id = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string));
                let msg = format!("unknown message kind {kind:?} (expected ack or command)");
                match id {
                    Some(id) => {
                        self.counters.commands_failed += 1;
                        self.send(protocol::reply_err(&id, &msg));
                    }
                    None => {
                        if self.command_errors.allow("unknown kind") {
                            log::warn!("backend message ignored: {msg}");
                        }
                    }
                }
            }
        }
    }

    fn on_ack(&mut self, seq: u64) {
        match self.spool.ack(seq) {
            Ok(0) => {}
            Ok(n) => {
                self.counters.acked += n;
                self.ack_progress = Instant::now();
                self.arm_spool_tick();
            }
            Err(e) => {
                self.counters.spool_errors += 1;
                log::error!("spool ack seq={seq} failed: {e}");
            }
        }
    }

    fn on_command(&mut self, body: &[u8]) {
        // Size and nesting limits are checked before serde_json sees the body.
        let parsed = protocol::parse_command(body);
        let id = match &parsed {
            Ok(c) => Some(c.id.as_str()),
            Err(e) => e.id.as_deref(),
        };
        if let Some(id) = id {
            if let Some(prev) = self.replies.get(id) {
                // Same id seen before: answer as before, never execute twice.
                log::info!("duplicate command id={id}: not executed again");
                if let Some(reply) = prev.clone() {
                    self.send(reply);
                }
                return;
            }
        }
        // The rate limit comes after the duplicate check (a retry of an executed command is
        // answered as before) and is not remembered (the same id may be retried later).
        if !self.command_rate.try_take(Instant::now()) {
            self.counters.commands_failed += 1;
            let msg = format!(
                "rate limit exceeded (max_per_s={})",
                self.cfg.commands.max_per_s
            );
            if self.command_errors.allow("command rate limit") {
                log::warn!("command refused id={} error=\"{msg}\"", id.unwrap_or("-"));
            }
            if let Some(id) = id {
                let reply = protocol::reply_err(id, &msg);
                self.send(reply);
            }
            return;
        }
        let cmd = match parsed {
            Ok(c) => c,
            Err(e) => {
                if let Some(prev) = e.id.as_deref().and_then(|id| self.replies.get(id)) {
                    // Same id seen before: answer as before, never execute (or count) twice.
                    log::info!(
                        "duplicate command id={}: not executed again",
                        e.id.as_deref().unwrap_or("-")
                    );
                    if let Some(reply) = prev.clone() {
                        self.send(reply);
                    }
                    return;
                }
                self.counters.commands_failed += 1;
                if self.command_errors.allow("bad command") {
                    log::warn!(
                        "command refused id={} error=\"{}\"",
                        e.id.as_deref().unwrap_or("-"),
                        e.message
                    );
                }
                if let Some(id) = e.id {
                    let reply = protocol::reply_err(&id, &e.message);
                    self.replies.insert(&id, Some(reply.clone()));
                    self.send(reply);
                }
                return;
            }
        };
        match self.execute(&cmd) {
            Ok(true) => self.finish_command(&cmd.id, Ok(())),
            Ok(false) => self.replies.insert(&cmd.id, None),
            Err(e) => self.finish_command(&cmd.id, Err(e)),
        }
    }

    fn finish_command(&mut self, id: &str, result: Result<(), String>) {
        let reply = match result {
            Ok(()) => {
                self.counters.commands_ok += 1;
                protocol::reply_ok(id)
            }
            Err(e) => {
                self.counters.commands_failed += 1;
                if self.command_errors.allow("command failed") {
                    log::warn!("command refused id={id} error=\"{e}\"");
                }
                protocol::reply_err(id, &e)
            }
        };
        self.replies.insert(id, Some(reply.clone()));
        self.send(reply);
    }

    /// Executes a command. `Ok(true)`: done now; `Ok(false)`: the reply follows later.
    fn execute(&mut self, cmd: &Command) -> Result<bool, String> {
        if let Some(out) = self.outputs.get(&cmd.target) {
            let (pin, level, max) = (out.pin, out.level, out.max_pulse_ms);
            let new_level = match cmd.action {
                Action::Set(v) => Level::try_from(v).map_err(|e| e.to_string())?,
                Action::Toggle => !level,
                Action::Pulse(ms) if ms > max => {
                    return Err(format!(
                        "pulse of {ms} ms exceeds max_pulse_ms={max} for {}",
                        cmd.target
                    ))
                }
                Action::Pulse(_) => !level,
                Action::Write(_) => {
                    return Err(format!(
                        "{} is a GPIO output: use set, toggle or pulse",
                        cmd.target
                    ))
                }
            };
            self.gpio
                .write(pin, new_level)
                .map_err(|e| format!("GPIO write failed: {e}"))?;
            let out = self
                .outputs
                .get_mut(&cmd.target)
                .expect("output looked up above");
            out.level = new_level;
            // Any command ends a running pulse; a new pulse keeps the original level to restore.
            let restore = match out.pulse.take() {
                Some((restore, token)) => {
                    self.handle.remove(token);
                    restore
                }
                None => level,
            };
            if let Action::Pulse(ms) = cmd.action {
                let name = cmd.target.clone();
                let token = self
                    .handle
                    .insert_source(
                        Timer::from_duration(Duration::from_millis(ms)),
                        move |_, _, gw: &mut Gateway| {
                            gw.end_pulse(&name);
                            TimeoutAction::Drop
                        },
                    )
                    .map_err(|e| format!("cannot arm pulse timer: {e}"))?;
                let out = self
                    .outputs
                    .get_mut(&cmd.target)
                    .expect("output looked up above");
                out.pulse = Some((restore, token));
            }
            log::info!(
                "command id={} target={} action={} level={new_level}",
                cmd.id,
                cmd.target,
                cmd.action.name()
            );
            return Ok(true);
        }
        if let Some(port) = self.ports.get(&cmd.target) {
            let Action::Write(text) = &cmd.action else {
                return Err(format!("{} is a serial port: use write", cmd.target));
            };
            protocol::check_write_value(text, port.allow_binary)?;
            let mut data = text.clone().into_bytes();
            data.extend_from_slice(port.line_ending.as_bytes());
            let token = self.next_write_token;
            self.next_write_token += 1;
            port.handle.write(data, token).map_err(|e| match e {
                WriteError::NotConnected => format!("serial port {} is not connected", cmd.target),
                WriteError::Busy => format!("serial port {}: {e}", cmd.target),
            })?;
            self.pending_writes.insert(token, cmd.id.clone());
            return Ok(false);
        }
        if self.inputs.values().any(|i| i.name == cmd.target) {
            return Err(format!(
                "{} is a GPIO input: it takes no commands",
                cmd.target
            ));
        }
        Err(format!("unknown target {:?}", cmd.target))
    }

    fn end_pulse(&mut self, name: &str) {
        let Some(out) = self.outputs.get_mut(name) else {
            return;
        };
        let Some((restore, _)) = out.pulse.take() else {
            return;
        };
        match self.gpio.write(out.pin, restore) {
            Ok(()) => {
                out.level = restore;
                log::info!("pulse ended target={name} level={restore}");
            }
            Err(e) => log::error!("pulse end failed target={name} error=\"{e}\""),
        }
    }

    fn on_edge(&mut self, edge: InputChange) {
        let Some(input) = self.inputs.get_mut(&edge.pin) else {
            return;
        };
        if edge.level == input.level {
            return;
        }
        let now = Instant::now();
        if let Some(at) = input.changed_at {
            let quiet_until = at + input.debounce;
            if now < quiet_until {
                // Too soon: look again when the debounce window ends, so the final level is
                // never missed.
                if input.recheck.is_none() {
                    let pin = edge.pin;
                    match self.handle.insert_source(
                        Timer::from_deadline(quiet_until),
                        move |_, _, gw: &mut Gateway| {
                            gw.recheck_input(pin);
                            TimeoutAction::Drop
                        },
                    ) {
                        Ok(token) => input.recheck = Some(token),
                        Err(e) => log::error!("cannot arm debounce timer: {e}"),
                    }
                }
                return;
            }
        }
        input.level = edge.level;
        input.changed_at = Some(now);
        if input.edge.reports(edge.level) {
            let name = input.name.clone();
            let values = Values::single("level", &json!(edge.level));
            self.emit_reading(&name, &values);
        }
    }

    fn recheck_input(&mut self, pin: u8) {
        if let Some(input) = self.inputs.get_mut(&pin) {
            input.recheck = None;
            input.changed_at = None;
        }
        match self.gpio.read(pin) {
            Ok(level) => self.on_edge(InputChange { pin, level }),
            Err(e) => log::warn!("debounce re-read failed pin={pin} error=\"{e}\""),
        }
    }

    fn on_serial(&mut self, name: &str, event: SerialEvent) {
        match event {
            SerialEvent::Line(line) => {
                let Some(port) = self.ports.get_mut(name) else {
                    return;
                };
                match protocol::parse_line(port.format, &line) {
                    Ok(values) => self.emit_reading(name, &values),
                    Err(e) => {
                        port.bad_lines += 1;
                        if port.limiter.allow("bad serial line") {
                            let preview: String =
                                String::from_utf8_lossy(&line).chars().take(80).collect();
                            log::warn!(
                                "bad serial line port={name} error=\"{e}\" line={preview:?} bad_lines={}",
                                port.bad_lines
                            );
                        }
                    }
                }
            }
            SerialEvent::Overlong(n) => {
                if let Some(port) = self.ports.get_mut(name) {
                    port.bad_lines += 1;
                    port.overlong_lines += 1;
                    if port.limiter.allow("overlong serial line") {
                        log::warn!(
                            "serial line too long port={name} bytes={n} max={}: discarded",
                            protocol::MAX_LINE
                        );
                    }
                }
            }
            SerialEvent::Connected => {
                if let Some(port) = self.ports.get_mut(name) {
                    port.connected = true;
                }
            }
            SerialEvent::Disconnected(_) => {
                if let Some(port) = self.ports.get_mut(name) {
                    port.connected = false;
                    port.disconnects += 1;
                }
            }
            SerialEvent::WriteDone(token) => {
                if let Some(id) = self.pending_writes.remove(&token) {
                    log::info!("command id={id} target={name} action=write: written");
                    self.finish_command(&id, Ok(()));
                }
            }
            SerialEvent::WriteFailed(token, why) => {
                if let Some(id) = self.pending_writes.remove(&token) {
                    self.finish_command(&id, Err(why));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_cache_evicts_oldest() {
        let mut c = ReplyCache::default();
        for i in 0..(REPLY_CACHE + 5) {
            c.insert(&format!("c{i}"), None);
        }
        assert!(c.get("c0").is_none());
        assert!(c.get("c4").is_none());
        assert!(c.get("c5").is_some());
        assert_eq!(c.map.len(), REPLY_CACHE);
    }

    fn test_gateway(dir: &std::path::Path) -> (EventLoop<'static, Gateway>, Gateway) {
        let text = format!(
            "[gateway]\nid = \"gw-t\"\ndata_dir = \"{0}\"\n\
             [backend]\nendpoint = \"tcp://127.0.0.1:1\"\n\
             [gpio]\nbackend = \"sim\"\nsim_dir = \"{0}\"\n\
             [[gpio.output]]\nname = \"relay1\"\npin = 27\n",
            dir.display()
        );
        let cfg = Config::parse(&text, "t.toml").unwrap();
        let ev = EventLoop::try_new().unwrap();
        let gw = Gateway::new(cfg, &ev).unwrap();
        (ev, gw)
    }

    fn replies(gw: &Gateway) -> Vec<String> {
        gw.outbox.peek(|o| {
            o.iter()
                .filter(|m| m.kind == protocol::KIND_REPLY)
                .map(|m| m.body.clone())
                .collect()
        })
    }

    /// A repeated id is answered with the first reply and neither executed nor counted again,
    /// whether the first attempt succeeded or was refused.
    #[test]
    fn duplicate_commands_execute_and_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let (_ev, mut gw) = test_gateway(dir.path());
        let toggle = br#"{"id":"c-1","target":"relay1","action":"toggle"}"#;
        gw.on_command(toggle);
        gw.on_command(toggle);
        assert_eq!(
            crate::hw::sim::read_pin_file(dir.path(), 27).unwrap(),
            Some(Level::High)
        );
        let bad = br#"{"id":"c-2","target":"relay1","action":"set","value":7}"#;
        gw.on_command(bad);
        gw.on_command(bad);
        assert_eq!(gw.counters.commands_ok, 1);
        assert_eq!(gw.counters.commands_failed, 1);
        let r = replies(&gw);
        assert_eq!(r.len(), 4, "{r:?}");
        assert_eq!(r[0], r[1]);
        assert_eq!(r[2], r[3]);
        assert!(r[2].contains("\"ok\":false"), "{}", r[2]);
    }

    #[test]
    fn rate_limiter_bursts_then_refills() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(20, t0);
        let burst = (0..50).filter(|_| r.try_take(t0)).count();
        assert_eq!(burst, 20);
        assert!(!r.try_take(t0 + Duration::from_millis(10)));
        // 20/s: one token every 50 ms.
        assert!(r.try_take(t0 + Duration::from_millis(60)));
        assert!(!r.try_take(t0 + Duration::from_millis(70)));
        // Never more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..50).filter(|_| r.try_take(later)).count(), 20);
    }

    /// The replay pace: a burst, then `rate` per second; `time_until` says when a batch is
    /// available.
    #[test]
    fn replay_limiter_paces_batches() {
        let t0 = Instant::now();
        let mut r = RateLimiter::with_burst(1000, 256, t0);
        assert_eq!(r.available(t0), 256);
        r.take(256);
        assert_eq!(r.available(t0), 0);
        let wait = r.time_until(REPLAY_BATCH);
        assert!((wait.as_secs_f64() - 0.256).abs() < 1e-6, "{wait:?}");
        // 100 ms later: 100 tokens.
        assert_eq!(r.available(t0 + Duration::from_millis(100)), 100);
        r.take(40);
        assert_eq!(r.available(t0 + Duration::from_millis(100)), 60);
        // Capped at the burst; asking for more than the burst waits for the burst only.
        assert_eq!(r.available(t0 + Duration::from_secs(60)), 256);
        assert_eq!(r.time_until(10_000), Duration::ZERO);
        // Over 10 s at most burst + 10 × rate tokens are handed out.
        let mut total = 0;
        for ms in (0..=10_000).step_by(7) {
            let n = r.available(t0 + Duration::from_secs(60) + Duration::from_millis(ms));
            r.take(n);
            total += n;
        }
        assert!((10_000..=10_000 + 256).contains(&total), "{total}");
    }

    #[test]
    fn log_limiter_bursts() {
        let mut l = LogLimiter::default();
        let allowed = (0..100).filter(|_| l.allow("x")).count();
        assert_eq!(allowed, LogLimiter::BURST as usize);
    }
}
