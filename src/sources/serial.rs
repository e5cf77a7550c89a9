//! `SerialSource`: one serial port in the loop, framed into lines, with buffered writes and
//! automatic reconnection.
//!
//! - The tty is opened non-blocking in raw mode ([`open_tty`]) and read when readable.
//!   Bytes are framed into lines by a [`LineFramer`] (which bytes end a line is the port's
//!   [`InputLineEnding`]; by default LF, CR or CR LF); a line longer than
//!   [`MAX_LINE`](crate::protocol::MAX_LINE) bytes is discarded up to its end and reported
//!   once as [`SerialEvent::Overlong`]. Empty lines are skipped.
//! - Writes go into a bounded buffer and are flushed only when the fd is writable;
//!   [`SerialEvent::WriteDone`] reports each write once its last byte reached the tty. A
//!   write not done within the port's write timeout (default [`DEFAULT_WRITE_TIMEOUT`]) ends
//!   with [`SerialEvent::WriteFailed`]: a device that neither drains nor hangs up must not
//!   leave a command unanswered. Its unsent bytes are discarded and the port stays open.
//! - Hang-up (read of 0 bytes, EIO: the USB adapter was unplugged, the pty closed), a missing
//!   device or any other error drops the port, is logged once, and a timerfd retries the open
//!   with backoff (1 s doubling to 30 s) until the path is back.

pub use crate::config::InputLineEnding;
use calloop::generic::Generic;
use calloop::ping::{make_ping, Ping, PingSource};
use calloop::{EventSource, Interest, Mode, Poll, PostAction, Readiness, Token, TokenFactory};
use nix::sys::termios::BaudRate;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

mod framer;
mod reconfig;
mod writes;
pub use framer::LineFramer;
#[cfg(test)]
use writes::Expired;
use writes::WriteQueue;

/// Bytes of pending writes accepted per port; more is refused (the device is too slow).
pub const MAX_PENDING_WRITE: usize = 64 * 1024;
/// How long a write may wait for the device unless the port sets another timeout.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_millis(2000);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Bytes read per wake before yielding to other sources (the rest is read on the next
/// dispatch: the source pings itself).
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
    /// The port is closed (unplugged, missing); it is reopened with backoff.
    #[error("serial port is not connected")]
    NotConnected,
    /// [`MAX_PENDING_WRITE`] bytes already wait for the device: retry later.
    #[error("serial port write buffer is full ({MAX_PENDING_WRITE} bytes pending)")]
    Busy,
}

struct Shared {
    connected: bool,
    writes: WriteQueue,
    /// New settings for the source, taken on its next dispatch.
    settings: Option<reconfig::Settings>,
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
    /// Whether the port is open now.
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
    /// A read stopped at its budget with data left: the port is edge-triggered, so the next
    /// dispatch reads on without a new edge (the ping wakes it).
    more_to_read: bool,
    shared: Rc<RefCell<Shared>>,
    framer: LineFramer,
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
            more_to_read: false,
            shared: Rc::new(RefCell::new(Shared {
                connected: false,
                writes: WriteQueue::new(DEFAULT_WRITE_TIMEOUT),
                settings: None,
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

    /// A handle that queues writes to this port.
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
                // Edge-triggered: a level-triggered tty is polled again by every epoll_wait
                // after it was reported, and n_tty_poll, finding the buffer empty, waits for
                // the tty's flip-buffer work (a kworker) to finish. With the kworkers busy
                // (writeback under a disk flood) that held the whole loop, commands included,
                // for milliseconds. Edge-triggered, the tty is polled only when data arrived.
                self.port = Some(Generic::new(tty, Interest::READ, Mode::Edge));
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

    /// Reads until the tty is empty (a short read: with the port edge-triggered, data that
    /// arrives later brings a new edge) or the budget is spent (then `more_to_read`).
    fn read_some<F>(&mut self, callback: &mut F) -> Result<(), String>
    where
        F: FnMut(SerialEvent, &mut ()),
    {
        self.more_to_read = false;
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
                    // Stop when a short read emptied the tty's buffer (no read that would only
                    // return EAGAIN: on an empty buffer n_tty_read, too, waits for the
                    // flip-buffer work), or when this wake has held the loop long enough (a
                    // flood must not delay commands).
                    if n < buf.len() {
                        return Ok(());
                    }
                    if started.elapsed() >= READ_TIME_BUDGET {
                        break;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
        self.more_to_read = true;
        self.ping.ping();
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
            .map_err(io::Error::other)?;
        self.apply_settings(&mut callback);

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
        let readable = port_ready.is_some_and(|r| r.readable || r.error);
        if readable || self.more_to_read {
            if let Err(e) = self.read_some(&mut callback) {
                failure = Some(e);
            }
        }
        if port_ready.is_some_and(|r| r.writable) {
            woke_write = true;
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
        calloop::batch_register!(poll, factory, self.ping_source, self.timer)?;
        // Open on registration so the first readings are not delayed by a retry period.
        self.arm_retry_now();
        Ok(())
    }

    fn reregister(&mut self, poll: &mut Poll, factory: &mut TokenFactory) -> calloop::Result<()> {
        calloop::batch_reregister!(poll, factory, self.ping_source, self.timer)?;
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
        calloop::batch_unregister!(poll, self.ping_source, self.timer)?;
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
mod tests;
