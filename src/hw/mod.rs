//! GPIO hardware backends behind one small trait.
//!
//! - [`rppal`](self::rppal) — a Raspberry Pi's GPIO via the `rppal` crate. Needs membership in
//!   the `gpio` group (access to `/dev/gpiomem`). Edge interrupts run on rppal's own thread
//!   and are forwarded into a bounded `calloop::channel`.
//! - [`sim`] — simulated pins as files `gpio<N>` in a directory (`0`/`1` and a newline),
//!   watched with inotify. Any program can drive inputs (`echo 1 > gpio17`) and observe
//!   outputs (`cat gpio27`).
//!
//! Troubleshooting on a Pi: `Gpio::new()` fails with "Unknown SoC/model" on other boards;
//! "Permission denied" means the user is not in the `gpio` group (`sudo usermod -aG gpio zgate`).

pub mod rppal;
pub mod sim;

use crate::config::{GpioBackendKind, GpioConfig};
use crate::sources::gpio::GpioEvents;

/// An error of a GPIO backend. Each variant says the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum HwError {
    #[error("cannot use the simulated GPIO directory {path}: {source} (create it, or set gpio.sim_dir to a writable directory)")]
    SimDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot access simulated pin file {path}: {source}")]
    SimPin {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch {path} with inotify: {source} (raise fs.inotify.max_user_instances/max_user_watches)")]
    Inotify {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("Raspberry Pi GPIO unavailable: {0} (on a Pi: add the user to the `gpio` group; elsewhere use [gpio] backend = \"sim\")")]
    Rppal(String),
    #[error("GPIO pin {0} is not configured")]
    UnknownPin(u8),
}

/// Output and input access for configured pins. Implemented by each backend; edges arrive
/// through the [`GpioEvents`] source returned by [`open`].
pub trait GpioBackend {
    /// Drives an output pin to `level` (0 or 1).
    fn write(&mut self, pin: u8, level: u8) -> Result<(), HwError>;
    /// Reads the current level of an input pin.
    fn read(&mut self, pin: u8) -> Result<u8, HwError>;
}

/// A level change seen on an input pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    pub pin: u8,
    pub level: u8,
}

/// Opens the configured backend: sets up inputs and outputs (outputs at their `initial`
/// level) and returns the backend with the event source that reports input edges.
pub fn open(cfg: &GpioConfig) -> Result<(Box<dyn GpioBackend>, GpioEvents), HwError> {
    match cfg.backend {
        GpioBackendKind::Sim => {
            let (gpio, events) = sim::SimGpio::open(&cfg.sim_dir, &cfg.input, &cfg.output)?;
            Ok((Box::new(gpio), GpioEvents::Sim(events)))
        }
        GpioBackendKind::Rppal => {
            let (gpio, channel) = rppal::RppalGpio::open(&cfg.input, &cfg.output)?;
            Ok((Box::new(gpio), GpioEvents::Channel(channel)))
        }
    }
}
