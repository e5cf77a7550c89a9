//! `[[modbus]]`: Modbus RTU buses, their devices and registers, and the checks serde cannot
//! express for them (ranges, kinds against types, overlapping addresses, units used twice).

use super::validate::ErrAt;
use super::{ConfigError, STANDARD_BAUD_RATES};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::PathBuf;

/// `[[modbus]] parity`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// No parity bit (the default).
    #[default]
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// One `[[modbus]]` bus: a serial line (RS-485) with one master (the gateway) and its slaves.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    /// The bus's name (in `stats`); unique across all names.
    pub name: String,
    /// The tty device of the RS-485 adapter.
    pub path: PathBuf,
    /// One of [`STANDARD_BAUD_RATES`] (default 9600).
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Parity bit (default none).
    #[serde(default)]
    pub parity: Parity,
    /// 1 or 2 stop bits (default 1).
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// How long to wait for a response to one request, in ms, beyond the time the request
    /// and the expected response take on the wire (10 to 60000, default 200).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Times a request is sent again after a timeout or a broken response before the poll
    /// (or the write) fails (0 to 10, default 1).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// `[[modbus.device]]`: the slaves polled on this bus.
    #[serde(default)]
    pub device: Vec<ModbusDeviceConfig>,
}

/// One `[[modbus.device]]`: a slave, polled every `poll_ms`; each poll is one reading.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModbusDeviceConfig {
    /// The readings' `source` and the first part of command targets; unique across all names.
    pub name: String,
    /// The slave address, 1 to 247.
    pub unit: u8,
    /// Time between the starts of two polls, in ms (10 to 86400000, default 1000).
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// `[[modbus.device.register]]`: the values read at each poll.
    #[serde(default)]
    pub register: Vec<RegisterConfig>,
    /// Which polls are sent and when (`report`, `deadband`, `deadbands`, `min_interval_ms`,
    /// `max_interval_s`).
    #[serde(flatten)]
    pub report: super::ReportConfig,
}

/// `[[modbus.device.register]] kind`: which Modbus table the address is in.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum RegisterKind {
    /// Holding registers (read with function 03, written with 06/16).
    Holding,
    /// Input registers (function 04, read-only).
    Input,
    /// Coils (function 01, written with 05).
    Coil,
    /// Discrete inputs (function 02, read-only).
    Discrete,
}

impl RegisterKind {
    /// Whether the table holds single bits (coils, discrete inputs) rather than 16-bit words.
    pub fn is_bit(self) -> bool {
        matches!(self, RegisterKind::Coil | RegisterKind::Discrete)
    }
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            RegisterKind::Holding => "holding",
            RegisterKind::Input => "input",
            RegisterKind::Coil => "coil",
            RegisterKind::Discrete => "discrete",
        }
    }
}

/// `[[modbus.device.register]] type`: how the raw register(s) become a number.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    /// One register, unsigned.
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, two's complement.
    I32,
    /// Two registers, IEEE 754 single precision.
    F32,
    /// One coil or discrete input.
    Bool,
}

impl ValueType {
    /// How many registers (or bits) the value takes.
    pub fn width(self) -> u16 {
        match self {
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            _ => 1,
        }
    }
}

/// `[[modbus.device.register]] word_order`: which register of a 32-bit value comes first.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum WordOrder {
    /// The high word at `address`, the low word at `address + 1` (the default).
    #[default]
    Big,
    /// The low word at `address`.
    Little,
}

/// One `[[modbus.device.register]]`: a value of the device's readings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// The key in the reading's `values`, and the second part of a command target
    /// (`device.register`); unique within its device.
    pub name: String,
    /// Which table.
    pub kind: RegisterKind,
    /// 0-based address in that table.
    pub address: u16,
    /// The value's type; `u16` for registers and `bool` for coils and discrete inputs when
    /// not given (use [`RegisterConfig::value_type`]).
    #[serde(rename = "type", default)]
    pub ty: Option<ValueType>,
    /// Word order of 32-bit types (default big).
    #[serde(default)]
    pub word_order: WordOrder,
    /// value = raw × scale + offset (default 1).
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// value = raw × scale + offset (default 0).
    #[serde(default)]
    pub offset: f64,
    /// Whether a `set` command may write it (holding registers and coils only).
    #[serde(default)]
    pub writable: bool,
}

impl RegisterConfig {
    /// The value's type, with the default for its kind.
    pub fn value_type(&self) -> ValueType {
        match self.ty {
            Some(t) => t,
            None if self.kind.is_bit() => ValueType::Bool,
            None => ValueType::U16,
        }
    }
}

fn default_baud() -> u32 {
    9600
}
fn default_stop_bits() -> u8 {
    1
}
fn default_timeout_ms() -> u64 {
    200
}
fn default_retries() -> u32 {
    1
}
fn default_poll_ms() -> u64 {
    1000
}
fn default_scale() -> f64 {
    1.0
}

