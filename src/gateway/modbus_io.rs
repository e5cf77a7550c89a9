//! The loop's side of the Modbus buses: each bus's tty as a level-triggered source, its one
//! timer ([`TimerId::Modbus`]), `set` commands on `device.register` targets, and the
//! `modbus` part of `stats`. The decisions are the [`Bus`] state machine's; its effects are
//! applied by the interpreter (`interpret.rs`, [`Gateway::apply_bus`]).

use super::modbus::{Bus, BusEffect, Target};
use super::*;
use crate::config::ModbusConfig;
use calloop::generic::Generic;
use calloop::{Interest, Mode, PostAction};
use serde_json::{Map, Value};
use std::os::fd::OwnedFd;
use std::rc::Rc;

/// How often a bus whose tty cannot be opened is tried again.
const REOPEN_EVERY: Duration = Duration::from_secs(5);

/// One bus in the loop: its state machine and its tty.
pub struct BusIo {
    /// The state machine.
    pub bus: Bus,
    cfg: ModbusConfig,
    fd: Option<Rc<OwnedFd>>,
    token: Option<RegistrationToken>,
    next_open: Instant,
    /// Bytes read in one wake (kept: no allocation per read).
    rx: Vec<u8>,
    /// The state machine's effects waiting to be applied (kept, like `Gateway::fx`).
    pub(super) out: Vec<BusEffect>,
    logs: LogLimits,
}

impl BusIo {
    /// A bus from its configuration, not open yet.
    pub fn new(cfg: &ModbusConfig, now: Instant) -> BusIo {
        BusIo {
            bus: Bus::new(cfg, now),
            cfg: cfg.clone(),
            fd: None,
            token: None,
            next_open: now,
            rx: Vec::with_capacity(512),
            out: Vec::new(),
            logs: LogLimits::default(),
        }
    }
}

impl Gateway {
    /// Opens every bus and starts its schedule (a bus whose tty is missing polls into
    /// timeouts and is opened again every few seconds).
    pub(super) fn start_modbus(&mut self, now: Instant) {
        for b in 0..self.modbus.len() {
            self.open_bus(b, now);
            let io = &mut self.modbus[b];
            io.bus.start(now, &mut io.out);
            self.apply_bus(b, now);
        }
    }

    /// Opens the tty of bus `b` and adds it to the loop, unless it is open or was tried less
    /// than [`REOPEN_EVERY`] ago.
    fn open_bus(&mut self, b: usize, now: Instant) {
        let io = &mut self.modbus[b];
        if io.fd.is_some() || now < io.next_open {
            return;
        }
        io.next_open = now + REOPEN_EVERY;
        let fd = match crate::sources::modbus::open_bus(&io.cfg) {
            Ok(fd) => fd,
            Err(e) => {
                if io.logs.allow("modbus open failed", now) {
                    log::warn!(
                        "modbus bus cannot be opened bus={} path={} error=\"{e}\": its polls \
                         time out until it can (tried again every {} s)",
                        io.cfg.name,
                        io.cfg.path.display(),
                        REOPEN_EVERY.as_secs()
                    );
                }
                return;
            }
        };
        // Edge-triggered, as the serial source is (a level-triggered tty makes every
        // epoll_wait wait for the tty's flip-buffer work; see `sources::serial`). Bytes left
        // past `read_available`'s cap are line noise: the next request discards unread input.
        let source = Generic::new(fd.clone(), Interest::READ, Mode::Edge);
        let inserted = self
            .handle
            .insert_source(source, move |_, _, gw: &mut Gateway| {
                Ok(if gw.on_modbus_readable(b) {
                    PostAction::Continue
                } else {
                    PostAction::Remove
                })
            });
        match inserted {
            Ok(token) => {
                log::info!(
                    "modbus bus open bus={} path={} baud={} parity={:?} stop_bits={} devices={}",
                    io.cfg.name,
                    io.cfg.path.display(),
                    io.cfg.baud,
                    io.cfg.parity,
                    io.cfg.stop_bits,
                    io.cfg.device.len()
                );
                io.fd = Some(fd);
                io.token = Some(token);
                self.reader_tokens.push(token);
            }
            Err(e) => log::error!("cannot add modbus bus {}: {}", io.cfg.name, e.error),
        }
    }

