//! The gateway: one calloop loop that owns the backend socket, the serial ports, the GPIO
//! lines and the timers.
//!
//! Flow: serial lines and GPIO edges become readings in the spool and then the outbox; the
//! [`ZmqSource`] sends them when the socket is writable. Commands from the backend are
//! executed on the loop thread and answered with a `reply` once they took effect. Nothing
//! here blocks: every I/O is non-blocking and every queue is bounded.
//!
//! Structure: each concern is a plain state machine that takes its input and `now` and
//! returns [`Effect`]s — [`link`] (connection checks), [`delivery`] (spool → outbox, rewind,
//! retransmit, replay pace), [`commands`] (duplicates, rate limit, replies), [`outputs`]
//! (levels, pulses), [`inputs`] (debounce), [`report`] (report on change: deadband, minimum
//! interval, heartbeat). [`Gateway`] is the interpreter: the only part that
//! touches the `LoopHandle`, the socket, the spool and the hardware.

pub mod command_log;
pub mod commands;
pub mod delivery;
pub mod effect;
mod error;
mod handlers;
pub mod inputs;
mod interpret;
pub mod link;
pub mod modbus;
mod modbus_io;
pub mod outputs;
pub mod ports;
pub mod reload;
pub mod report;
mod reporting;
mod socket;
pub mod stats;

pub use self::effect::{Effect, Effects, TimerId};
pub use self::error::GatewayError;
use self::error::{chain, ierr, lerr};
pub use self::socket::backend_socket;
pub use self::stats::Counters;

use self::command_log::CommandLog;
use self::commands::Commands;
use self::delivery::{Delivery, SpoolView};
use self::inputs::Inputs;
use self::link::Link;
use self::outputs::{LevelCause, Outputs};
use self::ports::PortState;
use crate::config::Config;
use crate::hw::GpioBackend;
use crate::limit::LogLimits;
use crate::protocol::{self, Command, Message, Values};
use crate::sd_notify;
use crate::sources::gpio::OpenGpio;
use crate::sources::serial::{SerialEvent, WriteError};
use crate::sources::zmq::{OutboxHandle, ZmqEvent, ZmqSource};
use crate::spool::{Appended, Spool};
use calloop::signals::{Signal, Signals};
use calloop::timer::{TimeoutAction, Timer};
use calloop::{EventLoop, LoopHandle, RegistrationToken};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The signals the gateway handles (blocked and read through a signalfd): SIGTERM and SIGINT
/// stop it, SIGHUP reloads the config file, SIGUSR1 logs the stats, SIGUSR2 and SIGALRM are
/// ignored (their default action would end the process).
pub const HANDLED_SIGNALS: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
];

/// The loop's shared state: the state machines and the interpreter of their effects.
pub struct Gateway {
    cfg: Config,
    handle: LoopHandle<'static, Gateway>,
    outbox: OutboxHandle,
    zmq_token: RegistrationToken,
    gpio: Box<dyn GpioBackend>,
    spool: Spool,
    link: Link,
    delivery: Delivery,
    commands: Commands,
    command_log: CommandLog,
    outputs: Outputs,
    inputs: Inputs,
    ports: BTreeMap<String, PortState>,
    /// The Modbus buses, in configuration order (`TimerId::Modbus(n)` is bus `n`'s timer).
    modbus: Vec<modbus_io::BusIo>,
    /// Reading sources removed on shutdown.
    reader_tokens: Vec<RegistrationToken>,
    /// The config file and the sources a reload replaces.
    sources: reload::Sources,
    /// The armed one-shot timers.
    timers: HashMap<TimerId, RegistrationToken>,
    /// Effects waiting to be applied (kept, so the steady state allocates nothing).
    fx: Effects,
    logs: LogLimits,
    /// Counters reported in `stats`.
    pub counters: Counters,
    /// Report on change: one reporter per reading source.
    reports: self::report::Reports,
    /// Whether the wall clock is synchronised (asked at most once a second).
    clock: crate::clock::ClockWatch,
    /// This boot's id, sent with `hello`, `stats` and unsynced readings.
    boot_id: String,
    started: Instant,
    shutdown_deadline: Option<Instant>,
    // Last field: the context outlives the socket inside the loop's ZmqSource.
    _ctx: zmq::Context,
}

