//! Reloading the configuration (SIGHUP, `systemctl reload`): what differs between the running
//! configuration and the file read again, as a [`ReloadPlan`] that the interpreter applies
//! (`reload/apply.rs`).
//!
//! [`ReloadPlan::new`] decides without touching anything: which keys need a restart (they are
//! refused: the running value stays and the key is named in a log line), and which serial
//! ports, inputs and outputs were added, removed or changed. Items are matched by name; an
//! input or output whose pin changed counts as removed and added.
//!
//! Applied live: `[[serial]]` (every key; a changed `path` reopens the port, a changed `baud`
//! is set on the open tty), `[[gpio.input]]`, `[[gpio.output]]` (an output kept across the
//! reload keeps its level and any running pulse; `initial` only applies to a new output),
//! `[commands]`, `gateway.stats_interval_s`, `backend.shutdown_flush_ms`.
//! Refused (need a restart): `gateway.id`, `gateway.data_dir`, every other `[backend]` key
//! (endpoint, CURVE keys, `insecure`, `outbox_max`, `max_msg_size`: they define the
//! connection), every `[spool]` key, `gpio.backend` and `gpio.sim_dir`.

mod apply;

pub(super) use self::apply::{insert_gpio_events, insert_port, insert_stats_timer, Sources};

use crate::config::{BackendConfig, Config, GpioConfig, Initial};
use std::fmt::{self, Debug};

/// A key whose change needs a restart: the running value is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The dotted key, e.g. `backend.endpoint`.
    pub key: String,
    /// The value in force (kept).
    pub running: String,
    /// The value in the file.
    pub file: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key={} running={} file={}",
            self.key, self.running, self.file
        )
    }
}

/// How one list of named items (serial ports, inputs, outputs) changed. Indices refer to the
/// running configuration (`old`) or to the new one (`new`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListDiff {
    /// New indices of items only in the new configuration.
    pub added: Vec<usize>,
    /// Old indices of items only in the running configuration.
    pub removed: Vec<usize>,
    /// (old, new) indices of items in both whose settings differ.
    pub changed: Vec<(usize, usize)>,
    /// (old, new) indices of items in both with the same settings.
    pub unchanged: Vec<(usize, usize)>,
}

impl ListDiff {
    /// Matches `old` and `new` by `key`; matched items that differ are `changed`.
    fn of<T, K: PartialEq>(old: &[T], new: &[T], key: impl Fn(&T) -> K) -> ListDiff
    where
        T: PartialEq,
    {
        let mut d = ListDiff::default();
        for (ni, n) in new.iter().enumerate() {
            match old.iter().position(|o| key(o) == key(n)) {
                Some(oi) if old[oi] == *n => d.unchanged.push((oi, ni)),
                Some(oi) => d.changed.push((oi, ni)),
                None => d.added.push(ni),
            }
        }
        for (oi, o) in old.iter().enumerate() {
            if !new.iter().any(|n| key(n) == key(o)) {
                d.removed.push(oi);
            }
        }
        d
    }

    /// (old, new) indices of every item in both configurations.
    pub fn kept(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.changed.iter().chain(&self.unchanged).copied()
    }

    /// Whether anything was added, removed or changed.
    pub fn any(&self) -> bool {
        !(self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty())
    }
}

/// What a reload changes (see the module doc).
#[derive(Debug, Clone)]
pub struct ReloadPlan {
    /// The configuration to run from now on: the file's, with every refused key at its
    /// running value.
    pub config: Config,
    /// Keys that differ but need a restart, in file order.
    pub refused: Vec<Refused>,
    /// Serial ports, matched by name.
    pub serial: ListDiff,
    /// GPIO inputs, matched by name and pin.
    pub inputs: ListDiff,
    /// GPIO outputs, matched by name and pin.
    pub outputs: ListDiff,
    /// `[gpio]` differs: the GPIO backend is reopened.
    pub gpio_changed: bool,
    /// `commands.max_per_s` differs.
    pub commands_changed: bool,
    /// `gateway.stats_interval_s` differs.
    pub stats_interval_changed: bool,
    /// `backend.shutdown_flush_ms` differs.
    pub shutdown_flush_changed: bool,
}

/// A value as the log shows it: quoted text, an unset option as `unset`.
fn shown<T: Debug>(value: &T) -> String {
    let text = format!("{value:?}");
    match text.strip_prefix("Some(").and_then(|t| t.strip_suffix(')')) {
        Some(inner) => inner.to_string(),
        None if text == "None" => "unset".into(),
        None => text,
    }
}

/// Records `key` as refused when the file's value differs, and puts the running value back.
fn refuse<T: PartialEq + Clone + Debug>(
    refused: &mut Vec<Refused>,
    key: &str,
    running: &T,
    file: &mut T,
) {
    if running != file {
        refused.push(Refused {
            key: key.to_string(),
            running: shown(running),
            file: shown(file),
        });
        *file = running.clone();
    }
}

