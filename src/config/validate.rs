//! The checks serde cannot express: ranges, unique names and pins, endpoints and CURVE keys.
//! Each failure names the file, the line and the key (see [`super::locate`]).

use super::*;
use crate::config::locate::locate;

/// Builds a ConfigError from (section, table index, key, message).
pub(super) type ErrAt<'a> = dyn Fn(&str, Option<usize>, &str, String) -> ConfigError + 'a;

impl Config {
    /// Checks the parsed config as a whole; `text` locates the offending key for the error.
    pub(super) fn validate(&self, text: &str, file: &str) -> Result<(), ConfigError> {
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
                    format!("{name:?} is used twice (names are unique across inputs, outputs, serial ports, Modbus buses and devices)"),
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
        let devices = self.modbus.iter().flat_map(|b| &b.device);
        for (i, bus) in self.modbus.iter().enumerate() {
            check_name("modbus", i, &bus.name)?;
        }
        for (i, dev) in devices.enumerate() {
            check_name("modbus.device", i, &dev.name)?;
        }
        self.validate_lines(&err)?;
        let serial_paths: Vec<&PathBuf> = self.serial.iter().map(|s| &s.path).collect();
        super::modbus::validate(&self.modbus, &serial_paths, &err)?;
        // On a chip named by path the offsets are that chip's; otherwise they are BCM numbers
        // of a Pi's header.
        let any_offset = self.gpio.backend == GpioBackendKind::Cdev
            && matches!(self.gpio.chip, ChipSelect::Path(_));
        let pin_list = self
            .gpio
            .input
            .iter()
            .enumerate()
            .map(|(i, p)| (LineKind::Input, i, p.pin))
            .chain(
                self.gpio
                    .output
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (LineKind::Output, i, p.pin)),
            );
        for (kind, i, pin) in pin_list {
            // A named line's offset is known once it is looked up on the chip.
            if self.gpio.named(kind, i).is_some() {
                continue;
            }
            let section = kind.section();
            if pin > MAX_BCM_PIN && !any_offset {
                return Err(err(
                    section,
                    Some(i),
                    "pin",
                    format!(
                        "BCM pin {pin} does not exist (0..={MAX_BCM_PIN}; with backend = \"cdev\" \
                         and chip set to a device path, any offset of that chip)"
                    ),
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
        for (i, input) in self.gpio.input.iter().enumerate() {
            input
                .report
                .check(false)
                .map_err(|(key, msg)| err("gpio.input", Some(i), &key, msg))?;
        }
        for (i, serial) in self.serial.iter().enumerate() {
            serial
                .report
                .check(true)
                .map_err(|(key, msg)| err("serial", Some(i), &key, msg))?;
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

    /// `[gpio]`: exactly one of `pin` and `line` per entry, `line` only with the `cdev`
    /// backend, and `chip` either "auto" or an absolute device path.
    fn validate_lines(&self, err: &ErrAt) -> Result<(), ConfigError> {
        let g = &self.gpio;
        if let ChipSelect::Path(p) = &g.chip {
            if !p.is_absolute() {
                return Err(err(
                    "gpio",
                    None,
                    "chip",
                    format!(
                        "{:?} is neither \"auto\" nor an absolute device path such as \
                         \"/dev/gpiochip0\"",
                        p.display().to_string()
                    ),
                ));
            }
        }
        if let Some(&(kind, i, both)) = g.pin_or_line.first() {
            return Err(if both {
                err(
                    kind.section(),
                    Some(i),
                    "line",
                    "give either pin (the line offset) or line (the line's name), not both".into(),
                )
            } else {
                err(
                    kind.section(),
                    Some(i),
                    "pin",
                    "missing: give pin (the line offset, the BCM number on a Raspberry Pi) or \
                     line (the line's name on the chip, e.g. \"GPIO17\", with backend = \"cdev\")"
                        .into(),
                )
            });
        }
        for named in &g.lines {
            let section = named.kind.section();
            if g.backend != GpioBackendKind::Cdev {
                return Err(err(
                    section,
                    Some(named.index),
                    "line",
                    format!(
                        "line names are looked up on a GPIO chip, which needs backend = \"cdev\" \
                         (this is {:?}): give pin instead",
                        format!("{:?}", g.backend).to_lowercase()
                    ),
                ));
            }
            if named.name.is_empty() || named.name.len() > 31 {
                return Err(err(
                    section,
                    Some(named.index),
                    "line",
                    "must be 1 to 31 characters (the kernel's limit for line names)".into(),
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
                     /usr/share/doc/zgate/security.md), or set backend.insecure = true to \
                     accept a plaintext link",
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
}
