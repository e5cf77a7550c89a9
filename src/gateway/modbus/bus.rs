//! One Modbus RTU bus as a state machine: which request goes out next, when, and what a
//! response (or its absence) means. It takes `now` and the bytes received and returns
//! [`BusEffect`]s; the interpreter writes the frames, arms the bus's one timer, stores the
//! readings and sends the replies.
//!
//! Rules: one request in flight (RS-485 is half-duplex); the line stays quiet for 3.5
//! characters (1.75 ms above 19200 baud) after every response or timeout; a retry of the
//! request in progress goes first, then queued writes, then the next block of the poll in
//! progress, then the device whose poll is most overdue (ties: the next after the last one
//! polled). A request's deadline is the time to send it and to receive the expected response
//! at the bus's baud rate, plus `timeout_ms`; a device that does not answer so costs at most
//! `(timeout_ms + wire time) × (retries + 1)` per poll. Each device keeps its own schedule
//! (`next_due += poll_ms`; a device more than a period behind starts afresh from now).

use super::frame::{self, EXCEPTION_LEN, WRITE_RESPONSE_LEN};
use super::plan::{self, Raw, ReadBlock};
use crate::config::{ModbusConfig, Parity, RegisterConfig};
use crate::limit::LogLimits;
use crate::protocol::Values;
use rmodbus::client::ModbusRequest;
use rmodbus::ErrorKind;
use serde_json::Value;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Writes waiting for the bus at most; more are refused.
pub const MAX_QUEUED_WRITES: usize = 16;

/// What the bus asks of the interpreter.
#[derive(Debug, Clone, PartialEq)]
pub enum BusEffect {
    /// Discard unread input, then write this frame (non-blocking).
    Send(Vec<u8>),
    /// Call [`Bus::on_timer`] at this time (replaces the previous wake-up).
    Wake(Instant),
    /// A poll of device number `device` completed: every register's value, in configuration
    /// order (one reading).
    Reading {
        /// The device's index on the bus.
        device: usize,
        /// Its values.
        values: Values,
    },
    /// The write of command `id` ended: after the slave's response, or failed.
    WriteDone {
        /// The command id.
        id: String,
        /// `Err` holds the reason (exception, timeout, broken response).
        result: Result<(), String>,
    },
}

/// The poll counters of one device, as `stats` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Polls started.
    pub polls: u64,
    /// Polls that became a reading.
    pub ok: u64,
    /// Polls that failed because the device did not answer (after the retries).
    pub timeouts: u64,
    /// Polls that failed on a broken response (bad CRC, wrong length, wrong unit or function).
    pub crc_errors: u64,
    /// Polls that failed on an exception response.
    pub exceptions: u64,
}

/// What a command target means on this bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Not a name of this bus.
    NotHere,
    /// The bus itself, or a device without a register part.
    NotRegister,
    /// Register `reg` of device `device`.
    Register {
        /// Device index.
        device: usize,
        /// Register index in the device's configuration.
        reg: usize,
    },
}

struct Device {
    name: String,
    unit: u8,
    poll: Duration,
    regs: Vec<RegisterConfig>,
    blocks: Vec<ReadBlock>,
    /// The block of each register.
    reg_block: Vec<usize>,
    next_due: Instant,
    stats: DeviceStats,
}

#[derive(Debug, Clone)]
enum Job {
    Read {
        device: usize,
        block: usize,
    },
    Write {
        device: usize,
        reg: usize,
        id: String,
    },
}

struct Request {
    job: Job,
    req: ModbusRequest,
    frame: Vec<u8>,
    /// Length of the normal (non-exception) response.
    expect: usize,
    attempt: u32,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Timeout,
    Broken,
    Exception(u8),
}

/// One bus (see the module doc).
pub struct Bus {
    name: String,
    devices: Vec<Device>,
    timeout: Duration,
    retries: u32,
    char_time: Duration,
    gap: Duration,
    writes: VecDeque<Request>,
    retry: Option<Request>,
    in_flight: Option<(Request, Instant)>,
    /// The poll in progress: device, next block, the blocks read so far.
    poll: Option<(usize, usize, Vec<Raw>)>,
    quiet_until: Instant,
    last_device: usize,
    rx: Vec<u8>,
    logs: LogLimits,
}

