//! GPIO through the kernel's GPIO character device (`/dev/gpiochipN`, uAPI v2) with the
//! `gpiocdev` crate.
//!
//! Every configured line is its own line request, and every request is a file descriptor:
//! the input requests are calloop [`Generic`] sources inside [`CdevEvents`], drained on every
//! wake. No thread, no polling.
//!
//! - **Chip.** [`ChipSelect::Auto`] finds the chip of the Raspberry Pi's 40-pin header by its
//!   label ([`HEADER_CHIP_LABELS`]), never by its number (the Pi 5's RP1 chip moved from
//!   gpiochip4 to gpiochip0 in Linux 6.6.45). [`ChipSelect::Path`] names a chip explicitly.
//! - **Lines.** A line is its offset on the chip (the BCM number on a Pi), or a name looked up
//!   on the chip ([`resolve_names`], e.g. `GPIO17`).
//! - **Inputs** are requested with their bias and edge detection on both edges (the gateway
//!   tracks the level, so it must see every change; its `edge` setting picks which changes
//!   become readings). A debounce period is handed to the kernel (`with_debounce_period`); a
//!   kernel that refuses it leaves the gateway's own debounce alone. The level at open is read
//!   from the kernel.
//! - **Outputs** are driven to their initial level, or with [`Initial::Keep`] requested as
//!   they are, read, and then driven at the level they had, so the line does not jump.
//! - **Busy lines.** A line held by another consumer fails the open with
//!   [`HwError::LineHeld`], naming the consumer from the kernel's line info.
//!
//! Requirements: Linux 5.10 or later (uAPI v2) and read/write access to the chip's device file
//! (group `gpio`; see the [`hw`](super) module docs). Nothing else: it works on every Pi
//! (Raspberry Pi OS or Debian's kernel) and on any other Linux board.

use super::{GpioBackend, HwError, Initial, InputChange, InputLine, Level, OutputLine, Pull};
use calloop::generic::Generic;
use calloop::{EventSource, Interest, Mode, Poll, PostAction, Readiness, Token, TokenFactory};
use gpiocdev::line::{Bias, EdgeDetection, EdgeKind, Value};
use gpiocdev::{Chip, Request};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The consumer name zgate's line requests carry (what `gpioinfo` shows).
pub const CONSUMER: &str = "zgate";

mod chips;
pub use chips::*;
use chips::{line_summaries, open_chip};

fn value(level: Level) -> Value {
    match level {
        Level::Low => Value::Inactive,
        Level::High => Value::Active,
    }
}

fn level(value: Value) -> Level {
    Level::from(value == Value::Active)
}

/// One line request, shared by the backend (reads, writes) and the event source (edges).
struct Line {
    request: Request,
    offset: u32,
}

/// The request's fd, for calloop; the request itself stays shared.
struct LineFd(Rc<Line>);

impl AsFd for LineFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.request.as_fd()
    }
}

/// The open chip's configured lines.
pub struct CdevGpio {
    chip: PathBuf,
    inputs: HashMap<u8, Rc<Line>>,
    outputs: HashMap<u8, Rc<Line>>,
}

/// Requests `pin` with `cfg`; EBUSY becomes [`HwError::LineHeld`] with the holder's name,
/// any other refusal of the kernel [`HwError::Io`] (the offset was checked before).
fn request(chip: &Chip, pin: u8, cfg: &gpiocdev::request::Config) -> Result<Request, HwError> {
    let offset = u32::from(pin);
    Request::from_config(cfg.clone())
        .with_consumer(CONSUMER)
        .request()
        .map_err(|e| match errno_of(&e) {
            Some(libc::EBUSY) => {
                // Ask again: the holder may have changed since the lines were listed.
                let now = chip.line_info(offset).ok().map(LineSummary::from);
                busy_error(chip.path(), pin, now.as_ref())
            }
            Some(libc::EACCES) | Some(libc::EPERM) => HwError::PermissionDenied {
                path: chip.path().display().to_string(),
            },
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                HwError::ChipUnavailable {
                    path: chip.path().display().to_string(),
                    reason: e.to_string(),
                }
            }
            // The offset was checked against the chip's lines: EINVAL and the rest are the
            // kernel refusing the request's settings.
            Some(errno) => HwError::Io {
                pin,
                op: "line request",
                source: io::Error::from_raw_os_error(errno),
            },
            None => HwError::Io {
                pin,
                op: "line request",
                source: io::Error::other(e.to_string()),
            },
        })
}

fn io_err(pin: u8, op: &'static str, e: gpiocdev::Error) -> HwError {
    let source = match errno_of(&e) {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::other(e.to_string()),
    };
    HwError::Io { pin, op, source }
}

