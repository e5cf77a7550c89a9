//! GPIO outputs: levels, the `set`/`toggle`/`pulse` commands, pulse deadlines.
//!
//! [`Outputs`] decides the level a command drives ([`Outputs::plan`]); the interpreter writes
//! the pin and reports success with [`Outputs::applied`], which arms or cancels the pulse
//! timer ([`TimerId::Pulse`]). When the timer fires, [`Outputs::pulse_due`] asks for the
//! restore write ([`Effect::EndPulse`]), reported back with [`Outputs::pulse_ended`].
//! At shutdown [`Outputs::end_pulses`] asks for the restore write of every running pulse.
//!
//! A command on an output that is pulsing:
//! - `pulse` extends the pulse: the output stays at its pulsed level, the timer restarts with
//!   the new `ms`, and the level to restore stays the one from before the first pulse.
//! - `set` ends the pulse (its timer is cancelled, nothing is restored) and drives its value.
//! - `toggle` ends the pulse as if it had run out, then inverts the level it would have
//!   restored: the output keeps its pulsed level, now without a timer. So "pulse, then
//!   toggle" ends at the same level whether the toggle comes during or after the pulse.
//!
//! Every level an output takes is reported as a reading from the output
//! ([`Effect::OutputLevel`], `{"level": 0|1, "cause": ...}`, see [`LevelCause`]): its level at
//! start, each change a command made, each pulse end. A command that leaves the level as it
//! was (a `set` to the current level, a `pulse` extending a pulse, a `toggle` during a pulse)
//! reports nothing: its reply confirms it, and a reading would be a state the actuator was
//! already in.

use super::effect::{Effect, Effects, TimerId};
use crate::config::OutputConfig;
use crate::hw::{Initial, Level};
use crate::protocol::Action;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Why an output reports its level (the `cause` of its reading).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelCause {
    /// The level read after the gateway opened the output.
    Start,
    /// A `set`, `toggle` or `pulse` command changed the level.
    Command,
    /// A pulse ended and the output was driven back.
    PulseEnd,
    /// The output was (re)configured by a configuration reload.
    Reload,
}

impl LevelCause {
    /// The name in a reading's `values.cause`.
    pub fn as_str(self) -> &'static str {
        match self {
            LevelCause::Start => "start",
            LevelCause::Command => "command",
            LevelCause::PulseEnd => "pulse_end",
            LevelCause::Reload => "reload",
        }
    }
}

/// A running pulse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pulse {
    /// The level restored when it ends.
    pub restore: Level,
    /// When it ends.
    pub until: Instant,
}

/// One configured output.
#[derive(Debug, Clone)]
pub struct OutputState {
    /// Its name in commands and readings.
    pub name: String,
    /// Its pin.
    pub pin: u8,
    /// The level last driven.
    pub level: Level,
    /// `max_pulse_ms`.
    pub max_pulse_ms: u64,
    /// The running pulse, if any.
    pub pulse: Option<Pulse>,
}

/// A pin write a command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinWrite {
    /// The output's index.
    pub output: usize,
    /// Its pin.
    pub pin: u8,
    /// The level to drive.
    pub level: Level,
}

/// Every configured output (see the module doc).
#[derive(Debug, Default)]
pub struct Outputs {
    outputs: Vec<OutputState>,
}

impl Outputs {
    /// The configured outputs at their `initial` levels ([`Initial::Keep`]: low until
    /// [`Outputs::set_levels_read`] says otherwise).
    pub fn new(cfg: &[OutputConfig]) -> Outputs {
        Outputs {
            outputs: cfg
                .iter()
                .map(|o| OutputState {
                    name: o.name.clone(),
                    pin: o.pin,
                    level: match o.initial {
                        Initial::Drive(level) => level,
                        Initial::Keep => Level::Low,
                    },
                    max_pulse_ms: o.max_pulse_ms,
                    pulse: None,
                })
                .collect(),
        }
    }

    /// Takes the levels read after open (pin → level) for every output found there.
    pub fn set_levels_read(&mut self, levels: &BTreeMap<u8, Level>) {
        for out in &mut self.outputs {
            if let Some(&level) = levels.get(&out.pin) {
                out.level = level;
            }
        }
    }

    /// Asks for a reading of output `i`'s current level with `cause` (for [`LevelCause::Reload`]:
    /// call it once the output is (re)configured and its level known, after
    /// [`Outputs::set_levels_read`]).
    pub fn report_level(&self, i: usize, cause: LevelCause, fx: &mut Effects) {
        if let Some(out) = self.outputs.get(i) {
            fx.push(Effect::OutputLevel {
                output: i,
                level: out.level,
                cause,
            });
        }
    }

    /// Asks for a reading of every output's current level with `cause` (at start:
    /// [`LevelCause::Start`], once the levels read after open are set).
    pub fn report_all(&self, cause: LevelCause, fx: &mut Effects) {
        for i in 0..self.outputs.len() {
            self.report_level(i, cause, fx);
        }
    }

