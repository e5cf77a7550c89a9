//! The bus state machine driven by hand: time advances only when the test says so, and the
//! slaves are rmodbus's server side ([`SimSlave`]) answering after the wire time of the
//! request and the response.

use super::bus::{Bus, BusEffect, Target};
use super::frame::exception_name;
use crate::config::{Config, ModbusConfig};
use crate::modbus_sim::SimSlave;
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn bus_config(devices: &str) -> ModbusConfig {
    let text = format!(
        "[gateway]\nid = \"g\"\n[[modbus]]\nname = \"bus1\"\npath = \"/dev/null\"\n\
         timeout_ms = 50\nretries = 1\n{devices}"
    );
    Config::parse(&text, "t").unwrap().modbus.remove(0)
}

const METER: &str = r#"
[[modbus.device]]
name = "meter"
unit = 1
poll_ms = 100
[[modbus.device.register]]
name = "voltage"
kind = "input"
address = 0
scale = 0.1
[[modbus.device.register]]
name = "power"
kind = "input"
address = 1
type = "f32"
[[modbus.device.register]]
name = "setpoint"
kind = "holding"
address = 10
type = "i16"
writable = true
[[modbus.device.register]]
name = "relay"
kind = "coil"
address = 3
writable = true
[[modbus.device.register]]
name = "counter"
kind = "holding"
address = 20
type = "u32"
"#;

/// A bus, its slaves and a clock.
struct Rig {
    bus: Bus,
    slaves: Vec<SimSlave>,
    now: Instant,
    out: Vec<BusEffect>,
    wake: Option<Instant>,
    /// A response on its way: (arrival, bytes).
    incoming: Option<(Instant, Vec<u8>)>,
    /// Every frame sent, with its time.
    sent: Vec<(Instant, Vec<u8>)>,
    /// Every arrival of a response.
    arrivals: Vec<Instant>,
    readings: Vec<(Instant, String, Map<String, Value>)>,
    replies: Vec<(String, Result<(), String>)>,
    /// Applied to every response before it is delivered.
    corrupt: Option<fn(&mut Vec<u8>)>,
}

impl Rig {
    fn new(devices: &str, slaves: Vec<SimSlave>) -> Rig {
        let now = Instant::now();
        let cfg = bus_config(devices);
        let mut rig = Rig {
            bus: Bus::new(&cfg, now),
            slaves,
            now,
            out: Vec::new(),
            wake: None,
            incoming: None,
            sent: Vec::new(),
            arrivals: Vec::new(),
            readings: Vec::new(),
            replies: Vec::new(),
            corrupt: None,
        };
        rig.bus.start(now, &mut rig.out);
        rig.absorb();
        rig
    }

    fn absorb(&mut self) {
        for e in std::mem::take(&mut self.out) {
            match e {
                BusEffect::Send(frame) => {
                    self.sent.push((self.now, frame.clone()));
                    let answer = self.slaves.iter_mut().find_map(|s| s.answer(&frame));
                    if let Some(mut resp) = answer {
                        if let Some(c) = self.corrupt {
                            c(&mut resp);
                        }
                        let wire = self.bus.char_time() * (frame.len() + resp.len()) as u32;
                        self.incoming = Some((self.now + wire + ms(1), resp));
                    }
                }
                BusEffect::Wake(at) => self.wake = Some(at),
                BusEffect::Reading { device, values } => {
                    let name = self.bus.device_name(device).to_string();
                    self.readings.push((self.now, name, values.to_map()));
                }
                BusEffect::WriteDone { id, result } => self.replies.push((id, result)),
            }
        }
    }

    /// Runs the loop (responses and timer) until `until`.
    fn run(&mut self, until: Instant) {
        loop {
            let arrival = self.incoming.as_ref().map(|(t, _)| *t);
            let next = match (arrival, self.wake) {
                (Some(a), Some(w)) => a.min(w),
                (Some(a), None) => a,
                (None, Some(w)) => w,
                (None, None) => break,
            };
            if next > until {
                break;
            }
            self.now = next;
            if arrival == Some(next) {
                let (_, bytes) = self.incoming.take().unwrap();
                self.arrivals.push(next);
                self.bus.on_bytes(&bytes, next, &mut self.out);
            } else {
                self.wake = None;
                self.bus.on_timer(next, &mut self.out);
            }
            self.absorb();
        }
        self.now = until;
    }

