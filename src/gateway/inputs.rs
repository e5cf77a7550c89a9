//! GPIO inputs: levels, debounce, which edges become readings.
//!
//! [`Inputs::on_level`] takes a level seen on a pin at `now`. A change outside the debounce
//! window becomes an [`Effect::Reading`] (if the input's `edge` reports it); a change inside
//! it arms [`TimerId::Debounce`], and when that fires ([`Inputs::debounce_due`]) the pin is
//! read again ([`Effect::ReadInput`]) so the final level is never missed.

use super::effect::{Effect, Effects, TimerId};
use crate::config::{Edge, InputConfig, Pull};
use crate::hw::Level;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One configured input.
#[derive(Debug, Clone)]
pub struct InputState {
    /// Its name in readings.
    pub name: String,
    /// Its pin.
    pub pin: u8,
    /// Which changes are reported.
    pub edge: Edge,
    /// Changes closer than this to the last accepted one are re-checked at the window's end.
    pub debounce: Duration,
    /// The level last accepted.
    pub level: Level,
    /// When the level was last accepted (start of the debounce window).
    changed_at: Option<Instant>,
    /// A debounce re-check is armed.
    recheck_armed: bool,
}

/// Every configured input (see the module doc).
#[derive(Debug, Default)]
pub struct Inputs {
    inputs: Vec<InputState>,
}

impl Inputs {
    /// The configured inputs, each at the idle level of its pull until
    /// [`Inputs::set_level`] says otherwise.
    pub fn new(cfg: &[InputConfig]) -> Inputs {
        Inputs {
            inputs: cfg
                .iter()
                .map(|i| InputState {
                    name: i.name.clone(),
                    pin: i.pin,
                    edge: i.edge,
                    debounce: Duration::from_millis(i.debounce_ms),
                    level: Level::from(i.pull == Pull::Up),
                    changed_at: None,
                    recheck_armed: false,
                })
                .collect(),
        }
    }

    /// The index of the input on `pin`.
    pub fn find_pin(&self, pin: u8) -> Option<usize> {
        self.inputs.iter().position(|i| i.pin == pin)
    }

    /// Whether an input is called `name`.
    pub fn has_name(&self, name: &str) -> bool {
        self.inputs.iter().any(|i| i.name == name)
    }

    /// Every input, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &InputState> {
        self.inputs.iter()
    }

    /// Input number `i`.
    pub fn get(&self, i: usize) -> Option<&InputState> {
        self.inputs.get(i)
    }

    /// Takes the levels read after open (pin → level) for every input found there, without
    /// readings.
    pub fn set_levels_read(&mut self, levels: &BTreeMap<u8, Level>) {
        for input in &mut self.inputs {
            if let Some(&level) = levels.get(&input.pin) {
                input.level = level;
            }
        }
    }

    /// Sets the known level of input `i` without a reading (a level read at start).
    pub fn set_level(&mut self, i: usize, level: Level) {
        if let Some(input) = self.inputs.get_mut(i) {
            input.level = level;
        }
    }

    /// Input `i` reads `level` at `now` (an edge, or a re-read).
    pub fn on_level(&mut self, i: usize, level: Level, now: Instant, fx: &mut Effects) {
        let Some(input) = self.inputs.get_mut(i) else {
            return;
        };
        if level == input.level {
            return;
        }
        if let Some(at) = input.changed_at {
            let quiet_until = at + input.debounce;
            if now < quiet_until {
                // Too soon: look again when the debounce window ends.
                if !input.recheck_armed {
                    input.recheck_armed = true;
                    fx.push(Effect::Arm(TimerId::Debounce(i), quiet_until));
                }
                return;
            }
        }
        input.level = level;
        input.changed_at = Some(now);
        if input.edge.reports(level) {
            fx.push(Effect::Reading { input: i, level });
        }
    }

    /// The debounce timer of input `i` fired: the window is over; read the pin again.
    pub fn debounce_due(&mut self, i: usize, fx: &mut Effects) {
        if let Some(input) = self.inputs.get_mut(i) {
            input.recheck_armed = false;
            input.changed_at = None;
            fx.push(Effect::ReadInput(i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(edge: Edge) -> Inputs {
        Inputs::new(&[InputConfig {
            name: "door".into(),
            pin: 17,
            pull: Pull::Up,
            edge,
            debounce_ms: 50,
            report: Default::default(),
        }])
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn changes_become_readings_repeats_do_not() {
        let t0 = Instant::now();
        let mut i = inputs(Edge::Both);
        let mut fx = Effects::default();
        assert_eq!(i.find_pin(17), Some(0));
        assert!(i.has_name("door"));
        // Pull-up: idle level 1.
        i.on_level(0, Level::High, t0, &mut fx);
        assert!(fx.is_empty());
        i.on_level(0, Level::Low, t0, &mut fx);
        i.on_level(0, Level::High, t0 + ms(100), &mut fx);
        assert_eq!(
            fx.drain(),
            vec![
                Effect::Reading {
                    input: 0,
                    level: Level::Low
                },
                Effect::Reading {
                    input: 0,
                    level: Level::High
                }
            ]
        );
    }

    /// A bounce inside the window arms one re-check at its end; the re-read level is then
    /// taken, so the final level is never missed.
    #[test]
    fn bounce_is_rechecked_at_the_window_end() {
        let t0 = Instant::now();
        let mut i = inputs(Edge::Both);
        let mut fx = Effects::default();
        i.on_level(0, Level::Low, t0, &mut fx);
        fx.drain();
        i.on_level(0, Level::High, t0 + ms(10), &mut fx);
        i.on_level(0, Level::Low, t0 + ms(20), &mut fx);
        i.on_level(0, Level::High, t0 + ms(30), &mut fx);
        assert_eq!(
            fx.drain(),
            vec![Effect::Arm(TimerId::Debounce(0), t0 + ms(50))]
        );
        i.debounce_due(0, &mut fx);
        assert_eq!(fx.drain(), vec![Effect::ReadInput(0)]);
        i.on_level(0, Level::High, t0 + ms(50), &mut fx);
        assert_eq!(
            fx.drain(),
            vec![Effect::Reading {
                input: 0,
                level: Level::High
            }]
        );
    }

    #[test]
    fn edge_setting_filters_readings() {
        let t0 = Instant::now();
        let mut i = inputs(Edge::Falling);
        let mut fx = Effects::default();
        i.on_level(0, Level::Low, t0, &mut fx);
        i.on_level(0, Level::High, t0 + ms(100), &mut fx);
        assert_eq!(
            fx.drain(),
            vec![Effect::Reading {
                input: 0,
                level: Level::Low
            }]
        );
        // A level read at start changes what counts as a change.
        let mut i = inputs(Edge::Both);
        i.set_level(0, Level::Low);
        i.on_level(0, Level::Low, t0, &mut fx);
        assert!(fx.is_empty());
    }
}
