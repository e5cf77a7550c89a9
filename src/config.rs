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

mod locate;
mod modbus;
mod report;
mod validate;

pub use modbus::{
    ModbusConfig, ModbusDeviceConfig, Parity, RegisterConfig, RegisterKind, ValueType, WordOrder,
};
pub use report::{ReportConfig, ReportMode};

use locate::toml_error;

/// A configuration error: file, 1-based line (0 when unknown), dotted key and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The config file's name as given (a path, or the name passed to [`Config::parse`]).
    pub file: String,
    /// 1-based line of the offending key or table; 0 when it cannot be located.
    pub line: usize,
    /// Dotted key, e.g. `gpio.output.pin`; empty for an error about the whole file.
    pub key: String,
    /// What is wrong and what is accepted.
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

/// The whole configuration file, validated ([`Config::load`], [`Config::parse`]).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[gateway]`: identity, state directory, stats period (required: `id`).
    pub gateway: GatewayConfig,
    /// `[backend]`: the ZeroMQ link to the backend.
    #[serde(default)]
    pub backend: BackendConfig,
    /// `[gpio]`: the GPIO backend and its inputs and outputs.
    #[serde(default)]
    pub gpio: GpioConfig,
    /// `[[serial]]`: serial ports, each a reading source and a `write` command target.
    #[serde(default)]
    pub serial: Vec<SerialConfig>,
    /// `[spool]`: the on-disk spool of unacknowledged readings.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// `[commands]`: limits on commands from the backend.
    #[serde(default)]
    pub commands: CommandsConfig,
    /// `[[modbus]]`: Modbus RTU buses, each with its polled devices.
    #[serde(default)]
    pub modbus: Vec<ModbusConfig>,
}

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Gateway id; also the ZeroMQ routing id. 1 to 255 printable ASCII characters, no spaces.
    pub id: String,
    /// State directory; the spool lives in `data_dir/spool` (default `/var/lib/zgate`).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Seconds between `stats` messages; at least 1 (default 30).
    #[serde(default = "default_stats_interval")]
    pub stats_interval_s: u64,
}

/// `[backend]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The backend's ZeroMQ endpoint, `tcp://host:port` or `ipc:///path`; the gateway dials
    /// out with a DEALER socket (default `tcp://127.0.0.1:5555`).
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// Messages held in memory while the backend is slow or away, 1 to 10,000,000 (default
    /// 10,000); control messages have a small reserve beyond it.
    #[serde(default = "default_outbox_max")]
    pub outbox_max: usize,
    /// On SIGTERM/SIGINT, how long (ms) to keep delivering queued messages (default 2000).
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

/// `[gpio] backend`: which GPIO implementation drives the pins.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GpioBackendKind {
    /// The kernel's GPIO character device (`"cdev"`, the default): any Pi, any kernel from
    /// Linux 5.10, any other Linux board. See [`crate::hw::cdev`].
    #[default]
    Cdev,
    /// The Raspberry Pi's GPIO through rppal (`"rppal"`): needs `/dev/gpiomem`, which only
    /// Raspberry Pi OS kernels provide.
    Rppal,
    /// Simulated pins (`"sim"`): one file per pin in `sim_dir`, watched with inotify.
    Sim,
}

/// Which list of `[gpio]` an entry is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// `[[gpio.input]]`.
    Input,
    /// `[[gpio.output]]`.
    Output,
}

impl LineKind {
    /// The dotted section name, as in config errors.
    pub fn section(self) -> &'static str {
        match self {
            LineKind::Input => "gpio.input",
            LineKind::Output => "gpio.output",
        }
    }
}

/// An input or output given by `line = "NAME"` instead of `pin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedLine {
    /// Input or output.
    pub kind: LineKind,
    /// Its index in `[[gpio.input]]` or `[[gpio.output]]`.
    pub index: usize,
    /// The line name to look up on the chip, e.g. `GPIO17`.
    pub name: String,
    /// The offset found on the chip, once [`crate::sources::gpio::resolve_lines`] has run;
    /// the entry's `pin` then holds it too.
    pub resolved: Option<u8>,
}

