//! The ROUTER side every backend of zgate gateways needs: the socket options
//! docs/protocol.md requires (ZMQ_ROUTER_HANDOVER, ZMQ_ROUTER_MANDATORY, ZMTP heartbeats),
//! optional CURVE with the ZAP allow-list handler, a monitor that logs failed handshakes and
//! reports disconnects, and the check that a message's routing id is the id its key is
//! registered under. `zgate backend` and `zgate-bridge` both use it.
//!
//! The caller polls [`Router::socket`], [`Router::monitor`] and [`Router::zap_socket`] (all
//! ZeroMQ sockets: their ZMQ_FD is edge-triggered) and calls [`Router::serve_zap`],
//! [`Router::drain_monitor`] and [`Router::recv_message`] until each reports nothing more.

use super::zap::{Zap, ZAP_DOMAIN, ZAP_ENDPOINT};
use crate::limit::LogLimits;
use crate::security;
use crate::sources::zmq::{recv_monitor_event, MonitorEvent};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// ZMTP heartbeat interval of the ROUTER (the gateway uses the same).
pub const HEARTBEAT_IVL_MS: i32 = 10_000;
/// A connection that sent nothing, heartbeats included, for this long is dropped.
pub const HEARTBEAT_TIMEOUT_MS: i32 = 30_000;

/// Log-limit kind of handshakes that failed before authentication.
pub const LOG_HANDSHAKE_FAILED: &str = "connection rejected (handshake failed)";
/// Log-limit kind of messages whose routing id is not the id their key is registered under.
pub const LOG_IMPERSONATION: &str = "message rejected (impersonation)";

/// How a [`Router`] binds and whom it lets in.
#[derive(Debug, Clone, Default)]
pub struct RouterOptions {
    /// The endpoint the ROUTER binds.
    pub bind: String,
    /// CURVE server secret key file (Z85, under the key rule of [`security::check_key_file`]).
    /// Requires `allow_dir`.
    pub secret_key: Option<PathBuf>,
    /// Directory of `<gateway-id>.pub` files: the gateways allowed to connect.
    pub allow_dir: Option<PathBuf>,
    /// How the operator turns CURVE on (ends the INSECURE warning), e.g.
    /// `start with --secret-key FILE --allow DIR`.
    pub curve_hint: String,
}

/// Who last spoke under a routing id (CURVE only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The key registered under this id.
    Verified,
    /// A key registered under another id (the user id).
    Impersonated(String),
}

/// One received message and what libzmq knows about its sender.
#[derive(Debug)]
pub struct Received {
    /// Every frame, the routing id first.
    pub frames: Vec<Vec<u8>>,
    /// The ZAP user id: with CURVE, the gateway id the sender's key is registered under.
    pub user_id: Option<String>,
    /// The sender's address (for log lines).
    pub peer: Option<String>,
    /// The file descriptor of the sender's connection (libzmq's ZMQ_SRCFD): the value the
    /// monitor's ACCEPTED and DISCONNECTED events name. `None` when unavailable.
    pub fd: Option<i32>,
}

extern "C" {
    // libzmq's own (linked through the zmq crate), for a property the crate does not wrap.
    fn zmq_msg_get(msg: *const std::ffi::c_void, property: std::ffi::c_int) -> std::ffi::c_int;
    fn zmq_msg_size(msg: *const std::ffi::c_void) -> usize;
}

/// ZMQ_SRCFD (zmq.h): the fd of the connection a received message came from.
const ZMQ_SRCFD: std::ffi::c_int = 2;

/// The C `zmq_msg_t` inside a [`zmq::Message`]: the crate's `Message` is a struct whose only
/// field is that `zmq_msg_t`, so it sits at offset 0. [`srcfd_usable`] checks this once at
/// run time (a message's size read through the pointer must match), and the fd is not read
/// when it fails.
fn raw_msg(msg: &zmq::Message) -> *const std::ffi::c_void {
    (msg as *const zmq::Message).cast()
}

/// True when [`raw_msg`] gives the real `zmq_msg_t` (checked once).
fn srcfd_usable() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        let probe = zmq::Message::from(&b"zgate-srcfd-probe"[..]);
        // SAFETY: zmq_msg_size only reads the message; the pointer is valid for the call.
        let ok = unsafe { zmq_msg_size(raw_msg(&probe)) } == probe.len();
        if !ok {
            log::warn!("the fd of a message's connection cannot be read with this zmq crate: disconnects are found by probing");
        }
        ok
    })
}

