//! The tty of a Modbus RTU bus: opened non-blocking and raw like a serial port
//! ([`open_tty`]), with the bus's parity and stop bits; read when readable (level-triggered
//! calloop `Generic` source); each request written with one non-blocking `write` after the
//! unread input is discarded (a late answer to an abandoned request must not be taken for
//! the answer to the next one).
//!
//! The scheduling, timeouts and parsing are the gateway's bus state machine
//! (`crate::gateway::modbus`); this file only moves bytes.

use super::serial::open_tty;
use crate::config::{ModbusConfig, Parity};
use nix::errno::Errno;
use nix::sys::termios::{tcflush, tcgetattr, tcsetattr, ControlFlags, FlushArg, SetArg};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::Rc;

/// Bytes read per call at most (a Modbus RTU frame is at most 256 bytes).
const READ_CHUNK: usize = 512;

/// Opens the bus's tty: raw, non-blocking, exclusive, 8 data bits, the bus's baud rate,
/// parity and stop bits.
pub fn open_bus(cfg: &ModbusConfig) -> Result<Rc<OwnedFd>, String> {
    let fd = open_tty(&cfg.path, cfg.baud)?;
    let mut t = tcgetattr(&fd).map_err(|e| format!("tcgetattr: {}", e.desc()))?;
    match cfg.parity {
        Parity::None => {}
        Parity::Even => t.control_flags |= ControlFlags::PARENB,
        Parity::Odd => t.control_flags |= ControlFlags::PARENB | ControlFlags::PARODD,
    }
    if cfg.stop_bits == 2 {
        t.control_flags |= ControlFlags::CSTOPB;
    }
    tcsetattr(&fd, SetArg::TCSANOW, &t).map_err(|e| format!("tcsetattr: {}", e.desc()))?;
    Ok(Rc::new(fd))
}

/// Reads what the tty holds now into `buf` (cleared first). `Err` on hang-up or a read
/// error: the port is lost.
pub fn read_available(fd: &impl AsFd, buf: &mut Vec<u8>) -> Result<(), String> {
    buf.clear();
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        match nix::unistd::read(fd.as_fd().as_raw_fd(), &mut chunk) {
            Ok(0) => return Err("hang-up (end of file)".into()),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                // A short read emptied the tty (no read just for EAGAIN: on an empty tty
                // n_tty_read waits for the flip-buffer work).
                if n < chunk.len() || buf.len() >= 4 * READ_CHUNK {
                    return Ok(());
                }
            }
            Err(Errno::EAGAIN) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("read failed: {}", e.desc())),
        }
    }
}

/// Discards unread input, then writes `frame` without blocking. A frame the tty does not
/// take whole at once is an error (after the previous exchange its output buffer is empty,
/// so this means the port is stuck); the bus then times the request out.
pub fn send(fd: &impl AsFd, frame: &[u8]) -> Result<(), String> {
    let _ = tcflush(fd, FlushArg::TCIFLUSH);
    loop {
        match nix::unistd::write(fd, frame) {
            Ok(n) if n == frame.len() => return Ok(()),
            Ok(n) => return Err(format!("the tty took {n} of {} bytes", frame.len())),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("write failed: {}", e.desc())),
        }
    }
}
