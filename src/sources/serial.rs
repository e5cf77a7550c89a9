//! `SerialSource`: one serial port in the loop, framed into lines, with buffered writes and
//! automatic reconnection.
//!
//! - The tty is opened non-blocking in raw mode ([`open_tty`]) and read when readable.
//!   Bytes are framed into lines by a [`LineFramer`] (which bytes end a line is the port's
//!   [`InputLineEnding`]; by default LF, CR or CR LF); a line longer than [`MAX_LINE`] bytes
//!   is discarded up to its end and reported once as [`SerialEvent::Overlong`]. Empty lines
//!   are skipped.
//! - Writes go into a bounded buffer and are flushed only when the fd is writable;
//!   [`SerialEvent::WriteDone`] reports each write once its last byte reached the tty. A
//!   write not done within the port's write timeout (default [`DEFAULT_WRITE_TIMEOUT`]) ends
//!   with [`SerialEvent::WriteFailed`]: a device that neither drains nor hangs up must not
//!   leave a command unanswered. Its unsent bytes are discarded and the port stays open.
//! - Hang-up (read of 0 bytes, EIO: the USB adapter was unplugged, the pty closed), a missing
//!   device or any other error drops the port, is logged once, and a timerfd retries the open
//!   with backoff (1 s doubling to 30 s) until the path is back.

pub use crate::config::InputLineEnding;
use crate::protocol::MAX_LINE;
use calloop::generic::Generic;
use calloop::ping::{make_ping, Ping, PingSource};
use calloop::{EventSource, Interest, Mode, Poll, PostAction, Readiness, Token, TokenFactory};
use nix::sys::termios::BaudRate;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Bytes of pending writes accepted per port; more is refused (the device is too slow).
pub const MAX_PENDING_WRITE: usize = 64 * 1024;
/// How long a write may wait for the device unless the port sets another timeout.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_millis(2000);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Bytes read per wake before yielding to other sources (the fd is level-triggered, so the
/// rest is read on the next dispatch).
const READ_BUDGET: usize = 64 * 1024;
/// Time spent reading and handling lines per wake before yielding. Every line becomes a
/// reading (parse, JSON, outbox) in the callback, so a byte budget alone lets a flood of
/// short lines hold the loop for a long time: 64 KiB of `n=12345` lines took ~400 ms in a
/// debug build, delaying commands by as much. Checked after each chunk.
const READ_TIME_BUDGET: Duration = Duration::from_millis(1);
/// Bytes per read: small, so one chunk's lines cost little beyond the time budget.
const READ_CHUNK: usize = 256;

/// What a serial port reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialEvent {
    /// A complete line, without its line ending.
    Line(Vec<u8>),
    /// A line longer than MAX_LINE was discarded; the value is how many bytes were dropped.
    Overlong(usize),
    /// The port was opened.
    Connected,
    /// The port was lost; the text says why.
    Disconnected(String),
    /// All bytes of the write with this token reached the tty.
    WriteDone(u64),
    /// The write with this token could not be completed: the port went away, or the device
    /// did not take all its bytes within the write timeout (the text says which).
    WriteFailed(u64, String),
}

/// Why a write was refused before it started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("serial port is not connected")]
    NotConnected,
    #[error("serial port write buffer is full ({MAX_PENDING_WRITE} bytes pending)")]
    Busy,
}

struct PendingWrite {
    data: Vec<u8>,
    done: usize,
    token: u64,
    /// When the write fails if the device has not taken all of it.
    deadline: Instant,
}

/// A write that timed out: its token, and whether part of it already reached the tty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expired {
    token: u64,
    partial: bool,
}

/// The queue of writes waiting for the device. Plain data with `now` passed in, so the
/// timeout rule is tested without a loop or a tty.
struct WriteQueue {
    pending: VecDeque<PendingWrite>,
    pending_bytes: usize,
    timeout: Duration,
}

impl WriteQueue {
    fn new(timeout: Duration) -> WriteQueue {
        WriteQueue {
            pending: VecDeque::new(),
            pending_bytes: 0,
            timeout,
        }
    }

    fn push(&mut self, data: Vec<u8>, token: u64, now: Instant) -> Result<(), WriteError> {
        if self.pending_bytes + data.len() > MAX_PENDING_WRITE {
            return Err(WriteError::Busy);
        }
        self.pending_bytes += data.len();
        self.pending.push_back(PendingWrite {
            data,
            done: 0,
            token,
            deadline: now + self.timeout,
        });
        Ok(())
    }

    /// The deadline of the oldest write (writes are queued in deadline order).
    fn next_deadline(&self) -> Option<Instant> {
        self.pending.front().map(|w| w.deadline)
    }