/// The connection fd of a received message (ZMQ_SRCFD), when it can be read.
fn srcfd(msg: &zmq::Message) -> Option<i32> {
    if !srcfd_usable() {
        return None;
    }
    // SAFETY: `raw_msg` points at a live, received zmq_msg_t (checked by srcfd_usable).
    let fd = unsafe { zmq_msg_get(raw_msg(msg), ZMQ_SRCFD) };
    (fd >= 0).then_some(fd)
}

/// The peer address of a socket fd owned by libzmq, if it is still open.
fn peer_of_fd(fd: i32) -> Option<String> {
    use std::os::fd::FromRawFd;
    if fd < 0 {
        return None;
    }
    // SAFETY: the fd is only borrowed: ManuallyDrop never closes it. If libzmq closed it
    // meanwhile, peer_addr fails (or names whatever reuses it: used for a log line only).
    let stream = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    stream.peer_addr().ok().map(|a| a.to_string())
}

/// A bound ROUTER for gateways, its monitor and (with CURVE) its ZAP handler.
pub struct Router {
    socket: zmq::Socket,
    zap: Option<Zap>,
    monitor: zmq::Socket,
    routes: HashMap<Vec<u8>, Route>,
    /// Peer addresses of accepted connections, by fd (for handshake failure logs).
    accepted: HashMap<i32, String>,
    /// A handshake failure waiting for its DISCONNECTED event (which names the fd).
    failed_handshake: Option<String>,
    /// One log limit per kind of rejection: a flood of one kind (a gateway with a wrong
    /// server key retrying several times a second) never hides another (an impersonation).
    logs: LogLimits,
}

impl Router {
    /// Creates the ROUTER (and with CURVE the ZAP handler, bound first) and binds it.
    /// `name` ("backend", "bridge") names this server in the log and its monitor endpoint.
    pub fn new(ctx: &zmq::Context, opts: &RouterOptions, name: &str) -> anyhow::Result<Router> {
        use anyhow::Context as _;
        let socket = ctx.socket(zmq::ROUTER)?;
        socket.set_router_mandatory(true)?;
        // A gateway that reconnects (its link froze, its heartbeat gave up) comes back with
        // the same routing id while the old pipe may still be alive here: without handover
        // the ROUTER keeps the stale pipe and silently ignores the new connection.
        socket.set_router_handover(true)?;
        // ZMTP heartbeats, as the gateway's: a dead link is found and its pipe dropped.
        socket.set_heartbeat_ivl(HEARTBEAT_IVL_MS)?;
        socket.set_heartbeat_timeout(HEARTBEAT_TIMEOUT_MS)?;
        socket.set_linger(1000)?;
        let zap = match (&opts.secret_key, &opts.allow_dir) {
            (Some(key), Some(dir)) => {
                security::require_curve().map_err(anyhow::Error::msg)?;
                let pair = security::load_secret_key(key).map_err(anyhow::Error::msg)?;
                let meta = std::fs::metadata(dir)
                    .with_context(|| format!("allow list directory {}", dir.display()))?;
                anyhow::ensure!(meta.is_dir(), "{} is not a directory", dir.display());
                // The ZAP handler exists before the socket can accept anyone.
                let zap = Zap::bind(ctx, dir.clone())
                    .with_context(|| format!("binding the ZAP handler {ZAP_ENDPOINT}"))?;
                socket.set_curve_server(true)?;
                socket.set_curve_secretkey(&pair.secret_bytes())?;
                socket.set_zap_domain(ZAP_DOMAIN)?;
                log::info!(
                    "CURVE on: {name} public key {} (gateways set it as backend.server_public_key); allow list {}",
                    pair.public,
                    dir.display()
                );
                Some(zap)
            }
            (None, None) => {
                if !security::endpoint_is_local(&opts.bind) {
                    log::warn!(
                        "INSECURE: bind={} without CURVE: the link is plaintext and \
                         unauthenticated; anyone who can reach this port can read readings, \
                         send readings as any gateway id and receive its commands; {} (see {})",
                        opts.bind,
                        opts.curve_hint,
                        security::SECURITY_DOC
                    );
                }
                None
            }
            _ => anyhow::bail!("the CURVE secret key and the allow list go together"),
        };
        let monitor_ep = format!("inproc://zgate-{name}-monitor-{}", std::process::id());
        socket.monitor(
            &monitor_ep,
            (zmq::SocketEvent::ACCEPTED as u16
                | zmq::SocketEvent::DISCONNECTED as u16
                | zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL as u16
                | zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL as u16
                | zmq::SocketEvent::HANDSHAKE_FAILED_AUTH as u16) as i32,
        )?;
        let monitor = ctx.socket(zmq::PAIR)?;
        monitor.connect(&monitor_ep)?;
        socket
            .bind(&opts.bind)
            .with_context(|| format!("cannot bind {}", opts.bind))?;
        Ok(Router {
            socket,
            zap,
            monitor,
            routes: HashMap::new(),
            accepted: HashMap::new(),
            failed_handshake: None,
            logs: LogLimits::default(),
        })
    }

