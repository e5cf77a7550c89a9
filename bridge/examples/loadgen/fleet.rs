//! Many simulated gateways in one thread: a libzmq DEALER with CURVE per gateway, speaking
//! protocol v1 (docs/protocol.md) as a gateway does: `hello` on connect, then readings with
//! consecutive seqs. It reads the bridge's acks to know what JetStream confirmed; it never
//! resends (a reading the bridge did not ack stays unacked and shows as backlog).
//!
//! Acks are read from the sockets whose ZMQ_FD an epoll set reports, not by trying every
//! socket in turn: a thousand `recv` attempts per pass would spin a core that, on this
//! benchmark's two, belongs to the bridge and the cluster under test. The ZMQ_FD is
//! registered level-triggered (libzmq drains it while processing the socket's commands, which
//! every `recv` does), and after every send the socket is read too: a send may process the
//! command that made a message readable, consuming the signal.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

/// One gateway's key pair, Z85.
#[derive(Clone)]
pub struct GwKey {
    pub id: String,
    pub public: String,
    pub secret: String,
}

/// `count` gateways `lg-00001`.. with fresh CURVE keys, also written to `keys_file` (one
/// `id public secret` line each, for the idle child processes).
pub fn make_keys(count: usize, keys_file: &Path) -> Result<Vec<GwKey>, String> {
    let mut keys = Vec::with_capacity(count);
    let mut all = String::new();
    for i in 1..=count {
        let kp = zmq::CurveKeyPair::new().map_err(|e| format!("CURVE key pair: {e}"))?;
        let k = GwKey {
            id: format!("lg-{i:05}"),
            public: zmq::z85_encode(&kp.public_key).map_err(|e| e.to_string())?,
            secret: zmq::z85_encode(&kp.secret_key).map_err(|e| e.to_string())?,
        };
        let _ = writeln!(all, "{} {} {}", k.id, k.public, k.secret);
        keys.push(k);
    }
    std::fs::write(keys_file, all).map_err(|e| e.to_string())?;
    Ok(keys)
}

pub fn read_keys(keys_file: &Path) -> Result<Vec<GwKey>, String> {
    let text = std::fs::read_to_string(keys_file).map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some(GwKey {
                id: f.next()?.into(),
                public: f.next()?.into(),
                secret: f.next()?.into(),
            })
        })
        .collect())
}

/// Sockets per libzmq context (its default ZMQ_MAX_SOCKETS is 1023).
const SOCKETS_PER_CONTEXT: usize = 1000;

struct Gw {
    sock: zmq::Socket,
    id: String,
    /// Seq of the next reading (the first is 1).
    next_seq: u64,
    /// Highest seq the bridge acked.
    acked: u64,
    /// The bridge answered the hello (any message counts).
    heard: bool,
}

/// The simulated gateways (all in the calling thread).
pub struct Fleet {
    // Declared after the sockets: a context is dropped (terminated) after its sockets closed.
    gws: Vec<Gw>,
    /// Every socket's ZMQ_FD (data: the gateway's index).
    epoll: Epoll,
    _ctxs: Vec<zmq::Context>,
    /// Readings sent and acked over the fleet's life.
    pub sent: u64,
    pub acked: u64,
    body: String,
    rr: usize,
}

/// What one paced run measured.
pub struct Step {
    pub rate: f64,
    /// Acked readings per second over the run (after its first second).
    pub acked_per_s: f64,
    /// Readings sent but not acked at the end of the run.
    pub backlog: u64,
    /// Sends skipped because a gateway had `cap` readings unacked.
    pub capped: u64,
}

impl Step {
    /// The bridge kept up: acks came at the rate sent, the backlog stayed under about a
    /// second's worth, and no gateway hit its cap.
    pub fn sustained(&self) -> bool {
        self.acked_per_s >= 0.97 * self.rate
            && (self.backlog as f64) <= self.rate
            && self.capped == 0
    }
}

