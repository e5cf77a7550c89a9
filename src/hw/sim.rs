//! Simulated GPIO: one file per configured BCM pin, `<sim_dir>/gpio<N>`, holding `0` or `1`
//! and a newline.
//!
//! On open, an existing file keeps its content: its level is read like a real pin's. A missing
//! input file is created at the level its pull gives an open contact (up → 1, down/none → 0); a
//! missing `initial = "keep"` output file at 0 (a pin never driven); an output with
//! `initial = 0|1` is written. A level is written in place, like a sysfs `value` file: one
//! `pwrite` of the two bytes `0\n` or `1\n` at offset 0, so a reader sees the old or the new
//! level, never a partial file. (Not temp file + rename: on ext4, a rename over an existing
//! file flushes the new file's data first, which kept the loop thread in the kernel for about
//! 1 ms per output write; see docs/benchmarks.md.) The directory is watched with inotify (an fd
//! in the loop, no polling): an input file whose content changes to a new level is an
//! [`InputChange`].

use super::{GpioBackend, HwError, Initial, InputChange, InputLine, Level, OutputLine};
use calloop::generic::Generic;
use calloop::{EventSource, Interest, Mode, Poll, PostAction, Readiness, Token, TokenFactory};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// The simulated backend: reads and writes the pin files.
pub struct SimGpio {
    dir: PathBuf,
    inputs: Vec<u8>,
    outputs: Vec<u8>,
}

/// The file of `pin` in `dir`.
pub fn pin_path(dir: &Path, pin: u8) -> PathBuf {
    dir.join(format!("gpio{pin}"))
}

fn level_bytes(level: Level) -> &'static [u8; 2] {
    match level {
        Level::Low => b"0\n",
        Level::High => b"1\n",
    }
}

/// Writes `level` to a pin file in place (created if missing): one `pwrite` of `0\n` or `1\n`
/// at offset 0, then a truncation only if the file held something longer.
pub fn write_pin_file(dir: &Path, pin: u8, level: Level) -> io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(pin_path(dir, pin))?;
    f.write_all_at(level_bytes(level), 0)?;
    if f.metadata()?.len() > 2 {
        f.set_len(2)?;
    }
    Ok(())
}

