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
    for pin in inputs.iter().map(|i| i.pin).chain(outputs.iter().map(|o| o.pin)) {
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
                .map_err(|e| io::Error::other(e.to_string())),
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