    /// Corrupts every response from now on, the one on its way included.
    fn set_corrupt(&mut self, c: fn(&mut Vec<u8>)) {
        self.corrupt = Some(c);
        if let Some((_, r)) = &mut self.incoming {
            c(r);
        }
    }

    fn stats(&self, device: &str) -> super::DeviceStats {
        *self.bus.stats().find(|(n, _)| *n == device).unwrap().1
    }

    fn readings_of(&self, device: &str) -> Vec<Instant> {
        self.readings
            .iter()
            .filter(|(_, n, _)| n == device)
            .map(|(t, _, _)| *t)
            .collect()
    }
}

fn meter() -> SimSlave {
    let mut s = SimSlave::new(1);
    s.set_input(0, 2301);
    let p = 1234.5f32.to_bits();
    s.set_input(1, (p >> 16) as u16);
    s.set_input(2, p as u16);
    s.set_holding(10, (-7i16) as u16);
    s.set_coil(3, true);
    s.set_holding(20, 1);
    s.set_holding(21, 2);
    s
}

#[test]
fn one_poll_is_one_reading_with_merged_requests() {
    let mut rig = Rig::new(METER, vec![meter()]);
    let t0 = rig.now;
    rig.run(t0 + ms(99));
    assert_eq!(rig.readings.len(), 1);
    let want = json!({"voltage": 230.1, "power": 1234.5, "setpoint": -7, "relay": true,
                      "counter": 65538});
    assert_eq!(Value::Object(rig.readings[0].2.clone()), want);
    // input 0..3 (voltage + power), holding 10, holding 20..22, coil 3: four requests.
    assert_eq!(rig.sent.len(), 4);
    let functions: Vec<u8> = rig.sent.iter().map(|(_, f)| f[1]).collect();
    assert_eq!(functions, vec![3, 3, 4, 1]);
    assert_eq!(
        rig.sent[2].1[2..6],
        [0, 0, 0, 3],
        "inputs 0..3 in one request"
    );
    let s = rig.stats("meter");
    assert_eq!((s.polls, s.ok, s.timeouts), (1, 1, 0));
    // Polls keep their period.
    rig.run(t0 + ms(1000));
    let times = rig.readings_of("meter");
    assert_eq!(times.len(), 10);
    for w in times.windows(2) {
        let period = w[1] - w[0];
        assert!(period >= ms(99) && period <= ms(101), "{period:?}");
    }
}

#[test]
fn the_bus_stays_quiet_three_and_a_half_characters_between_frames() {
    let mut rig = Rig::new(METER, vec![meter()]);
    rig.run(rig.now + ms(500));
    let gap = rig.bus.char_time().mul_f64(3.5);
    assert!(
        gap > Duration::from_micros(3600),
        "{gap:?} at 9600 8N1 (10 bits a character)"
    );
    for (arrival, (sent, _)) in rig.arrivals.iter().zip(rig.sent.iter().skip(1)) {
        assert!(
            *sent >= *arrival + gap,
            "sent {sent:?} < arrival {arrival:?} + gap"
        );
    }
}

#[test]
fn a_dead_unit_costs_its_timeouts_and_the_others_keep_their_period() {
    let devices = format!(
        "{}\n[[modbus.device]]\nname = \"ghost\"\nunit = 9\npoll_ms = 500\n\
         [[modbus.device.register]]\nname = \"x\"\nkind = \"holding\"\naddress = 0\n",
        METER.replace("poll_ms = 100", "poll_ms = 500")
    );
    let mut rig = Rig::new(&devices, vec![meter()]);
    let t0 = rig.now;
    rig.run(t0 + ms(10_000));
    let ghost = rig.stats("ghost");
    assert!(ghost.timeouts >= 19, "{ghost:?}");
    assert_eq!(ghost.ok, 0);
    assert!(
        ghost.polls - ghost.timeouts <= 1,
        "at most one in progress: {ghost:?}"
    );
    // Each ghost poll: two attempts, each the wire time + 50 ms.
    let ghost_frames: Vec<Instant> = rig
        .sent
        .iter()
        .filter(|(_, f)| f[0] == 9)
        .map(|(t, _)| *t)
        .collect();
    let cost = ghost_frames[1] - ghost_frames[0];
    // 8 bytes out, 7 expected back at 9600 (15.6 ms), 50 ms timeout, 3.6 ms gap.
    assert!(cost >= ms(65) && cost < ms(72), "{cost:?}");
    let times = rig.readings_of("meter");
    let mean = (times[times.len() - 1] - times[0]).as_secs_f64() / (times.len() - 1) as f64;
    assert!(
        (mean - 0.5).abs() < 0.05,
        "meter period {mean} s with a dead neighbour"
    );
}

