//! Applying a [`ReloadPlan`] to the running gateway: the interpreter's part of a reload.
//!
//! Nothing here restarts the loop, touches the backend socket or the spool. GPIO is reopened
//! only when `[gpio]` changed: the pulses of removed outputs end first (restored, on the
//! backend that still holds their pins), the old backend is closed (rppal's pins are
//! exclusive), and the new one is opened with every kept output at `initial = "keep"`, so its
//! level does not change and a running pulse runs on. Every pin is then read again: a kept
//! input that changed meanwhile becomes a reading, as an edge would have.

use super::ReloadPlan;
use crate::config::{Config, GpioConfig, Initial, SerialConfig};
use crate::gateway::error::ierr;
use crate::gateway::inputs::Inputs;
use crate::gateway::outputs::{LevelCause, Outputs};
use crate::gateway::ports::PortState;
use crate::gateway::{Effect, Gateway, GatewayError, TimerId};
use crate::hw::{GpioBackend, HwError, Level};
use crate::sources::gpio::{GpioEvents, OpenGpio};
use crate::sources::serial::SerialSource;
use calloop::timer::{TimeoutAction, Timer};
use calloop::{LoopHandle, RegistrationToken};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The config file and the loop sources a reload replaces.
#[derive(Debug, Default)]
pub struct Sources {
    /// The file SIGHUP re-reads; `None`: the configuration came from memory.
    pub config_path: Option<PathBuf>,
    /// The GPIO input changes.
    pub gpio: Option<RegistrationToken>,
    /// Each serial port's source, by name.
    pub ports: BTreeMap<String, RegistrationToken>,
    /// The periodic `stats` timer.
    pub stats: Option<RegistrationToken>,
}

/// Adds the GPIO input changes to the loop.
pub(in crate::gateway) fn insert_gpio_events(
    handle: &LoopHandle<'static, Gateway>,
    events: GpioEvents,
) -> Result<RegistrationToken, GatewayError> {
    handle
        .insert_source(events, |edge, _, gw: &mut Gateway| gw.on_edge(edge))
        .map_err(ierr("adding the GPIO source"))
}

/// Adds serial port `sc` to the loop (it opens on registration).
pub(in crate::gateway) fn insert_port(
    handle: &LoopHandle<'static, Gateway>,
    sc: &SerialConfig,
) -> Result<(PortState, RegistrationToken), GatewayError> {
    let source = SerialSource::new(&sc.name, &sc.path, sc.baud)
        .map_err(|source| GatewayError::Serial {
            name: sc.name.clone(),
            source,
        })?
        .input_line_ending(sc.input_line_ending)
        .write_timeout(Duration::from_millis(sc.write_timeout_ms));
    let port = PortState::new(sc, source.handle());
    let name = sc.name.clone();
    let token = handle
        .insert_source(source, move |event, _, gw: &mut Gateway| {
            gw.on_serial(&name, event)
        })
        .map_err(ierr("adding a serial port"))?;
    Ok((port, token))
}

/// Adds the timer that sends `stats` every `interval_s` seconds.
pub(in crate::gateway) fn insert_stats_timer(
    handle: &LoopHandle<'static, Gateway>,
    interval_s: u64,
) -> Result<RegistrationToken, GatewayError> {
    let interval = Duration::from_secs(interval_s);
    handle
        .insert_source(
            Timer::from_duration(interval),
            move |_, _, gw: &mut Gateway| {
                gw.on_stats_timer();
                TimeoutAction::ToDuration(interval)
            },
        )
        .map_err(ierr("adding the stats timer"))
}

/// Stands in for the GPIO backend while it is reopened, and after a reopen that failed.
struct Closed;

impl Closed {
    fn error(pin: u8) -> HwError {
        HwError::Io {
            pin,
            op: "use after a configuration reload",
            source: std::io::Error::other(
                "the GPIO backend could not be reopened (the log says why); restart zgate",
            ),
        }
    }
}

impl GpioBackend for Closed {
    fn write(&mut self, pin: u8, _: Level) -> Result<(), HwError> {
        Err(Closed::error(pin))
    }
    fn read(&mut self, pin: u8) -> Result<Level, HwError> {
        Err(Closed::error(pin))
    }
}

/// `gpio` with every output at `initial = "keep"`.
fn keep_all(gpio: &GpioConfig) -> GpioConfig {
    let mut gpio = gpio.clone();
    for o in &mut gpio.output {
        o.initial = Initial::Keep;
    }
    gpio
}