    /// True when gateways authenticate with CURVE keys from the allow list.
    pub fn curve(&self) -> bool {
        self.zap.is_some()
    }

    /// The ROUTER socket.
    pub fn socket(&self) -> &zmq::Socket {
        &self.socket
    }

    /// The monitor socket (poll it; then call [`Router::drain_monitor`]).
    pub fn monitor(&self) -> &zmq::Socket {
        &self.monitor
    }

    /// The ZAP handler's socket, with CURVE (poll it; then call [`Router::serve_zap`]).
    pub fn zap_socket(&self) -> Option<&zmq::Socket> {
        self.zap.as_ref().map(|z| &z.socket)
    }

    /// The shared log limits (kinds of rejections; callers may add their own kinds).
    pub fn logs(&mut self) -> &mut LogLimits {
        &mut self.logs
    }

    /// Answers every pending ZAP request.
    pub fn serve_zap(&mut self) -> Result<(), zmq::Error> {
        match &self.zap {
            Some(zap) => zap.serve(&mut self.logs),
            None => Ok(()),
        }
    }

    /// Handles every pending monitor event: logs handshake failures (a peer without CURVE,
    /// or with the wrong server key). Returns the fds of the connections that closed.
    pub fn drain_monitor(&mut self) -> Result<Vec<i32>, zmq::Error> {
        let mut closed = Vec::new();
        while let Some(MonitorEvent { event, value, .. }) = recv_monitor_event(&self.monitor)? {
            use zmq::SocketEvent as E;
            match event {
                E::ACCEPTED => {
                    let fd = value as i32;
                    let peer = peer_of_fd(fd).unwrap_or_else(|| "unknown".into());
                    self.accepted.insert(fd, peer);
                }
                E::HANDSHAKE_FAILED_PROTOCOL => {
                    self.failed_handshake = Some(format!(
                        "protocol error {value:#x}: a peer without CURVE, or one using the \
                         wrong server public key"
                    ));
                }
                E::HANDSHAKE_FAILED_NO_DETAIL => {
                    self.failed_handshake = Some(format!(
                        "errno {value}: peer closed during the handshake or uses another \
                         security mechanism"
                    ));
                }
                // Logged by the ZAP handler, with the reason.
                E::HANDSHAKE_FAILED_AUTH => self.failed_handshake = None,
                E::DISCONNECTED => {
                    closed.push(value as i32);
                    let peer = self.accepted.remove(&(value as i32));
                    if let Some(why) = self.failed_handshake.take() {
                        if self.logs.allow(LOG_HANDSHAKE_FAILED, Instant::now()) {
                            log::warn!(
                                "connection rejected peer={} reason=\"handshake failed: {why}\"",
                                peer.as_deref().unwrap_or("unknown")
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(closed)
    }

    /// Receives one multipart message (without waiting) with the sender's ZAP user id and
    /// address; `None` when nothing is pending.
    pub fn recv_message(&self) -> Result<Option<Received>, zmq::Error> {
        let mut frames = Vec::new();
        let mut user_id = None;
        let mut peer = None;
        let mut fd = None;
        loop {
            let mut msg = match self.socket.recv_msg(zmq::DONTWAIT) {
                Ok(m) => m,
                Err(zmq::Error::EAGAIN) if frames.is_empty() => return Ok(None),
                Err(e) => return Err(e),
            };
            if frames.len() == 1 {
                // The first frame the peer sent (after the routing id ROUTER adds).
                user_id = msg.gets("User-Id").map(str::to_string);
                // The address only names a sender whose key and routing id disagree (in the
                // log line of `sender_verified`); fetched for those alone.
                if user_id
                    .as_deref()
                    .is_some_and(|u| u.as_bytes() != frames[0])
                {
                    peer = msg.gets("Peer-Address").map(str::to_string);
                }
                fd = srcfd(&msg);
            }
            let more = msg.get_more();
            frames.push(msg.to_vec());
            if !more {
                return Ok(Some(Received {
                    frames,
                    user_id,
                    peer,
                    fd,
                }));
            }
        }
    }

    /// With CURVE: true when the routing id is the id the sender's key is registered under
    /// (otherwise the message is logged, rate-limited, and the routing id is remembered as
    /// impersonated until its own key speaks again). Without CURVE: always true.
    pub fn sender_verified(&mut self, r: &Received) -> bool {
        if !self.curve() {
            return true;
        }
        let Some(id) = r.frames.first() else {
            return false;
        };
        let user = r.user_id.as_deref().unwrap_or("");
        if user.as_bytes() == id.as_slice() {
            if self.routes.get(id) != Some(&Route::Verified) {
                self.routes.insert(id.clone(), Route::Verified);
            }
            return true;
        }
        self.routes
            .insert(id.clone(), Route::Impersonated(user.to_string()));
        if self.logs.allow(LOG_IMPERSONATION, Instant::now()) {
            log::warn!(
                "message rejected peer={} reason=\"routing id {:?} but the key is registered as {:?} (impersonation)\"",
                r.peer.as_deref().unwrap_or("unknown"),
                String::from_utf8_lossy(id),
                user
            );
        }
        false
    }

    /// Who last spoke under routing id `id` (CURVE only; `None` before any message).
    pub fn route(&self, id: &[u8]) -> Option<&Route> {
        self.routes.get(id)
    }

    /// Sends one message without blocking. With ZMQ_ROUTER_MANDATORY a routing id with no
    /// connection fails with EHOSTUNREACH instead of being dropped silently.
    pub fn send(&self, id: &[u8], kind: &str, body: &[u8]) -> Result<(), zmq::Error> {
        self.socket
            .send(id, zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|_| self.socket.send(kind, zmq::SNDMORE | zmq::DONTWAIT))
            .and_then(|_| self.socket.send(body, zmq::DONTWAIT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_names_its_connection_fd_as_the_monitor_does() {
        let ctx = zmq::Context::new();
        let opts = RouterOptions {
            bind: "tcp://127.0.0.1:*".into(),
            ..Default::default()
        };
        let mut r = Router::new(&ctx, &opts, "fd-test").unwrap();
        let ep = r.socket().get_last_endpoint().unwrap().unwrap();
        let dealer = |id: &str| {
            let d = ctx.socket(zmq::DEALER).unwrap();
            d.set_identity(id.as_bytes()).unwrap();
            d.set_linger(0).unwrap();
            d.connect(&ep).unwrap();
            d.send_multipart(["hello", "{}"], 0).unwrap();
            d
        };
        let (a, b) = (dealer("a"), dealer("b"));
        let mut fds = HashMap::new();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while fds.len() < 2 && Instant::now() < deadline {
            r.socket().poll(zmq::POLLIN, 100).unwrap();
            while let Some(m) = r.recv_message().unwrap() {
                fds.insert(m.frames[0].clone(), m.fd.expect("ZMQ_SRCFD"));
            }
        }
        assert_eq!(fds.len(), 2);
        assert_ne!(fds[&b"a"[..]], fds[&b"b"[..]]);
        drop(a);
        let mut closed = Vec::new();
        while closed.is_empty() && Instant::now() < deadline {
            r.monitor().poll(zmq::POLLIN, 100).unwrap();
            closed = r.drain_monitor().unwrap();
        }
        assert_eq!(closed, vec![fds[&b"a"[..]]]);
        drop(b);
    }
}