/// Edges are drained until EAGAIN, so the request's fd must not block.
fn set_nonblocking(pin: u8, request: &Request) -> Result<(), HwError> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let fd = request.as_raw_fd();
    let err = |e: nix::Error| HwError::Io {
        pin,
        op: "make the line request non-blocking",
        source: io::Error::from(e),
    };
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).map_err(err)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(err)?;
    Ok(())
}

fn check_offset(lines: &[LineSummary], pin: u8) -> Result<(), HwError> {
    if lines.iter().any(|l| l.offset == u32::from(pin)) {
        Ok(())
    } else {
        Err(HwError::NoSuchPin { pin })
    }
}

impl CdevGpio {
    /// Opens the chip `select` names and requests the configured lines: inputs with bias,
    /// edge detection and kernel debounce, outputs at their initial level (or kept). Returns
    /// the event source of input changes. With no lines configured no chip is opened.
    pub fn open(
        select: &ChipSelect,
        inputs: &[InputLine],
        outputs: &[OutputLine],
    ) -> Result<(CdevGpio, CdevEvents), HwError> {
        if inputs.is_empty() && outputs.is_empty() {
            let gpio = CdevGpio {
                chip: PathBuf::new(),
                inputs: HashMap::new(),
                outputs: HashMap::new(),
            };
            return Ok((gpio, CdevEvents { lines: Vec::new() }));
        }
        let (chip, label) = open_chip(select)?;
        let lines = line_summaries(&chip)?;
        log::info!(
            "gpio chip path={} label={label} lines={}",
            chip.path().display(),
            lines.len()
        );
        let mut gpio = CdevGpio {
            chip: chip.path().to_path_buf(),
            inputs: HashMap::new(),
            outputs: HashMap::new(),
        };
        let mut events = Vec::new();
        for i in inputs {
            let line = open_input(&chip, &lines, i)?;
            set_nonblocking(i.pin, &line.request)?;
            let line = Rc::new(line);
            events.push(InputSource {
                pin: i.pin,
                source: Generic::new(LineFd(line.clone()), Interest::READ, Mode::Level),
                buf: vec![0; EDGES_PER_READ * line.request.edge_event_u64_size()],
                line: line.clone(),
                line_seqno: None,
            });
            gpio.inputs.insert(i.pin, line);
        }
        for o in outputs {
            let line = open_output(&chip, &lines, o)?;
            gpio.outputs.insert(o.pin, Rc::new(line));
        }
        Ok((gpio, CdevEvents { lines: events }))
    }
}

fn open_input(chip: &Chip, lines: &[LineSummary], i: &InputLine) -> Result<Line, HwError> {
    check_offset(lines, i.pin)?;
    let offset = u32::from(i.pin);
    let mut cfg = gpiocdev::request::Config::default();
    cfg.on_chip(chip.path())
        .with_line(offset)
        .as_input()
        .with_bias(match i.pull {
            Pull::Up => Bias::PullUp,
            Pull::Down => Bias::PullDown,
            Pull::None => Bias::Disabled,
        })
        .with_edge_detection(EdgeDetection::BothEdges);
    let request = if i.debounce.is_zero() {
        request(chip, i.pin, &cfg)?
    } else {
        let mut with_debounce = cfg.clone();
        with_debounce.with_debounce_period(i.debounce);
        match request(chip, i.pin, &with_debounce) {
            Ok(r) => r,
            // The offset exists (checked above), so EINVAL or another I/O error here is the
            // kernel refusing the debounce attribute: the gateway's own debounce still
            // filters the changes.
            Err(HwError::Io { .. }) => {
                log::info!(
                    "gpio kernel debounce unavailable pin={} chip={}: using the gateway's debounce only",
                    i.pin,
                    chip.path().display()
                );
                request(chip, i.pin, &cfg)?
            }
            Err(e) => return Err(e),
        }
    };
    Ok(Line { request, offset })
}

fn open_output(chip: &Chip, lines: &[LineSummary], o: &OutputLine) -> Result<Line, HwError> {
    check_offset(lines, o.pin)?;
    let offset = u32::from(o.pin);
    let mut cfg = gpiocdev::request::Config::default();
    cfg.on_chip(chip.path()).with_line(offset);
    let request = match o.initial {
        Initial::Drive(l) => {
            cfg.as_output(value(l));
            request(chip, o.pin, &cfg)?
        }
        Initial::Keep => {
            // As it is: direction and level untouched, so the level can be read; then driven
            // at that level (no change on the line).
            cfg.as_is();
            let request = request(chip, o.pin, &cfg)?;
            let now = request
                .value(offset)
                .map_err(|e| io_err(o.pin, "read", e))?;
            let mut out = request.config();
            out.with_line(offset).as_output(now);
            request
                .reconfigure(&out)
                .map_err(|e| io_err(o.pin, "drive the kept level", e))?;
            request
        }
    };
    Ok(Line { request, offset })
}

