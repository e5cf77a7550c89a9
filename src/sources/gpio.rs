//! GPIO for the loop: [`open`] opens the configured backend, reads the level of every
//! configured pin, and returns [`GpioEvents`], the one event source of input changes whatever
//! the backend.
//!
//! This module depends on [`crate::hw`] and [`crate::config`]; `hw` depends on neither.

use crate::config::{GpioBackendKind, GpioConfig};
use crate::hw::rppal::RppalGpio;
use crate::hw::sim::{SimGpio, SimWatcher};
use crate::hw::{GpioBackend, HwError, InputChange, InputLine, Level, OutputLine};
use calloop::channel::{Channel, Event};
use calloop::{EventSource, Poll, PostAction, Readiness, Token, TokenFactory};
use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

/// The opened GPIO: the backend, its input changes and the level of every configured pin.
pub struct OpenGpio {
    /// Writes outputs, reads any configured pin.
    pub backend: Box<dyn GpioBackend>,
    /// Input changes, to insert into the loop.
    pub events: GpioEvents,
    /// BCM pin → level read from the backend after open, for every input and output.
    pub levels: BTreeMap<u8, Level>,
}

/// Opens the configured backend: inputs with their bias, outputs at their `initial` level (or
/// kept), then reads every configured pin. Input changes after the read arrive through
/// [`OpenGpio::events`].
pub fn open(cfg: &GpioConfig) -> Result<OpenGpio, HwError> {
    let inputs: Vec<InputLine> = cfg
        .input
        .iter()
        .map(|i| InputLine {
            pin: i.pin,
            pull: i.pull,
            debounce: Duration::from_millis(i.debounce_ms),
        })
        .collect();
    let outputs: Vec<OutputLine> = cfg
        .output
        .iter()
        .map(|o| OutputLine {
            pin: o.pin,
            initial: o.initial,
        })
        .collect();
    let (mut backend, events): (Box<dyn GpioBackend>, _) = match cfg.backend {
        GpioBackendKind::Sim => {
            let (gpio, watcher) = SimGpio::open(&cfg.sim_dir, &inputs, &outputs)?;
            (Box::new(gpio), GpioEvents::Sim(watcher))
        }
        GpioBackendKind::Rppal => {
            let (gpio, channel) = RppalGpio::open(&inputs, &outputs)?;
            (Box::new(gpio), GpioEvents::Channel(channel))
        }
    };
    let mut levels = BTreeMap::new();
    for pin in inputs
        .iter()
        .map(|i| i.pin)
        .chain(outputs.iter().map(|o| o.pin))
    {
        levels.insert(pin, backend.read(pin)?);
    }
    Ok(OpenGpio {
        backend,
        events,
        levels,
    })
}

/// Input changes from whichever backend is open.
pub enum GpioEvents {
    /// The simulated backend's inotify watch.
    Sim(SimWatcher),
    /// Changes sent by rppal's interrupt thread.
    Channel(Channel<InputChange>),
}

impl EventSource for GpioEvents {
    type Event = InputChange;
    type Metadata = ();
    type Ret = ();
    type Error = io::Error;

    fn process_events<F>(
        &mut self,
        readiness: Readiness,
        token: Token,
        mut callback: F,
    ) -> Result<PostAction, Self::Error>
    where
        F: FnMut(Self::Event, &mut Self::Metadata) -> Self::Ret,
    {
        match self {
            GpioEvents::Sim(w) => w.process_events(readiness, token, callback),
            GpioEvents::Channel(c) => c
                .process_events(readiness, token, |event, m| {
                    if let Event::Msg(change) = event {
                        callback(change, m);
                    }
                })
                .map_err(io::Error::other),
        }
    }

    fn register(&mut self, poll: &mut Poll, factory: &mut TokenFactory) -> calloop::Result<()> {
        match self {
            GpioEvents::Sim(w) => w.register(poll, factory),
            GpioEvents::Channel(c) => c.register(poll, factory),
        }
    }
    fn reregister(&mut self, poll: &mut Poll, factory: &mut TokenFactory) -> calloop::Result<()> {
        match self {
            GpioEvents::Sim(w) => w.reregister(poll, factory),
            GpioEvents::Channel(c) => c.reregister(poll, factory),
        }
    }
    fn unregister(&mut self, poll: &mut Poll) -> calloop::Result<()> {
        match self {
            GpioEvents::Sim(w) => w.unregister(poll),
            GpioEvents::Channel(c) => c.unregister(poll),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(dir: &std::path::Path) -> Config {
        let text = format!(
            "[gateway]\nid = \"gw-t\"\ndata_dir = \"{0}\"\n\
             [gpio]\nbackend = \"sim\"\nsim_dir = \"{0}\"\n\
             [[gpio.input]]\nname = \"door\"\npin = 17\npull = \"up\"\n\
             [[gpio.input]]\nname = \"window\"\npin = 18\npull = \"up\"\n\
             [[gpio.output]]\nname = \"relay1\"\npin = 27\ninitial = \"keep\"\n\
             [[gpio.output]]\nname = \"relay2\"\npin = 22\ninitial = 1\n",
            dir.display()
        );
        Config::parse(&text, "t.toml").unwrap()
    }

    /// The levels at open are read from the backend: a pull-up input whose file holds 0 is
    /// Low, a kept output has its file's level (and its file is not written), a new pull-up
    /// input is High, a driven output has its initial level.
    #[test]
    fn open_reads_every_configured_level() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gpio17"), "0\n").unwrap();
        std::fs::write(dir.path().join("gpio27"), "1").unwrap();
        let gpio = open(&config(dir.path()).gpio).unwrap();
        let want: BTreeMap<u8, Level> = [
            (17, Level::Low),
            (18, Level::High),
            (22, Level::High),
            (27, Level::High),
        ]
        .into();
        assert_eq!(gpio.levels, want);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("gpio27")).unwrap(),
            "1"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("gpio17")).unwrap(),
            "0\n"
        );
    }
}
