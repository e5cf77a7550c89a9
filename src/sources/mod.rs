//! Event sources of the gateway's one calloop loop: one per file.
//!
//! - [`zmq`]: the backend link (DEALER socket, bounded outbox, connection monitor).
//! - [`serial`]: a serial port framed into lines, with buffered writes and reconnection.
//! - [`gpio`]: input edges from the configured GPIO backend.
//! - [`modbus`]: the tty of a Modbus RTU bus (raw bytes; the bus logic is the gateway's).
//!
//! Timers (stats, pulses, debounce re-checks, shutdown deadline) are calloop's own `Timer`s,
//! inserted by the gateway; signals use calloop's `Signals` (signalfd).

pub mod gpio;
pub mod modbus;
pub mod serial;
pub mod zmq;
