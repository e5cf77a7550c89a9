//! GPIO for the loop: [`open`] opens the configured backend, reads the level of every
//! configured pin, and returns [`GpioEvents`], the one event source of input changes whatever
//! the backend.
//!
//! This module depends on [`crate::hw`] and [`crate::config`]; `hw` depends on neither.

use crate::config::{GpioBackendKind, GpioConfig, LineKind};
use crate::hw::cdev::{resolve_names, CdevEvents, CdevGpio};
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

/// Looks up the inputs and outputs given by `line = "NAME"` on the configured chip (`cdev`
/// only) and sets their `pin` to the offset found. Two entries on the same line are refused.
/// Without named lines nothing is opened. Run it before [`open`] and before the
/// configuration's pins are used anywhere else.
pub fn resolve_lines(cfg: &mut GpioConfig) -> Result<(), HwError> {
    if cfg.lines.is_empty() || cfg.backend != GpioBackendKind::Cdev {
        return Ok(());
    }
    let names: Vec<&str> = cfg.lines.iter().map(|l| l.name.as_str()).collect();
    let offsets = resolve_names(&cfg.chip, &names)?;
    apply_offsets(cfg, &offsets)
}

/// Sets the `pin` of each named entry to its offset (`offsets` in the order of
/// [`GpioConfig::lines`]) and refuses two entries on the same line.
pub fn apply_offsets(cfg: &mut GpioConfig, offsets: &[u8]) -> Result<(), HwError> {
    for (named, &offset) in cfg.lines.iter_mut().zip(offsets) {
        named.resolved = Some(offset);
        match named.kind {
            LineKind::Input => cfg.input[named.index].pin = offset,
            LineKind::Output => cfg.output[named.index].pin = offset,
        }
    }
    let mut seen: BTreeMap<u8, &str> = BTreeMap::new();
    let entries = cfg
        .input
        .iter()
        .map(|i| (i.pin, i.name.as_str()))
        .chain(cfg.output.iter().map(|o| (o.pin, o.name.as_str())));
    for (pin, name) in entries {
        if let Some(other) = seen.insert(pin, name) {
            return Err(HwError::LineTwice {
                pin,
                first: other.to_string(),
                second: name.to_string(),
            });
        }
    }
    Ok(())
}