impl Bus {
    /// A bus from its configuration; every device is due at `now`.
    pub fn new(cfg: &ModbusConfig, now: Instant) -> Bus {
        let bits = 1 + 8 + u32::from(cfg.parity != Parity::None) + u32::from(cfg.stop_bits);
        let char_time = Duration::from_secs_f64(f64::from(bits) / f64::from(cfg.baud));
        let gap = if cfg.baud > 19200 {
            Duration::from_micros(1750)
        } else {
            char_time.mul_f64(3.5)
        };
        let devices = cfg
            .device
            .iter()
            .map(|d| {
                let blocks = plan::read_blocks(&d.register);
                let reg_block = d
                    .register
                    .iter()
                    .map(|r| plan::block_of(&blocks, r).unwrap_or(0))
                    .collect();
                Device {
                    name: d.name.clone(),
                    unit: d.unit,
                    poll: Duration::from_millis(d.poll_ms),
                    regs: d.register.clone(),
                    blocks,
                    reg_block,
                    next_due: now,
                    stats: DeviceStats::default(),
                }
            })
            .collect::<Vec<_>>();
        Bus {
            name: cfg.name.clone(),
            last_device: devices.len().saturating_sub(1),
            devices,
            timeout: Duration::from_millis(cfg.timeout_ms),
            retries: cfg.retries,
            char_time,
            gap,
            writes: VecDeque::new(),
            retry: None,
            in_flight: None,
            poll: None,
            quiet_until: now,
            rx: Vec::with_capacity(256),
            logs: LogLimits::default(),
        }
    }

    /// The bus's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of device number `device`.
    pub fn device_name(&self, device: usize) -> &str {
        &self.devices[device].name
    }

    /// Every device's name and counters, in configuration order.
    pub fn stats(&self) -> impl Iterator<Item = (&str, &DeviceStats)> {
        self.devices.iter().map(|d| (d.name.as_str(), &d.stats))
    }

    /// The time one character takes on the line (start, 8 data, parity and stop bits).
    pub fn char_time(&self) -> Duration {
        self.char_time
    }

    /// What `target` (`device.register`) names on this bus.
    pub fn resolve(&self, target: &str) -> Target {
        if target == self.name {
            return Target::NotRegister;
        }
        for (device, d) in self.devices.iter().enumerate() {
            if target == d.name {
                return Target::NotRegister;
            }
            let Some(rest) = target.strip_prefix(d.name.as_str()) else {
                continue;
            };
            let Some(reg_name) = rest.strip_prefix('.') else {
                continue;
            };
            if let Some(reg) = d.regs.iter().position(|r| r.name == reg_name) {
                return Target::Register { device, reg };
            }
        }
        Target::NotHere
    }

    /// Starts the schedule: the first poll goes out now.
    pub fn start(&mut self, now: Instant, out: &mut Vec<BusEffect>) {
        self.kick(now, out);
    }

    /// Queues the write of `value` to register `reg` of `device` for command `id`; it goes
    /// before the next poll request. Refused (nothing sent) when the register is not
    /// writable, the value does not fit, or [`MAX_QUEUED_WRITES`] wait already.
    pub fn write(
        &mut self,
        id: &str,
        device: usize,
        reg: usize,
        value: f64,
        now: Instant,
        out: &mut Vec<BusEffect>,
    ) -> Result<(), String> {
        let d = &self.devices[device];
        let r = &d.regs[reg];
        if !r.writable {
            return Err(format!(
                "{}.{} is not writable (set writable = true on a holding register or coil)",
                d.name, r.name
            ));
        }
        let op = plan::encode(r, value).map_err(|e| format!("{}.{}: {e}", d.name, r.name))?;
        if self.writes.len() >= MAX_QUEUED_WRITES {
            return Err(format!(
                "bus {} has {MAX_QUEUED_WRITES} writes waiting: try again later",
                self.name
            ));
        }
        let (req, frame) = frame::write_request(d.unit, r.address, op)?;
        self.writes.push_back(Request {
            job: Job::Write {
                device,
                reg,
                id: id.to_string(),
            },
            req,
            frame,
            expect: WRITE_RESPONSE_LEN,
            attempt: 0,
        });
        self.kick(now, out);
        Ok(())
    }

