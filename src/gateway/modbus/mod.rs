//! Modbus RTU master: each `[[modbus]]` bus is a [`Bus`] state machine (scheduling, retries,
//! timeouts, response parsing) that takes `now` and the bytes received and returns
//! [`BusEffect`]s; [`plan`] holds what a poll reads and how raw registers become values.
//! Framing and CRC are rmodbus's (sans-IO); the tty is `crate::sources::modbus`.

pub mod bus;
pub mod frame;
pub mod plan;

pub use bus::{Bus, BusEffect, DeviceStats, Target};

#[cfg(test)]
mod tests;
