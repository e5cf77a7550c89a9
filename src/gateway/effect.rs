//! What the gateway's state machines ask the interpreter (`gateway/mod.rs`) to do.
//!
//! The machines never touch the loop, the socket or the hardware: they push [`Effect`]s into
//! an [`Effects`] queue that the interpreter drains in order. The queue is kept and reused, so
//! the steady state allocates nothing for it.

use super::commands::CachedReply;
use super::outputs::LevelCause;
use crate::hw::Level;
use crate::protocol::Message;
use std::collections::VecDeque;
use std::time::Instant;

/// A one-shot timer owned by the interpreter. Arming an armed timer moves its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimerId {
    /// Check the backend connection (see `link`).
    ConnCheck,
    /// Continue a paced replay from the spool (see `delivery`).
    Replay,
    /// Interval fsync and ack persistence of the spool.
    SpoolTick,
    /// End the pulse of output number `n` (see `outputs`).
    Pulse(usize),
    /// Re-read input number `n` when its debounce window ends (see `inputs`).
    Debounce(usize),
    /// `[backend] hello_timeout_s` after a connection's hello: was the backend heard (see
    /// `link`)?
    HelloTimeout,
    /// Make the unheard connection again once the reconnect backoff allows (see `link`).
    Reconnect,
    /// A held reading's minimum interval ended, or a heartbeat is due (see `report`).
    Report,
    /// The next step of Modbus bus number `n` (see `modbus::Bus`).
    Modbus(usize),
}

/// One thing to do.
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// Queue a control message (reply, stats); readings never take its place.
    Send(Message),
    /// Put a fresh `hello` at the front of the outbox.
    Hello,
    /// Remove the readings queued in the outbox (a rewind resends them in seq order).
    DropQueuedReadings,
    /// Read up to `max` readings from seq `from` on out of the spool into the outbox, then
    /// report the next seq to `Delivery::replayed`.
    ReadSpool {
        /// First seq to read.
        from: u64,
        /// At most this many readings.
        max: usize,
    },
    /// Move readings from the spool into the outbox as far as its room allows
    /// (`Delivery::fill` with the current room).
    Fill,
    /// Arm (or move) a one-shot timer to fire at the deadline.
    Arm(TimerId, Instant),
    /// Cancel a one-shot timer if armed.
    Cancel(TimerId),
    /// Ask the backend link to check its connection (reconnect if libzmq gave up).
    CheckConnection,
    /// Drop the backend connection and dial the endpoint again (readings stay in the spool
    /// and the outbox; the new connection gets its own `hello`).
    Reconnect,
    /// Drive the pin of output number `output` to `level`, then report to
    /// `Outputs::pulse_ended`.
    EndPulse {
        /// The output's index.
        output: usize,
        /// The level to restore.
        level: Level,
    },
    /// Read input number `input` now and feed the level back to `Inputs::on_level`.
    ReadInput(usize),
    /// Input number `input` changed to `level`: store and send a reading.
    Reading {
        /// The input's index.
        input: usize,
        /// Its new level.
        level: Level,
    },
    /// Output number `output` is at `level` because of `cause`: store and send a reading
    /// from it.
    OutputLevel {
        /// The output's index.
        output: usize,
        /// Its level.
        level: Level,
        /// Why it is reported.
        cause: LevelCause,
    },
    /// Command `id` was answered: append `entry` to the command log so a retry after a
    /// restart is answered the same way.
    RememberReply {
        /// The command id.
        id: String,
        /// Its digest and reply.
        entry: CachedReply,
    },
}

/// The queue of effects, drained in order by the interpreter.
#[derive(Debug, Default)]
pub struct Effects(VecDeque<Effect>);

impl Effects {
    /// Appends an effect.
    pub fn push(&mut self, e: Effect) {
        self.0.push_back(e);
    }
    /// Takes the oldest effect.
    pub fn pop(&mut self) -> Option<Effect> {
        self.0.pop_front()
    }
    /// Whether no effect waits.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The waiting effects, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Effect> {
        self.0.iter()
    }
    /// Takes every waiting effect (tests).
    pub fn drain(&mut self) -> Vec<Effect> {
        self.0.drain(..).collect()
    }
}