impl Gateway {
    /// SIGHUP: re-reads the config file; an invalid file changes nothing.
    pub(in crate::gateway) fn reload(&mut self) {
        if self.shutdown_deadline.is_some() {
            log::info!("reload ignored: shutting down");
            return;
        }
        let Some(path) = self.sources.config_path.clone() else {
            log::warn!("reload ignored: the configuration was not read from a file");
            return;
        };
        match Config::load(&path) {
            Ok(mut new) => {
                // Named lines (`line = "GPIO17"`) become offsets, as at start.
                if let Err(e) = crate::sources::gpio::resolve_lines(&mut new.gpio) {
                    log::error!("reload failed: {e}; the running configuration is kept");
                    return;
                }
                let plan = ReloadPlan::new(&self.cfg, new);
                self.apply_reload(plan);
            }
            Err(e) => log::error!(
                "reload failed: invalid configuration: {e}; the running configuration is kept"
            ),
        }
    }

    /// Applies `plan` (see the module doc) and logs one line of what changed.
    pub(in crate::gateway) fn apply_reload(&mut self, mut plan: ReloadPlan) {
        let now = Instant::now();
        for r in &plan.refused {
            log::warn!("reload refused {r}: this key needs a restart; the running value is kept");
        }
        if plan.commands_changed {
            let n = plan.config.commands.max_per_s;
            self.commands.set_max_per_s(n, now);
        }
        if plan.stats_interval_changed {
            if let Some(t) = self.sources.stats.take() {
                self.handle.remove(t);
            }
            let secs = plan.config.gateway.stats_interval_s;
            match insert_stats_timer(&self.handle, secs) {
                Ok(t) => self.sources.stats = Some(t),
                Err(e) => log::error!("reload: cannot re-arm the stats timer: {e}"),
            }
        }
        self.reload_serial(&mut plan, now);
        if plan.gpio_changed && !self.reload_gpio(&plan, now) {
            plan.config.gpio = self.cfg.gpio.clone();
            plan.inputs = Default::default();
            plan.outputs = Default::default();
        }
        let summary = plan.summary();
        self.cfg = plan.config;
        self.sync_reports(now);
        log::info!("reload applied {summary}");
        self.apply_effects();
    }

    fn remove_port(&mut self, name: &str, now: Instant) {
        if let Some(t) = self.sources.ports.remove(name) {
            self.handle.remove(t);
            self.reader_tokens.retain(|x| *x != t);
        }
        if let Some(port) = self.ports.remove(name) {
            for token in port.handle.abandon() {
                let why = format!("serial port {name} was removed by a configuration reload");
                self.commands
                    .write_finished(token, Err(why), now, &mut self.fx);
            }
            log::info!("serial port removed name={name}");
        }
    }

    /// Serial ports: removed ones leave the loop, changed ones take their new settings in
    /// place, added ones join the loop (and open at once). A port that cannot be added is
    /// left out of the configuration in force.
    fn reload_serial(&mut self, plan: &mut ReloadPlan, now: Instant) {
        for &oi in &plan.serial.removed {
            let name = self.cfg.serial[oi].name.clone();
            self.remove_port(&name, now);
        }
        for &(_, ni) in &plan.serial.changed {
            let sc = &plan.config.serial[ni];
            if let Some(port) = self.ports.get_mut(&sc.name) {
                port.reconfigure(sc);
                port.handle.reconfigure(sc);
                log::info!(
                    "serial port reconfigured name={} path={} baud={} format={:?} \
                     input_line_ending={:?} write_timeout_ms={}",
                    sc.name,
                    sc.path.display(),
                    sc.baud,
                    sc.format,
                    sc.input_line_ending,
                    sc.write_timeout_ms
                );
            }
        }
        let mut failed = Vec::new();
        for &ni in &plan.serial.added {
            let sc = &plan.config.serial[ni];
            match insert_port(&self.handle, sc) {
                Ok((port, token)) => {
                    self.reader_tokens.push(token);
                    self.sources.ports.insert(sc.name.clone(), token);
                    self.ports.insert(sc.name.clone(), port);
                    log::info!("serial port added name={}", sc.name);
                }
                Err(e) => {
                    log::error!("reload: cannot add serial port name={}: {e}", sc.name);
                    failed.push(ni);
                }
            }
        }
        if !failed.is_empty() {
            plan.serial.added.retain(|ni| !failed.contains(ni));
            let names: Vec<String> = failed
                .iter()
                .map(|&ni| plan.config.serial[ni].name.clone())
                .collect();
            plan.config.serial.retain(|s| !names.contains(&s.name));
        }
    }