    /// Removes every write whose deadline has come, unsent bytes included.
    fn expire(&mut self, now: Instant) -> Vec<Expired> {
        let mut out = Vec::new();
        while let Some(w) = self.pending.front() {
            if w.deadline > now {
                break;
            }
            let w = self.pending.pop_front().expect("front exists");
            self.pending_bytes -= w.data.len();
            out.push(Expired {
                token: w.token,
                partial: w.done > 0,
            });
        }
        out
    }

    /// Removes every write (the port was lost); returns their tokens.
    fn clear(&mut self) -> Vec<u64> {
        self.pending_bytes = 0;
        self.pending.drain(..).map(|w| w.token).collect()
    }
}

struct Shared {
    connected: bool,
    writes: WriteQueue,
}

/// Handle to queue writes to a port from anywhere in the loop. Cheap to clone.
#[derive(Clone)]
pub struct SerialHandle {
    shared: Rc<RefCell<Shared>>,
    ping: Ping,
}

impl SerialHandle {
    /// Queues `data`; [`SerialEvent::WriteDone`] with `token` follows once it was written, or
    /// [`SerialEvent::WriteFailed`] when the port is lost or the write timeout passes first.
    pub fn write(&self, data: Vec<u8>, token: u64) -> Result<(), WriteError> {
        let mut s = self.shared.borrow_mut();
        if !s.connected {
            return Err(WriteError::NotConnected);
        }
        s.writes.push(data, token, Instant::now())?;
        drop(s);
        self.ping.ping();
        Ok(())
    }
    pub fn is_connected(&self) -> bool {
        self.shared.borrow().connected
    }
}

/// Maps a numeric baud rate to the termios constant; `None` for non-standard rates. Accepts
/// exactly [`crate::config::STANDARD_BAUD_RATES`] (a test keeps the two in step).
pub fn baud_rate(baud: u32) -> Option<BaudRate> {
    use BaudRate::*;
    Some(match baud {
        50 => B50,
        75 => B75,
        110 => B110,
        134 => B134,
        150 => B150,
        200 => B200,
        300 => B300,
        600 => B600,
        1200 => B1200,
        1800 => B1800,
        2400 => B2400,
        4800 => B4800,
        9600 => B9600,
        19200 => B19200,
        38400 => B38400,
        57600 => B57600,
        115200 => B115200,
        230400 => B230400,
        460800 => B460800,
        500000 => B500000,
        576000 => B576000,
        921600 => B921600,
        1000000 => B1000000,
        1152000 => B1152000,
        1500000 => B1500000,
        2000000 => B2000000,
        2500000 => B2500000,
        3000000 => B3000000,
        3500000 => B3500000,
        4000000 => B4000000,
        _ => return None,
    })
}

/// Opens a tty non-blocking in raw mode (8N1, no flow control, no echo, no line discipline
/// processing) at `baud`, with exclusive access (TIOCEXCL).
///
/// Plain termios (TCGETS/TCSETS) rather than the serialport crate: serialport sets the speed
/// with TCGETS2, which qemu-user does not emulate, and the ARM builds are tested under qemu.
pub fn open_tty(path: &Path, baud: u32) -> Result<OwnedFd, String> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    use nix::sys::termios::{
        cfmakeraw, cfsetspeed, tcgetattr, tcsetattr, ControlFlags, SetArg, SpecialCharacterIndices,
    };
    let speed = baud_rate(baud).ok_or_else(|| format!("unsupported baud rate {baud}"))?;
    let raw = open(
        path,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| e.desc().to_string())?;
    // SAFETY: `open` just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut t = tcgetattr(&fd).map_err(|e| format!("not a terminal? tcgetattr: {}", e.desc()))?;
    cfmakeraw(&mut t);
    t.control_flags |= ControlFlags::CLOCAL | ControlFlags::CREAD;
    t.control_flags &= !(ControlFlags::CRTSCTS | ControlFlags::CSTOPB | ControlFlags::PARENB);
    // VMIN=1: with O_NONBLOCK an empty read is EAGAIN. (VMIN=0 would make it return 0,
    // which is indistinguishable from a hang-up.)
    t.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
    t.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
    cfsetspeed(&mut t, speed).map_err(|e| format!("cfsetspeed: {}", e.desc()))?;
    tcsetattr(&fd, SetArg::TCSANOW, &t).map_err(|e| format!("tcsetattr: {}", e.desc()))?;
    // Exclusive access keeps other programs (ModemManager, a stray `cat`) off the port.
    // SAFETY: TIOCEXCL takes no argument; fd is a valid open tty.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCEXCL) };
    Ok(fd)
}