#[test]
fn broken_responses_are_retried_then_counted() {
    let mut rig = Rig::new(METER, vec![meter()]);
    rig.set_corrupt(|r: &mut Vec<u8>| {
        let n = r.len();
        r[n - 1] ^= 0x55;
    });
    rig.run(rig.now + ms(250));
    let s = rig.stats("meter");
    assert!(s.crc_errors >= 2, "{s:?}");
    assert_eq!(s.ok, 0);
    assert!(rig.readings.is_empty());
    // Each broken response was sent twice (retries = 1).
    assert_eq!(rig.sent[0].1, rig.sent[1].1);
    // Truncated responses time out with bytes received: broken, not silent.
    let mut rig = Rig::new(METER, vec![meter()]);
    rig.set_corrupt(|r: &mut Vec<u8>| r.truncate(4));
    rig.run(rig.now + ms(250));
    let s = rig.stats("meter");
    assert!(s.crc_errors >= 1 && s.timeouts == 0, "{s:?}");
    // Garbage on the line and a response from the wrong unit are also broken.
    let mut rig = Rig::new(METER, vec![meter()]);
    rig.set_corrupt(|r: &mut Vec<u8>| r[0] = 7);
    rig.run(rig.now + ms(250));
    assert!(rig.stats("meter").crc_errors >= 1);
}

#[test]
fn an_exception_fails_the_poll_without_retry() {
    let devices = METER.replace("address = 20", "address = 2000");
    let mut rig = Rig::new(&devices, vec![meter()]);
    rig.run(rig.now + ms(50));
    let s = rig.stats("meter");
    assert_eq!((s.polls, s.exceptions, s.ok), (1, 1, 0));
    assert!(rig.readings.is_empty());
    assert_eq!(
        rig.sent.len(),
        2,
        "no retry, no further block of the failed poll"
    );
    assert_eq!(exception_name(2), "illegal data address");
}

#[test]
fn writes_go_before_the_next_poll_and_reply_after_the_response() {
    let mut rig = Rig::new(METER, vec![meter()]);
    rig.run(rig.now + ms(10));
    let polled = rig.sent.len();
    let Target::Register { device, reg } = rig.bus.resolve("meter.setpoint") else {
        panic!("resolve");
    };
    let mut out = Vec::new();
    rig.bus
        .write("w-1", device, reg, -123.0, rig.now, &mut out)
        .unwrap();
    rig.out = out;
    rig.absorb();
    assert!(rig.replies.is_empty(), "the reply waits for the slave");
    rig.run(rig.now + ms(30));
    assert_eq!(rig.replies, vec![("w-1".to_string(), Ok(()))]);
    assert_eq!(rig.slaves[0].holding(10), (-123i16) as u16);
    // The write went out right after the request in flight, before the poll's next block.
    assert_eq!(rig.sent[polled].1[1], 6, "function 06");
    // A coil.
    let Target::Register { device, reg } = rig.bus.resolve("meter.relay") else {
        panic!("resolve");
    };
    let mut out = Vec::new();
    rig.bus
        .write("w-2", device, reg, 0.0, rig.now, &mut out)
        .unwrap();
    rig.out = out;
    rig.absorb();
    rig.run(rig.now + ms(30));
    assert!(!rig.slaves[0].coil(3));
    // Refused without touching the bus: not writable, out of range, not a register.
    let sent = rig.sent.len();
    let Target::Register { device, reg } = rig.bus.resolve("meter.voltage") else {
        panic!("resolve");
    };
    let mut out = Vec::new();
    let e = rig.bus.write("w-3", device, reg, 1.0, rig.now, &mut out);
    assert!(e.unwrap_err().contains("not writable"));
    let Target::Register { device, reg } = rig.bus.resolve("meter.setpoint") else {
        panic!("resolve");
    };
    let e = rig
        .bus
        .write("w-4", device, reg, 40000.0, rig.now, &mut out);
    assert!(e.unwrap_err().contains("range"));
    assert!(out.is_empty());
    assert_eq!(rig.bus.resolve("meter"), Target::NotRegister);
    assert_eq!(rig.bus.resolve("meter.nope"), Target::NotHere);
    assert_eq!(rig.bus.resolve("other.voltage"), Target::NotHere);
    rig.run(rig.now + ms(1));
    assert_eq!(rig.sent.len(), sent);
}

