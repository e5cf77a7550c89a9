//! `GpioEvents`: input edges from whichever GPIO backend is configured, as one event source.
//!
//! The simulated backend watches files with inotify; rppal's interrupt threads send into a
//! bounded channel. Both appear to the loop as a stream of [`Edge`]s.

use crate::hw::sim::SimWatcher;
use crate::hw::Edge;
use calloop::channel::{Channel, Event};
use calloop::{EventSource, Poll, PostAction, Readiness, Token, TokenFactory};
use std::io;

pub enum GpioEvents {
    Sim(SimWatcher),
    Channel(Channel<Edge>),
}

impl EventSource for GpioEvents {
    type Event = Edge;
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
                .process_events(readiness, token, |e, _| {
                    if let Event::Msg(edge) = e {
                        callback(edge, &mut ());
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
