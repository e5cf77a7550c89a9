//! Raspberry Pi GPIO through the `rppal` crate.
//!
//! rppal exposes no pollable fd for interrupts: `set_async_interrupt` runs a callback on
//! rppal's own thread. That thread only forwards the edge into a bounded
//! `calloop::channel::SyncSender`; the loop thread does everything else. Debouncing uses
//! rppal's own `debounce` parameter (`debounce_ms` per input).
//!
//! Permissions: the user needs access to `/dev/gpiomem` (group `gpio` on Raspberry Pi OS).
//! On a machine that is not a Raspberry Pi, opening fails with "Unknown model": use
//! `[gpio] backend = "sim"` there.

use super::{Edge, GpioBackend, HwError};
use crate::config::{InputConfig, OutputConfig, Pull};
use calloop::channel::{sync_channel, Channel};
use rppal::gpio::{Gpio, InputPin, Level, OutputPin, Trigger};
use std::collections::HashMap;
use std::time::Duration;

/// Edges buffered between rppal's interrupt thread and the loop. When the loop is this far
/// behind, further edges are dropped (and counted) instead of blocking rppal's thread.
const EDGE_QUEUE: usize = 1024;

pub struct RppalGpio {
    inputs: HashMap<u8, InputPin>,
    outputs: HashMap<u8, OutputPin>,
}

impl RppalGpio {
    pub fn open(
        inputs: &[InputConfig],
        outputs: &[OutputConfig],
    ) -> Result<(RppalGpio, Channel<Edge>), HwError> {
        let gpio = Gpio::new().map_err(|e| HwError::Rppal(e.to_string()))?;
        let (tx, rx) = sync_channel(EDGE_QUEUE);
        let mut input_pins = HashMap::new();
        for cfg in inputs {
            let pin = gpio
                .get(cfg.pin)
                .map_err(|e| HwError::Rppal(format!("pin {}: {e}", cfg.pin)))?;
            let mut pin = match cfg.pull {
                Pull::Up => pin.into_input_pullup(),
                Pull::Down => pin.into_input_pulldown(),
                Pull::None => pin.into_input(),
            };
            let tx = tx.clone();
            let bcm = cfg.pin;
            let debounce = (cfg.debounce_ms > 0).then(|| Duration::from_millis(cfg.debounce_ms));
            pin.set_async_interrupt(Trigger::Both, debounce, move |event| {
                let level = u8::from(event.trigger == Trigger::RisingEdge);
                if tx.try_send(Edge { pin: bcm, level }).is_err() {
                    // The loop is far behind or gone; never block rppal's thread.
                    log::warn!("gpio edge dropped pin={bcm}: event queue full");
                }
            })
            .map_err(|e| HwError::Rppal(format!("pin {}: interrupt: {e}", cfg.pin)))?;
            input_pins.insert(cfg.pin, pin);
        }
        let mut output_pins = HashMap::new();
        for cfg in outputs {
            let pin = gpio
                .get(cfg.pin)
                .map_err(|e| HwError::Rppal(format!("pin {}: {e}", cfg.pin)))?;
            let mut pin = if cfg.initial == 0 {
                pin.into_output_low()
            } else {
                pin.into_output_high()
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
    fn write(&mut self, pin: u8, level: u8) -> Result<(), HwError> {
        let p = self.outputs.get_mut(&pin).ok_or(HwError::UnknownPin(pin))?;
        p.write(if level == 0 { Level::Low } else { Level::High });
        Ok(())
    }

    fn read(&mut self, pin: u8) -> Result<u8, HwError> {
        if let Some(p) = self.inputs.get(&pin) {
            return Ok(u8::from(p.read() == Level::High));
        }
        if let Some(p) = self.outputs.get(&pin) {
            return Ok(u8::from(p.is_set_high()));
        }
        Err(HwError::UnknownPin(pin))
    }
}