    /// The bus's timer fired.
    pub fn on_timer(&mut self, now: Instant, out: &mut Vec<BusEffect>) {
        if let Some((_, deadline)) = &self.in_flight {
            if now < *deadline {
                out.push(BusEffect::Wake(*deadline));
                return;
            }
            let failure = if self.rx.is_empty() {
                Failure::Timeout
            } else {
                Failure::Broken
            };
            let (request, _) = self.in_flight.take().expect("checked above");
            self.failed(request, failure, now, out);
        }
        self.kick(now, out);
    }

    /// Bytes received on the bus.
    pub fn on_bytes(&mut self, data: &[u8], now: Instant, out: &mut Vec<BusEffect>) {
        let Some((request, _)) = &self.in_flight else {
            // Nothing asked: noise, or a late answer to a request given up on.
            return;
        };
        let room = 256usize.saturating_sub(self.rx.len());
        self.rx.extend_from_slice(&data[..data.len().min(room)]);
        let exception = self.rx.len() >= 2 && self.rx[1] == request.req.func.byte() | 0x80;
        let need = if exception {
            EXCEPTION_LEN
        } else {
            request.expect
        };
        if self.rx.len() < need {
            return;
        }
        let (request, _) = self.in_flight.take().expect("checked above");
        let frame = &self.rx[..need];
        let result = if exception {
            // rmodbus checks CRC and unit, then reports the exception as an error of its
            // own (it knows codes 1 to 9 only: any code is taken from the frame).
            match request.req.parse_ok(frame) {
                Err(ErrorKind::FrameCRCError | ErrorKind::FrameBroken) | Ok(()) => {
                    Err(Failure::Broken)
                }
                Err(_) => Err(Failure::Exception(frame[2])),
            }
        } else {
            match request.job {
                Job::Read { .. } => frame::parse_read(&request.req, request.expect, frame)
                    .map(Some)
                    .ok_or(Failure::Broken),
                Job::Write { .. } => {
                    (request.req.parse_ok(frame).map(|()| None)).map_err(|_| Failure::Broken)
                }
            }
        };
        match result {
            Ok(raw) => self.succeeded(request, raw, now, out),
            Err(f) => self.failed(request, f, now, out),
        }
        self.kick(now, out);
    }

    fn succeeded(
        &mut self,
        request: Request,
        raw: Option<Raw>,
        now: Instant,
        out: &mut Vec<BusEffect>,
    ) {
        self.quiet_until = now + self.gap;
        match request.job {
            Job::Write { device, reg, id } => {
                let d = &self.devices[device];
                log::info!(
                    "command id={id} target={}.{} action=set: written bus={} unit={}",
                    d.name,
                    d.regs[reg].name,
                    self.name,
                    d.unit
                );
                out.push(BusEffect::WriteDone { id, result: Ok(()) });
            }
            Job::Read { device, block } => {
                let Some((_, _, mut raws)) = self.poll.take() else {
                    return;
                };
                raws.extend(raw);
                if block + 1 < self.devices[device].blocks.len() {
                    self.poll = Some((device, block + 1, raws));
                    return;
                }
                let d = &mut self.devices[device];
                d.stats.ok += 1;
                out.push(BusEffect::Reading {
                    device,
                    values: Self::values(d, &raws),
                });
            }
        }
    }

    /// A completed poll's values: every register in configuration order.
    fn values(d: &Device, raws: &[Raw]) -> Values {
        let vals: Vec<Value> = d
            .regs
            .iter()
            .zip(&d.reg_block)
            .map(|(r, &b)| {
                raws.get(b)
                    .and_then(|raw| plan::decode(r, d.blocks[b].start, raw))
                    .unwrap_or(Value::Null)
            })
            .collect();
        let pairs: Vec<(&str, &Value)> =
            d.regs.iter().map(|r| r.name.as_str()).zip(&vals).collect();
        Values::pairs(&pairs)
    }