/// One serial port as a calloop event source; see the module documentation.
pub struct SerialSource {
    name: String,
    path: PathBuf,
    baud: u32,
    port: Option<Generic<OwnedFd>>,
    /// The port needs registering (just opened) or its interest changed.
    port_dirty: bool,
    port_registered: bool,
    write_interest: bool,
    /// One timer, two uses that never overlap: while the port is closed it schedules the
    /// next open; while it is open it fires at the oldest pending write's deadline.
    timer: Generic<TimerFd>,
    /// The deadline the timer is set to while the port is open.
    timer_deadline: Option<Instant>,
    backoff: Duration,
    /// A failure has been logged for the current outage (log once per outage).
    outage_logged: bool,
    ping_source: PingSource,
    ping: Ping,
    shared: Rc<RefCell<Shared>>,
    framer: LineFramer,
}

/// Splits the bytes of a port into lines (see [`InputLineEnding`]). Lines longer than
/// [`MAX_LINE`] are dropped whole and reported once; empty lines are skipped (so in `auto`
/// mode the LF of a CR LF, even in a later read, ends nothing).
pub struct LineFramer {
    ending: InputLineEnding,
    line: Vec<u8>,
    /// Bytes discarded of the current overlong line (0 when not discarding).
    discarding: usize,
    /// The last byte taken was a CR (for `crlf` when the LF comes in the next read).
    prev_cr: bool,
}

impl LineFramer {
    /// A framer with nothing buffered.
    pub fn new(ending: InputLineEnding) -> LineFramer {
        LineFramer {
            ending,
            line: Vec::with_capacity(256),
            discarding: 0,
            prev_cr: false,
        }
    }

    /// Forgets a partial line (the port was reopened).
    pub fn reset(&mut self) {
        self.line.clear();
        self.discarding = 0;
        self.prev_cr = false;
    }

    /// Where the next line ends in `bytes`: the index of its terminating byte.
    fn next_end(&self, bytes: &[u8]) -> Option<usize> {
        match self.ending {
            InputLineEnding::Lf => bytes.iter().position(|&b| b == b'\n'),
            InputLineEnding::Cr => bytes.iter().position(|&b| b == b'\r'),
            InputLineEnding::Auto => bytes.iter().position(|&b| b == b'\n' || b == b'\r'),
            InputLineEnding::Crlf => {
                let mut from = 0;
                loop {
                    let i = from + bytes[from..].iter().position(|&b| b == b'\n')?;
                    let after_cr = if i == 0 {
                        self.prev_cr
                    } else {
                        bytes[i - 1] == b'\r'
                    };
                    if after_cr {
                        return Some(i);
                    }
                    from = i + 1;
                }
            }
        }
    }

    /// Frames `bytes`, calling `emit` with each complete line or overlong report.
    pub fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(SerialEvent)) {
        // In lf and crlf modes a CR before the LF is part of the ending, not of the line.
        let strip_cr = matches!(self.ending, InputLineEnding::Lf | InputLineEnding::Crlf);
        while !bytes.is_empty() {
            let Some(i) = self.next_end(bytes) else {
                if self.discarding > 0 {
                    self.discarding += bytes.len();
                } else if self.line.len() + bytes.len() > MAX_LINE + 1 {
                    self.discarding = self.line.len() + bytes.len();
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(bytes);
                }
                self.prev_cr = bytes.last() == Some(&b'\r');
                return;
            };
            let (head, rest) = bytes.split_at(i);
            self.prev_cr = rest[0] == b'\r';
            bytes = &rest[1..];
            if self.discarding > 0 {
                let dropped = self.discarding + head.len();
                self.discarding = 0;
                emit(SerialEvent::Overlong(dropped));
                continue;
            }
            // One byte of slack for a CR that is part of the ending.
            if self.line.len() + head.len() > MAX_LINE + 1 {
                let dropped = self.line.len() + head.len();
                self.line.clear();
                emit(SerialEvent::Overlong(dropped));
                continue;
            }
            self.line.extend_from_slice(head);
            if strip_cr && self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            if self.line.len() > MAX_LINE {
                let dropped = self.line.len();
                self.line.clear();
                emit(SerialEvent::Overlong(dropped));
            } else if !self.line.is_empty() {
                let line = std::mem::replace(&mut self.line, Vec::with_capacity(256));
                emit(SerialEvent::Line(line));
            }
        }
    }
}

impl SerialSource {
    /// Creates the source; the port is opened on registration (and retried if missing).
    /// Lines end as [`InputLineEnding::Auto`] and writes time out after
    /// [`DEFAULT_WRITE_TIMEOUT`] unless set with [`SerialSource::input_line_ending`] and
    /// [`SerialSource::write_timeout`].
    pub fn new(name: &str, path: &Path, baud: u32) -> io::Result<SerialSource> {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let (ping, ping_source) = make_ping()?;
        Ok(SerialSource {
            name: name.to_string(),
            path: path.to_path_buf(),
            baud,
            port: None,
            port_dirty: false,
            port_registered: false,
            write_interest: false,
            timer: Generic::new(timer, Interest::READ, Mode::Level),
            timer_deadline: None,
            backoff: BACKOFF_MIN,
            outage_logged: false,
            ping_source,
            ping,
            shared: Rc::new(RefCell::new(Shared {
                connected: false,
                writes: WriteQueue::new(DEFAULT_WRITE_TIMEOUT),
            })),
            framer: LineFramer::new(InputLineEnding::Auto),
        })
    }

