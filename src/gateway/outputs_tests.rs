//! Output tests: plans, pulses and level reports, time driven by hand.

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

mod levels {
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
        // relay2 (pin 22, kept) reads high after open; a pin no output has changes nothing.
        o.set_levels_read(&[(22, Level::High), (5, Level::High)].into_iter().collect());
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
        assert_eq!(
            levels(&mut fx),
            vec![(0, 0, "command")],
            "pulse from 1 goes to 0"
        );
        run(&mut o, 0, Action::Set(0), t0, &mut fx);
        assert_eq!(
            levels(&mut fx),
            vec![],
            "set to the pulsed level: no change"
        );
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