impl ReloadPlan {
    /// Compares the running configuration `old` with `new`, read from the file again.
    pub fn new(old: &Config, mut new: Config) -> ReloadPlan {
        let mut refused = Vec::new();
        let r = &mut refused;
        refuse(r, "gateway.id", &old.gateway.id, &mut new.gateway.id);
        let (o, n) = (&old.gateway.data_dir, &mut new.gateway.data_dir);
        refuse(r, "gateway.data_dir", o, n);

        let (o, n) = (&old.backend, &mut new.backend);
        refuse(r, "backend.endpoint", &o.endpoint, &mut n.endpoint);
        let (ok, nk) = (&o.server_public_key, &mut n.server_public_key);
        refuse(r, "backend.server_public_key", ok, nk);
        let (ok, nk) = (&o.secret_key_file, &mut n.secret_key_file);
        refuse(r, "backend.secret_key_file", ok, nk);
        refuse(r, "backend.insecure", &o.insecure, &mut n.insecure);
        refuse(r, "backend.outbox_max", &o.outbox_max, &mut n.outbox_max);
        refuse(
            r,
            "backend.max_msg_size",
            &o.max_msg_size,
            &mut n.max_msg_size,
        );
        let (ot, nt) = (&o.hello_timeout_s, &mut n.hello_timeout_s);
        refuse(r, "backend.hello_timeout_s", ot, nt);
        // Keys added to [backend] later are refused unless they are listed as live here.
        let live = BackendConfig {
            shutdown_flush_ms: n.shutdown_flush_ms,
            ..o.clone()
        };
        if *n != live {
            r.push(Refused {
                key: "backend".into(),
                running: format!("{o:?}"),
                file: format!("{n:?}"),
            });
            *n = live;
        }

        let (o, n) = (&old.spool, &mut new.spool);
        refuse(r, "spool.max_bytes", &o.max_bytes, &mut n.max_bytes);
        refuse(r, "spool.when_full", &o.when_full, &mut n.when_full);
        refuse(r, "spool.fsync", &o.fsync, &mut n.fsync);
        let (ov, nv) = (&o.fsync_interval_ms, &mut n.fsync_interval_ms);
        refuse(r, "spool.fsync_interval_ms", ov, nv);
        refuse(
            r,
            "spool.retransmit_s",
            &o.retransmit_s,
            &mut n.retransmit_s,
        );
        let (ov, nv) = (&o.replay_max_per_s, &mut n.replay_max_per_s);
        refuse(r, "spool.replay_max_per_s", ov, nv);
        refuse(r, "spool", o, n);

        // Buses are opened and scheduled at start only.
        refuse(r, "modbus", &old.modbus, &mut new.modbus);

        let (o, n) = (&old.gpio, &mut new.gpio);
        refuse(r, "gpio.backend", &o.backend, &mut n.backend);
        refuse(r, "gpio.sim_dir", &o.sim_dir, &mut n.sim_dir);

        ReloadPlan {
            serial: ListDiff::of(&old.serial, &new.serial, |s| s.name.clone()),
            inputs: ListDiff::of(&old.gpio.input, &new.gpio.input, |i| {
                (i.name.clone(), i.pin)
            }),
            outputs: ListDiff::of(&old.gpio.output, &new.gpio.output, |o| {
                (o.name.clone(), o.pin)
            }),
            gpio_changed: old.gpio != new.gpio,
            commands_changed: old.commands != new.commands,
            stats_interval_changed: old.gateway.stats_interval_s != new.gateway.stats_interval_s,
            shutdown_flush_changed: old.backend.shutdown_flush_ms != new.backend.shutdown_flush_ms,
            config: new,
            refused,
        }
    }

    /// The `[gpio]` section to open the backend with: the new one, except that every output
    /// kept across the reload is opened with `initial = "keep"` (its level is not driven
    /// again, so a relay does not drop and a running pulse stays on).
    pub fn gpio_to_open(&self) -> GpioConfig {
        let mut gpio = self.config.gpio.clone();
        for (_, new) in self.outputs.kept() {
            gpio.output[new].initial = Initial::Keep;
        }
        gpio
    }

    /// Whether applying the plan changes anything at all.
    pub fn changes_anything(&self) -> bool {
        self.serial.any()
            || self.gpio_changed
            || self.commands_changed
            || self.stats_interval_changed
            || self.shutdown_flush_changed
    }

    /// The facts of the `reload applied` log line.
    pub fn summary(&self) -> String {
        let c = &self.config;
        format!(
            "serial_added={} serial_removed={} serial_changed={} inputs_added={} \
             inputs_removed={} inputs_changed={} outputs_added={} outputs_removed={} \
             outputs_changed={} commands_max_per_s={}{} stats_interval_s={}{} \
             shutdown_flush_ms={}{} refused={}",
            self.serial.added.len(),
            self.serial.removed.len(),
            self.serial.changed.len(),
            self.inputs.added.len(),
            self.inputs.removed.len(),
            self.inputs.changed.len(),
            self.outputs.added.len(),
            self.outputs.removed.len(),
            self.outputs.changed.len(),
            c.commands.max_per_s,
            if self.commands_changed { "(new)" } else { "" },
            c.gateway.stats_interval_s,
            if self.stats_interval_changed {
                "(new)"
            } else {
                ""
            },
            c.backend.shutdown_flush_ms,
            if self.shutdown_flush_changed {
                "(new)"
            } else {
                ""
            },
            self.refused.len(),
        )
    }
}

#[cfg(test)]
mod tests;