    fn failed(&mut self, mut request: Request, f: Failure, now: Instant, out: &mut Vec<BusEffect>) {
        self.quiet_until = now + self.gap;
        // An exception is an answer: sending the same request again would get the same one.
        if !matches!(f, Failure::Exception(_)) && request.attempt < self.retries {
            request.attempt += 1;
            self.retry = Some(request);
            return;
        }
        let attempts = request.attempt + 1;
        let device = match &request.job {
            Job::Read { device, .. } | Job::Write { device, .. } => *device,
        };
        let d = &mut self.devices[device];
        let reason = match f {
            Failure::Timeout => format!(
                "no response from {} (unit {}) after {attempts} attempt(s) of {} ms",
                d.name,
                d.unit,
                self.timeout.as_millis()
            ),
            Failure::Broken => format!(
                "broken response from {} (unit {}): bad CRC, length, unit or function, after \
                 {attempts} attempt(s)",
                d.name, d.unit
            ),
            Failure::Exception(code) => format!(
                "exception response from {} (unit {}): {} (code {code})",
                d.name,
                d.unit,
                frame::exception_name(code)
            ),
        };
        let kind: &'static str = match f {
            Failure::Timeout => "modbus timeout",
            Failure::Broken => "modbus crc error",
            Failure::Exception(_) => "modbus exception",
        };
        let address = request.req.reg;
        match request.job {
            Job::Read { .. } => {
                match f {
                    Failure::Timeout => d.stats.timeouts += 1,
                    Failure::Broken => d.stats.crc_errors += 1,
                    Failure::Exception(_) => d.stats.exceptions += 1,
                }
                self.poll = None;
                if self.logs.allow(kind, now) {
                    log::warn!(
                        "modbus poll failed bus={} device={} function={} address={address}: {reason}",
                        self.name,
                        d.name,
                        request.req.func.byte()
                    );
                }
            }
            Job::Write { id, .. } => {
                out.push(BusEffect::WriteDone {
                    id,
                    result: Err(reason),
                });
            }
        }
    }

    /// Sends the next request if the bus is free and quiet, or says when to look again.
    fn kick(&mut self, now: Instant, out: &mut Vec<BusEffect>) {
        if let Some((_, deadline)) = &self.in_flight {
            out.push(BusEffect::Wake(*deadline));
            return;
        }
        let has_work = self.retry.is_some() || !self.writes.is_empty() || self.poll.is_some();
        if now < self.quiet_until {
            let next = if has_work {
                self.quiet_until
            } else {
                self.next_due().max(self.quiet_until)
            };
            out.push(BusEffect::Wake(next));
            return;
        }
        let request = if let Some(r) = self.retry.take() {
            Some(r)
        } else if let Some(w) = self.writes.pop_front() {
            Some(w)
        } else if let Some((device, block, _)) = &self.poll {
            Some(self.read_request(*device, *block))
        } else {
            self.start_poll(now)
        };
        match request {
            Some(r) => self.send(r, now, out),
            None => out.push(BusEffect::Wake(self.next_due())),
        }
    }

    fn next_due(&self) -> Instant {
        self.devices
            .iter()
            .map(|d| d.next_due)
            .min()
            .unwrap_or(self.quiet_until)
    }

    /// The most overdue device's poll, if one is due.
    fn start_poll(&mut self, now: Instant) -> Option<Request> {
        let n = self.devices.len();
        let device = (1..=n)
            .map(|k| (self.last_device + k) % n)
            .filter(|&i| self.devices[i].next_due <= now)
            .min_by_key(|&i| self.devices[i].next_due)?;
        let d = &mut self.devices[device];
        let next = d.next_due + d.poll;
        d.next_due = if next > now { next } else { now + d.poll };
        d.stats.polls += 1;
        self.last_device = device;
        self.poll = Some((device, 0, Vec::with_capacity(d.blocks.len())));
        Some(self.read_request(device, 0))
    }

    fn read_request(&self, device: usize, block: usize) -> Request {
        let d = &self.devices[device];
        let (req, frame, expect) = frame::read_request(d.unit, &d.blocks[block]);
        Request {
            job: Job::Read { device, block },
            req,
            frame,
            expect,
            attempt: 0,
        }
    }

    fn send(&mut self, request: Request, now: Instant, out: &mut Vec<BusEffect>) {
        self.rx.clear();
        let wire = self.char_time * (request.frame.len() + request.expect) as u32;
        let deadline = now + wire + self.timeout;
        out.push(BusEffect::Send(request.frame.clone()));
        out.push(BusEffect::Wake(deadline));
        self.in_flight = Some((request, deadline));
    }
}
