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

    /// Asks for a reading of output `i`'s current level with `cause` (for [`LevelCause::Reload`]:
    /// call it once the output is (re)configured and its level known, after
    /// [`Outputs::set_level`]).
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

    /// The effects other than level reports (timers, restore writes).
    fn timers(fx: &mut Effects) -> Vec<Effect> {
        fx.drain()
            .into_iter()
            .filter(|e| !matches!(e, Effect::OutputLevel { .. }))
            .collect()
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
        assert!(timers(&mut fx).is_empty(), "no pulse: no timer");
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
        assert_eq!(timers(&mut fx), vec![Effect::Arm(TimerId::Pulse(0), until)]);
        assert_eq!(
            o.get(0).unwrap().pulse,
            Some(Pulse {
                restore: Level::Low,
                until
            })
        );
        o.pulse_due(0, until, &mut fx);
        assert_eq!(
            timers(&mut fx),
            vec![Effect::EndPulse {
                output: 0,
                level: Level::Low
            }]
        );
        o.pulse_ended(0, Level::Low, Ok(()), &mut fx);
        assert_eq!(o.get(0).unwrap().level, Level::Low);
        assert_eq!(o.get(0).unwrap().pulse, None);
        // A late timer after the end does nothing.
        o.pulse_due(0, until, &mut fx);
        assert!(timers(&mut fx).is_empty());
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
            timers(&mut fx),
            vec![Effect::Arm(TimerId::Pulse(0), t0 + ms(200))]
        );
        let w = run(&mut o, Action::Pulse(500), t0 + ms(100), &mut fx);
        assert_eq!(w.level, Level::High, "stays active");
        let until = t0 + ms(600);
        assert_eq!(timers(&mut fx), vec![Effect::Arm(TimerId::Pulse(0), until)]);
        let restore = Level::Low;
        assert_eq!(o.get(0).unwrap().pulse, Some(Pulse { restore, until }));
        // The first deadline passes: a timer firing then only re-arms for the new one.
        o.pulse_due(0, t0 + ms(200), &mut fx);
        assert_eq!(timers(&mut fx), vec![Effect::Arm(TimerId::Pulse(0), until)]);
        assert_eq!(o.get(0).unwrap().level, Level::High);
        o.pulse_due(0, until, &mut fx);
        let end = || Effect::EndPulse {
            output: 0,
            level: Level::Low,
        };
        assert_eq!(timers(&mut fx), vec![end()]);
        o.pulse_ended(0, Level::Low, Ok(()), &mut fx);
        assert_eq!(o.get(0).unwrap().level, Level::Low);

        // A shorter pulse during a pulse ends it earlier: the timer restarts with its ms.
        run(&mut o, Action::Pulse(1000), t0, &mut fx);
        run(&mut o, Action::Pulse(50), t0 + ms(10), &mut fx);
        let until = t0 + ms(60);
        assert_eq!(
            timers(&mut fx).last(),
            Some(&Effect::Arm(TimerId::Pulse(0), until))
        );
        o.pulse_due(0, until, &mut fx);
        assert_eq!(timers(&mut fx), vec![end()]);
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
            timers(&mut fx);
            let w = run(&mut o, Action::Set(v), t0 + ms(50), &mut fx);
            assert_eq!(w.level, Level::try_from(v).unwrap());
            assert_eq!(timers(&mut fx), vec![Effect::Cancel(TimerId::Pulse(0))]);
            assert_eq!(o.get(0).unwrap().pulse, None);
            // A timer that fired anyway (already queued) restores nothing.
            o.pulse_due(0, t0 + ms(200), &mut fx);
            assert!(timers(&mut fx).is_empty());
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
        timers(&mut fx);
        let w = run(&mut o, Action::Toggle, t0 + ms(50), &mut fx);
        assert_eq!(w.level, Level::High);
        assert_eq!(timers(&mut fx), vec![Effect::Cancel(TimerId::Pulse(0))]);
        assert_eq!(o.get(0).unwrap().pulse, None);
        o.pulse_due(0, t0 + ms(200), &mut fx);
        assert!(timers(&mut fx).is_empty());
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
        timers(&mut fx);
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
        assert_eq!(timers(&mut fx), want);
        o.pulse_ended(0, Level::Low, Ok(()), &mut fx);
        o.pulse_ended(2, Level::High, Ok(()), &mut fx);
        let levels: Vec<_> = o.iter().map(|x| (x.level, x.pulse)).collect();
        assert_eq!(
            levels,
            vec![(Level::Low, None), (Level::Low, None), (Level::High, None)]
        );
        assert_eq!(o.end_pulses(&mut fx), 0);
        assert!(timers(&mut fx).is_empty());
    }
}

#[cfg(test)]
mod level_tests {
    use super::*;

    fn outputs() -> Outputs {
        let cfg = |name: &str, pin, initial| OutputConfig {
            name: name.into(),
            pin,
            initial,
            max_pulse_ms: 5000,
        };
        Outputs::new(&[
            cfg("relay1", 27, Initial::Drive(Level::Low)),
            cfg("relay2", 22, Initial::Keep),
        ])
    }

