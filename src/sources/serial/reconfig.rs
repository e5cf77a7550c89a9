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

#[cfg(test)]
mod tests {
    use super::*;
    use calloop::EventLoop;
    use nix::sys::termios::{cfgetospeed, tcgetattr};
    use std::io::Write;

    fn pty() -> (std::fs::File, PathBuf) {
        let p = nix::pty::openpty(None, None).unwrap();
        let path = std::fs::read_link(format!("/proc/self/fd/{}", p.slave.as_raw_fd())).unwrap();
        drop(p.slave);
        (std::fs::File::from(p.master), path)
    }

    fn cfg(path: &Path, baud: u32, ending: InputLineEnding) -> SerialConfig {
        let text = format!(
            "[gateway]\nid = \"t\"\n[[serial]]\nname = \"s\"\npath = \"{}\"\nbaud = {baud}\n\
             input_line_ending = \"{}\"\nwrite_timeout_ms = 300\n",
            path.display(),
            format!("{ending:?}").to_lowercase()
        );
        crate::config::Config::parse(&text, "t.toml")
            .unwrap()
            .serial[0]
            .clone()
    }

    fn run_until(ev: &mut EventLoop<Vec<SerialEvent>>, st: &mut Vec<SerialEvent>, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while st.len() < n {
            assert!(Instant::now() < deadline, "timeout; events so far: {st:?}");
            ev.dispatch(Some(Duration::from_millis(20)), st).unwrap();
        }
    }

    fn line(s: &str) -> SerialEvent {
        SerialEvent::Line(s.as_bytes().to_vec())
    }

    /// A new line ending and baud rate apply to the open port (no reopen, a partial line
    /// kept); a new path closes the port and opens the new one at once.
    #[test]
    fn settings_apply_in_place_and_a_new_path_reopens() {
        let (mut master, path) = pty();
        let mut ev: EventLoop<Vec<SerialEvent>> = EventLoop::try_new().unwrap();
        let src = SerialSource::new("s", &path, 9600).unwrap();
        let handle = src.handle();
        ev.handle()
            .insert_source(src, |e, _, st: &mut Vec<SerialEvent>| st.push(e))
            .unwrap();
        let mut st = Vec::new();
        run_until(&mut ev, &mut st, 1);
        master.write_all(b"a=1\nb=").unwrap();
        run_until(&mut ev, &mut st, 2);

        // A pty master reports its slave's termios.
        assert_eq!(cfgetospeed(&tcgetattr(&master).unwrap()), BaudRate::B9600);
        handle.reconfigure(&cfg(&path, 19200, InputLineEnding::Cr));
        ev.dispatch(Some(Duration::from_millis(20)), &mut st)
            .unwrap();
        assert_eq!(
            cfgetospeed(&tcgetattr(&master).unwrap()),
            BaudRate::B19200,
            "set on the open tty"
        );
        assert_eq!(
            handle.shared.borrow().writes.timeout,
            Duration::from_millis(300)
        );
        master.write_all(b"2\rc=3\n4\r").unwrap();
        run_until(&mut ev, &mut st, 4);
        assert_eq!(
            st,
            vec![
                SerialEvent::Connected,
                line("a=1"),
                line("b=2"),
                line("c=3\n4")
            ]
        );

        let (mut master2, path2) = pty();
        st.clear();
        handle.reconfigure(&cfg(&path2, 19200, InputLineEnding::Cr));
        run_until(&mut ev, &mut st, 2);
        assert!(matches!(&st[0], SerialEvent::Disconnected(why) if why.contains("path changed")));
        assert_eq!(st[1], SerialEvent::Connected);
        master2.write_all(b"d=5\r").unwrap();
        run_until(&mut ev, &mut st, 3);
        assert_eq!(st[2], line("d=5"));
        assert_eq!(cfgetospeed(&tcgetattr(&master2).unwrap()), BaudRate::B19200);
    }
}