#[test]
fn a_write_to_a_dead_or_refusing_slave_fails_with_the_reason() {
    // The slave refuses holding 10 writes: its storage ends at 999, so use address 1500.
    let devices = METER.replace("address = 10", "address = 1500");
    let mut rig = Rig::new(&devices, vec![meter()]);
    let Target::Register { device, reg } = rig.bus.resolve("meter.setpoint") else {
        panic!("resolve");
    };
    let mut out = Vec::new();
    rig.bus
        .write("w-1", device, reg, 1.0, rig.now, &mut out)
        .unwrap();
    rig.out.extend(out);
    rig.absorb();
    rig.run(rig.now + ms(100));
    let (id, result) = &rig.replies[0];
    assert_eq!(id, "w-1");
    assert!(
        result
            .as_ref()
            .unwrap_err()
            .contains("illegal data address"),
        "{result:?}"
    );
    // No slave at all: the reply comes after timeout x (retries + 1).
    let mut rig = Rig::new(METER, vec![]);
    let t0 = rig.now;
    rig.run(t0 + ms(200));
    let Target::Register { device, reg } = rig.bus.resolve("meter.setpoint") else {
        panic!("resolve");
    };
    let mut out = Vec::new();
    rig.bus
        .write("w-2", device, reg, 1.0, rig.now, &mut out)
        .unwrap();
    rig.out.extend(out);
    rig.absorb();
    let asked = rig.now;
    rig.run(asked + ms(400));
    let (_, result) = rig.replies.iter().find(|(id, _)| id == "w-2").unwrap();
    assert!(
        result.as_ref().unwrap_err().contains("no response"),
        "{result:?}"
    );
    assert!(rig.stats("meter").timeouts >= 1);
}

#[test]
fn a_reload_keeps_the_running_buses() {
    let text = |poll: u64| {
        format!(
            "[gateway]\nid = \"g\"\n[[modbus]]\nname = \"bus1\"\npath = \"/dev/null\"\n\
             [[modbus.device]]\nname = \"m\"\nunit = 1\npoll_ms = {poll}\n\
             [[modbus.device.register]]\nname = \"v\"\nkind = \"input\"\naddress = 0\n"
        )
    };
    let old = Config::parse(&text(1000), "t").unwrap();
    let new = Config::parse(&text(500), "t").unwrap();
    let plan = crate::gateway::reload::ReloadPlan::new(&old, new);
    assert!(
        plan.refused.iter().any(|r| r.key == "modbus"),
        "{:?}",
        plan.refused
    );
    assert_eq!(plan.config.modbus, old.modbus, "the running buses stay");
}

/// The Modbus CRC-16 (polynomial 0xA001), to build frames by hand.
fn crc(frame: &[u8]) -> [u8; 2] {
    let mut crc: u16 = 0xFFFF;
    for &b in frame {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc.to_le_bytes()
}

#[test]
fn every_exception_code_is_an_exception_and_a_bad_crc_is_not() {
    for (code, name) in [(2u8, "illegal data address"), (11, "gateway target device")] {
        let mut rig = Rig::new(METER, vec![]);
        let (_, first) = rig.sent[0].clone();
        let mut resp = vec![1, first[1] | 0x80, code];
        resp.extend(crc(&resp));
        let mut out = Vec::new();
        rig.bus.on_bytes(&resp, rig.now, &mut out);
        rig.out = out;
        rig.absorb();
        let s = rig.stats("meter");
        assert_eq!((s.exceptions, s.crc_errors), (1, 0), "code {code}");
        assert!(exception_name(code).starts_with(name));
    }
    let mut rig = Rig::new(METER, vec![]);
    let (_, first) = rig.sent[0].clone();
    let mut resp = vec![1, first[1] | 0x80, 2];
    resp.extend(crc(&resp));
    resp[4] ^= 1;
    let mut out = Vec::new();
    rig.bus.on_bytes(&resp, rig.now, &mut out);
    rig.out = out;
    rig.absorb();
    let s = rig.stats("meter");
    assert_eq!(
        (s.exceptions, s.crc_errors),
        (0, 0),
        "retried first (retries = 1)"
    );
    assert_eq!(rig.sent.len(), 1, "the retry waits for the gap");
}
