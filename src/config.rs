//! Configuration: one TOML file, parsed into typed structs with defaults.
//!
//! Unknown keys are an error. Every error names the file, the line and the key, e.g.
//! `zgate.toml:12: key gpio.output.pin: pin 27 is used twice (also by "relay2")`.
//! `zgate config-template` prints [`TEMPLATE`], a fully commented example.

pub use crate::protocol::LineFormat;
pub use crate::spool::{FsyncPolicy, SpoolConfig, WhenFull};
use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration error: file, 1-based line (0 when unknown), dotted key and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if !self.key.is_empty() {
            write!(f, "key {}: ", self.key)?;
        }
        write!(f, "{}", self.message)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub backend: BackendConfig,
    #[serde(default)]
    pub gpio: GpioConfig,
    #[serde(default)]
    pub serial: Vec<SerialConfig>,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub commands: CommandsConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Gateway id; also the ZeroMQ routing id.
    pub id: String,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "default_stats_interval")]
    pub stats_interval_s: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    #[serde(default = "default_outbox_max")]
    pub outbox_max: usize,
    #[serde(default = "default_shutdown_flush_ms")]
    pub shutdown_flush_ms: u64,
    /// The backend's CURVE public key (Z85, 40 characters). With `secret_key_file`, turns
    /// CURVE on for the link.
    #[serde(default)]
    pub server_public_key: Option<String>,
    /// File holding this gateway's CURVE secret key (Z85), mode 0600.
    #[serde(default)]
    pub secret_key_file: Option<PathBuf>,
    /// Accept a plaintext link to a non-loopback endpoint (loud warning, `hello` says so).
    #[serde(default)]
    pub insecure: bool,
    /// ZMQ_MAXMSGSIZE: libzmq drops a peer that sends a larger frame.
    #[serde(default = "default_max_msg_size")]
    pub max_msg_size: i64,
    /// Seconds to wait, after each connection's `hello`, for any message from the backend
    /// before the connection is treated as not working and made again.
    #[serde(default = "default_hello_timeout_s")]
    pub hello_timeout_s: u64,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            endpoint: default_endpoint(),
            outbox_max: default_outbox_max(),
            shutdown_flush_ms: default_shutdown_flush_ms(),
            server_public_key: None,
            secret_key_file: None,
            insecure: false,
            max_msg_size: default_max_msg_size(),
            hello_timeout_s: default_hello_timeout_s(),
        }
    }
}

impl BackendConfig {
    /// True when the link uses CURVE.
    pub fn curve(&self) -> bool {
        self.server_public_key.is_some() && self.secret_key_file.is_some()
    }
    /// True when the link is plaintext and the operator accepted it with `insecure = true`.
    pub fn insecure_link(&self) -> bool {
        self.insecure && !self.curve()
    }
}

