//! One module per benchmark item (numbered as in docs/benchmarks.md); item S is
//! `crate::spool`.

pub mod backlog;
pub mod commands;
pub mod diskflood;
pub mod fleet;
pub mod forwarder;
pub mod idle;
pub mod instructions;
pub mod latency;
pub mod modbus;
pub mod size;
pub mod steady;
pub mod syscalls;
pub mod throughput;