impl Gateway {
    /// Sets up every source in `event_loop` and returns the loop's shared state.
    pub fn new(
        cfg: Config,
        event_loop: &EventLoop<'static, Gateway>,
    ) -> Result<Gateway, GatewayError> {
        let handle = event_loop.handle();
        // First, before any thread exists (libzmq's I/O threads, rppal's interrupt threads):
        // Signals blocks these signals in this thread, and threads inherit the mask, so none
        // of them ends the process by its default action.
        let signals = Signals::new(&HANDLED_SIGNALS)
            .map_err(lerr("blocking the handled signals for the signal source"))?;
        handle
            .insert_source(signals, |event, _, gw: &mut Gateway| {
                gw.on_signal(event.signal())
            })
            .map_err(ierr("adding the signal source"))?;

        let ctx = zmq::Context::new();
        let socket = backend_socket(&ctx, &cfg)?;
        let zerr = |what| move |source| GatewayError::Zmq { what, source };
        let mut zsource = ZmqSource::new(&ctx, socket, cfg.backend.outbox_max)?;
        zsource
            .connect(&cfg.backend.endpoint)
            .map_err(zerr("connecting to the backend endpoint"))?;
        let outbox = zsource.handle();
        let zmq_token = handle
            .insert_source(zsource, |event, _, gw: &mut Gateway| gw.on_zmq(event))
            .map_err(ierr("adding the backend socket"))?;

        let spool_dir = cfg.gateway.data_dir.join("spool");
        // Spool::open logs what it recovered (segments, records, discarded bytes, next seq).
        let (spool, _recovery) = Spool::open(&spool_dir, cfg.spool.clone())?;
        // fsync = "always": the spool's helper thread says when readings became durable.
        let (durable_ping, durable_source) = calloop::ping::make_ping()
            .map_err(|e| lerr("creating the spool's durable ping")(e.into()))?;
        handle
            .insert_source(durable_source, |_, _, gw: &mut Gateway| {
                gw.on_spool_durable()
            })
            .map_err(ierr("adding the spool's durable ping"))?;
        spool.set_durable_waker(Box::new(move || durable_ping.ping()));

        let OpenGpio {
            backend: gpio,
            events: gpio_events,
            levels,
        } = crate::sources::gpio::open(&cfg.gpio)?;
        let gpio_token = reload::insert_gpio_events(&handle, gpio_events)?;
        let mut sources = reload::Sources {
            gpio: Some(gpio_token),
            ..Default::default()
        };
        let mut reader_tokens = vec![gpio_token];

        let mut ports = BTreeMap::new();
        for sc in &cfg.serial {
            let (port, token) = reload::insert_port(&handle, sc)?;
            reader_tokens.push(token);
            sources.ports.insert(sc.name.clone(), token);
            ports.insert(sc.name.clone(), port);
        }

        let retransmit = Duration::from_secs(cfg.spool.retransmit_s);
        handle
            .insert_source(
                Timer::from_duration(retransmit),
                move |_, _, gw: &mut Gateway| {
                    gw.on_retransmit_timer();
                    TimeoutAction::ToDuration(retransmit)
                },
            )
            .map_err(ierr("adding the retransmit timer"))?;

        sources.stats = Some(reload::insert_stats_timer(
            &handle,
            cfg.gateway.stats_interval_s,
        )?);

        log::info!(
            "gateway starting id={} endpoint={} security={} inputs={} outputs={} serial={} modbus={} gpio={:?}",
            cfg.gateway.id,
            cfg.backend.endpoint,
            if cfg.backend.curve() { "curve" } else { "none" },
            cfg.gpio.input.len(),
            cfg.gpio.output.len(),
            cfg.serial.len(),
            cfg.modbus.len(),
            cfg.gpio.backend
        );
        let now = Instant::now();
        let view = SpoolView {
            first_unacked: spool.first_unacked(),
            next_seq: spool.next_seq(),
            sendable_end: spool.sendable_end(),
        };
        // The ids answered before a restart (see `command_log`).
        let mut commands = Commands::new(cfg.commands.max_per_s, now);
        let command_log = CommandLog::open_into(&cfg.gateway.data_dir, &mut commands)?;
        let mut gw = Gateway {
            link: Link::new(
                &cfg.backend.endpoint,
                cfg.backend.curve(),
                Duration::from_secs(cfg.backend.hello_timeout_s),
            ),
            delivery: Delivery::new(&cfg.spool, view, now),
            commands,
            command_log,
            outputs: Outputs::new(&cfg.gpio.output),
            inputs: Inputs::new(&cfg.gpio.input),
            modbus: cfg
                .modbus
                .iter()
                .map(|c| modbus_io::BusIo::new(c, now))
                .collect(),
            cfg,
            handle,
            outbox,
            zmq_token,
            gpio,
            spool,
            ports,
            reader_tokens,
            sources,
            timers: HashMap::new(),
            fx: Effects::default(),
            logs: LogLimits::default(),
            counters: Counters::default(),
            reports: Default::default(),
            clock: Default::default(),
            boot_id: crate::clock::boot_id(),
            started: now,
            shutdown_deadline: None,
            _ctx: ctx,
        };
        // Levels read after open, not assumed from pull or `initial`.
        gw.inputs.set_levels_read(&levels);
        gw.outputs.set_levels_read(&levels);
        gw.outputs.report_all(LevelCause::Start, &mut gw.fx);
        gw.sync_reports(now);
        // Until the first handshake is reported.
        gw.link.start(now, &mut gw.fx);
        gw.apply_effects();
        gw.start_modbus(now);
        Ok(gw)
    }