/// Limits on commands from the backend.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommandsConfig {
    /// Commands accepted per second (token bucket of this size, refilled at this rate);
    /// the excess is refused with `ok: false`.
    #[serde(default = "default_max_per_s")]
    pub max_per_s: u32,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            max_per_s: default_max_per_s(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GpioBackendKind {
    #[default]
    Rppal,
    Sim,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpioConfig {
    #[serde(default)]
    pub backend: GpioBackendKind,
    #[serde(default = "default_sim_dir")]
    pub sim_dir: PathBuf,
    #[serde(default)]
    pub input: Vec<InputConfig>,
    #[serde(default)]
    pub output: Vec<OutputConfig>,
}

impl Default for GpioConfig {
    fn default() -> Self {
        GpioConfig {
            backend: GpioBackendKind::default(),
            sim_dir: default_sim_dir(),
            input: Vec::new(),
            output: Vec::new(),
        }
    }
}

pub use crate::hw::{Initial, Level, Pull};

/// The `edge` setting of an input: which changes become readings. (A change itself is a
/// [`crate::hw::InputChange`].)
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Edge {
    Rising,
    Falling,
    #[default]
    Both,
}

impl Edge {
    /// Whether a change to `level` is reported with this setting.
    pub fn reports(self, level: Level) -> bool {
        match self {
            Edge::Rising => level == Level::High,
            Edge::Falling => level == Level::Low,
            Edge::Both => true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub name: String,
    pub pin: u8,
    #[serde(default)]
    pub pull: Pull,
    #[serde(default)]
    pub edge: Edge,
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    pub name: String,
    pub pin: u8,
    /// `0`, `1` or `"keep"` (drive nothing at start; the level the pin has is read).
    #[serde(default)]
    pub initial: Initial,
    #[serde(default = "default_max_pulse_ms")]
    pub max_pulse_ms: u64,
}

/// Which bytes end a line received on a serial port (`[[serial]] input_line_ending`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum InputLineEnding {
    /// LF, CR or CR LF each end a line (CR LF is one ending, even split across reads).
    #[default]
    Auto,
    /// LF ends a line; a CR right before it is removed.
    Lf,
    /// CR ends a line; LF is an ordinary byte.
    Cr,
    /// Only the pair CR LF ends a line; a lone CR or LF is an ordinary byte.
    Crlf,
}

/// The baud rates a serial port may be set to (the standard rates Linux termios knows).
pub const STANDARD_BAUD_RATES: [u32; 30] = [
    50, 75, 110, 134, 150, 200, 300, 600, 1200, 1800, 2400, 4800, 9600, 19200, 38400, 57600,
    115200, 230400, 460800, 500000, 576000, 921600, 1000000, 1152000, 1500000, 2000000, 2500000,
    3000000, 3500000, 4000000,
];

/// One `[[serial]]` port.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// The reading `source` and command `target` name.
    pub name: String,
    /// The tty device (prefer a stable name from /dev/serial/by-id/ or a udev rule).
    pub path: PathBuf,
    /// One of [`STANDARD_BAUD_RATES`].
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// How a received line becomes a reading's `values`.
    #[serde(default)]
    pub format: LineFormat,
    /// Appended to the value of every `write` command (at most 4 bytes).
    #[serde(default = "default_line_ending")]
    pub line_ending: String,
    /// Allow control characters in `write` command values (refused by default).
    #[serde(default)]
    pub allow_binary: bool,
    /// Which bytes end a received line.
    #[serde(default)]
    pub input_line_ending: InputLineEnding,
    /// A `write` command not fully taken by the device within this many ms fails (`ok:
    /// false`, "timed out"); its unsent bytes are discarded.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/zgate")
}
fn default_stats_interval() -> u64 {
    30
}
fn default_endpoint() -> String {
    "tcp://127.0.0.1:5555".into()
}
fn default_outbox_max() -> usize {
    10_000
}
fn default_shutdown_flush_ms() -> u64 {
    2000
}
fn default_max_msg_size() -> i64 {
    64 * 1024
}
fn default_hello_timeout_s() -> u64 {
    10
}
fn default_max_per_s() -> u32 {
    20
}
fn default_sim_dir() -> PathBuf {
    PathBuf::from("/run/zgate-sim")
}
fn default_debounce_ms() -> u64 {
    20
}
fn default_max_pulse_ms() -> u64 {
    10_000
}
fn default_baud() -> u32 {
    9600
}
fn default_line_ending() -> String {
    "\n".into()
}
fn default_write_timeout_ms() -> u64 {
    2000
}

/// Builds a ConfigError from (section, table index, key, message).
type ErrAt<'a> = dyn Fn(&str, Option<usize>, &str, String) -> ConfigError + 'a;

/// Highest BCM GPIO number on any Raspberry Pi header.
pub const MAX_BCM_PIN: u8 = 27;

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: 0,
            key: String::new(),
            message: format!("cannot read config file: {e}"),
        })?;
        Config::parse(&text, &file)
    }

    /// Parses and validates config text; `file` is the name used in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| toml_error(text, file, &e))?;
        cfg.validate(text, file)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str, file: &str) -> Result<(), ConfigError> {
        let err = |section: &str, index: Option<usize>, key: &str, message: String| {
            let line = locate(text, section, index, key);
            let dotted = if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            };
            ConfigError {
                file: file.to_string(),
                line,
                key: dotted,
                message,
            }
        };
        let id = &self.gateway.id;
        if id.is_empty() || id.len() > 255 || !id.chars().all(|c| c.is_ascii_graphic()) {
            return Err(err(
                "gateway",
                None,
                "id",
                "must be 1 to 255 printable ASCII characters without spaces".into(),
            ));
        }
        if self.gateway.stats_interval_s == 0 {
            return Err(err(
                "gateway",
                None,
                "stats_interval_s",
                "must be at least 1".into(),
            ));
        }
        let ep = &self.backend.endpoint;
        // inproc:// cannot reach another process and never reports a handshake: refused.
        if !(ep.starts_with("tcp://") || ep.starts_with("ipc://")) {
            return Err(err(
                "backend",
                None,
                "endpoint",
                format!("{ep:?} is not a ZeroMQ endpoint (tcp://host:port or ipc:///path)"),
            ));
        }
        self.validate_security(&err)?;
        if self.backend.outbox_max == 0 || self.backend.outbox_max > 10_000_000 {
            return Err(err(
                "backend",
                None,
                "outbox_max",
                "must be between 1 and 10000000".into(),
            ));
        }
        let sp = &self.spool;
        if sp.max_bytes < crate::spool::MIN_MAX_BYTES {
            return Err(err(
                "spool",
                None,
                "max_bytes",
                format!("must be at least {}", crate::spool::MIN_MAX_BYTES),
            ));
        }
        if !(10..=60_000).contains(&sp.fsync_interval_ms) {
            return Err(err(
                "spool",
                None,
                "fsync_interval_ms",
                "must be between 10 and 60000".into(),
            ));
        }
        if !(1..=86_400).contains(&sp.retransmit_s) {
            return Err(err(
                "spool",
                None,
                "retransmit_s",
                "must be between 1 and 86400".into(),
            ));
        }
        let mut names: HashSet<String> = HashSet::new();
        let mut pins: HashSet<u8> = HashSet::new();
        let mut check_name = |section: &str, i: usize, name: &str| {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(err(
                    section,
                    Some(i),
                    "name",
                    format!("{name:?}: use 1 to 64 characters from A-Z a-z 0-9 - _ ."),
                ));
            }
            if !names.insert(name.to_string()) {
                return Err(err(
                    section,
                    Some(i),
                    "name",
                    format!("{name:?} is used twice (names are unique across inputs, outputs and serial ports)"),
                ));
            }
            Ok(())
        };
        for (i, input) in self.gpio.input.iter().enumerate() {
            check_name("gpio.input", i, &input.name)?;
        }
        for (i, output) in self.gpio.output.iter().enumerate() {
            check_name("gpio.output", i, &output.name)?;
        }
        for (i, serial) in self.serial.iter().enumerate() {
            check_name("serial", i, &serial.name)?;
        }
        let pin_list = self
            .gpio
            .input
            .iter()
            .map(|p| ("gpio.input", p.pin))
            .chain(self.gpio.output.iter().map(|p| ("gpio.output", p.pin)));
        let mut counters = [0usize; 2];
        for (section, pin) in pin_list {
            let idx = if section == "gpio.input" { 0 } else { 1 };
            let i = counters[idx];
            counters[idx] += 1;
            if pin > MAX_BCM_PIN {
                return Err(err(
                    section,
                    Some(i),
                    "pin",
                    format!("BCM pin {pin} does not exist (0..={MAX_BCM_PIN})"),
                ));
            }
            if !pins.insert(pin) {
                return Err(err(
                    section,
                    Some(i),
                    "pin",
                    format!("BCM pin {pin} is used twice"),
                ));
            }
        }
        for (i, input) in self.gpio.input.iter().enumerate() {
            if input.debounce_ms > 10_000 {
                return Err(err(
                    "gpio.input",
                    Some(i),
                    "debounce_ms",
                    "must be at most 10000".into(),
                ));
            }
        }
        for (i, output) in self.gpio.output.iter().enumerate() {
            if output.max_pulse_ms == 0 || output.max_pulse_ms > 86_400_000 {
                return Err(err(
                    "gpio.output",
                    Some(i),
                    "max_pulse_ms",
                    "must be between 1 and 86400000 (one day)".into(),
                ));
            }
        }
        for (i, serial) in self.serial.iter().enumerate() {
            if serial.path.as_os_str().is_empty() {
                return Err(err("serial", Some(i), "path", "must not be empty".into()));
            }
            if !STANDARD_BAUD_RATES.contains(&serial.baud) {
                return Err(err(
                    "serial",
                    Some(i),
                    "baud",
                    format!(
                        "{} is not a standard baud rate (e.g. 9600, 19200, 38400, 57600, 115200)",
                        serial.baud
                    ),
                ));
            }
            if serial.line_ending.len() > 4 {
                return Err(err(
                    "serial",
                    Some(i),
                    "line_ending",
                    "must be at most 4 bytes".into(),
                ));
            }
            if !(10..=600_000).contains(&serial.write_timeout_ms) {
                return Err(err(
                    "serial",
                    Some(i),
                    "write_timeout_ms",
                    "must be between 10 and 600000 (ten minutes)".into(),
                ));
            }
        }
        Ok(())
    }

    /// CURVE keys, the endpoint policy and the command limits.
    fn validate_security(&self, err: &ErrAt) -> Result<(), ConfigError> {
        let b = &self.backend;
        if let Some(key) = &b.server_public_key {
            crate::security::z85_decode_key(key)
                .map_err(|e| err("backend", None, "server_public_key", e))?;
        }
        if let Some(path) = &b.secret_key_file {
            if path.as_os_str().is_empty() {
                return Err(err(
                    "backend",
                    None,
                    "secret_key_file",
                    "must not be empty".into(),
                ));
            }
        }
        match (&b.server_public_key, &b.secret_key_file) {
            (Some(_), None) => {
                return Err(err(
                    "backend",
                    None,
                    "secret_key_file",
                    "server_public_key is set but secret_key_file is not: CURVE needs both \
                     (create the gateway's key with `zgate keygen --out PREFIX`)"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    "backend",
                    None,
                    "server_public_key",
                    "secret_key_file is set but server_public_key is not: CURVE needs both \
                     (the backend's public key, Z85)"
                        .into(),
                ))
            }
            _ => {}
        }
        if !b.curve() && !b.insecure && !crate::security::endpoint_is_local(&b.endpoint) {
            return Err(err(
                "backend",
                None,
                "endpoint",
                format!(
                    "{:?} is not a loopback or ipc endpoint, and the link is not encrypted: \
                     set backend.server_public_key and backend.secret_key_file (CURVE, see \
                     docs/security.md), or set backend.insecure = true to accept a plaintext \
                     link",
                    b.endpoint
                ),
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&b.max_msg_size) {
            return Err(err(
                "backend",
                None,
                "max_msg_size",
                "must be between 1024 and 16777216 bytes".into(),
            ));
        }
        if !(1..=3600).contains(&b.hello_timeout_s) {
            return Err(err(
                "backend",
                None,
                "hello_timeout_s",
                "must be between 1 and 3600 seconds".into(),
            ));
        }
        if !(1..=10_000).contains(&self.commands.max_per_s) {
            return Err(err(
                "commands",
                None,
                "max_per_s",
                "must be between 1 and 10000".into(),
            ));
        }
        Ok(())
    }

    /// Names of configured inputs, outputs and serial ports (for `hello`).
    pub fn inputs(&self) -> Vec<String> {
        self.gpio.input.iter().map(|p| p.name.clone()).collect()
    }
    pub fn outputs(&self) -> Vec<String> {
        self.gpio.output.iter().map(|p| p.name.clone()).collect()
    }
    pub fn serial_names(&self) -> Vec<String> {
        self.serial.iter().map(|p| p.name.clone()).collect()
    }
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Turns a toml/serde error into a ConfigError with line and dotted key.
fn toml_error(text: &str, file: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_string();
    let (line, key) = match e.span() {
        Some(span) => {
            let line = line_of_offset(text, span.start);
            (line, key_at_line(text, line))
        }
        None => (0, String::new()),
    };
    // serde names the offending key in the message for unknown/missing fields.
    let key = match backticked(&message) {
        Some(name)
            if message.starts_with("unknown field") || message.starts_with("missing field") =>
        {
            let section = section_at_line(text, line);
            if key.is_empty() || message.starts_with("missing field") {
                join_key(&section, name)
            } else {
                key
            }
        }
        _ => key,
    };
    ConfigError {
        file: file.to_string(),
        line,
        key,
        message,
    }
}

fn backticked(s: &str) -> Option<&str> {
    let start = s.find('`')? + 1;
    let end = s[start..].find('`')? + start;
    Some(&s[start..end])
}

fn join_key(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_string()
    } else {
        format!("{section}.{key}")
    }
}

fn header_name(line: &str) -> Option<String> {
    let t = line.trim();
    let inner = t
        .strip_prefix("[[")
        .and_then(|r| r.split("]]").next())
        .or_else(|| t.strip_prefix('[').and_then(|r| r.split(']').next()))?;
    Some(inner.trim().to_string())
}

/// The table header in force at `line` (1-based), "" for the root table.
fn section_at_line(text: &str, line: usize) -> String {
    let mut section = String::new();
    for (i, l) in text.lines().enumerate() {
        if i + 1 > line {
            break;
        }
        if let Some(h) = header_name(l) {
            section = h;
        }
    }
    section
}

/// The dotted key defined on `line` (1-based), or the section if the line is a header.
fn key_at_line(text: &str, line: usize) -> String {
    let section = section_at_line(text, line);
    let Some(l) = text.lines().nth(line.saturating_sub(1)) else {
        return section;
    };
    if header_name(l).is_some() {
        return section;
    }
    match l.split_once('=') {
        Some((k, _)) => join_key(&section, k.trim().trim_matches('"')),
        None => section,
    }
}

/// Line (1-based) where `key` is set in the `index`-th `[section]`/`[[section]]`;
/// the header's line when the key is absent, 0 when the section is absent.
fn locate(text: &str, section: &str, index: Option<usize>, key: &str) -> usize {
    let want = index.unwrap_or(0);
    let mut seen: Option<usize> = None;
    let mut in_target = false;
    let mut header_line = 0;
    for (i, l) in text.lines().enumerate() {
        if let Some(h) = header_name(l) {
            if h == section {
                seen = Some(seen.map_or(0, |n| n + 1));
                in_target = seen == Some(want);
                if in_target {
                    header_line = i + 1;
                }
            } else {
                in_target = false;
            }
            continue;
        }
        if in_target {
            if let Some((k, _)) = l.split_once('=') {
                if k.trim().trim_matches('"') == key {
                    return i + 1;
                }
            }
        }
    }
    header_line
}

/// A fully commented configuration, printed by `zgate config-template`.
pub const TEMPLATE: &str = include_str!("config_template.toml");

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[gateway]
id = "gw-01"
data_dir = "/tmp/zgate"

[backend]
endpoint = "tcp://127.0.0.1:5555"

[gpio]
backend = "sim"
sim_dir = "/tmp/sim"

[[gpio.input]]
name = "door"
pin = 17
pull = "up"

[[gpio.output]]
name = "relay1"
pin = 27

[[serial]]
name = "weather"
path = "/dev/ttyUSB0"
"#;

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.gateway.id, "gw-01");
        assert_eq!(c.gateway.stats_interval_s, 30);
        assert_eq!(c.backend.outbox_max, 10_000);
        assert_eq!(c.backend.shutdown_flush_ms, 2000);
        assert_eq!(c.gpio.backend, GpioBackendKind::Sim);
        assert_eq!(c.gpio.input[0].edge, Edge::Both);
        assert_eq!(c.gpio.input[0].debounce_ms, 20);
        assert_eq!(c.gpio.output[0].max_pulse_ms, 10_000);
        assert_eq!(c.serial[0].baud, 9600);
        assert_eq!(c.serial[0].format, LineFormat::Kv);
        assert_eq!(c.serial[0].line_ending, "\n");
        assert_eq!(c.serial[0].input_line_ending, InputLineEnding::Auto);
        assert_eq!(c.serial[0].write_timeout_ms, 2000);
    }

    #[test]
    fn serial_input_line_ending_and_write_timeout() {
        for (text, want) in [
            ("auto", InputLineEnding::Auto),
            ("lf", InputLineEnding::Lf),
            ("cr", InputLineEnding::Cr),
            ("crlf", InputLineEnding::Crlf),
        ] {
            let t = GOOD.replace(
                "path = \"/dev/ttyUSB0\"",
                &format!("path = \"/dev/ttyUSB0\"\ninput_line_ending = \"{text}\"\nwrite_timeout_ms = 500"),
            );
            let c = Config::parse(&t, "z.toml").unwrap();
            assert_eq!(c.serial[0].input_line_ending, want);
            assert_eq!(c.serial[0].write_timeout_ms, 500);
        }
        let t = GOOD.replace(
            "path = \"/dev/ttyUSB0\"",
            "path = \"/dev/ttyUSB0\"\ninput_line_ending = \"lfcr\"",
        );
        let e = Config::parse(&t, "z.toml").unwrap_err();
        assert_eq!(
            (e.file.as_str(), e.line, e.key.as_str()),
            ("z.toml", 25, "serial.input_line_ending"),
            "{e}"
        );
        assert!(e.message.contains("crlf"), "{e}");
        for bad in ["0", "5", "600001"] {
            let t = GOOD.replace(
                "path = \"/dev/ttyUSB0\"",
                &format!("path = \"/dev/ttyUSB0\"\nwrite_timeout_ms = {bad}"),
            );
            let e = Config::parse(&t, "z.toml").unwrap_err();
            assert_eq!(
                (e.line, e.key.as_str()),
                (25, "serial.write_timeout_ms"),
                "{e}"
            );
        }
        let t = GOOD.replace(
            "path = \"/dev/ttyUSB0\"",
            "path = \"/dev/ttyUSB0\"\nbaud = 12345",
        );
        let e = Config::parse(&t, "z.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (25, "serial.baud"), "{e}");
    }

    #[test]
    fn template_is_valid() {
        Config::parse(TEMPLATE, "template").unwrap();
    }

    #[test]
    fn unknown_key_names_file_line_key() {
        let text = GOOD.replace("pin = 27", "pin = 27\npinn = 3");
        let e = Config::parse(&text, "z.toml").unwrap_err();
        assert_eq!(e.file, "z.toml");
        assert_eq!(e.line, 21, "{e}");
        assert_eq!(e.key, "gpio.output.pinn", "{e}");
        assert!(
            e.to_string()
                .starts_with("z.toml:21: key gpio.output.pinn:"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_line_and_key() {
        let text = GOOD.replace("pin = 17", "pin = \"seventeen\"");
        let e = Config::parse(&text, "z.toml").unwrap_err();
        assert_eq!(e.line, 15, "{e}");
        assert_eq!(e.key, "gpio.input.pin", "{e}");
    }

    #[test]
    fn bad_enum_value() {
        let text = GOOD.replace("pull = \"up\"", "pull = \"sideways\"");
        let e = Config::parse(&text, "z.toml").unwrap_err();
        assert_eq!(e.line, 16, "{e}");
        assert_eq!(e.key, "gpio.input.pull");
    }

    #[test]
    fn missing_id() {
        let text = GOOD.replace("id = \"gw-01\"", "");
        let e = Config::parse(&text, "z.toml").unwrap_err();
        assert!(e.message.contains("missing field"), "{e}");
        assert!(e.key.ends_with("id"), "{e}");
    }

    #[test]
    fn duplicate_name_and_pin() {
        let text = GOOD.replace("name = \"relay1\"", "name = \"door\"");
        let e = Config::parse(&text, "z.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (19, "gpio.output.name"), "{e}");
        let text = GOOD.replace("pin = 27", "pin = 17");
        let e = Config::parse(&text, "z.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (20, "gpio.output.pin"), "{e}");
        let text = GOOD.replace("name = \"weather\"", "name = \"relay1\"");
        let e = Config::parse(&text, "z.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (23, "serial.name"), "{e}");
    }

    #[test]
    fn hello_timeout_s_is_checked_with_its_line() {
        let with = |v: &str| {
            GOOD.replace(
                "endpoint = \"tcp://127.0.0.1:5555\"",
                &format!("endpoint = \"tcp://127.0.0.1:5555\"\nhello_timeout_s = {v}"),
            )
        };
        assert_eq!(
            Config::parse(&with("2"), "z.toml")
                .unwrap()
                .backend
                .hello_timeout_s,
            2
        );
        for bad in ["0", "3601"] {
            let e = Config::parse(&with(bad), "z.toml").unwrap_err();
            assert_eq!(
                (e.line, e.key.as_str()),
                (8, "backend.hello_timeout_s"),
                "{e}"
            );
            assert!(
                e.to_string()
                    .starts_with("z.toml:8: key backend.hello_timeout_s:"),
                "{e}"
            );
        }
        let e = Config::parse(&with("-1"), "z.toml").unwrap_err();
        assert!(e.key.ends_with("hello_timeout_s"), "{e}");
    }

    #[test]
    fn range_checks() {
        for (from, to, key) in [
            ("pin = 27", "pin = 40", "gpio.output.pin"),
            ("pin = 27", "pin = 27\ninitial = 2", "gpio.output.initial"),
            (
                "endpoint = \"tcp://127.0.0.1:5555\"",
                "endpoint = \"http://x\"",
                "backend.endpoint",
            ),
            ("id = \"gw-01\"", "id = \"gw 01\"", "gateway.id"),
        ] {
            let e = Config::parse(&GOOD.replace(from, to), "z.toml").unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.line > 0, "{e}");
        }
    }

    /// `initial` takes 0, 1 or "keep"; anything else names file, line and key.
    #[test]
    fn output_initial_values() {
        let with = |v: &str| GOOD.replace("pin = 27", &format!("pin = 27\ninitial = {v}"));
        let c = Config::parse(&with("\"keep\""), "z.toml").unwrap();
        assert_eq!(c.gpio.output[0].initial, Initial::Keep);
        let c = Config::parse(&with("1"), "z.toml").unwrap();
        assert_eq!(c.gpio.output[0].initial, Initial::Drive(Level::High));
        let c = Config::parse(GOOD, "z.toml").unwrap();
        assert_eq!(c.gpio.output[0].initial, Initial::Drive(Level::Low));
        for bad in ["2", "\"on\"", "-1"] {
            let e = Config::parse(&with(bad), "z.toml").unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (21, "gpio.output.initial"), "{e}");
            assert!(
                e.to_string()
                    .starts_with("z.toml:21: key gpio.output.initial:")
                    && e.message.contains("0, 1 or \"keep\""),
                "{e}"
            );
        }
    }

    const KEY: &str = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID";

    #[test]
    fn security_keys_and_defaults() {
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert!(!c.backend.curve());
        assert!(!c.backend.insecure_link());
        assert_eq!(c.backend.max_msg_size, 65536);
        assert_eq!(c.backend.hello_timeout_s, 10);
        assert_eq!(c.commands.max_per_s, 20);
        assert!(!c.serial[0].allow_binary);
        let text = GOOD.replace(
            "endpoint = \"tcp://127.0.0.1:5555\"",
            &format!(
                "endpoint = \"tcp://192.0.2.1:5555\"\nserver_public_key = \"{KEY}\"\nsecret_key_file = \"/etc/zgate/gw.key\""
            ),
        ) + "\n[commands]\nmax_per_s = 5\n";
        let c = Config::parse(&text, "t.toml").unwrap();
        assert!(c.backend.curve());
        assert_eq!(c.commands.max_per_s, 5);
    }

    #[test]
    fn non_loopback_plaintext_is_refused_unless_insecure() {
        let remote = GOOD.replace("tcp://127.0.0.1:5555", "tcp://192.0.2.1:5555");
        let e = Config::parse(&remote, "z.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (7, "backend.endpoint"), "{e}");
        assert!(e.message.contains("server_public_key"), "{e}");
        assert!(e.message.contains("insecure = true"), "{e}");
        let insecure = remote.replace(
            "endpoint = \"tcp://192.0.2.1:5555\"",
            "endpoint = \"tcp://192.0.2.1:5555\"\ninsecure = true",
        );
        let c = Config::parse(&insecure, "z.toml").unwrap();
        assert!(c.backend.insecure_link());
        for ep in ["tcp://localhost:1", "tcp://[::1]:1", "ipc:///tmp/x"] {
            Config::parse(&GOOD.replace("tcp://127.0.0.1:5555", ep), "z.toml").unwrap();
        }
    }

    #[test]
    fn bad_curve_keys_name_line_and_key() {
        let bad = GOOD.replace(
            "endpoint = \"tcp://127.0.0.1:5555\"",
            "endpoint = \"tcp://127.0.0.1:5555\"\nserver_public_key = \"abc\"\nsecret_key_file = \"k\"",
        );
        let e = Config::parse(&bad, "z.toml").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (8, "backend.server_public_key"),
            "{e}"
        );
        let bad = bad.replace("\"abc\"", &format!("\"{}~\"", &KEY[..39]));
        let e = Config::parse(&bad, "z.toml").unwrap_err();
        assert!(e.message.contains("Z85 alphabet"), "{e}");
        let half = GOOD.replace(
            "endpoint = \"tcp://127.0.0.1:5555\"",
            &format!("endpoint = \"tcp://127.0.0.1:5555\"\nserver_public_key = \"{KEY}\""),
        );
        let e = Config::parse(&half, "z.toml").unwrap_err();
        assert_eq!(e.key, "backend.secret_key_file", "{e}");
        let e = Config::parse(
            &(GOOD.to_string() + "[commands]\nmax_per_s = 0\n"),
            "z.toml",
        )
        .unwrap_err();
        assert_eq!(e.key, "commands.max_per_s", "{e}");
    }

    #[test]
    fn locate_finds_nth_table() {
        let t = "[[a]]\nx = 1\n[[a]]\ny = 2\nx = 3\n";
        assert_eq!(locate(t, "a", Some(1), "x"), 5);
        assert_eq!(locate(t, "a", Some(1), "z"), 3);
        assert_eq!(locate(t, "b", None, "z"), 0);
    }
}