    /// Sets which bytes end a received line (`[[serial]] input_line_ending`).
    pub fn input_line_ending(mut self, ending: InputLineEnding) -> SerialSource {
        self.framer = LineFramer::new(ending);
        self
    }

    /// Sets how long a write may wait for the device (`[[serial]] write_timeout_ms`);
    /// applies to writes queued from now on.
    pub fn write_timeout(self, timeout: Duration) -> SerialSource {
        self.shared.borrow_mut().writes.timeout = timeout;
        self
    }

    pub fn handle(&self) -> SerialHandle {
        SerialHandle {
            shared: self.shared.clone(),
            ping: self.ping.clone(),
        }
    }

    /// Tries to open the port; on failure arms the retry timer.
    fn try_open<F>(&mut self, callback: &mut F)
    where
        F: FnMut(SerialEvent, &mut ()),
    {
        match open_tty(&self.path, self.baud) {
            Ok(tty) => {
                log::info!(
                    "serial port open name={} path={} baud={}",
                    self.name,
                    self.path.display(),
                    self.baud
                );
                self.port = Some(Generic::new(tty, Interest::READ, Mode::Level));
                self.port_dirty = true;
                self.port_registered = false;
                self.write_interest = false;
                self.backoff = BACKOFF_MIN;
                self.outage_logged = false;
                self.framer.reset();
                self.timer_deadline = None;
                self.shared.borrow_mut().connected = true;
                callback(SerialEvent::Connected, &mut ());
            }
            Err(e) => {
                if !self.outage_logged {
                    log::warn!(
                        "serial port unavailable name={} path={} error=\"{e}\" retry=backoff(1s..30s)",
                        self.name,
                        self.path.display()
                    );
                    self.outage_logged = true;
                } else {
                    log::debug!(
                        "serial port still unavailable name={} error=\"{e}\" next_retry_s={}",
                        self.name,
                        self.backoff.as_secs()
                    );
                }
                self.arm_retry();
            }
        }
    }

    fn arm_retry(&mut self) {
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.set_timer(delay);
    }

    /// Arms the timer `delay` from now (at least 1 ns: a zero expiration would disarm it).
    fn set_timer(&mut self, delay: Duration) {
        let delay = delay.max(Duration::from_nanos(1));
        // SAFETY: we do not replace or close the timer fd.
        let timer = unsafe { self.timer.get_mut() };
        if let Err(e) = timer.set(
            Expiration::OneShot(TimeSpec::from_duration(delay)),
            TimerSetTimeFlags::empty(),
        ) {
            log::error!("serial timer failed name={} error={e}", self.name);
        }
    }

    /// Ends the writes whose deadline has come and arms the timer for the next one.
    fn expire_writes<F>(&mut self, now: Instant, callback: &mut F)
    where
        F: FnMut(SerialEvent, &mut ()),
    {
        let (expired, next, timeout) = {
            let mut s = self.shared.borrow_mut();
            let expired = s.writes.expire(now);
            (expired, s.writes.next_deadline(), s.writes.timeout)
        };
        if expired.iter().any(|e| e.partial) {
            // Part of a timed-out write is in the driver's output queue. Drop what the
            // device has not taken, so it never receives a truncated command run together
            // with the next one.
            if let Some(port) = self.port.as_ref() {
                // SAFETY: the port's descriptor is open for the duration of this call.
                let fd = unsafe { BorrowedFd::borrow_raw(port.get_ref().as_raw_fd()) };
                if let Err(e) =
                    nix::sys::termios::tcflush(fd, nix::sys::termios::FlushArg::TCOFLUSH)
                {
                    log::warn!("serial output flush failed name={} error={e}", self.name);
                }
            }
        }
        for e in expired {
            log::warn!(
                "serial write timed out name={} token={} timeout_ms={} partial={}",
                self.name,
                e.token,
                timeout.as_millis(),
                e.partial
            );
            callback(
                SerialEvent::WriteFailed(
                    e.token,
                    format!(
                        "serial write timed out after {} ms: the device did not take the data \
                         (unsent bytes discarded)",
                        timeout.as_millis()
                    ),
                ),
                &mut (),
            );
        }
        if next != self.timer_deadline {
            if let Some(deadline) = next {
                self.set_timer(deadline.saturating_duration_since(now));
            }
            // With no write pending an armed timer is left to fire once, harmlessly.
            self.timer_deadline = next;
        }
    }

