//! New settings for a running port (a configuration reload), without dropping what it is
//! reading: a new line ending or baud rate is applied to the open tty; only a new path
//! closes the port and opens the new one.

use super::*;
use crate::config::SerialConfig;

/// The settings the source itself uses, handed over through [`SerialHandle::reconfigure`].
pub(super) struct Settings {
    path: PathBuf,
    baud: u32,
    ending: InputLineEnding,
}

impl SerialHandle {
    /// Applies `cfg`'s `path`, `baud`, `input_line_ending` and `write_timeout_ms` to the
    /// running port. The write timeout applies to writes queued from now on; the rest on the
    /// source's next dispatch: a partial line is kept, a new baud rate is set on the open tty,
    /// and a new path closes the port (its pending writes fail) and opens the new one at once.
    pub fn reconfigure(&self, cfg: &SerialConfig) {
        let mut s = self.shared.borrow_mut();
        s.writes.timeout = Duration::from_millis(cfg.write_timeout_ms);
        s.settings = Some(Settings {
            path: cfg.path.clone(),
            baud: cfg.baud,
            ending: cfg.input_line_ending,
        });
        drop(s);
        self.ping.ping();
    }

    /// The port is being removed: refuses further writes and returns the tokens of the writes
    /// still pending, which will never complete (the caller answers them).
    pub fn abandon(&self) -> Vec<u64> {
        let mut s = self.shared.borrow_mut();
        s.connected = false;
        s.writes.clear()
    }
}

/// Sets the speed of the open tty `fd`, keeping the rest of its termios.
fn set_baud(fd: BorrowedFd<'_>, baud: u32) -> Result<(), String> {
    use nix::sys::termios::{cfsetspeed, tcgetattr, tcsetattr, SetArg};
    let speed = baud_rate(baud).ok_or_else(|| format!("unsupported baud rate {baud}"))?;
    let mut t = tcgetattr(fd).map_err(|e| format!("tcgetattr: {}", e.desc()))?;
    cfsetspeed(&mut t, speed).map_err(|e| format!("cfsetspeed: {}", e.desc()))?;
    tcsetattr(fd, SetArg::TCSANOW, &t).map_err(|e| format!("tcsetattr: {}", e.desc()))
}

impl SerialSource {
    /// Takes the settings handed over by [`SerialHandle::reconfigure`], if any.
    pub(super) fn apply_settings<F>(&mut self, callback: &mut F)
    where
        F: FnMut(SerialEvent, &mut ()),
    {
        let Some(new) = self.shared.borrow_mut().settings.take() else {
            return;
        };
        self.framer.set_ending(new.ending);
        let path_changed = new.path != self.path;
        let baud_changed = new.baud != self.baud;
        if path_changed && self.port.is_some() {
            let reason = format!(
                "path changed to {} by a configuration reload",
                new.path.display()
            );
            self.disconnect(reason, callback);
        }
        self.path = new.path;
        self.baud = new.baud;
        if path_changed {
            // Open the new path now, not after the backoff.
            self.backoff = BACKOFF_MIN;
            self.arm_retry_now();
            return;
        }
        if !baud_changed {
            return;
        }
        let Some(port) = self.port.as_ref() else {
            // Closed: the next open uses the new rate.
            return;
        };
        // SAFETY: the port's descriptor is open for the duration of this call.
        let fd = unsafe { BorrowedFd::borrow_raw(port.get_ref().as_raw_fd()) };
        match set_baud(fd, self.baud) {
            Ok(()) => log::info!(
                "serial port baud rate set name={} baud={}",
                self.name,
                self.baud
            ),
            Err(e) => self.disconnect(format!("cannot set baud={}: {e}", self.baud), callback),
        }
    }
}