impl GpioBackend for CdevGpio {
    fn write(&mut self, pin: u8, level: Level) -> Result<(), HwError> {
        let line = self.outputs.get(&pin).ok_or(HwError::NotConfigured {
            pin,
            expected: "an output",
        })?;
        line.request
            .set_value(line.offset, value(level))
            .map_err(|e| io_err(pin, "write", e))
    }

    fn read(&mut self, pin: u8) -> Result<Level, HwError> {
        let line = self
            .inputs
            .get(&pin)
            .or_else(|| self.outputs.get(&pin))
            .ok_or(HwError::NotConfigured {
                pin,
                expected: "an input or output",
            })?;
        line.request
            .value(line.offset)
            .map(level)
            .map_err(|e| io_err(pin, "read", e))
    }
}

impl CdevGpio {
    /// The chip the lines were requested on (empty when no line is configured).
    pub fn chip(&self) -> &Path {
        &self.chip
    }
}

/// One input request as a calloop source.
struct InputSource {
    pin: u8,
    source: Generic<LineFd>,
    line: Rc<Line>,
    /// The kernel's per-line sequence number of the last edge read.
    line_seqno: Option<u32>,
    /// Room for [`EDGES_PER_READ`] raw events, allocated once.
    buf: Vec<u64>,
}

/// The input line requests as one event source of [`InputChange`]s.
pub struct CdevEvents {
    lines: Vec<InputSource>,
}

/// Edges read with one `read`: the kernel copies as many queued events as fit.
const EDGES_PER_READ: usize = 16;

/// Whether edges were lost between the edge numbered `prev` and the next one, `seqno` (the
/// kernel numbers each line's edges; a gap means its queue overflowed).
pub fn edges_lost(prev: Option<u32>, seqno: u32) -> bool {
    prev.is_some_and(|p| seqno != p.wrapping_add(1))
}

/// Reads every queued edge of `line` (its fd is non-blocking) into `buf`, calling `emit` per
/// edge. When edges were lost ([`edges_lost`]), the level is read once more so the last change
/// reported is the line's real level.
///
/// Not `Request::read_edge_event`: in a uAPI-v2-only build it reads into a buffer of eight
/// events and returns only the first, dropping the others.
fn drain(
    input: &mut InputSource,
    line: &Line,
    emit: &mut dyn FnMut(InputChange),
) -> io::Result<()> {
    let pin = input.pin;
    let words = line.request.edge_event_u64_size();
    let err = |e: gpiocdev::Error| io::Error::other(format!("GPIO{pin}: reading edges: {e}"));
    let mut last = None;
    let mut lost = false;
    loop {
        let n = match line.request.read_edge_events_into_slice(&mut input.buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if errno_of(&e) == Some(libc::EAGAIN) => break,
            Err(e) => return Err(err(e)),
        };
        for raw in input.buf[..n].chunks_exact(words) {
            let ev = line.request.edge_event_from_slice(raw).map_err(err)?;
            lost |= edges_lost(input.line_seqno, ev.line_seqno);
            input.line_seqno = Some(ev.line_seqno);
            let level = Level::from(ev.kind == EdgeKind::Rising);
            last = Some(level);
            emit(InputChange { pin, level });
        }
    }
    if lost {
        if let Ok(v) = line.request.value(line.offset) {
            let now = level(v);
            log::warn!("gpio edges lost pin={pin}: kernel queue overflowed; level re-read={now}");
            if last != Some(now) {
                emit(InputChange { pin, level: now });
            }
        }
    }
    Ok(())
}

impl EventSource for CdevEvents {
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
        for input in &mut self.lines {
            // The fd's line is shared; a clone of the Rc lets `drain` borrow the input too.
            let line = input.line.clone();
            let mut wake = false;
            input.source.process_events(readiness, token, |_, _| {
                wake = true;
                Ok(PostAction::Continue)
            })?;
            if wake {
                drain(input, &line, &mut |c| callback(c, &mut ()))?;
            }
        }
        Ok(PostAction::Continue)
    }

    fn register(&mut self, poll: &mut Poll, factory: &mut TokenFactory) -> calloop::Result<()> {
        self.lines
            .iter_mut()
            .try_for_each(|l| l.source.register(poll, factory))
    }
    fn reregister(&mut self, poll: &mut Poll, factory: &mut TokenFactory) -> calloop::Result<()> {
        self.lines
            .iter_mut()
            .try_for_each(|l| l.source.reregister(poll, factory))
    }
    fn unregister(&mut self, poll: &mut Poll) -> calloop::Result<()> {
        self.lines
            .iter_mut()
            .try_for_each(|l| l.source.unregister(poll))
    }
}

#[cfg(test)]
mod tests;