/// Opens the configured backend: inputs with their bias, outputs at their `initial` level (or
/// kept), then reads every configured pin. Input changes after the read arrive through
/// [`OpenGpio::events`]. Entries given by `line` must have been resolved ([`resolve_lines`]).
pub fn open(cfg: &GpioConfig) -> Result<OpenGpio, HwError> {
    if let Some(named) = cfg.lines.iter().find(|l| l.resolved.is_none()) {
        return Err(HwError::LineNotResolved {
            name: named.name.clone(),
        });
    }
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
        GpioBackendKind::Cdev => {
            let (gpio, events) = CdevGpio::open(&cfg.chip, &inputs, &outputs)?;
            (Box::new(gpio), GpioEvents::Cdev(events))
        }
        GpioBackendKind::Rppal => {
            let (gpio, channel) = RppalGpio::open(&inputs, &outputs)?;
            (Box::new(gpio), GpioEvents::Channel(channel))
        }
    };
    let mut levels = BTreeMap::new();
    for pin in inputs
        .iter()
        .map(|i| i.pin)
        .chain(outputs.iter().map(|o| o.pin))
    {
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
    /// The kernel's line requests, one fd per input.
    Cdev(CdevEvents),
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
            GpioEvents::Cdev(c) => c.process_events(readiness, token, callback),
            GpioEvents::Channel(c) => c
                .process_events(readiness, token, |event, m| {
                    if let Event::Msg(change) = event {
                        callback(change, m);
                    }
                })
                .map_err(io::Error::other),
        }
    }

    fn register(&mut self, poll: &mut Poll, factory: &mut TokenFactory) -> calloop::Result<()> {
        match self {
            GpioEvents::Sim(w) => w.register(poll, factory),
            GpioEvents::Cdev(c) => c.register(poll, factory),
            GpioEvents::Channel(c) => c.register(poll, factory),
        }
    }
    fn reregister(&mut self, poll: &mut Poll, factory: &mut TokenFactory) -> calloop::Result<()> {
        match self {
            GpioEvents::Sim(w) => w.reregister(poll, factory),
            GpioEvents::Cdev(c) => c.reregister(poll, factory),
            GpioEvents::Channel(c) => c.reregister(poll, factory),
        }
    }
    fn unregister(&mut self, poll: &mut Poll) -> calloop::Result<()> {
        match self {
            GpioEvents::Sim(w) => w.unregister(poll),
            GpioEvents::Cdev(c) => c.unregister(poll),
            GpioEvents::Channel(c) => c.unregister(poll),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(dir: &std::path::Path) -> Config {
        let text = format!(
            "[gateway]\nid = \"gw-t\"\ndata_dir = \"{0}\"\n\
             [gpio]\nbackend = \"sim\"\nsim_dir = \"{0}\"\n\
             [[gpio.input]]\nname = \"door\"\npin = 17\npull = \"up\"\n\
             [[gpio.input]]\nname = \"window\"\npin = 18\npull = \"up\"\n\
             [[gpio.output]]\nname = \"relay1\"\npin = 27\ninitial = \"keep\"\n\
             [[gpio.output]]\nname = \"relay2\"\npin = 22\ninitial = 1\n",
            dir.display()
        );
        Config::parse(&text, "t.toml").unwrap()
    }

    fn cdev_config(gpio: &str) -> Config {
        let text = format!("[gateway]\nid = \"gw-t\"\n[gpio]\nbackend = \"cdev\"\n{gpio}");
        Config::parse(&text, "t.toml").unwrap()
    }

    /// Named entries get the offsets found on the chip; two entries on one line are refused
    /// with both names.
    #[test]
    fn offsets_of_named_lines_are_applied_and_must_be_unique() {
        let text = "[[gpio.input]]\nname = \"door\"\nline = \"GPIO17\"\n\
                    [[gpio.output]]\nname = \"relay\"\npin = 27\n\
                    [[gpio.output]]\nname = \"lamp\"\nline = \"GPIO22\"\n";
        let mut gpio = cdev_config(text).gpio;
        apply_offsets(&mut gpio, &[17, 22]).unwrap();
        assert_eq!(
            (gpio.input[0].pin, gpio.output[0].pin, gpio.output[1].pin),
            (17, 27, 22)
        );
        assert!(gpio.lines.iter().all(|l| l.resolved.is_some()));

        let mut gpio = cdev_config(text).gpio;
        let e = apply_offsets(&mut gpio, &[17, 27]).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, HwError::LineTwice { pin: 27, .. }), "{msg}");
        assert!(
            msg.contains("\"relay\"") && msg.contains("\"lamp\""),
            "{msg}"
        );
    }

    /// Opening with a name not yet looked up is refused (its `pin` is a placeholder), before
    /// any chip is touched.
    #[test]
    fn open_refuses_unresolved_line_names() {
        let cfg = cdev_config("[[gpio.input]]\nname = \"door\"\nline = \"GPIO17\"\n");
        let e = open(&cfg.gpio).err().expect("must fail");
        assert!(
            matches!(e, HwError::LineNotResolved { ref name } if name == "GPIO17"),
            "{e}"
        );
    }

    /// Without lines, the cdev backend opens no chip (a serial-only gateway runs anywhere),
    /// and resolving is a no-op for other backends.
    #[test]
    fn cdev_without_lines_opens_nothing() {
        let mut cfg = cdev_config("chip = \"/nonexistent/gpiochip9\"\n");
        resolve_lines(&mut cfg.gpio).unwrap();
        let gpio = open(&cfg.gpio).unwrap();
        assert!(gpio.levels.is_empty());
    }

    /// A chip path that does not exist fails start-up with an error naming the path and the
    /// way to list chips, for pins and for line names alike.
    #[test]
    fn missing_chip_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let chip = dir.path().join("gpiochip0");
        let cfg = cdev_config(&format!(
            "chip = \"{}\"\n[[gpio.output]]\nname = \"relay\"\npin = 27\n",
            chip.display()
        ));
        let e = open(&cfg.gpio).err().expect("must fail");
        let msg = e.to_string();
        assert!(matches!(e, HwError::ChipUnavailable { .. }), "{msg}");
        assert!(
            msg.contains(&chip.display().to_string()) && msg.contains("gpiodetect"),
            "{msg}"
        );

        let mut cfg = cdev_config(&format!(
            "chip = \"{}\"\n[[gpio.input]]\nname = \"door\"\nline = \"GPIO17\"\n",
            chip.display()
        ));
        let e = resolve_lines(&mut cfg.gpio).unwrap_err();
        assert!(matches!(e, HwError::ChipUnavailable { .. }), "{e}");
    }

    /// The levels at open are read from the backend: a pull-up input whose file holds 0 is
    /// Low, a kept output has its file's level (and its file is not written), a new pull-up
    /// input is High, a driven output has its initial level.
    #[test]
    fn open_reads_every_configured_level() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gpio17"), "0\n").unwrap();
        std::fs::write(dir.path().join("gpio27"), "1").unwrap();
        let gpio = open(&config(dir.path()).gpio).unwrap();
        let want: BTreeMap<u8, Level> = [
            (17, Level::Low),
            (18, Level::High),
            (22, Level::High),
            (27, Level::High),
        ]
        .into();
        assert_eq!(gpio.levels, want);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("gpio27")).unwrap(),
            "1"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("gpio17")).unwrap(),
            "0\n"
        );
    }
}