    /// Reopens GPIO with the plan's `[gpio]`. Returns false when that failed and the running
    /// `[gpio]` was reopened instead (or nothing could be: GPIO commands then fail).
    fn reload_gpio(&mut self, plan: &ReloadPlan, now: Instant) -> bool {
        // Removed outputs: end their pulses while the old backend still holds the pins.
        for &oi in &plan.outputs.removed {
            let Some((pin, Some(p))) = self.outputs.get(oi).map(|o| (o.pin, o.pulse)) else {
                continue;
            };
            let result = self.gpio.write(pin, p.restore).map_err(|e| e.to_string());
            self.outputs
                .pulse_ended(oi, p.restore, result, &mut self.fx);
        }
        // Now, while the effects' output indices still name the running outputs.
        self.apply_effects();
        // Pulse and debounce timers are keyed by index, and indices change.
        let stale: Vec<TimerId> = self
            .timers
            .keys()
            .filter(|id| matches!(id, TimerId::Pulse(_) | TimerId::Debounce(_)))
            .copied()
            .collect();
        for id in stale {
            if let Some(t) = self.timers.remove(&id) {
                self.handle.remove(t);
            }
        }
        if let Some(t) = self.sources.gpio.take() {
            self.handle.remove(t);
            self.reader_tokens.retain(|x| *x != t);
        }
        // Closed first: rppal cannot claim a pin the old backend still holds.
        drop(std::mem::replace(&mut self.gpio, Box::new(Closed)));

        let (opened, applied) = match crate::sources::gpio::open(&plan.gpio_to_open()) {
            Ok(g) => (Some(g), true),
            Err(e) => {
                log::error!(
                    "reload: cannot open GPIO with the new configuration: {e}; the running \
                     [gpio] configuration is kept"
                );
                match crate::sources::gpio::open(&keep_all(&self.cfg.gpio)) {
                    Ok(g) => (Some(g), false),
                    Err(e) => {
                        log::error!(
                            "reload: cannot reopen GPIO: {e}; GPIO commands fail until zgate \
                             is restarted"
                        );
                        (None, false)
                    }
                }
            }
        };
        let Some(OpenGpio {
            backend,
            events,
            levels,
        }) = opened
        else {
            return false;
        };
        self.gpio = backend;
        match insert_gpio_events(&self.handle, events) {
            Ok(t) => {
                self.sources.gpio = Some(t);
                self.reader_tokens.push(t);
            }
            Err(e) => log::error!("reload: {e}: GPIO input changes are not seen"),
        }
        let (gpio_cfg, input_map, output_map): (&GpioConfig, Vec<_>, Vec<_>) = if applied {
            (
                &plan.config.gpio,
                plan.inputs.kept().collect(),
                plan.outputs.kept().collect(),
            )
        } else {
            let n_in = self.cfg.gpio.input.len();
            let n_out = self.cfg.gpio.output.len();
            (
                &self.cfg.gpio,
                (0..n_in).map(|i| (i, i)).collect(),
                (0..n_out).map(|i| (i, i)).collect(),
            )
        };
        let mut outputs = Outputs::new(&gpio_cfg.output);
        let mut inputs = Inputs::new(&gpio_cfg.input);
        for &(oi, ni) in &output_map {
            if let Some(old) = self.outputs.get(oi) {
                outputs.take_over(ni, old);
            }
        }
        outputs.set_levels_read(&levels);
        for (ni, out) in outputs.iter().enumerate() {
            if let Some(p) = out.pulse {
                self.fx.push(Effect::Arm(TimerId::Pulse(ni), p.until));
            }
        }
        for &(oi, ni) in &input_map {
            if let Some(old) = self.inputs.get(oi) {
                inputs.set_level(ni, old.level);
            }
        }
        for (ni, cfg) in gpio_cfg.input.iter().enumerate() {
            let Some(&level) = levels.get(&cfg.pin) else {
                continue;
            };
            if input_map.iter().any(|&(_, n)| n == ni) {
                // A change while the backend was reopened is a change like any other.
                inputs.on_level(ni, level, now, &mut self.fx);
            } else {
                inputs.set_level(ni, level);
            }
        }
        self.outputs = outputs;
        self.inputs = inputs;
        // GPIO was reopened: a reading of every output's level, as `hello` is not sent again.
        self.outputs.report_all(LevelCause::Reload, &mut self.fx);
        applied
    }
}
