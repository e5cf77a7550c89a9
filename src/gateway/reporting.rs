//! The interpreter's side of report on change ([`report`](super::report)) and of honest
//! timestamps ([`crate::clock`]): readings of serial ports, GPIO inputs and Modbus devices
//! pass their source's [`Reporter`](super::report::Reporter) before they are stored; held
//! readings and heartbeats leave on [`TimerId::Report`]; every reading made while the clock
//! is not synchronised carries `clock`, `mono_ms` and `boot_id`.

use super::report::{Decision, Kind, Released};
use super::*;
use crate::protocol::ReadingExtra;

impl Gateway {
    /// One reporter per serial port, GPIO input and Modbus device of `cfg`; those of sources no longer
    /// configured are dropped, their held readings sent now.
    pub(super) fn sync_reports(&mut self, now: Instant) {
        let cfg = &self.cfg;
        let names: Vec<String> = cfg
            .serial
            .iter()
            .map(|s| s.name.clone())
            .chain(cfg.gpio.input.iter().map(|i| i.name.clone()))
            .chain(
                cfg.modbus
                    .iter()
                    .flat_map(|b| b.device.iter().map(|d| d.name.clone())),
            )
            .collect();
        let gone = self.reports.retain(|s| names.iter().any(|n| n == s));
        for sc in &cfg.serial {
            self.reports.set(&sc.name, &sc.report, Kind::Samples, now);
        }
        for ic in &cfg.gpio.input {
            self.reports.set(&ic.name, &ic.report, Kind::Events, now);
        }
        for dc in cfg.modbus.iter().flat_map(|b| &b.device) {
            self.reports.set(&dc.name, &dc.report, Kind::Samples, now);
        }
        self.reports.rearm(&mut self.fx);
        for r in gone {
            self.emit_released(r, now);
        }
    }

    /// A reading from `source` at `now`: sent, held or suppressed as its reporter decides.
    pub(super) fn report_reading(&mut self, source: &str, values: &Values, now: Instant) {
        match self.reports.on_reading(source, values, now, &mut self.fx) {
            Decision::Send => self.emit_reading(source, values, now),
            Decision::Heartbeat => {
                self.emit_reading_aged(source, values, now, Duration::ZERO, true);
            }
            Decision::Hold | Decision::Suppress => {}
        }
    }

    /// Stores every held reading now (shutdown, or the loop stopped on an error): it goes out
    /// during the shutdown flush or after the next start.
    pub(super) fn release_held(&mut self) {
        let now = Instant::now();
        for r in self.reports.take_held() {
            self.emit_released(r, now);
        }
    }

    /// [`TimerId::Report`]: sends the held readings and heartbeats that are due (none once
    /// shutdown began: the sources are no longer read).
    pub(super) fn on_report_timer(&mut self, now: Instant) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        for r in self.reports.on_timer(now, &mut self.fx) {
            self.emit_released(r, now);
        }
    }

    /// Sends a reading a reporter released; `values: None` asks for the source's current
    /// state (a GPIO input's level).
    fn emit_released(&mut self, r: Released, now: Instant) {
        let values = match r.due.values {
            Some(v) => v,
            None => match self.inputs.iter().find(|i| i.name == r.source) {
                Some(input) => Values::single("level", &json!(input.level)),
                None => return,
            },
        };
        let age = now.saturating_duration_since(r.due.at);
        self.emit_reading_aged(&r.source, &values, now, age, r.due.heartbeat);
    }

    /// Stores a reading made now (see [`Gateway::emit_reading_aged`]).
    pub(super) fn emit_reading(&mut self, source: &str, values: &Values, now: Instant) {
        self.emit_reading_aged(source, values, now, Duration::ZERO, false);
    }

    /// Stores a reading made `age` ago (a held reading keeps the time it was read), then lets
    /// the outbox take it if it has room.
    pub(super) fn emit_reading_aged(
        &mut self,
        source: &str,
        values: &Values,
        now: Instant,
        age: Duration,
        heartbeat: bool,
    ) {
        let wall = std::time::SystemTime::now()
            .checked_sub(age)
            .unwrap_or(std::time::UNIX_EPOCH);
        let time_ms = wall
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let time = humantime::format_rfc3339_millis(wall).to_string();
        // Taken out while the reading is written (no copy per reading), put back after.
        let boot_id = std::mem::take(&mut self.boot_id);
        let extra = ReadingExtra {
            heartbeat,
            unsynced: (!self.clock.synced(now)).then(|| {
                let mono_ms = crate::clock::boottime_ms().saturating_sub(age.as_millis() as u64);
                (mono_ms, boot_id.as_str())
            }),
        };
        self.store_reading(source, values, now, time_ms, &time, extra);
        self.boot_id = boot_id;
    }

    /// The clock fields of `hello` and `stats`: `clock`, `boot_id`, `mono_ms` now.
    pub(super) fn clock_fields(&mut self, now: Instant) -> serde_json::Value {
        json!({
            "clock": crate::clock::clock_word(self.clock.synced(now)),
            "boot_id": self.boot_id,
            "mono_ms": crate::clock::boottime_ms(),
        })
    }

    /// Suppressed readings per source, for `stats`.
    pub(super) fn suppressed(&self) -> BTreeMap<String, u64> {
        self.reports
            .iter()
            .map(|(s, r)| (s.clone(), r.suppressed))
            .collect()
    }
}
