//! GPIO outputs: levels, the `set`/`toggle`/`pulse` commands, pulse deadlines.
//!
//! [`Outputs`] decides the level a command drives ([`Outputs::plan`]); the interpreter writes
//! the pin and reports success with [`Outputs::applied`], which arms or cancels the pulse
//! timer ([`TimerId::Pulse`]). When the timer fires, [`Outputs::pulse_due`] asks for the
//! restore write ([`Effect::EndPulse`]), reported back with [`Outputs::pulse_ended`].

use super::effect::{Effect, Effects, TimerId};
use crate::config::OutputConfig;
use crate::hw::{Initial, Level};
use crate::protocol::Action;
use std::time::{Duration, Instant};

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
    /// [`Outputs::set_level`] says otherwise).
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

    /// Sets the known level of output `i` (the level read back after open).
    pub fn set_level(&mut self, i: usize, level: Level) {
        if let Some(out) = self.outputs.get_mut(i) {
            out.level = level;
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

    /// The pin write `action` asks of output `i`, or why it is refused.
    pub fn plan(&self, i: usize, action: &Action) -> Result<PinWrite, String> {
        let out = &self.outputs[i];
        let level = match *action {
            Action::Set(v) => Level::try_from(v).map_err(|e| e.to_string())?,
            Action::Toggle => !out.level,
            Action::Pulse(ms) if ms > out.max_pulse_ms => {
                return Err(format!(
                    "pulse of {ms} ms exceeds max_pulse_ms={} for {}",
                    out.max_pulse_ms, out.name
                ))
            }
            Action::Pulse(_) => !out.level,
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

    /// The write planned for `action` succeeded at `now`. Any command ends a running pulse;
    /// a new pulse keeps the original level to restore and arms its timer.
    pub fn applied(&mut self, w: PinWrite, action: &Action, now: Instant, fx: &mut Effects) {
        let out = &mut self.outputs[w.output];
        let old = out.level;
        out.level = w.level;
        let running = out.pulse.take();
        let restore = running.map_or(old, |p| p.restore);
        if let Action::Pulse(ms) = *action {
            let until = now + Duration::from_millis(ms);
            out.pulse = Some(Pulse { restore, until });
            fx.push(Effect::Arm(TimerId::Pulse(w.output), until));
        } else if running.is_some() {
            fx.push(Effect::Cancel(TimerId::Pulse(w.output)));
        }
    }

    /// The pulse timer of output `i` fired: the restore write, if a pulse still runs.
    pub fn pulse_due(&mut self, i: usize, fx: &mut Effects) {
        let Some(out) = self.outputs.get(i) else {
            return;
        };
        if let Some(p) = out.pulse {
            fx.push(Effect::EndPulse {
                output: i,
                level: p.restore,
            });
        }
    }

    /// The restore write of output `i` to `level` ended with `result`.
    pub fn pulse_ended(&mut self, i: usize, level: Level, result: Result<(), String>) {
        let Some(out) = self.outputs.get_mut(i) else {
            return;
        };
        out.pulse = None;
        match result {
            Ok(()) => {
                out.level = level;
                log::info!("pulse ended target={} level={level}", out.name);
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
mod tests {
    use super::*;

    fn outputs() -> Outputs {
        Outputs::new(&[OutputConfig {
            name: "relay1".into(),
            pin: 27,
            initial: Initial::Drive(Level::Low),
            max_pulse_ms: 5000,
        }])
    }

    /// Plans and applies `action` as the interpreter does after a successful pin write.
    fn run(o: &mut Outputs, action: Action, now: Instant, fx: &mut Effects) -> PinWrite {
        let w = o.plan(0, &action).unwrap();
        o.applied(w, &action, now, fx);
        w
    }

    #[test]
    fn set_and_toggle_drive_the_pin() {
        let t0 = Instant::now();
        let mut o = outputs();
        let mut fx = Effects::default();
        assert_eq!(o.find("relay1"), Some(0));
        assert_eq!(o.find("nope"), None);
        assert_eq!(run(&mut o, Action::Toggle, t0, &mut fx).level, Level::High);
        assert_eq!(run(&mut o, Action::Set(1), t0, &mut fx).level, Level::High);
        assert_eq!(run(&mut o, Action::Toggle, t0, &mut fx).level, Level::Low);
        assert!(fx.is_empty(), "no pulse: no timer");
        assert!(o
            .plan(0, &Action::Write("x".into()))
            .unwrap_err()
            .contains("GPIO output"));
    }

    #[test]
    fn pulse_arms_a_deadline_and_restores() {
        let t0 = Instant::now();
        let mut o = outputs();
        let mut fx = Effects::default();
        let w = run(&mut o, Action::Pulse(200), t0, &mut fx);
        assert_eq!((w.pin, w.level), (27, Level::High));
        let until = t0 + Duration::from_millis(200);
        assert_eq!(fx.drain(), vec![Effect::Arm(TimerId::Pulse(0), until)]);
        assert_eq!(
            o.get(0).unwrap().pulse,
            Some(Pulse {
                restore: Level::Low,
                until
            })
        );
        o.pulse_due(0, &mut fx);
        assert_eq!(
            fx.drain(),
            vec![Effect::EndPulse {
                output: 0,
                level: Level::Low
            }]
        );
        o.pulse_ended(0, Level::Low, Ok(()));
        assert_eq!(o.get(0).unwrap().level, Level::Low);
        assert_eq!(o.get(0).unwrap().pulse, None);
        // A late timer after the end does nothing.
        o.pulse_due(0, &mut fx);
        assert!(fx.is_empty());
    }

    #[test]
    fn set_during_a_pulse_cancels_its_timer() {
        let t0 = Instant::now();
        let mut o = outputs();
        let mut fx = Effects::default();
        run(&mut o, Action::Pulse(200), t0, &mut fx);
        fx.drain();
        run(&mut o, Action::Set(0), t0, &mut fx);
        assert_eq!(fx.drain(), vec![Effect::Cancel(TimerId::Pulse(0))]);
        assert_eq!(o.get(0).unwrap().pulse, None);
    }

    #[test]
    fn pulse_over_the_limit_is_refused() {
        let o = outputs();
        let e = o.plan(0, &Action::Pulse(5001)).unwrap_err();
        assert!(e.contains("exceeds max_pulse_ms=5000 for relay1"), "{e}");
    }
}
