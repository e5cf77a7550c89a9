//! Raspberry Pi GPIO through the `rppal` crate.
//!
//! rppal exposes no pollable fd for interrupts: `set_async_interrupt` runs a callback on
//! rppal's own thread. That thread only forwards the change into a bounded
//! `calloop::channel::SyncSender`; the loop thread does everything else. Debouncing uses
//! rppal's own `debounce` parameter (`debounce_ms` per input).
//!
//! Requirements: a Raspberry Pi running Raspberry Pi OS (rppal maps the registers through
//! `/dev/gpiomem`, which other kernels lack) and read/write access to `/dev/gpiomem` and
//! `/dev/gpiochipN` (group `gpio`; see the [`hw`](super) module docs). rppal's errors map onto
//! [`HwError`] as far as rppal keeps the cause: `PermissionDenied` names the file,
//! `PinNotAvailable` is [`HwError::NoSuchPin`], `UnknownModel` is [`HwError::Unavailable`], and
//! an I/O error from the interrupt set-up is classified by its errno (EBUSY: the line is held
//! by another consumer).

use super::{GpioBackend, HwError, Initial, InputChange, InputLine, Level, OutputLine, Pull};
use calloop::channel::{sync_channel, Channel};
use rppal::gpio::{self as rp, Gpio, InputPin, Mode, OutputPin, Trigger};
use std::collections::HashMap;

/// Changes buffered between rppal's interrupt thread and the loop. When the loop is this far
/// behind, further changes are dropped (and logged) instead of blocking rppal's thread.
const EDGE_QUEUE: usize = 1024;

/// The configured pins, held open for as long as the gateway runs.
pub struct RppalGpio {
    inputs: HashMap<u8, InputPin>,
    outputs: HashMap<u8, OutputPin>,
}

/// Maps an rppal error for `pin` (`op` says what was being done) onto an [`HwError`].
pub fn map_error(pin: u8, op: &'static str, e: rp::Error) -> HwError {
    match e {
        rp::Error::PermissionDenied(path) => HwError::PermissionDenied { path },
        rp::Error::PinNotAvailable(pin) => HwError::NoSuchPin { pin },
        rp::Error::PinUsed(pin) => HwError::LineBusy {
            pin,
            detail: "zgate already holds it".into(),
        },
        rp::Error::UnknownModel => HwError::Unavailable {
            backend: "rppal",
            reason: "not a Raspberry Pi, or its model is unknown to rppal".into(),
        },
        rp::Error::Io(source) => HwError::from_io("rppal", pin, "/dev/gpiochipN", op, source),
        rp::Error::ThreadPanic => HwError::Io {
            pin,
            op,
            source: std::io::Error::other("rppal's interrupt thread panicked"),
        },
    }
}

fn rp_level(level: Level) -> rp::Level {
    match level {
        Level::Low => rp::Level::Low,
        Level::High => rp::Level::High,
    }
}

fn level(level: rp::Level) -> Level {
    Level::from(level == rp::Level::High)
}

impl RppalGpio {
    /// Claims the configured pins: inputs with their bias and change interrupts, outputs at
    /// their initial level (or kept as they are). Returns the channel of input changes.
    pub fn open(
        inputs: &[InputLine],
        outputs: &[OutputLine],
    ) -> Result<(RppalGpio, Channel<InputChange>), HwError> {
        let gpio = Gpio::new().map_err(|e| match e {
            rp::Error::Io(source) => HwError::from_io("rppal", 0, "/dev/gpiomem", "open", source),
            e => map_error(0, "open", e),
        })?;
        let (tx, rx) = sync_channel(EDGE_QUEUE);
        let mut input_pins = HashMap::new();
        for cfg in inputs {
            let pin = gpio
                .get(cfg.pin)
                .map_err(|e| map_error(cfg.pin, "claim", e))?;
            let mut pin = match cfg.pull {
                Pull::Up => pin.into_input_pullup(),
                Pull::Down => pin.into_input_pulldown(),
                Pull::None => pin.into_input(),
            };
            let tx = tx.clone();
            let bcm = cfg.pin;
            let debounce = (!cfg.debounce.is_zero()).then_some(cfg.debounce);
            pin.set_async_interrupt(Trigger::Both, debounce, move |event| {
                let level = Level::from(event.trigger == Trigger::RisingEdge);
                if tx.try_send(InputChange { pin: bcm, level }).is_err() {
                    // The loop is far behind or gone; never block rppal's thread.
                    log::warn!("gpio change dropped pin={bcm}: event queue full");
                }
            })
            .map_err(|e| map_error(cfg.pin, "request edge interrupts", e))?;
            input_pins.insert(cfg.pin, pin);
        }
        let mut output_pins = HashMap::new();
        for cfg in outputs {
            let pin = gpio
                .get(cfg.pin)
                .map_err(|e| map_error(cfg.pin, "claim", e))?;
            let mut pin = match cfg.initial {
                Initial::Drive(Level::Low) => pin.into_output_low(),
                Initial::Drive(Level::High) => pin.into_output_high(),
                // Already an output: switching the mode again changes nothing on the line.
                Initial::Keep if pin.mode() == Mode::Output => pin.into_output(),
                // Not yet an output: drive the level the line has now, so it does not jump.
                Initial::Keep => match level(pin.read()) {
                    Level::Low => pin.into_output_low(),
                    Level::High => pin.into_output_high(),
                },
            };
            // Keep the last commanded level if zgate exits (a relay should not drop on restart).
            pin.set_reset_on_drop(false);
            output_pins.insert(cfg.pin, pin);
        }
        Ok((
            RppalGpio {
                inputs: input_pins,
                outputs: output_pins,
            },
            rx,
        ))
    }
}

impl GpioBackend for RppalGpio {
    fn write(&mut self, pin: u8, level: Level) -> Result<(), HwError> {
        let p = self.outputs.get_mut(&pin).ok_or(HwError::NotConfigured {
            pin,
            expected: "an output",
        })?;
        p.write(rp_level(level));
        Ok(())
    }

    fn read(&mut self, pin: u8) -> Result<Level, HwError> {
        if let Some(p) = self.inputs.get(&pin) {
            return Ok(level(p.read()));
        }
        if let Some(p) = self.outputs.get(&pin) {
            // GPLEV: the level on the line, whether zgate drove it or kept it.
            return Ok(Level::from(p.is_set_high()));
        }
        Err(HwError::NotConfigured {
            pin,
            expected: "an input or output",
        })
    }
}