    /// Drops the port after a hang-up or error; fails pending writes; schedules a reopen.
    fn disconnect<F>(&mut self, reason: String, callback: &mut F)
    where
        F: FnMut(SerialEvent, &mut ()),
    {
        log::warn!(
            "serial port lost name={} path={} reason=\"{reason}\"",
            self.name,
            self.path.display()
        );
        // Dropping the Generic removes the fd from the poller.
        self.port = None;
        self.port_registered = false;
        self.port_dirty = false;
        self.timer_deadline = None;
        let failed: Vec<u64> = {
            let mut s = self.shared.borrow_mut();
            s.connected = false;
            s.writes.clear()
        };
        for token in failed {
            callback(
                SerialEvent::WriteFailed(token, format!("serial port lost: {reason}")),
                &mut (),
            );
        }
        callback(SerialEvent::Disconnected(reason), &mut ());
        self.outage_logged = true;
        self.backoff = BACKOFF_MIN;
        self.arm_retry();
    }

    fn read_some<F>(&mut self, callback: &mut F) -> Result<(), String>
    where
        F: FnMut(SerialEvent, &mut ()),
    {
        let Some(port) = self.port.as_ref() else {
            return Ok(());
        };
        let fd = port.get_ref().as_raw_fd();
        let mut buf = [0u8; READ_CHUNK];
        let mut total = 0;
        let started = Instant::now();
        while total < READ_BUDGET {
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) => return Err("hang-up (end of file)".into()),
                Ok(n) => {
                    total += n;
                    self.framer.push(&buf[..n], &mut |e| callback(e, &mut ()));
                    // Stop when a short read emptied the tty's buffer (the fd is level-triggered:
                    // skip the read that would only return EAGAIN), or when this wake has held
                    // the loop long enough (a flood must not delay commands).
                    if n < buf.len() || started.elapsed() >= READ_TIME_BUDGET {
                        return Ok(());
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
        Ok(())
    }

    /// Writes as much of the pending data as the tty takes now.
    fn flush_writes<F>(&mut self, callback: &mut F) -> Result<(), String>
    where
        F: FnMut(SerialEvent, &mut ()),
    {
        let Some(port) = self.port.as_ref() else {
            return Ok(());
        };
        let fd = port.get_ref().as_raw_fd();
        loop {
            let mut s = self.shared.borrow_mut();
            let Some(w) = s.writes.pending.front_mut() else {
                return Ok(());
            };
            // SAFETY: fd is the open port's descriptor for the duration of this call.
            let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
            match nix::unistd::write(bfd, &w.data[w.done..]) {
                Ok(n) => {
                    w.done += n;
                    if w.done == w.data.len() {
                        let token = w.token;
                        let len = w.data.len();
                        s.writes.pending.pop_front();
                        s.writes.pending_bytes -= len;
                        drop(s);
                        callback(SerialEvent::WriteDone(token), &mut ());
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("write failed: {e}")),
            }
        }
    }
}

impl EventSource for SerialSource {
    type Event = SerialEvent;
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
        let mut woke_write = false;
        self.ping_source
            .process_events(readiness, token, |_, _| woke_write = true)
            .map_err(|e| io::Error::other(e.to_string()))?;

        let mut timer_fired = false;
        self.timer.process_events(readiness, token, |_, timer| {
            // Consume the expiration; a spurious wake reads EAGAIN.
            let _ = timer.wait();
            timer_fired = true;
            Ok(PostAction::Continue)
        })?;
        if timer_fired && self.port.is_none() {
            self.try_open(&mut callback);
        }

        let mut port_ready = None;
        if let Some(port) = self.port.as_mut() {
            port.process_events(readiness, token, |r, _| {
                port_ready = Some(r);
                Ok(PostAction::Continue)
            })?;
        }
        let mut failure = None;
        if let Some(r) = port_ready {
            if r.readable || r.error {
                if let Err(e) = self.read_some(&mut callback) {
                    failure = Some(e);
                }
            }
            if r.writable {
                woke_write = true;
            }
        }
        if failure.is_none() && woke_write && self.port.is_some() {
            if let Err(e) = self.flush_writes(&mut callback) {
                failure = Some(e);
            }
        }
        if let Some(reason) = failure {
            self.disconnect(reason, &mut callback);
            return Ok(PostAction::Continue);
        }
        if self.port.is_some() {
            self.expire_writes(Instant::now(), &mut callback);
        }
        let want_write = self.port.is_some() && !self.shared.borrow().writes.pending.is_empty();
        if want_write != self.write_interest {
            self.write_interest = want_write;
            self.port_dirty = true;
        }
        if self.port_dirty {
            return Ok(PostAction::Reregister);
        }
        Ok(PostAction::Continue)
    }

    fn register(&mut self, poll: &mut Poll, factory: &mut TokenFactory) -> calloop::Result<()> {
        self.ping_source.register(poll, factory)?;
        self.timer.register(poll, factory)?;
        // Open on registration so the first readings are not delayed by a retry period.
        self.arm_retry_now();
        Ok(())
    }

    fn reregister(&mut self, poll: &mut Poll, factory: &mut TokenFactory) -> calloop::Result<()> {
        self.ping_source.reregister(poll, factory)?;
        self.timer.reregister(poll, factory)?;
        if let Some(port) = self.port.as_mut() {
            port.interest = if self.write_interest {
                Interest::BOTH
            } else {
                Interest::READ
            };
            if self.port_registered {
                port.reregister(poll, factory)?;
            } else {
                port.register(poll, factory)?;
                self.port_registered = true;
            }
        }
        self.port_dirty = false;
        Ok(())
    }

    fn unregister(&mut self, poll: &mut Poll) -> calloop::Result<()> {
        self.ping_source.unregister(poll)?;
        self.timer.unregister(poll)?;
        if let Some(port) = self.port.as_mut() {
            if self.port_registered {
                port.unregister(poll)?;
                self.port_registered = false;
            }
        }
        Ok(())
    }
}

impl SerialSource {
    /// Arms the timer to fire immediately, so the first open happens in the first dispatch.
    fn arm_retry_now(&mut self) {
        self.set_timer(Duration::from_nanos(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use calloop::EventLoop;
    use nix::pty::openpty;
    use std::io::Write;
    use std::os::fd::OwnedFd;

    struct St {
        events: Vec<SerialEvent>,
    }

    fn pty() -> (OwnedFd, PathBuf) {
        let p = openpty(None, None).unwrap();
        let path = std::fs::read_link(format!("/proc/self/fd/{}", p.slave.as_raw_fd())).unwrap();
        // Keep the slave open in the test too? No: close it so the gateway's open is the only one.
        drop(p.slave);
        (p.master, path)
    }

    fn run_until(ev: &mut EventLoop<St>, st: &mut St, pred: impl Fn(&St) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pred(st) {
            assert!(
                Instant::now() < deadline,
                "timeout; events so far: {:?}",
                st.events
            );
            ev.dispatch(Some(Duration::from_millis(20)), st).unwrap();
        }
    }

    #[test]
    fn open_tty_sets_raw_mode_and_rejects_odd_bauds() {
        let (_m, path) = pty();
        let fd = open_tty(&path, 115200).unwrap();
        let t = nix::sys::termios::tcgetattr(&fd).unwrap();
        assert_eq!(nix::sys::termios::cfgetospeed(&t), BaudRate::B115200);
        assert!(!t.local_flags.contains(nix::sys::termios::LocalFlags::ECHO));
        assert!(open_tty(&path, 12345)
            .unwrap_err()
            .contains("unsupported baud"));
        assert!(open_tty(Path::new("/nonexistent/tty"), 9600).is_err());
        assert!(open_tty(Path::new("/dev/null"), 9600)
            .unwrap_err()
            .contains("terminal"));
    }

    fn frame_all(ending: InputLineEnding, chunks: &[&[u8]]) -> Vec<SerialEvent> {
        let mut f = LineFramer::new(ending);
        let mut out = Vec::new();
        for c in chunks {
            f.push(c, &mut |e| out.push(e));
        }
        out
    }

    fn line(s: &str) -> SerialEvent {
        SerialEvent::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn frames_lines_and_overlong() {
        let long = vec![b'x'; MAX_LINE + 10];
        let exact = vec![b'z'; MAX_LINE];
        for ending in [InputLineEnding::Auto, InputLineEnding::Lf] {
            let out = frame_all(
                ending,
                &[
                    b"a=1\r\nb=",
                    b"2\n\n\r\n",
                    &long,
                    b"yy\nok\n",
                    &exact,
                    b"\r\n",
                ],
            );
            assert_eq!(
                out,
                vec![
                    line("a=1"),
                    line("b=2"),
                    SerialEvent::Overlong(MAX_LINE + 12),
                    line("ok"),
                    SerialEvent::Line(exact.clone()),
                ],
                "{ending:?}"
            );
        }
    }

    /// A sensor that ends lines with CR alone: every line is a reading (before, LF-only
    /// framing made 2,000 such lines one overlong line).
    #[test]
    fn cr_terminated_lines_each_make_a_line() {
        let text: Vec<u8> = (0..2000)
            .flat_map(|i| format!("n={i}\r").into_bytes())
            .collect();
        for ending in [InputLineEnding::Auto, InputLineEnding::Cr] {
            let mut f = LineFramer::new(ending);
            let mut out = Vec::new();
            for chunk in text.chunks(READ_CHUNK) {
                f.push(chunk, &mut |e| out.push(e));
            }
            assert_eq!(out.len(), 2000, "{ending:?}");
            for (i, e) in out.iter().enumerate() {
                assert_eq!(*e, line(&format!("n={i}")), "{ending:?}");
            }
        }
    }

    #[test]
    fn auto_takes_mixed_endings_and_split_crlf_as_one() {
        let out = frame_all(
            InputLineEnding::Auto,
            &[b"a=1\nb=2\rc=3\r\nd=4\r", b"\ne=5\r", b"\n", b"f=6\n"],
        );
        assert_eq!(
            out,
            vec![
                line("a=1"),
                line("b=2"),
                line("c=3"),
                line("d=4"),
                line("e=5"),
                line("f=6")
            ]
        );
    }

    #[test]
    fn explicit_endings() {
        // lf: a lone CR is part of the line.
        assert_eq!(
            frame_all(InputLineEnding::Lf, &[b"a\rb\n", b"c\r", b"\n"]),
            vec![line("a\rb"), line("c")]
        );
        // cr: LF is an ordinary byte.
        assert_eq!(
            frame_all(InputLineEnding::Cr, &[b"a\nb\rc\r"]),
            vec![line("a\nb"), line("c")]
        );
        // crlf: only the pair ends a line, also when split across reads.
        assert_eq!(
            frame_all(
                InputLineEnding::Crlf,
                &[b"a\nb\rc\r\nd\r", b"\n", b"e\n\r\n"]
            ),
            vec![line("a\nb\rc"), line("d"), line("e\n")]
        );
        // An overlong line in crlf mode ends at its CR LF, split across reads.
        let long = vec![b'x'; MAX_LINE + 5];
        assert_eq!(
            frame_all(InputLineEnding::Crlf, &[&long, b"\r", b"\nok\r\n"]),
            vec![SerialEvent::Overlong(MAX_LINE + 6), line("ok")]
        );
    }

    #[test]
    fn baud_rates_match_the_config_list() {
        for b in crate::config::STANDARD_BAUD_RATES {
            assert!(baud_rate(b).is_some(), "{b}");
        }
        for b in 0..=4_000_000u32 {
            if baud_rate(b).is_some() {
                assert!(crate::config::STANDARD_BAUD_RATES.contains(&b), "{b}");
            }
        }
    }

    #[test]
    fn write_queue_times_out_by_deadline() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = WriteQueue::new(ms(100));
        q.push(b"abc".to_vec(), 1, t0).unwrap();
        q.push(b"de".to_vec(), 2, t0 + ms(30)).unwrap();
        assert_eq!(q.next_deadline(), Some(t0 + ms(100)));
        assert_eq!(q.expire(t0 + ms(99)), vec![]);
        q.pending[0].done = 1;
        assert_eq!(
            q.expire(t0 + ms(100)),
            vec![Expired {
                token: 1,
                partial: true
            }]
        );
        assert_eq!(q.pending_bytes, 2);
        assert_eq!(q.next_deadline(), Some(t0 + ms(130)));
        assert_eq!(
            q.expire(t0 + ms(500)),
            vec![Expired {
                token: 2,
                partial: false
            }]
        );
        assert_eq!((q.pending_bytes, q.next_deadline()), (0, None));
        // The bound counts only what is still queued.
        q.push(vec![0; MAX_PENDING_WRITE], 3, t0).unwrap();
        assert_eq!(q.push(vec![0], 4, t0), Err(WriteError::Busy));
        assert_eq!(q.clear(), vec![3]);
        q.push(vec![0], 5, t0).unwrap();
    }

    /// A device that never takes the data: the write fails after the timeout, the port stays
    /// open, and once the device reads again a new write goes through.
    #[test]
    fn a_write_the_device_never_takes_times_out() {
        let (master, path) = pty();
        let timeout = Duration::from_millis(300);
        let source = SerialSource::new("t", &path, 9600)
            .unwrap()
            .write_timeout(timeout);
        let handle = source.handle();
        let mut ev: EventLoop<St> = EventLoop::try_new().unwrap();
        ev.handle()
            .insert_source(source, |e, _, st: &mut St| st.events.push(e))
            .unwrap();
        let mut st = St { events: vec![] };
        run_until(&mut ev, &mut st, |st| {
            st.events.contains(&SerialEvent::Connected)
        });
        // More than the pty buffer holds, and nobody reads the master.
        let started = Instant::now();
        handle.write(vec![b'x'; 60_000], 1).unwrap();
        run_until(&mut ev, &mut st, |st| {
            st.events
                .iter()
                .any(|e| matches!(e, SerialEvent::WriteFailed(1, _)))
        });
        let took = started.elapsed();
        assert!(
            took >= timeout && took < timeout * 3,
            "failed after {took:?}"
        );
        let why = st
            .events
            .iter()
            .find_map(|e| match e {
                SerialEvent::WriteFailed(1, why) => Some(why.clone()),
                _ => None,
            })
            .unwrap();
        assert!(why.contains("timed out"), "{why}");
        assert!(!st
            .events
            .iter()
            .any(|e| matches!(e, SerialEvent::Disconnected(_) | SerialEvent::WriteDone(1))));
        assert!(handle.is_connected());

        // The device drains what reached the tty; a new write is taken whole.
        let mfd = master.as_raw_fd();
        nix::fcntl::fcntl(
            mfd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match nix::unistd::read(mfd, &mut buf) {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        assert!(got.len() < 60_000, "the unsent bytes were discarded");
        handle.write(b"OK\n".to_vec(), 2).unwrap();
        run_until(&mut ev, &mut st, |st| {
            st.events.contains(&SerialEvent::WriteDone(2))
        });
        let deadline = Instant::now() + Duration::from_secs(2);
        while !got.ends_with(b"OK\n") && Instant::now() < deadline {
            if let Ok(n) = nix::unistd::read(mfd, &mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        assert!(got.ends_with(b"OK\n"), "{} bytes", got.len());
        assert!(
            got.iter()
                .all(|&b| b == b'x' || b == b'O' || b == b'K' || b == b'\n'),
            "bytes pass unchanged"
        );
        drop(master);
    }

    /// A flood of short lines must not hold the loop: one wake handles one chunk once the
    /// time budget is spent, and the rest follows on later dispatches (level-triggered).
    /// Before the time budget, all 4000 bytes (1000 lines) were handled in one wake.
    #[test]
    fn a_flood_of_lines_yields_the_loop() {
        let (master, path) = pty();
        let source = SerialSource::new("t", &path, 9600).unwrap();
        let mut ev: EventLoop<St> = EventLoop::try_new().unwrap();
        ev.handle()
            .insert_source(source, |e, _, st: &mut St| {
                if matches!(e, SerialEvent::Line(_)) {
                    // Each line costs 100 µs (a slow reading pipeline).
                    std::thread::sleep(Duration::from_micros(100));
                }
                st.events.push(e)
            })
            .unwrap();
        let mut st = St { events: vec![] };
        run_until(&mut ev, &mut st, |st| {
            st.events.contains(&SerialEvent::Connected)
        });
        st.events.clear();
        let mut m = std::fs::File::from(master);
        m.write_all(&b"a=1\n".repeat(1000)).unwrap();
        ev.dispatch(Some(Duration::from_secs(2)), &mut st).unwrap();
        let first = st.events.len();
        assert!(
            first > 0 && first <= READ_CHUNK / 4,
            "one wake handled {first} lines"
        );
        run_until(&mut ev, &mut st, |st| st.events.len() == 1000);
        assert!(st
            .events
            .iter()
            .all(|e| *e == SerialEvent::Line(b"a=1".to_vec())));
    }

    #[test]
    fn reads_writes_and_reconnects_on_a_real_pty() {
        let (master, path) = pty();
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("tty");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let source = SerialSource::new("t", &link, 9600).unwrap();
        let handle = source.handle();
        let mut ev: EventLoop<St> = EventLoop::try_new().unwrap();
        ev.handle()
            .insert_source(source, |e, _, st: &mut St| st.events.push(e))
            .unwrap();
        let mut st = St { events: vec![] };
        run_until(&mut ev, &mut st, |st| {
            st.events.contains(&SerialEvent::Connected)
        });
        let mut m = std::fs::File::from(master);
        m.write_all(b"t=1\n").unwrap();
        run_until(&mut ev, &mut st, |st| {
            st.events.contains(&SerialEvent::Line(b"t=1".to_vec()))
        });
        handle
            .write(b"HELLO\n".to_vec(), 7)
            .unwrap_or_else(|e| panic!("{e}: {:?}", st.events));
        run_until(&mut ev, &mut st, |st| {
            st.events.contains(&SerialEvent::WriteDone(7))
        });
        let mut buf = [0u8; 64];
        let n = nix::unistd::read(m.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"HELLO\n",
            "serialport puts the tty in raw mode: bytes pass unchanged"
        );

        // Unplug: close the master. The source must notice and drop the port.
        drop(m);
        run_until(&mut ev, &mut st, |st| {
            st.events
                .iter()
                .any(|e| matches!(e, SerialEvent::Disconnected(_)))
        });
        assert_eq!(
            handle.write(b"x".to_vec(), 8),
            Err(WriteError::NotConnected)
        );
        // Plug back in: a new pty under the same path.
        let (master2, path2) = pty();
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&path2, &link).unwrap();
        st.events.clear();
        run_until(&mut ev, &mut st, |st| {
            st.events.contains(&SerialEvent::Connected)
        });
        let mut m2 = std::fs::File::from(master2);
        m2.write_all(b"t=2\n").unwrap();
        run_until(&mut ev, &mut st, |st| {
            st.events.contains(&SerialEvent::Line(b"t=2".to_vec()))
        });
    }
}