/// `[gpio]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(from = "RawGpioConfig")]
pub struct GpioConfig {
    /// Which GPIO implementation to open.
    pub backend: GpioBackendKind,
    /// For the `cdev` backend: `"auto"` (the chip of a Raspberry Pi's 40-pin header, found by
    /// its label) or a chip device such as `/dev/gpiochip0`.
    pub chip: ChipSelect,
    /// For the `sim` backend: the directory of pin files `gpio<N>` holding `0` or `1`
    /// (default `/run/zgate-sim`).
    pub sim_dir: PathBuf,
    /// `[[gpio.input]]`: pins read; each reported change is a reading.
    pub input: Vec<InputConfig>,
    /// `[[gpio.output]]`: pins driven by `set` / `toggle` / `pulse` commands.
    pub output: Vec<OutputConfig>,
    /// The inputs and outputs given by `line` instead of `pin` (`cdev` only). Their `pin` is
    /// 0 until [`crate::sources::gpio::resolve_lines`] looks the names up on the chip.
    pub lines: Vec<NamedLine>,
    /// Entries with both `pin` and `line` (true) or neither (false), for the validation.
    pin_or_line: Vec<(LineKind, usize, bool)>,
}

impl Default for GpioConfig {
    fn default() -> Self {
        GpioConfig {
            backend: GpioBackendKind::default(),
            chip: ChipSelect::default(),
            sim_dir: default_sim_dir(),
            input: Vec::new(),
            output: Vec::new(),
            lines: Vec::new(),
            pin_or_line: Vec::new(),
        }
    }
}

impl GpioConfig {
    /// Whether entry `index` of `kind` is given by `line` (its `pin` is then resolved later).
    pub fn named(&self, kind: LineKind, index: usize) -> Option<&NamedLine> {
        self.lines
            .iter()
            .find(|l| l.kind == kind && l.index == index)
    }
}

/// `[gpio]` as written: `pin` and `line` both optional (exactly one is required, checked by
/// the validation so the error names the line).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpioConfig {
    #[serde(default)]
    backend: GpioBackendKind,
    #[serde(default)]
    chip: ChipSelect,
    #[serde(default = "default_sim_dir")]
    sim_dir: PathBuf,
    #[serde(default)]
    input: Vec<RawInput>,
    #[serde(default)]
    output: Vec<RawOutput>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    name: String,
    pin: Option<u8>,
    line: Option<String>,
    #[serde(default)]
    pull: Pull,
    #[serde(default)]
    edge: Edge,
    #[serde(default = "default_debounce_ms")]
    debounce_ms: u64,
    #[serde(flatten)]
    report: ReportConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    name: String,
    pin: Option<u8>,
    line: Option<String>,
    #[serde(default)]
    initial: Initial,
    #[serde(default = "default_max_pulse_ms")]
    max_pulse_ms: u64,
}

impl From<RawGpioConfig> for GpioConfig {
    fn from(raw: RawGpioConfig) -> GpioConfig {
        let mut lines = Vec::new();
        let mut pin_or_line = Vec::new();
        let mut note = |kind, index, pin: Option<u8>, line: Option<String>| {
            match (&pin, line) {
                (None, Some(name)) => lines.push(NamedLine {
                    kind,
                    index,
                    name,
                    resolved: None,
                }),
                (Some(_), Some(_)) => pin_or_line.push((kind, index, true)),
                (None, None) => pin_or_line.push((kind, index, false)),
                (Some(_), None) => {}
            }
            pin.unwrap_or(0)
        };
        let input = raw
            .input
            .into_iter()
            .enumerate()
            .map(|(i, r)| InputConfig {
                pin: note(LineKind::Input, i, r.pin, r.line),
                name: r.name,
                pull: r.pull,
                edge: r.edge,
                debounce_ms: r.debounce_ms,
                report: r.report,
            })
            .collect();
        let output = raw
            .output
            .into_iter()
            .enumerate()
            .map(|(i, r)| OutputConfig {
                pin: note(LineKind::Output, i, r.pin, r.line),
                name: r.name,
                initial: r.initial,
                max_pulse_ms: r.max_pulse_ms,
            })
            .collect();
        GpioConfig {
            backend: raw.backend,
            chip: raw.chip,
            sim_dir: raw.sim_dir,
            input,
            output,
            lines,
            pin_or_line,
        }
    }
}