    /// Bus `b`'s tty is readable; false when it was lost (the source is removed).
    fn on_modbus_readable(&mut self, b: usize) -> bool {
        let now = Instant::now();
        let io = &mut self.modbus[b];
        let Some(fd) = io.fd.clone() else {
            return false;
        };
        if let Err(e) = crate::sources::modbus::read_available(&*fd, &mut io.rx) {
            log::warn!(
                "modbus bus lost bus={} path={} error=\"{e}\": opened again when it is back",
                io.cfg.name,
                io.cfg.path.display()
            );
            io.fd = None;
            if let Some(t) = io.token.take() {
                self.reader_tokens.retain(|&x| x != t);
            }
            io.next_open = now + REOPEN_EVERY;
            return false;
        }
        io.bus.on_bytes(&io.rx, now, &mut io.out);
        self.apply_bus(b, now);
        true
    }

    /// Bus `b`'s timer fired.
    pub(super) fn on_modbus_timer(&mut self, b: usize) {
        // Shutting down: no new requests (the timer is not armed again).
        if self.shutdown_deadline.is_some() {
            return;
        }
        let now = Instant::now();
        let io = &mut self.modbus[b];
        io.bus.on_timer(now, &mut io.out);
        self.apply_bus(b, now);
    }

    /// [`BusEffect::Send`]: writes a request to bus `b` (opening it first if it is closed and
    /// due for another try). Not sent, the request times out in the state machine.
    pub(super) fn modbus_send(&mut self, b: usize, frame: &[u8], now: Instant) {
        self.open_bus(b, now);
        let io = &mut self.modbus[b];
        let Some(fd) = &io.fd else {
            return;
        };
        if let Err(e) = crate::sources::modbus::send(&**fd, frame) {
            if io.logs.allow("modbus send failed", now) {
                log::warn!("modbus request not sent bus={} error=\"{e}\"", io.cfg.name);
            }
        }
    }

    /// A command whose target is a Modbus name: `None` when it is not one. `Ok(false)`: the
    /// write is queued and answered after the slave's response.
    pub(super) fn modbus_execute(
        &mut self,
        cmd: &Command,
        now: Instant,
    ) -> Option<Result<bool, String>> {
        let (b, target) = self
            .modbus
            .iter()
            .enumerate()
            .map(|(b, io)| (b, io.bus.resolve(&cmd.target)))
            .find(|(_, t)| *t != Target::NotHere)?;
        let Target::Register { device, reg } = target else {
            return Some(Err(format!(
                "{} is a Modbus bus or device: use \"<device>.<register>\" as the target",
                cmd.target
            )));
        };
        let value = match cmd.action {
            protocol::Action::Set(v) => f64::from(v),
            protocol::Action::SetNumber(v) => v,
            _ => return Some(Err(format!("{} is a Modbus register: use set", cmd.target))),
        };
        let io = &mut self.modbus[b];
        if let Err(e) = io.bus.write(&cmd.id, device, reg, value, now, &mut io.out) {
            return Some(Err(e));
        }
        self.apply_bus(b, now);
        Some(Ok(false))
    }

    /// The `modbus` object of `stats`: bus → device → poll counters.
    pub(super) fn modbus_stats(&self) -> Map<String, Value> {
        self.modbus
            .iter()
            .map(|io| {
                let devices: Map<String, Value> = io
                    .bus
                    .stats()
                    .map(|(name, s)| {
                        (
                            name.to_string(),
                            json!({
                                "polls": s.polls,
                                "ok": s.ok,
                                "timeouts": s.timeouts,
                                "crc_errors": s.crc_errors,
                                "exceptions": s.exceptions,
                            }),
                        )
                    })
                    .collect();
                (io.bus.name().to_string(), Value::Object(devices))
            })
            .collect()
    }
}