impl Fleet {
    /// Connects `keys` to `endpoint` (CURVE, the bridge's public key `server_public`), each
    /// socket saying hello at once; returns when every one was answered, or fails after
    /// `timeout`.
    pub fn connect(
        endpoint: &str,
        server_public: &str,
        keys: &[GwKey],
        timeout: Duration,
    ) -> Result<Fleet, String> {
        Self::connect_partial(endpoint, server_public, keys, timeout, false)
    }

    /// [`Fleet::connect`]; with `partial`, returns the fleet at `timeout` however many were
    /// answered ([`Fleet::heard`] says how many).
    pub fn connect_partial(
        endpoint: &str,
        server_public: &str,
        keys: &[GwKey],
        timeout: Duration,
        partial: bool,
    ) -> Result<Fleet, String> {
        // libzmq allows 1023 sockets per context by default (ZMQ_MAX_SOCKETS), and the zmq
        // crate cannot change a context's options: one context (and I/O thread) per 1,000.
        let mut ctxs: Vec<zmq::Context> = Vec::new();
        let server = zmq::z85_decode(server_public).map_err(|e| format!("server key: {e}"))?;
        let spool_id = format!("{:016x}{:016x}", rand64(), rand64());
        let mut gws = Vec::with_capacity(keys.len());
        for k in keys {
            if gws.len() % SOCKETS_PER_CONTEXT == 0 {
                ctxs.push(zmq::Context::new());
            }
            let s = ctxs[ctxs.len() - 1]
                .socket(zmq::DEALER)
                .map_err(|e| format!("socket #{}: {e} (raise RLIMIT_NOFILE?)", gws.len()))?;
            let set = |r: Result<(), zmq::Error>, what: &str| r.map_err(|e| format!("{what}: {e}"));
            set(s.set_identity(k.id.as_bytes()), "identity")?;
            set(s.set_curve_serverkey(&server), "serverkey")?;
            set(
                s.set_curve_publickey(&zmq::z85_decode(&k.public).unwrap()),
                "pub",
            )?;
            set(
                s.set_curve_secretkey(&zmq::z85_decode(&k.secret).unwrap()),
                "secret",
            )?;
            // What the gateway sets (docs/protocol.md).
            set(s.set_heartbeat_ivl(10_000), "heartbeat")?;
            set(s.set_heartbeat_timeout(30_000), "heartbeat timeout")?;
            set(s.set_linger(0), "linger")?;
            set(s.set_sndhwm(100_000), "sndhwm")?;
            set(s.connect(endpoint), "connect")?;
            let hello = format!(
                "{{\"gateway\":\"{}\",\"protocol\":1,\"version\":\"loadgen\",\"inputs\":[],\
                 \"outputs\":[],\"serial\":[\"s\"],\"resume_seq\":1,\"spool_id\":\"{spool_id}\",\
                 \"levels\":{{}},\"security\":\"curve\",\"insecure\":false}}",
                k.id
            );
            set(
                s.send_multipart([&b"hello"[..], hello.as_bytes()], zmq::DONTWAIT),
                "hello",
            )?;
            gws.push(Gw {
                sock: s,
                id: k.id.clone(),
                next_seq: 1,
                acked: 0,
                heard: false,
            });
        }
        let epoll = Epoll::new()?;
        for (i, g) in gws.iter().enumerate() {
            let fd = g.sock.get_fd().map_err(|e| format!("ZMQ_FD: {e}"))?;
            epoll.add(fd, i as u64)?;
        }
        let mut f = Fleet {
            _ctxs: ctxs,
            epoll,
            gws,
            sent: 0,
            acked: 0,
            body: String::with_capacity(256),
            rr: 0,
        };
        let t = Instant::now();
        loop {
            f.sweep();
            let heard = f.heard();
            if heard == f.gws.len() {
                return Ok(f);
            }
            if t.elapsed() > timeout && partial {
                return Ok(f);
            }
            if t.elapsed() > timeout {
                return Err(format!(
                    "{heard} of {} gateways heard from the bridge within {timeout:?}",
                    f.gws.len()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Gateways whose hello the bridge answered.
    pub fn heard(&self) -> usize {
        self.gws.iter().filter(|g| g.heard).count()
    }

    pub fn len(&self) -> usize {
        self.gws.len()
    }

    /// Reads every message waiting on every socket (acks: raises `acked`).
    pub fn sweep(&mut self) {
        for i in 0..self.gws.len() {
            self.read(i);
        }
    }

    /// Reads what waits on the sockets the epoll set reports within `timeout` (at least one
    /// wait; nothing when none becomes ready).
    fn sweep_ready(&mut self, timeout: Duration) {
        let mut ready = [0u64; 256];
        let n = self.epoll.wait(&mut ready, timeout);
        for &i in &ready[..n] {
            self.read(i as usize);
        }
    }

    /// Reads every message waiting on gateway `i`'s socket.
    fn read(&mut self, i: usize) {
        let g = &mut self.gws[i];
        while let Ok(frames) = g.sock.recv_multipart(zmq::DONTWAIT) {
            g.heard = true;
            if frames.len() == 2 && frames[0] == b"ack" {
                if let Some(seq) = json_u64(&frames[1], b"\"seq\":") {
                    if seq > g.acked && seq < g.next_seq {
                        self.acked += seq - g.acked;
                        g.acked = seq;
                    }
                }
            }
        }
    }

    /// Sends readings at `rate` per second (all gateways in turn) for `secs`, at most `cap`
    /// unacked per gateway, reading acks every 5 ms. `t0` is the clock the readings' `t_ns`
    /// counts from.
    pub fn run_paced(&mut self, rate: f64, secs: f64, cap: u64, t0: Instant) -> Step {
        let start = Instant::now();
        let mut sent_here = 0u64;
        let mut capped = 0u64;
        let mut last_sweep = start;
        let mut mark: Option<(Instant, u64)> = None;
        loop {
            let now = Instant::now();
            let el = now.duration_since(start).as_secs_f64();
            if el >= secs {
                break;
            }
            if mark.is_none() && el >= 1.0 {
                mark = Some((now, self.acked));
            }
            let due = (rate * el) as u64;
            let mut tries = 0;
            while sent_here < due && tries < self.gws.len() {
                let i = self.rr;
                self.rr = (self.rr + 1) % self.gws.len();
                if self.gws[i].next_seq - 1 - self.gws[i].acked >= cap {
                    capped += 1;
                    tries += 1;
                    continue;
                }
                tries = 0;
                if self.send_reading(i, t0) {
                    sent_here += 1;
                }
            }
            if now.duration_since(last_sweep) >= Duration::from_secs(1) {
                // A safety net: a signal libzmq consumed where this did not look.
                self.sweep();
                last_sweep = now;
            }
            self.sweep_ready(Duration::from_micros(500));
        }
        self.sweep();
        let (m_t, m_acked) = mark.unwrap_or((start, 0));
        let window = m_t.elapsed().as_secs_f64().max(1e-3);
        Step {
            rate,
            acked_per_s: (self.acked - m_acked) as f64 / window,
            backlog: self.sent - self.acked,
            capped,
        }
    }

    /// Closed loop: keeps `window` readings unacked across the fleet (gateways in turn, at
    /// most `cap` each), sending the next as soon as acks make room, for `secs`. Returns the
    /// acked readings per second after the first second. With `window` equal to the raw
    /// publisher's PubAcks in flight, the bridge has at most as many outstanding.
    pub fn run_window(&mut self, window: u64, secs: f64, cap: u64, t0: Instant) -> f64 {
        let start = Instant::now();
        let mut mark: Option<(Instant, u64)> = None;
        let mut last_sweep = start;
        while start.elapsed().as_secs_f64() < secs {
            if last_sweep.elapsed() >= Duration::from_secs(1) {
                self.sweep();
                last_sweep = Instant::now();
            }
            let mut tries = 0;
            while self.sent - self.acked < window && tries < self.gws.len() {
                let i = self.rr;
                self.rr = (self.rr + 1) % self.gws.len();
                if self.gws[i].next_seq - 1 - self.gws[i].acked >= cap {
                    tries += 1;
                    continue;
                }
                tries = 0;
                self.send_reading(i, t0);
            }
            if mark.is_none() && start.elapsed() >= Duration::from_secs(1) {
                mark = Some((Instant::now(), self.acked));
            }
            self.sweep_ready(Duration::from_millis(1));
        }
        let (m_t, m_acked) = mark.unwrap_or((start, 0));
        (self.acked - m_acked) as f64 / m_t.elapsed().as_secs_f64().max(1e-3)
    }

    /// Waits until every reading sent was acked; false after `timeout`. When acks stop
    /// coming for `RETRANSMIT` (a publish the bridge saw fail is acked only once the gateway
    /// sends that reading again), every unacked reading is sent again, as a gateway does after
    /// `[spool] retransmit_s`.
    pub fn drain(&mut self, timeout: Duration, t0: Instant) -> bool {
        const RETRANSMIT: Duration = Duration::from_secs(5);
        let t = Instant::now();
        let (mut progress_at, mut last) = (t, self.acked);
        while self.acked < self.sent {
            if t.elapsed() > timeout {
                return false;
            }
            self.sweep();
            if self.acked != last {
                (progress_at, last) = (Instant::now(), self.acked);
            } else if progress_at.elapsed() >= RETRANSMIT {
                self.resend_unacked(t0);
                progress_at = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Sends every unacked reading again (same gateway, same seqs; `t_ns` is now).
    fn resend_unacked(&mut self, t0: Instant) {
        for g in &mut self.gws {
            for seq in g.acked + 1..g.next_seq {
                reading_body(&mut self.body, &g.id, seq, t0.elapsed().as_nanos() as u64);
                let _ = g
                    .sock
                    .send_multipart([&b"reading"[..], self.body.as_bytes()], zmq::DONTWAIT);
            }
        }
    }

    fn send_reading(&mut self, i: usize, t0: Instant) -> bool {
        let g = &mut self.gws[i];
        let t_ns = t0.elapsed().as_nanos() as u64;
        reading_body(&mut self.body, &g.id, g.next_seq, t_ns);
        match g
            .sock
            .send_multipart([&b"reading"[..], self.body.as_bytes()], zmq::DONTWAIT)
        {
            Ok(()) => {
                g.next_seq += 1;
                self.sent += 1;
                self.read(i);
                true
            }
            Err(_) => false,
        }
    }
}

/// An epoll set (level-triggered, read interest) whose events carry a `u64`.
struct Epoll(i32);

impl Epoll {
    fn new() -> Result<Epoll, String> {
        // SAFETY: plain system call; the fd is owned by the returned value.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(format!(
                "epoll_create1: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Epoll(fd))
    }

    fn add(&self, fd: i32, data: u64) -> Result<(), String> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: data,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        if unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(format!("epoll_ctl: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Fills `out` with the data of ready fds; how many.
    fn wait(&self, out: &mut [u64], timeout: Duration) -> usize {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 256];
        let max = out.len().min(evs.len()) as i32;
        // epoll_wait's timeout is in ms; 0 would spin, so a sub-ms wait rounds up to 1 ms.
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `evs` has room for `max` events.
        let n = unsafe { libc::epoll_wait(self.0, evs.as_mut_ptr(), max, ms) };
        let n = n.max(0) as usize;
        for (o, e) in out.iter_mut().zip(&evs[..n]) {
            *o = e.u64;
        }
        n
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

/// A reading body of 200 bytes for the gateway's `seq`; `values.t_ns` is the send time (ns
/// since the load generator's start), which the latency consumer reads back.
pub fn reading_body(out: &mut String, gw: &str, seq: u64, t_ns: u64) {
    out.clear();
    let _ = write!(
        out,
        "{{\"gateway\":\"{gw}\",\"seq\":{seq},\"source\":\"s\",\"time\":\"{}\",\
         \"values\":{{\"t_ns\":{t_ns},\"temperature\":21.5,\"humidity\":40,\"pad\":\"",
        zgate::protocol::now_rfc3339()
    );
    while out.len() < 197 {
        out.push('x');
    }
    out.push_str("\"}}");
}

/// The unsigned number after `key` in a JSON text (no whitespace between), or None.
pub fn json_u64(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&text[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

fn rand64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}