/// Checks every `[[modbus]]` bus; `serial_paths` are the `[[serial]]` ports' devices (a bus
/// may not share one). Names are checked for uniqueness by the caller.
pub(super) fn validate(
    buses: &[ModbusConfig],
    serial_paths: &[&PathBuf],
    err: &ErrAt,
) -> Result<(), ConfigError> {
    let (mut dev_index, mut reg_index) = (0usize, 0usize);
    let mut paths: HashSet<&PathBuf> = serial_paths.iter().copied().collect();
    for (b, bus) in buses.iter().enumerate() {
        let at = |key: &str, msg: String| Err(err("modbus", Some(b), key, msg));
        if bus.path.as_os_str().is_empty() {
            return at("path", "must not be empty".into());
        }
        if !paths.insert(&bus.path) {
            return at(
                "path",
                format!(
                    "{} is used twice (by a serial port or another bus)",
                    bus.path.display()
                ),
            );
        }
        if !STANDARD_BAUD_RATES.contains(&bus.baud) {
            return at(
                "baud",
                format!(
                    "{} is not a standard baud rate (e.g. 9600, 19200, 38400)",
                    bus.baud
                ),
            );
        }
        if !(1..=2).contains(&bus.stop_bits) {
            return at("stop_bits", "must be 1 or 2".into());
        }
        if !(10..=60_000).contains(&bus.timeout_ms) {
            return at("timeout_ms", "must be between 10 and 60000".into());
        }
        if bus.retries > 10 {
            return at("retries", "must be between 0 and 10".into());
        }
        if bus.device.is_empty() {
            return at(
                "device",
                "a bus needs at least one [[modbus.device]]".into(),
            );
        }
        let mut units = HashSet::new();
        for dev in &bus.device {
            let d = dev_index;
            dev_index += 1;
            let at = |key: &str, msg: String| Err(err("modbus.device", Some(d), key, msg));
            if !(1..=247).contains(&dev.unit) {
                return at(
                    "unit",
                    format!("{} is not a slave address (1 to 247)", dev.unit),
                );
            }
            if !units.insert(dev.unit) {
                return at(
                    "unit",
                    format!("unit {} is used twice on bus {:?}", dev.unit, bus.name),
                );
            }
            dev.report.check(true).or_else(|(key, msg)| at(&key, msg))?;
            if !(10..=86_400_000).contains(&dev.poll_ms) {
                return at("poll_ms", "must be between 10 and 86400000".into());
            }
            if dev.register.is_empty() {
                return at(
                    "register",
                    "a device needs at least one [[modbus.device.register]]".into(),
                );
            }
            let mut names = HashSet::new();
            let mut used: Vec<(RegisterKind, u16, u16, &str)> = Vec::new();
            for reg in &dev.register {
                let r = reg_index;
                reg_index += 1;
                let at =
                    |key: &str, msg: String| Err(err("modbus.device.register", Some(r), key, msg));
                if reg.name.is_empty() || reg.name.len() > 64 {
                    return at("name", "must be 1 to 64 characters".into());
                }
                if !names.insert(reg.name.as_str()) {
                    return at(
                        "name",
                        format!("{:?} is used twice in device {:?}", reg.name, dev.name),
                    );
                }
                let ty = reg.value_type();
                if reg.kind.is_bit() != (ty == ValueType::Bool) {
                    return at(
                        "type",
                        format!(
                            "a {} takes type {}",
                            reg.kind.as_str(),
                            if reg.kind.is_bit() {
                                "\"bool\""
                            } else {
                                "\"u16\", \"i16\", \"u32\", \"i32\" or \"f32\""
                            }
                        ),
                    );
                }
                let last = u32::from(reg.address) + u32::from(ty.width()) - 1;
                if last > u32::from(u16::MAX) {
                    return at("address", "the value ends beyond address 65535".into());
                }
                if let Some((_, _, _, other)) = used.iter().find(|(k, a, l, _)| {
                    *k == reg.kind
                        && u32::from(*a) <= last
                        && u32::from(reg.address) <= u32::from(*l)
                }) {
                    return at(
                        "address",
                        format!(
                            "{} {} overlaps register {other:?} of the same device",
                            reg.kind.as_str(),
                            reg.address
                        ),
                    );
                }
                used.push((reg.kind, reg.address, last as u16, &reg.name));
                if !reg.scale.is_finite() || reg.scale == 0.0 {
                    return at("scale", "must be a finite number other than 0".into());
                }
                if !reg.offset.is_finite() {
                    return at("offset", "must be a finite number".into());
                }
                if reg.writable && !matches!(reg.kind, RegisterKind::Holding | RegisterKind::Coil) {
                    return at(
                        "writable",
                        format!(
                            "a {} cannot be written (only holding registers and coils)",
                            reg.kind.as_str()
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}