    /// The index of the output called `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|o| o.name == name)
    }

    /// Output number `i`.
    pub fn get(&self, i: usize) -> Option<&OutputState> {
        self.outputs.get(i)
    }

    /// Every output, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &OutputState> {
        self.outputs.iter()
    }

    /// The pin write `action` asks of output `i`, or why it is refused (see the module doc
    /// for a command on a pulsing output).
    pub fn plan(&self, i: usize, action: &Action) -> Result<PinWrite, String> {
        let out = &self.outputs[i];
        // The level a toggle or a pulse inverts: during a pulse, the level it will restore
        // (so a pulse keeps the pulsed level, and so does a toggle).
        let base = out.pulse.map_or(out.level, |p| p.restore);
        let level = match *action {
            Action::Set(v) => Level::try_from(v).map_err(|e| e.to_string())?,
            Action::SetNumber(v) => {
                return Err(format!(
                    "set: value must be 0, 1, false or true, got {v} ({} is a GPIO output)",
                    out.name
                ))
            }
            Action::Toggle => !base,
            Action::Pulse(ms) if ms > out.max_pulse_ms => {
                return Err(format!(
                    "pulse of {ms} ms exceeds max_pulse_ms={} for {}",
                    out.max_pulse_ms, out.name
                ))
            }
            Action::Pulse(_) => !base,
            Action::Write(_) => {
                return Err(format!(
                    "{} is a GPIO output: use set, toggle or pulse",
                    out.name
                ))
            }
        };
        Ok(PinWrite {
            output: i,
            pin: out.pin,
            level,
        })
    }

    /// The write planned for `action` succeeded at `now`. A `pulse` starts or extends the
    /// pulse (keeping the level from before the first pulse to restore) and arms its timer
    /// at `now + ms`; `set` and `toggle` end a running pulse and cancel its timer. A changed
    /// level is reported ([`LevelCause::Command`]).
    pub fn applied(&mut self, w: PinWrite, action: &Action, now: Instant, fx: &mut Effects) {
        let out = &mut self.outputs[w.output];
        let old = out.level;
        out.level = w.level;
        if old != w.level {
            fx.push(Effect::OutputLevel {
                output: w.output,
                level: w.level,
                cause: LevelCause::Command,
            });
        }
        let running = out.pulse.take();
        let restore = running.map_or(old, |p| p.restore);
        if let Action::Pulse(ms) = *action {
            let until = now + Duration::from_millis(ms);
            out.pulse = Some(Pulse { restore, until });
            if running.is_some() {
                log::info!("pulse extended target={} ms={ms}", out.name);
            }
            fx.push(Effect::Arm(TimerId::Pulse(w.output), until));
        } else if running.is_some() {
            log::info!(
                "pulse ended by {} target={} level={}",
                action.name(),
                out.name,
                w.level
            );
            fx.push(Effect::Cancel(TimerId::Pulse(w.output)));
        }
    }

    /// Ends every running pulse now (shutdown): cancels its timer and asks for its restore
    /// write, reported back with [`Outputs::pulse_ended`]. Returns how many pulses run.
    pub fn end_pulses(&mut self, fx: &mut Effects) -> usize {
        let mut n = 0;
        for (i, out) in self.outputs.iter().enumerate() {
            if let Some(p) = out.pulse {
                fx.push(Effect::Cancel(TimerId::Pulse(i)));
                fx.push(Effect::EndPulse {
                    output: i,
                    level: p.restore,
                });
                n += 1;
            }
        }
        n
    }

    /// The pulse timer of output `i` fired at `now`: the restore write, if a pulse still runs
    /// and its (possibly extended) end has come; a timer that fires early is armed again.
    pub fn pulse_due(&mut self, i: usize, now: Instant, fx: &mut Effects) {
        let Some(out) = self.outputs.get(i) else {
            return;
        };
        match out.pulse {
            Some(p) if now >= p.until => fx.push(Effect::EndPulse {
                output: i,
                level: p.restore,
            }),
            Some(p) => fx.push(Effect::Arm(TimerId::Pulse(i), p.until)),
            None => {}
        }
    }

    /// The restore write of output `i` to `level` ended with `result`; a restore that
    /// succeeded is reported ([`LevelCause::PulseEnd`]).
    pub fn pulse_ended(
        &mut self,
        i: usize,
        level: Level,
        result: Result<(), String>,
        fx: &mut Effects,
    ) {
        let Some(out) = self.outputs.get_mut(i) else {
            return;
        };
        out.pulse = None;
        match result {
            Ok(()) => {
                out.level = level;
                log::info!("pulse ended target={} level={level}", out.name);
                fx.push(Effect::OutputLevel {
                    output: i,
                    level,
                    cause: LevelCause::PulseEnd,
                });
            }
            Err(e) => log::error!("pulse end failed target={} error=\"{e}\"", out.name),
        }
    }

    /// Output `i` takes over the level and running pulse of `from` (the same output before a
    /// configuration reload). The caller re-arms the pulse timer under the new index.
    pub fn take_over(&mut self, i: usize, from: &OutputState) {
        if let Some(out) = self.outputs.get_mut(i) {
            out.level = from.level;
            out.pulse = from.pulse;
        }
    }
}

#[cfg(test)]
#[path = "outputs_tests.rs"]
mod tests;