pub use crate::hw::cdev::ChipSelect;
pub use crate::hw::{Initial, Level, Pull};

/// The `edge` setting of an input: which changes become readings. (A change itself is a
/// [`crate::hw::InputChange`].)
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Edge {
    /// Only changes to [`Level::High`].
    Rising,
    /// Only changes to [`Level::Low`].
    Falling,
    /// Every change (the default).
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

/// One `[[gpio.input]]` pin.
#[derive(Debug, Clone, PartialEq)]
pub struct InputConfig {
    /// The readings' `source` name; unique among inputs, outputs and serial ports.
    pub name: String,
    /// The line offset: the BCM pin number on a Pi, 0 to [`MAX_BCM_PIN`] (not the header pin
    /// number); used once. For an input given by `line` (see [`GpioConfig::lines`]), the
    /// offset the name was found at.
    pub pin: u8,
    /// Internal bias resistor (default none). The level at start is read, not assumed.
    pub pull: Pull,
    /// Which changes become readings (default both).
    pub edge: Edge,
    /// A change must hold this long (ms, at most 10,000) before it is reported (default 20).
    pub debounce_ms: u64,
    /// Which edges are sent and when (`report`, `min_interval_ms`, `max_interval_s`; no
    /// deadband: every edge is a change).
    pub report: ReportConfig,
}

/// One `[[gpio.output]]` pin.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputConfig {
    /// The command `target` name; unique among inputs, outputs and serial ports.
    pub name: String,
    /// The line offset (BCM number on a Pi), 0 to [`MAX_BCM_PIN`]; used once. For an output
    /// given by `line`, the offset the name was found at.
    pub pin: u8,
    /// `0`, `1` or `"keep"` (drive nothing at start; the level the pin has is read).
    pub initial: Initial,
    /// Longest `pulse` a command may ask for, in ms, 1 to 86,400,000 (default 10,000).
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
    /// Which readings are sent and when (`report`, `deadband`, `deadbands`,
    /// `min_interval_ms`, `max_interval_s`).
    #[serde(flatten)]
    pub report: ReportConfig,
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

/// Highest BCM GPIO number on any Raspberry Pi header.
pub const MAX_BCM_PIN: u8 = 27;

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (file, text) = read_config_file(path)?;
        Config::parse(&text, &file)
    }

    /// Parses and validates config text; `file` is the name used in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let cfg: Config = parse_toml(text, file)?;
        cfg.validate(text, file)?;
        Ok(cfg)
    }

    /// Names of the configured GPIO inputs, in file order (for `hello`).
    pub fn inputs(&self) -> Vec<String> {
        self.gpio.input.iter().map(|p| p.name.clone()).collect()
    }
    /// Names of the configured GPIO outputs, in file order (for `hello`).
    pub fn outputs(&self) -> Vec<String> {
        self.gpio.output.iter().map(|p| p.name.clone()).collect()
    }
    /// Names of the configured serial ports, in file order (for `hello`).
    pub fn serial_names(&self) -> Vec<String> {
        self.serial.iter().map(|p| p.name.clone()).collect()
    }
}

/// Reads a config file: its name for errors and its text, or the error of [`Config::load`]
/// for a file that cannot be read. Other binaries of the workspace read theirs with it too.
pub fn read_config_file(path: &Path) -> Result<(String, String), ConfigError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((file, text)),
        Err(e) => Err(ConfigError {
            file,
            line: 0,
            key: String::new(),
            message: format!("cannot read config file: {e}"),
        }),
    }
}

/// Parses TOML `text` into `T` with the errors of [`Config::parse`]: file, line and dotted key
/// (an unknown key of a `deny_unknown_fields` type included). Other binaries of the workspace
/// (`zgate-bridge`) read their config files with it.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| toml_error(text, file, &e))
}

/// The 1-based line where `key` is set in table `[section]` of `text` (the header's line when
/// the key is absent, 0 when the section is absent): for errors found after parsing.
pub fn line_of_key(text: &str, section: &str, key: &str) -> usize {
    locate::locate(text, section, None, key)
}

/// A fully commented configuration, printed by `zgate config-template`.
pub const TEMPLATE: &str = include_str!("config_template.toml");

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_modbus;