/// Creates a pin file holding `level` unless the file exists; an existing file is left as it
/// is. Returns whether the file was created.
pub fn create_pin_file(dir: &Path, pin: u8, level: Level) -> io::Result<bool> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(pin_path(dir, pin))
    {
        Ok(mut f) => {
            f.write_all(level_bytes(level))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads a pin file: `Ok(Some(level))`, `Ok(None)` when the content is not 0 or 1.
pub fn read_pin_file(dir: &Path, pin: u8) -> io::Result<Option<Level>> {
    let text = std::fs::read_to_string(pin_path(dir, pin))?;
    Ok(match text.trim() {
        "0" => Some(Level::Low),
        "1" => Some(Level::High),
        _ => None,
    })
}

impl SimGpio {
    /// Sets up the pin files in `dir` (see the module docs) and the inotify watch that reports
    /// input changes. The watch exists before any level is read, so no change is missed.
    pub fn open(
        dir: &Path,
        inputs: &[InputLine],
        outputs: &[OutputLine],
    ) -> Result<(SimGpio, SimWatcher), HwError> {
        let dir_err = |source| HwError::SimDir {
            path: dir.display().to_string(),
            source,
        };
        let inotify_err = |source| HwError::Inotify {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(inotify_err)?;
        inotify
            .add_watch(
                dir,
                AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_MODIFY,
            )
            .map_err(inotify_err)?;
        let mut gpio = SimGpio {
            dir: dir.to_path_buf(),
            inputs: inputs.iter().map(|i| i.pin).collect(),
            outputs: outputs.iter().map(|o| o.pin).collect(),
        };
        let pin_err = |pin, source| HwError::SimPin {
            path: pin_path(dir, pin).display().to_string(),
            source,
        };
        for o in outputs {
            match o.initial {
                Initial::Drive(level) => write_pin_file(dir, o.pin, level),
                Initial::Keep => create_pin_file(dir, o.pin, Level::Low).map(drop),
            }
            .map_err(|e| pin_err(o.pin, e))?;
        }
        let mut levels = HashMap::new();
        for i in inputs {
            create_pin_file(dir, i.pin, i.pull.idle_level()).map_err(|e| pin_err(i.pin, e))?;
            let level = gpio.read(i.pin)?;
            levels.insert(format!("gpio{}", i.pin), (i.pin, level));
        }
        let watcher = SimWatcher {
            dir: dir.to_path_buf(),
            inotify: Generic::new(inotify, Interest::READ, Mode::Level),
            levels,
        };
        Ok((gpio, watcher))
    }
}

impl GpioBackend for SimGpio {
    fn write(&mut self, pin: u8, level: Level) -> Result<(), HwError> {
        if !self.outputs.contains(&pin) {
            return Err(HwError::NotConfigured {
                pin,
                expected: "an output",
            });
        }
        write_pin_file(&self.dir, pin, level).map_err(|source| HwError::SimPin {
            path: pin_path(&self.dir, pin).display().to_string(),
            source,
        })
    }

    fn read(&mut self, pin: u8) -> Result<Level, HwError> {
        if !self.inputs.contains(&pin) && !self.outputs.contains(&pin) {
            return Err(HwError::NotConfigured {
                pin,
                expected: "an input or output",
            });
        }
        let path = pin_path(&self.dir, pin);
        match read_pin_file(&self.dir, pin) {
            Ok(Some(level)) => Ok(level),
            Ok(None) => Err(HwError::SimPin {
                path: path.display().to_string(),
                source: io::Error::new(io::ErrorKind::InvalidData, "content is not 0 or 1"),
            }),
            Err(source) => Err(HwError::SimPin {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

/// The inotify watch on the simulated GPIO directory, as an event source of input changes.
pub struct SimWatcher {
    dir: PathBuf,
    inotify: Generic<Inotify>,
    /// File name → (pin, last level seen).
    levels: HashMap<String, (u8, Level)>,
}

impl EventSource for SimWatcher {
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
        let dir = &self.dir;
        let levels = &mut self.levels;
        self.inotify.process_events(readiness, token, |_, inotify| {
            loop {
                let events = match inotify.read_events() {
                    Ok(ev) => ev,
                    Err(nix::errno::Errno::EAGAIN) => break,
                    Err(e) => return Err(io::Error::from(e)),
                };
                for ev in events {
                    let Some(name) = ev.name.as_ref().and_then(|n| n.to_str()) else {
                        continue;
                    };
                    let Some((pin, last)) = levels.get_mut(name) else {
                        continue;
                    };
                    match read_pin_file(dir, *pin) {
                        Ok(Some(level)) if level != *last => {
                            *last = level;
                            callback(InputChange { pin: *pin, level }, &mut ());
                        }
                        Ok(Some(_)) => {}
                        // A writer that truncates before writing shows an empty file for a
                        // moment; the close-write event that follows carries the value.
                        Ok(None) => log::debug!("sim gpio file={name} content is not 0/1"),
                        Err(e) => log::debug!("sim gpio file={name} unreadable: {e}"),
                    }
                }
            }
            Ok(PostAction::Continue)
        })
    }

    fn register(&mut self, poll: &mut Poll, factory: &mut TokenFactory) -> calloop::Result<()> {
        self.inotify.register(poll, factory)
    }
    fn reregister(&mut self, poll: &mut Poll, factory: &mut TokenFactory) -> calloop::Result<()> {
        self.inotify.reregister(poll, factory)
    }
    fn unregister(&mut self, poll: &mut Poll) -> calloop::Result<()> {
        self.inotify.unregister(poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hw::Pull;
    use std::time::Duration;

    fn input(pin: u8, pull: Pull) -> InputLine {
        InputLine {
            pin,
            pull,
            debounce: Duration::ZERO,
        }
    }

    fn output(pin: u8, initial: Initial) -> OutputLine {
        OutputLine { pin, initial }
    }

    /// A pull-up input whose file holds 0 (contact closed before start) reads Low, and its
    /// file is left as it is.
    #[test]
    fn existing_input_file_is_read_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(pin_path(dir.path(), 17), "0\n").unwrap();
        let (mut gpio, _watcher) = SimGpio::open(dir.path(), &[input(17, Pull::Up)], &[]).unwrap();
        assert_eq!(gpio.read(17).unwrap(), Level::Low);
        assert_eq!(
            std::fs::read_to_string(pin_path(dir.path(), 17)).unwrap(),
            "0\n"
        );
    }

    /// A missing input file is created at the level its pull gives an open contact.
    #[test]
    fn missing_input_file_is_created_per_pull() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = [
            input(5, Pull::Up),
            input(6, Pull::Down),
            input(7, Pull::None),
        ];
        let (mut gpio, _watcher) = SimGpio::open(dir.path(), &inputs, &[]).unwrap();
        assert_eq!(gpio.read(5).unwrap(), Level::High);
        assert_eq!(gpio.read(6).unwrap(), Level::Low);
        assert_eq!(gpio.read(7).unwrap(), Level::Low);
    }

    /// `initial = "keep"` writes nothing: the file keeps its exact bytes and its level is
    /// read; `initial = 0|1` drives the level.
    #[test]
    fn keep_output_is_not_written_and_reads_its_level() {
        let dir = tempfile::tempdir().unwrap();
        // No newline: any rewrite would show as "1\n".
        std::fs::write(pin_path(dir.path(), 27), "1").unwrap();
        std::fs::write(pin_path(dir.path(), 22), "1\n").unwrap();
        let outputs = [
            output(27, Initial::Keep),
            output(22, Initial::Drive(Level::Low)),
            output(23, Initial::Keep),
        ];
        let (mut gpio, _watcher) = SimGpio::open(dir.path(), &[], &outputs).unwrap();
        assert_eq!(gpio.read(27).unwrap(), Level::High);
        assert_eq!(
            std::fs::read_to_string(pin_path(dir.path(), 27)).unwrap(),
            "1"
        );
        assert_eq!(gpio.read(22).unwrap(), Level::Low);
        // A kept output without a file has never been driven: created at 0.
        assert_eq!(gpio.read(23).unwrap(), Level::Low);
        gpio.write(27, Level::Low).unwrap();
        assert_eq!(gpio.read(27).unwrap(), Level::Low);
    }

    #[test]
    fn bad_input_file_content_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(pin_path(dir.path(), 17), "on\n").unwrap();
        let e = SimGpio::open(dir.path(), &[input(17, Pull::Up)], &[])
            .err()
            .expect("open must fail");
        let text = e.to_string();
        assert!(matches!(e, HwError::SimPin { .. }), "{text}");
        assert!(text.contains("gpio17") && text.contains("0 or 1"), "{text}");
    }

    #[test]
    fn unconfigured_pins_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut gpio, _watcher) = SimGpio::open(
            dir.path(),
            &[input(17, Pull::Up)],
            &[output(27, Initial::Keep)],
        )
        .unwrap();
        assert!(matches!(
            gpio.write(17, Level::High),
            Err(HwError::NotConfigured { pin: 17, .. })
        ));
        assert!(matches!(
            gpio.read(4),
            Err(HwError::NotConfigured { pin: 4, .. })
        ));
    }

    /// A change of an input file reaches the loop as one InputChange; rewriting the same
    /// level reports nothing.
    #[test]
    fn watcher_reports_input_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(pin_path(dir.path(), 17), "0\n").unwrap();
        let (_gpio, watcher) = SimGpio::open(dir.path(), &[input(17, Pull::Up)], &[]).unwrap();
        let mut ev: calloop::EventLoop<Vec<InputChange>> = calloop::EventLoop::try_new().unwrap();
        ev.handle()
            .insert_source(watcher, |change, _, seen: &mut Vec<InputChange>| {
                seen.push(change)
            })
            .unwrap();
        let mut seen = Vec::new();
        write_pin_file(dir.path(), 17, Level::Low).unwrap();
        write_pin_file(dir.path(), 17, Level::High).unwrap();
        for _ in 0..10 {
            ev.dispatch(Some(Duration::from_millis(50)), &mut seen)
                .unwrap();
            if !seen.is_empty() {
                break;
            }
        }
        assert_eq!(
            seen,
            vec![InputChange {
                pin: 17,
                level: Level::High
            }]
        );
    }
}
