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

    /// The pin write `action` asks of output `i`, or why it is refused (see the module doc
    /// for a command on a pulsing output).
    pub fn plan(&self, i: usize, action: &Action) -> Result<PinWrite, String> {
        let out = &self.outputs[i];
        // The level a toggle or a pulse inverts: during a pulse, the level it will restore
        // (so a pulse keeps the pulsed level, and so does a toggle).
        let base = out.pulse.map_or(out.level, |p| p.restore);
        let level = match *action {
            Action::Set(v) => Level::try_from(v).map_err(|e| e.to_string())?,
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
    /// at `now + ms`; `set` and `toggle` end a running pulse and cancel its timer.
    pub fn applied(&mut self, w: PinWrite, action: &Action, now: Instant, fx: &mut Effects) {
        let out = &mut self.outputs[w.output];
        let old = out.level;
        out.level = w.level;
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
        o.pulse_due(0, until, &mut fx);
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
        o.pulse_due(0, until, &mut fx);
        assert!(fx.is_empty());
    }

    #[test]
    fn pulse_over_the_limit_is_refused() {
        let o = outputs();
        let e = o.plan(0, &Action::Pulse(5001)).unwrap_err();
        assert!(e.contains("exceeds max_pulse_ms=5000 for relay1"), "{e}");
    }
    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A pulse during a pulse keeps the pulsed level, restarts the timer with the new `ms`
    /// (longer or shorter) and keeps the level from before the first pulse to restore.
    #[test]
    fn pulse_during_a_pulse_extends_it() {
        let t0 = Instant::now();
        let mut o = outputs();
        let mut fx = Effects::default();
        run(&mut o, Action::Pulse(200), t0, &mut fx);
        assert_eq!(
            fx.drain(),
            vec![Effect::Arm(TimerId::Pulse(0), t0 + ms(200))]
        );
        let w = run(&mut o, Action::Pulse(500), t0 + ms(100), &mut fx);
        assert_eq!(w.level, Level::High, "stays active");
        let until = t0 + ms(600);
        assert_eq!(fx.drain(), vec![Effect::Arm(TimerId::Pulse(0), until)]);
        let restore = Level::Low;
        assert_eq!(o.get(0).unwrap().pulse, Some(Pulse { restore, until }));
        // The first deadline passes: a timer firing then only re-arms for the new one.
        o.pulse_due(0, t0 + ms(200), &mut fx);
        assert_eq!(fx.drain(), vec![Effect::Arm(TimerId::Pulse(0), until)]);
        assert_eq!(o.get(0).unwrap().level, Level::High);
        o.pulse_due(0, until, &mut fx);
        let end = || Effect::EndPulse {
            output: 0,
            level: Level::Low,
        };
        assert_eq!(fx.drain(), vec![end()]);
        o.pulse_ended(0, Level::Low, Ok(()));
        assert_eq!(o.get(0).unwrap().level, Level::Low);

        // A shorter pulse during a pulse ends it earlier: the timer restarts with its ms.
        run(&mut o, Action::Pulse(1000), t0, &mut fx);
        run(&mut o, Action::Pulse(50), t0 + ms(10), &mut fx);
        let until = t0 + ms(60);
        assert_eq!(
            fx.drain().last(),
            Some(&Effect::Arm(TimerId::Pulse(0), until))
        );
        o.pulse_due(0, until, &mut fx);
        assert_eq!(fx.drain(), vec![end()]);
    }

    /// From a high output a pulse goes low; a pulse during it stays low and restores high.
    #[test]
    fn pulse_during_a_pulse_from_high_stays_low() {
        let t0 = Instant::now();
        let mut o = outputs();
        let mut fx = Effects::default();
        run(&mut o, Action::Set(1), t0, &mut fx);
        assert_eq!(
            run(&mut o, Action::Pulse(100), t0, &mut fx).level,
            Level::Low
        );
        assert_eq!(
            run(&mut o, Action::Pulse(100), t0, &mut fx).level,
            Level::Low
        );
        assert_eq!(o.get(0).unwrap().pulse.unwrap().restore, Level::High);
    }

    /// `set` during a pulse drives its value and nothing is restored afterwards, whichever
    /// value it sets.
    #[test]
    fn set_during_a_pulse_ends_it() {
        let t0 = Instant::now();
        let mut o = outputs();
        let mut fx = Effects::default();
        for v in [0, 1] {
            run(&mut o, Action::Pulse(200), t0, &mut fx);
            fx.drain();
            let w = run(&mut o, Action::Set(v), t0 + ms(50), &mut fx);
            assert_eq!(w.level, Level::try_from(v).unwrap());
            assert_eq!(fx.drain(), vec![Effect::Cancel(TimerId::Pulse(0))]);
            assert_eq!(o.get(0).unwrap().pulse, None);
            // A timer that fired anyway (already queued) restores nothing.
            o.pulse_due(0, t0 + ms(200), &mut fx);
            assert!(fx.is_empty());
            assert_eq!(o.get(0).unwrap().level, w.level);
        }
    }

    /// `toggle` during a pulse ends it as if it had run out, then inverts the restored
    /// level: the output keeps its pulsed level, without a timer.
    #[test]
    fn toggle_during_a_pulse_inverts_the_restored_level() {
        let t0 = Instant::now();
        let mut o = outputs();
        let mut fx = Effects::default();
        run(&mut o, Action::Pulse(200), t0, &mut fx);
        fx.drain();
        let w = run(&mut o, Action::Toggle, t0 + ms(50), &mut fx);
        assert_eq!(w.level, Level::High);
        assert_eq!(fx.drain(), vec![Effect::Cancel(TimerId::Pulse(0))]);
        assert_eq!(o.get(0).unwrap().pulse, None);
        o.pulse_due(0, t0 + ms(200), &mut fx);
        assert!(fx.is_empty());
        assert_eq!(
            run(&mut o, Action::Toggle, t0 + ms(300), &mut fx).level,
            Level::Low
        );
    }

    /// Shutdown: every running pulse is restored (timer cancelled, restore write asked for);
    /// outputs without a pulse are left alone.
    #[test]
    fn end_pulses_restores_every_running_pulse() {
        let t0 = Instant::now();
        let cfg = |name: &str, pin, level| OutputConfig {
            name: name.into(),
            pin,
            initial: Initial::Drive(level),
            max_pulse_ms: 60_000,
        };
        let mut o = Outputs::new(&[
            cfg("a", 1, Level::Low),
            cfg("b", 2, Level::Low),
            cfg("c", 3, Level::High),
        ]);
        let mut fx = Effects::default();
        for (i, action) in [(0, Action::Pulse(30_000)), (2, Action::Pulse(30_000))] {
            let w = o.plan(i, &action).unwrap();
            o.applied(w, &action, t0, &mut fx);
        }
        fx.drain();
        assert_eq!(o.end_pulses(&mut fx), 2);
        let want = vec![
            Effect::Cancel(TimerId::Pulse(0)),
            Effect::EndPulse {
                output: 0,
                level: Level::Low,
            },
            Effect::Cancel(TimerId::Pulse(2)),
            Effect::EndPulse {
                output: 2,
                level: Level::High,
            },
        ];
        assert_eq!(fx.drain(), want);
        o.pulse_ended(0, Level::Low, Ok(()));
        o.pulse_ended(2, Level::High, Ok(()));
        let levels: Vec<_> = o.iter().map(|x| (x.level, x.pulse)).collect();
        assert_eq!(
            levels,
            vec![(Level::Low, None), (Level::Low, None), (Level::High, None)]
        );
        assert_eq!(o.end_pulses(&mut fx), 0);
        assert!(fx.is_empty());
    }
}