    /// Runs until SIGINT/SIGTERM and the shutdown flush are done. Without a config file,
    /// SIGHUP has nothing to re-read: see [`Gateway::run_with_config_file`].
    pub fn run(cfg: Config) -> Result<(), GatewayError> {
        Gateway::run_with(cfg, None)
    }

    /// Runs `cfg`, loaded from `path`; SIGHUP re-reads `path` and applies what can change
    /// live (see [`reload`]).
    pub fn run_with_config_file(cfg: Config, path: PathBuf) -> Result<(), GatewayError> {
        Gateway::run_with(cfg, Some(path))
    }

    fn run_with(cfg: Config, path: Option<PathBuf>) -> Result<(), GatewayError> {
        let mut event_loop: EventLoop<'static, Gateway> =
            EventLoop::try_new().map_err(lerr("creating the event loop"))?;
        let mut gw = Gateway::new(cfg, &event_loop)?;
        gw.sources.config_path = path;
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
                .map_err(ierr("adding the watchdog timer"))?;
        }
        gw.drive(&mut event_loop)
    }

    /// Runs `event_loop` until shutdown is done or a source fails. Either way the spool
    /// state is written before it returns; a failure is logged with its cause and returned.
    pub fn drive(
        &mut self,
        event_loop: &mut EventLoop<'static, Gateway>,
    ) -> Result<(), GatewayError> {
        let signal = event_loop.get_signal();
        let result = event_loop.run(None, self, |gw| {
            gw.outbox.end_of_wake();
            if gw.finished() {
                signal.stop();
            }
        });
        let result = result.map_err(lerr("running the event loop"));
        if let Err(e) = &result {
            log::error!("gateway stopping on an error: {}", chain(e));
        }
        self.finish();
        result
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The file SIGHUP re-reads (set by [`Gateway::run_with_config_file`]).
    pub fn set_config_file(&mut self, path: PathBuf) {
        self.sources.config_path = Some(path);
    }

    /// One handled signal (see [`HANDLED_SIGNALS`]).
    fn on_signal(&mut self, signal: Signal) {
        match signal {
            Signal::SIGINT | Signal::SIGTERM => {
                log::info!("signal received signal={signal:?}: shutting down");
                self.begin_shutdown();
            }
            Signal::SIGHUP => {
                log::info!("signal received signal=SIGHUP: reloading the configuration");
                self.reload();
            }
            Signal::SIGUSR1 => {
                let stats = self.stats_now();
                log::info!("signal received signal=SIGUSR1: stats {}", stats.body);
            }
            other => log::debug!("signal received signal={other:?}: ignored"),
        }
    }

    /// The outbox of the backend link.
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

    /// Ends every running pulse (the outputs go back to the levels they had before, so a
    /// door strike does not stay energised after a stop), stops reading sensors and starts
    /// the bounded flush of the outbox.
    pub fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.end_pulses("shutdown");
        self.release_held();
        self.commands.set_stopping();
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
            log::error!("cannot arm the shutdown timer: {}", e.error);
        }
        log::info!(
            "shutdown: flushing outbox queued={} for up to {} ms",
            self.outbox.len(),
            flush.as_millis()
        );
    }

    /// Ends the pulses still running (one started during the flush, or every one when the
    /// loop stopped on an error), writes the spool state, logs what is left and lets libzmq
    /// hand queued frames to the kernel before exit.
    pub fn finish(&mut self) {
        self.end_pulses("exit");
        self.release_held();
        if let Err(e) = self.spool.flush() {
            log::error!("spool flush at shutdown failed: {e}");
        }
        self.command_log.flush();
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
        log::info!(
            "gateway stopped readings={} sent={} acked={}",
            self.counters.readings,
            self.outbox.sent(),
            self.counters.acked
        );
    }

    /// Restores every pulsing output now (written to the pin and logged by the interpreter).
    fn end_pulses(&mut self, when: &str) {
        let n = self.outputs.end_pulses(&mut self.fx);
        if n > 0 {
            log::info!("{when}: ending running pulses count={n}");
        }
        self.apply_effects();
    }

    fn view(&self) -> SpoolView {
        SpoolView {
            first_unacked: self.spool.first_unacked(),
            next_seq: self.spool.next_seq(),
            sendable_end: self.spool.sendable_end(),
        }
    }

    fn hello(&mut self) -> Message {
        let clock = self.clock_fields(Instant::now());
        // The level of every input and output as the gateway knows it now (read at start,
        // then followed), so a backend never has to assume one.
        let levels: serde_json::Map<String, serde_json::Value> = self
            .inputs
            .iter()
            .map(|i| (i.name.clone(), json!(u8::from(i.level))))
            .chain(
                self.outputs
                    .iter()
                    .map(|o| (o.name.clone(), json!(u8::from(o.level)))),
            )
            .collect();
        let mut body = json!({
                "gateway": self.cfg.gateway.id,
                "protocol": protocol::PROTOCOL_VERSION,
                "version": env!("CARGO_PKG_VERSION"),
                "inputs": self.cfg.inputs(),
                "outputs": self.cfg.outputs(),
                "serial": self.cfg.serial_names(),
                "resume_seq": self.view().resume_seq(),
                "spool_id": self.spool.spool_id(),
                "levels": levels,
                "security": if self.cfg.backend.curve() { "curve" } else { "none" },
                "insecure": self.cfg.backend.insecure_link(),
                "time": protocol::now_rfc3339(),
        });
        if let (Some(b), Some(c)) = (body.as_object_mut(), clock.as_object()) {
            b.extend(c.clone());
        }
        Message::new(protocol::KIND_HELLO, &body)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_levels;
#[cfg(test)]
mod tests_report;