    /// The level reports among the effects, as (output, level, cause).
    fn levels(fx: &mut Effects) -> Vec<(usize, u8, &'static str)> {
        fx.drain()
            .into_iter()
            .filter_map(|e| match e {
                Effect::OutputLevel {
                    output,
                    level,
                    cause,
                } => Some((output, u8::from(level), cause.as_str())),
                _ => None,
            })
            .collect()
    }

    fn run(o: &mut Outputs, i: usize, action: Action, now: Instant, fx: &mut Effects) {
        let w = o.plan(i, &action).unwrap();
        o.applied(w, &action, now, fx);
    }

    /// At start every output reports the level read after open (a kept output: the level of
    /// its pin, not an assumed one); a reload report names its cause.
    #[test]
    fn start_reports_every_output_with_its_read_level() {
        let mut o = outputs();
        let mut fx = Effects::default();
        o.set_level(1, Level::High);
        o.report_all(LevelCause::Start, &mut fx);
        assert_eq!(levels(&mut fx), vec![(0, 0, "start"), (1, 1, "start")]);
        o.report_level(1, LevelCause::Reload, &mut fx);
        o.report_level(7, LevelCause::Reload, &mut fx);
        assert_eq!(levels(&mut fx), vec![(1, 1, "reload")]);
    }

    /// A command reports the level it changed, once; a command that leaves the level as it
    /// was (set to the same level, a pulse extended, a toggle or a set during a pulse that
    /// keeps the pulsed level) reports nothing.
    #[test]
    fn commands_report_changes_only() {
        let t0 = Instant::now();
        let mut o = outputs();
        let mut fx = Effects::default();
        run(&mut o, 0, Action::Set(1), t0, &mut fx);
        assert_eq!(levels(&mut fx), vec![(0, 1, "command")]);
        run(&mut o, 0, Action::Set(1), t0, &mut fx);
        assert_eq!(levels(&mut fx), vec![], "same level: no reading");
        run(&mut o, 0, Action::Toggle, t0, &mut fx);
        assert_eq!(levels(&mut fx), vec![(0, 0, "command")]);
        run(&mut o, 1, Action::Toggle, t0, &mut fx);
        assert_eq!(levels(&mut fx), vec![(1, 1, "command")], "the other output");

        run(&mut o, 0, Action::Pulse(100), t0, &mut fx);
        assert_eq!(levels(&mut fx), vec![(0, 1, "command")], "a pulse starts");
        run(&mut o, 0, Action::Pulse(100), t0, &mut fx);
        assert_eq!(levels(&mut fx), vec![], "extended: still 1");
        run(&mut o, 0, Action::Toggle, t0, &mut fx);
        assert_eq!(levels(&mut fx), vec![], "toggle during a pulse keeps 1");
        run(&mut o, 0, Action::Pulse(100), t0, &mut fx);
        assert_eq!(levels(&mut fx), vec![(0, 0, "command")], "pulse from 1 goes to 0");
        run(&mut o, 0, Action::Set(0), t0, &mut fx);
        assert_eq!(levels(&mut fx), vec![], "set to the pulsed level: no change");
        assert_eq!(o.get(0).unwrap().pulse, None);
    }

    /// A pulse's end reports the restored level once the restore write succeeded (by its
    /// timer or at shutdown); a failed restore reports nothing.
    #[test]
    fn pulse_end_reports_the_restored_level() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut o = outputs();
        let mut fx = Effects::default();
        run(&mut o, 0, Action::Pulse(200), t0, &mut fx);
        fx.drain();
        o.pulse_due(0, t0 + ms(100), &mut fx);
        assert_eq!(levels(&mut fx), vec![], "not due yet");
        o.pulse_due(0, t0 + ms(200), &mut fx);
        assert_eq!(
            fx.drain(),
            vec![Effect::EndPulse {
                output: 0,
                level: Level::Low
            }],
            "nothing reported before the write"
        );
        o.pulse_ended(0, Level::Low, Ok(()), &mut fx);
        assert_eq!(levels(&mut fx), vec![(0, 0, "pulse_end")]);

        // A failed restore: no reading, the output stays at its pulsed level.
        run(&mut o, 0, Action::Pulse(200), t0, &mut fx);
        fx.drain();
        o.pulse_ended(0, Level::Low, Err("EIO".into()), &mut fx);
        assert!(fx.is_empty());
        assert_eq!(o.get(0).unwrap().level, Level::High);

        // Shutdown: the restore asked by end_pulses reports like a timer's.
        run(&mut o, 1, Action::Pulse(1000), t0, &mut fx);
        assert_eq!(levels(&mut fx), vec![(1, 1, "command")]);
        assert_eq!(o.end_pulses(&mut fx), 1);
        let ends: Vec<_> = fx
            .drain()
            .into_iter()
            .filter_map(|e| match e {
                Effect::EndPulse { output, level } => Some((output, level)),
                _ => None,
            })
            .collect();
        assert_eq!(ends, vec![(1, Level::Low)]);
        o.pulse_ended(1, Level::Low, Ok(()), &mut fx);
        assert_eq!(levels(&mut fx), vec![(1, 0, "pulse_end")]);
    }
}
