//! zgate: a field gateway daemon. One calloop event loop owns the GPIO lines, the serial
//! ports, the timers and a ZeroMQ socket to the backend.
//!
//! - [`config`]: the TOML configuration, with file/line/key errors.
//! - [`protocol`]: protocol v1 messages (see docs/protocol.md).
//! - [`sources`]: the loop's event sources (ZeroMQ, serial, GPIO).
//! - [`hw`]: GPIO backends (Raspberry Pi via rppal, simulated via files + inotify).
//! - [`spool`]: the on-disk spool of unacknowledged readings.
//! - [`gateway`]: the loop's state machines (link, delivery, commands, outputs, inputs) and
//!   the interpreter of their effects.
//! - [`clock`]: whether the wall clock is synchronised; boot id and boot time.
//! - [`limit`]: rate and log limiters (time injected).
//! - [`sd_notify`]: systemd readiness and watchdog notifications.
//! - [`security`]: CURVE keys, key files, the endpoint policy (docs/security.md).
//! - [`backend`]: the reference backend (`zgate backend`).
//! - [`demo`]: `zgate demo`, the embedded default with simulated hardware.

#![warn(missing_docs)]

pub mod backend;
pub mod clock;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod hw;
pub mod limit;
pub mod modbus_sim;
pub mod protocol;
pub mod sd_notify;
pub mod security;
pub mod sources;
pub mod spool;

pub use config::Config;
pub use gateway::{Gateway, GatewayError};
