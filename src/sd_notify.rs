//! Minimal, dependency-free `sd_notify(3)` client for `Type=notify` services.
//!
//! systemd passes the address of its notification socket in `NOTIFY_SOCKET`:
//! either a filesystem path (`/run/systemd/notify`) or, when it starts with
//! `@`, a Linux abstract socket name. A service reports state by sending one
//! datagram of newline-separated `KEY=VALUE` assignments to it, e.g.
//! `READY=1`, `WATCHDOG=1`, `STOPPING=1`, `STATUS=...`.
//!
//! With `WatchdogSec=` set, systemd also exports `WATCHDOG_USEC` (and
//! `WATCHDOG_PID`): the service must send `WATCHDOG=1` more often than that;
//! the usual practice, and what zgate does, is every `WATCHDOG_USEC / 2`
//! from a timer on the event loop, so a stuck loop stops the pings and systemd
//! restarts the service.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every call is a cheap no-op that
//! returns `Ok(false)`.
//!
//! The `*_to` / `*_from` variants take the inputs explicitly so that they can be
//! tested without touching process-global environment variables.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Environment variable holding the notification socket address.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// Environment variable holding the watchdog timeout in microseconds.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// Environment variable naming the pid the watchdog settings are meant for.
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// Sends `state` (e.g. `"READY=1"`, `"WATCHDOG=1"`, `"STATUS=connected"`)
/// to the service manager.
///
/// Returns `Ok(false)` when `NOTIFY_SOCKET` is not set (not running under
/// systemd, or `NotifyAccess=none`), `Ok(true)` when the datagram was sent.
pub fn notify(state: &str) -> io::Result<bool> {
    notify_with(std::env::var_os(NOTIFY_SOCKET).as_deref(), state)
}

/// `notify` with the socket address given as an `Option` (the value of
/// `NOTIFY_SOCKET`); `None` or an empty address yields `Ok(false)`.
pub fn notify_with(addr: Option<&OsStr>, state: &str) -> io::Result<bool> {
    match addr {
        Some(a) if !a.is_empty() => notify_to(a, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to the notification socket at `addr`: a filesystem path, or
/// an abstract socket name when `addr` starts with `@`.
pub fn notify_to<A: AsRef<OsStr>>(addr: A, state: &str) -> io::Result<()> {
    let addr = addr.as_ref();
    let bytes = addr.as_bytes();
    if bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty NOTIFY_SOCKET address",
        ));
    }
    let sock = UnixDatagram::unbound()?;
    let sent = if bytes[0] == b'@' {
        send_abstract(&sock, &bytes[1..], state.as_bytes())?
    } else if bytes[0] == b'/' {
        sock.send_to(state.as_bytes(), addr)?
    } else {
        // systemd only ever hands out absolute paths or '@' names (and, since
        // v254, "vsock:" addresses, which a Pi gateway never sees).
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsupported NOTIFY_SOCKET address {:?}", addr),
        ));
    };
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to NOTIFY_SOCKET",
        ));
    }
    Ok(())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(sock: &UnixDatagram, name: &[u8], buf: &[u8]) -> io::Result<usize> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let sa = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(buf, &sa)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_sock: &UnixDatagram, _name: &[u8], _buf: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets need Linux",
    ))
}

/// Convenience: `READY=1`, sent once start-up is complete (config loaded,
/// sockets and devices open, event loop about to run).
pub fn ready() -> io::Result<bool> {
    notify("READY=1")
}

/// Convenience: `WATCHDOG=1`, the keep-alive ping.
pub fn watchdog() -> io::Result<bool> {
    notify("WATCHDOG=1")
}

/// Convenience: `STOPPING=1`, sent when a clean shutdown begins.
pub fn stopping() -> io::Result<bool> {
    notify("STOPPING=1")
}

/// The watchdog timeout requested by the service manager (`WatchdogSec=`),
/// or `None` when the watchdog is off, the values are invalid, or
/// `WATCHDOG_PID` names another process. Send `WATCHDOG=1` at least every
/// half of this.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var_os(WATCHDOG_USEC).as_deref(),
        std::env::var_os(WATCHDOG_PID).as_deref(),
        std::process::id(),
    )
}

/// `watchdog_interval` with explicit inputs: the values of `WATCHDOG_USEC` and
/// `WATCHDOG_PID`, and the caller's pid.
pub fn watchdog_interval_from(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    our_pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.to_str()?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        let pid: u32 = pid.to_str()?.trim().parse().ok()?;
        if pid != our_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// The ping period to use for a watchdog timeout: half of it, as
/// `sd_watchdog_enabled(3)` recommends.
pub fn ping_period(timeout: Duration) -> Duration {
    timeout / 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static SEQ: AtomicUsize = AtomicUsize::new(0);

    fn unique(tag: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!(
            "zgate-sdn-{}-{}-{}-{}",
            tag,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst),
            nanos
        )
    }

    struct TempDir(PathBuf);
    impl TempDir {
        fn new() -> TempDir {
            let p = std::env::temp_dir().join(unique("dir"));
            std::fs::create_dir(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn path_socket_receives_ready_then_watchdog() {
        let dir = TempDir::new();
        let path = dir.0.join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        notify_to(&path, "READY=1").unwrap();
        notify_to(&path, "WATCHDOG=1").unwrap();
        assert_eq!(recv(&server), "READY=1");
        assert_eq!(recv(&server), "WATCHDOG=1");
    }

    #[test]
    fn notify_with_some_path_reports_sent() {
        let dir = TempDir::new();
        let path = dir.0.join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        assert!(notify_with(Some(path.as_os_str()), "STATUS=hello\nREADY=1").unwrap());
        assert_eq!(recv(&server), "STATUS=hello\nREADY=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_socket_receives() {
        use std::os::linux::net::SocketAddrExt;
        let name = unique("abs");
        let sa = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&sa).unwrap();
        notify_to(format!("@{}", name), "READY=1").unwrap();
        assert_eq!(recv(&server), "READY=1");
    }

    #[test]
    fn unset_or_empty_address_is_a_noop() {
        assert!(!notify_with(None, "READY=1").unwrap());
        assert!(!notify_with(Some(OsStr::new("")), "READY=1").unwrap());
    }

    #[test]
    fn missing_listener_is_an_error() {
        let dir = TempDir::new();
        let path = dir.0.join("nobody-listens");
        assert!(notify_to(&path, "READY=1").is_err());
        assert!(notify_with(Some(path.as_os_str()), "READY=1").is_err());
    }

    #[test]
    fn relative_address_is_rejected() {
        let e = notify_to("relative/notify", "READY=1").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn watchdog_interval_parsing() {
        let s = |v: &'static str| Some(OsStr::new(v));
        assert_eq!(
            watchdog_interval_from(s("30000000"), None, 42),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval_from(s("30000000"), s("42"), 42),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_interval_from(s("30000000"), s("43"), 42), None);
        assert_eq!(watchdog_interval_from(s("0"), None, 42), None);
        assert_eq!(watchdog_interval_from(s("abc"), None, 42), None);
        assert_eq!(watchdog_interval_from(s("-5"), None, 42), None);
        assert_eq!(watchdog_interval_from(None, s("42"), 42), None);
        assert_eq!(watchdog_interval_from(s("1000"), s("x"), 42), None);
        assert_eq!(
            ping_period(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
    }
}
