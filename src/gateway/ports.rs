//! Serial ports as the gateway sees them: line format, connection state, counters.
//!
//! [`PortState::on_line`] turns a line into reading values or counts it as bad (logged
//! rate-limited per kind); the interpreter stores the values and sends serial writes through
//! the port's [`SerialHandle`].

use crate::config::{LineFormat, SerialConfig};
use crate::limit::LogLimits;
use crate::protocol::{self, Values};
use crate::sources::serial::SerialHandle;
use std::time::Instant;

/// One configured serial port.
pub struct PortState {
    /// Queues writes to the port.
    pub handle: SerialHandle,
    /// How lines are parsed.
    pub format: LineFormat,
    /// Appended to every `write` command's value.
    pub line_ending: String,
    /// `write` values may hold control bytes.
    pub allow_binary: bool,
    /// Lines that did not parse (overlong ones included).
    pub bad_lines: u64,
    /// Lines longer than the maximum.
    pub overlong_lines: u64,
    /// Times the port was lost.
    pub disconnects: u64,
    /// The port is open.
    pub connected: bool,
    logs: LogLimits,
}

impl PortState {
    /// A port from its configuration and the handle of its source.
    pub fn new(cfg: &SerialConfig, handle: SerialHandle) -> PortState {
        PortState {
            handle,
            format: cfg.format,
            line_ending: cfg.line_ending.clone(),
            allow_binary: cfg.allow_binary,
            bad_lines: 0,
            overlong_lines: 0,
            disconnects: 0,
            connected: false,
            logs: LogLimits::default(),
        }
    }

    /// A line from port `name`: its values, or `None` when it is bad (counted and logged).
    pub fn on_line(&mut self, name: &str, line: &[u8], now: Instant) -> Option<Values> {
        match protocol::parse_line(self.format, line) {
            Ok(values) => Some(values),
            Err(e) => {
                self.bad_lines += 1;
                if self.logs.allow("bad serial line", now) {
                    let preview: String = String::from_utf8_lossy(line).chars().take(80).collect();
                    log::warn!(
                        "bad serial line port={name} error=\"{e}\" line={preview:?} bad_lines={}",
                        self.bad_lines
                    );
                }
                None
            }
        }
    }

    /// A line of `bytes` over the maximum was discarded.
    pub fn on_overlong(&mut self, name: &str, bytes: usize, now: Instant) {
        self.bad_lines += 1;
        self.overlong_lines += 1;
        if self.logs.allow("overlong serial line", now) {
            log::warn!(
                "serial line too long port={name} bytes={bytes} max={}: discarded",
                protocol::MAX_LINE
            );
        }
    }

    /// The port opened (`true`) or was lost (`false`).
    pub fn on_connection(&mut self, up: bool) {
        if !up {
            self.disconnects += 1;
        }
        self.connected = up;
    }

    /// Takes the settings of `cfg` that only the gateway uses (a configuration reload); the
    /// source's own settings go through [`SerialHandle::reconfigure`].
    pub fn reconfigure(&mut self, cfg: &SerialConfig) {
        self.format = cfg.format;
        self.line_ending = cfg.line_ending.clone();
        self.allow_binary = cfg.allow_binary;
    }
}
