"""Helpers for zgate's integration tests; the fixtures that hand them out are in conftest.py.

Everything here drives the real binary (``ZGATE_BIN``, default ``target/debug/zgate``):

- :class:`PtySensor`: a pseudo-terminal playing a serial sensor. The gateway's config points
  at a *symlink* in ``tmp_path``; :meth:`PtySensor.replug` closes the master (the gateway sees
  a hang-up) and puts a fresh pty behind the same symlink. The master stays open across
  gateway restarts.
- :class:`Feed`: writes lines to a :class:`PtySensor` at a steady rate in a thread (or
  synchronously, :meth:`Feed.write_now`).
- :func:`make_config`: TOML text with tmp paths and the given endpoint.
- :class:`Gateway`: ``zgate run --config``; stdout and stderr of every start go to one log
  file, printed when a test fails; always killed in teardown.
- :class:`Peer`: an independent pyzmq ROUTER playing the backend, either driven by the test
  (:meth:`Peer.expect`) or receiving in a thread (``background=True``); it can ack.
- :class:`RefBackend`: ``zgate backend --bind``; stdout parsed line by line on a thread.
- :func:`read_segment`, :func:`spool_state`: a small reader of the spool's on-disk format
  (docs/design.md, "The on-disk spool").

Waiting is always "poll until a deadline"; a fixed sleep is never a pass condition.
"""

import ctypes
import errno
import json
import os
import queue
import random
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
import tty
from pathlib import Path

import pytest
import zmq

REPO = Path(__file__).resolve().parents[2]
ZGATE_BIN = os.environ.get("ZGATE_BIN") or str(REPO / "target" / "debug" / "zgate")

GW_ID = "gw-01"
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
READING_KEYS = {"gateway", "seq", "source", "time", "values"}
# What a reading made while the kernel clock is not synchronised carries as well.
UNSYNCED_KEYS = {"clock", "mono_ms", "boot_id"}


_LIBC = ctypes.CDLL(None, use_errno=True)


def die_with_parent():
    """``preexec_fn``: the child gets SIGKILL when the test process dies, so a test run that
    crashes leaves no gateway behind dialling out as ``gw-01`` to ports later tests reuse."""
    _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_HANDED_OUT = set()
_PORT_RNG = random.Random(os.getpid() ^ time.monotonic_ns())


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago and that no other call in this test
    run has returned.

    The port comes from below the kernel's ephemeral range: a port taken from that range
    (``bind(0)``) can be handed to some outgoing connection (a nats-server route, a gateway
    dialling out) between this call and the server that wants it binding it, and two calls
    could return the same port. Both happened: a node of a test cluster failed with "address
    already in use" and the cluster ran one node short."""
    low = max(1024, min(_EPHEMERAL_LOW, 65536) - 20000)
    high = max(low + 1000, min(_EPHEMERAL_LOW, 65536))
    for _ in range(1000):
        port = _PORT_RNG.randrange(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                # The wildcard address: it conflicts with any listener on this port.
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {low}..{high}")


free_tcp_port = free_port


def wait_until(pred, timeout, what, interval=0.005):
    """Polls ``pred`` until it returns a truthy value (returned) or fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def zgate_env():
    """The environment of every zgate child: ``RUST_LOG`` from ``ZGATE_TEST_LOG`` (info)."""
    return dict(os.environ, RUST_LOG=os.environ.get("ZGATE_TEST_LOG", "info"))


# --------------------------------------------------------------------------- serial sensor


class PtySensor:
    """A pty whose slave the gateway opens through the symlink ``self.path``.

    ``nonblocking``: the master never blocks a write (:meth:`try_line` reports a full tty
    buffer instead); :meth:`write` still completes by waiting. Leave it off when the master is
    handed to a child that expects blocking writes."""

    def __init__(self, link: Path, nonblocking=False):
        self.path = link
        self.nonblocking = nonblocking
        self.master = None
        self._open()

    def _open(self):
        master, slave = os.openpty()
        tty_path = os.ttyname(slave)
        # Raw, no echo, until the gateway sets its own termios: lines written before it opens
        # the port (or between two gateway runs) arrive unchanged.
        tty.setraw(slave)
        # Only the gateway keeps the slave open: closing the master is then a real hang-up.
        os.close(slave)
        if self.nonblocking:
            os.set_blocking(master, False)
        tmp = self.path.with_name(self.path.name + ".new")
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(tty_path, tmp)
        os.replace(tmp, self.path)
        self.master = master
        self.tty = tty_path

    def write(self, data: bytes):
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                select.select([], [self.master], [], 0.05)
                continue
            view = view[n:]

    def line(self, text):
        self.write((text if isinstance(text, bytes) else text.encode()) + b"\n")

    def try_line(self, text, stop=None):
        """Writes one line on a non-blocking master. False when nothing could be written (tty
        buffer full: nobody is reading). A partial write is completed (never leave a mangled
        line behind), or abandoned once ``stop`` is set (end of the test)."""
        assert self.nonblocking, "try_line needs PtySensor(nonblocking=True)"
        data = (text + "\n").encode()
        try:
            n = os.write(self.master, data)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EIO):
                return False
            raise
        while n < len(data):
            try:
                n += os.write(self.master, data[n:])
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EIO):
                    raise
                if stop is not None and stop.is_set():
                    n += len(data)
                time.sleep(0.001)
        return True

    def read_available(self, want, timeout: float) -> bytes:
        """Reads from the master until ``want`` bytes arrived or the deadline passed;
        ``want=None`` reads everything until the deadline."""
        out = b""
        deadline = time.monotonic() + timeout
        while want is None or len(out) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    out += os.read(self.master, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    break
        return out

    def pending_now(self) -> bytes:
        """Whatever the master can read right now, without waiting."""
        out = b""
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out

    def drain(self):
        """Discards anything the gateway wrote to the port."""
        self.pending_now()

    def unplug(self):
        if self.master is not None:
            os.close(self.master)
            self.master = None

    def replug(self):
        self.unplug()
        self._open()

    def close(self):
        self.unplug()


def sensor_line(i):
    """The kv line with counter i, and the ``values`` the gateway must make of it."""
    line = f"n={i} temp={20 + i % 7}.5 ok={'true' if i % 2 else 'false'}"
    values = {"n": i, "temp": 20 + i % 7 + 0.5, "ok": bool(i % 2)}
    return line, values


class Feed:
    """Writes ``line(start)``, ``line(start + 1)``, ... to a non-blocking :class:`PtySensor`
    at ``rate`` lines/s in a thread (:meth:`start`), or synchronously (:meth:`write_now`).
    ``written`` holds the counters of the lines that reached the tty (complete); ``lost``
    counts lines refused by a full tty buffer. ``line(i)`` returns the text (default: the
    line of :func:`sensor_line`)."""

    def __init__(self, pty, rate=200.0, start=1, line=None):
        assert pty.nonblocking, "a Feed needs PtySensor(nonblocking=True)"
        self.pty = pty
        self.rate = rate
        self.next = start
        self.line = line or (lambda i: sensor_line(i)[0])
        self.written = []
        self.lost = 0
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        period = 1.0 / self.rate
        t = time.monotonic()
        while not self._stop.is_set():
            if self.pty.master is None:
                return
            if self.pty.try_line(self.line(self.next), self._stop):
                self.written.append(self.next)
            else:
                self.lost += 1
            self.next += 1
            self.pty.drain()
            t += period
            delay = t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                t = time.monotonic()  # far behind (busy machine): do not burst

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def write_now(self, count):
        """Writes ``count`` lines now (no thread); returns their counters."""
        out = []
        for _ in range(count):
            assert self.pty.try_line(self.line(self.next)), "tty buffer full"
            out.append(self.next)
            self.written.append(self.next)
            self.next += 1
        return out


# --------------------------------------------------------------------------- config


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return json.dumps(str(v))


def make_config(
    tmp_path,
    endpoint,
    serial=(),
    stats_interval_s=30,
    outbox_max=1000,
    shutdown_flush_ms=2000,
    inputs=(("door", 17, "up"),),
    outputs=(("relay1", 27, 0, 2000), ("relay2", 22, 1, 2000)),
    *,
    gateway_id=GW_ID,
    backend=(),
    spool=None,
    extra="",
):
    """TOML text. A setting given as None is left out (the gateway's default applies).

    ``serial``: (name, path, format, line_ending[, extra lines]) tuples; ``inputs``: (name,
    pin, pull); ``outputs``: (name, pin, initial, max_pulse_ms); ``backend``: more lines for
    ``[backend]``; ``spool``: a dict for ``[spool]``; ``extra``: TOML appended as is."""
    sim = tmp_path / "sim"

    def kv(key, value):
        return [] if value is None else [f"{key} = {toml_value(value)}"]

    lines = [
        "[gateway]",
        *kv("id", gateway_id),
        *kv("data_dir", str(tmp_path / "data")),
        *kv("stats_interval_s", stats_interval_s),
        "",
        "[backend]",
        *kv("endpoint", endpoint),
        *kv("outbox_max", outbox_max),
        *kv("shutdown_flush_ms", shutdown_flush_ms),
        *backend,
        "",
        "[gpio]",
        'backend = "sim"',
        *kv("sim_dir", str(sim)),
    ]
    if spool is not None:
        lines += ["", "[spool]"] + [f"{k} = {toml_value(v)}" for k, v in spool.items()]
    for name, pin, pull in inputs:
        lines += ["", "[[gpio.input]]", *kv("name", name), *kv("pin", pin), *kv("pull", pull),
                  "debounce_ms = 0"]
    for name, pin, initial, max_pulse in outputs:
        lines += ["", "[[gpio.output]]", *kv("name", name), *kv("pin", pin),
                  *kv("initial", initial), *kv("max_pulse_ms", max_pulse)]
    for name, path, fmt, ending, *more in serial:
        lines += ["", "[[serial]]", *kv("name", name), *kv("path", str(path)), "baud = 9600",
                  *kv("format", fmt), *kv("line_ending", ending), *more]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def pin_file(tmp_path, pin):
    return tmp_path / "sim" / f"gpio{pin}"


def read_pin(tmp_path, pin):
    try:
        return pin_file(tmp_path, pin).read_text()
    except FileNotFoundError:
        return None


def set_input(tmp_path, pin, level):
    """Drives a simulated input the way the sim backend expects: a whole-file rename."""
    sim = tmp_path / "sim"
    tmp = sim / f".gpio{pin}.tmp"
    tmp.write_text(f"{level}\n")
    tmp.rename(pin_file(tmp_path, pin))


# --------------------------------------------------------------------------- processes


class Gateway:
    """``zgate run --config``. The config text is written to ``<name>.toml``; stdout and
    stderr of every start go to ``<name>.stderr`` (appended). ``exe``: the command that runs
    zgate (default ``[ZGATE_BIN]``), e.g. an emulator wrapper."""

    def __init__(self, tmp_path, config_text, name="gw", exe=None):
        self.config = tmp_path / f"{name}.toml"
        self.config.write_text(config_text)
        self.log_path = tmp_path / f"{name}.stderr"
        self.log_path.write_bytes(b"")
        self.exe = list(exe or [ZGATE_BIN])
        self.proc = None
        self.starts = 0
        self._start_offset = 0
        self.start()

    def start(self):
        """Starts (again, after :meth:`kill9` or :meth:`term`) with the same config."""
        assert self.proc is None or self.proc.poll() is not None, "still running"
        with open(self.log_path, "ab") as log:
            self._start_offset = log.tell()
            self.proc = subprocess.Popen(
                [*self.exe, "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=zgate_env(),
                preexec_fn=die_with_parent,
            )
        self.starts += 1
        return self

    def log(self, since_start=False):
        """The log text: all of it, or only what the latest start wrote."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        if since_start:
            data = data[self._start_offset:]
        return data.decode(errors="replace")

    def wait_log(self, needle, timeout=5, count=1, since_start=False):
        def found():
            self.assert_alive()
            return self.log(since_start).count(needle) >= count

        wait_until(found, timeout, f"{needle!r} (x{count}) in the gateway log")

    def wait_match(self, pattern, timeout=10, since_start=True):
        """Waits for the regex ``pattern`` in the log (by default: since the latest start);
        returns the match."""
        rx = re.compile(pattern)

        def found():
            self.assert_alive()
            return rx.search(self.log(since_start))

        return wait_until(found, timeout, f"gateway log /{pattern}/")

    def wait_serial_open(self, name, timeout=5, count=1, since_start=False):
        self.wait_log(f"serial port open name={name} ", timeout, count, since_start)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def assert_alive(self):
        rc = self.proc.poll()
        assert rc is None, f"gateway exited with {rc}; log:\n{self.log()[-4000:]}"

    def terminate(self):
        self.proc.send_signal(signal.SIGTERM)

    def term(self, timeout=10):
        """SIGTERM, then waits for the exit; returns the exit code."""
        self.terminate()
        return self.proc.wait(timeout)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class Peer:
    """A pyzmq ROUTER backend for the gateway ``gateway_id``. Every received message is kept
    in ``history`` as (kind, body) and its routing id in ``senders``; readings also in
    ``arrivals`` (seq, values, body bytes) with ``arrival_times``, hellos in ``hellos``,
    stats in ``stats``. ``high`` is the highest contiguous seq held (or skipped over by a
    ``resume_seq`` in hello/stats, as the reference backend does).

    Driven by the test (:meth:`recv`, :meth:`expect`, ...), or with ``background=True`` by a
    thread that receives everything (read the lists under ``lock``). With ``auto_ack`` the
    peer acks ``high`` after each reading (after each batch in the background)."""

    def __init__(self, endpoint="tcp://127.0.0.1:*", rcvhwm=None, ctx=None, *,
                 gateway_id=GW_ID, handover=False, auto_ack=False, background=False):
        self.ctx = ctx or zmq.Context.instance()
        self.gateway_id = gateway_id.encode()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if handover:
            self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if rcvhwm is not None:
            self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.history = []
        self.senders = []
        self.backlog = []
        self.lock = threading.Lock()
        self.arrivals = []
        self.arrival_times = []
        self.hellos = []
        self.stats = []
        self.acks_sent = []
        self.high = 0
        self._ahead = set()
        self.acking = auto_ack
        self._ack_now = threading.Event()
        self._stop = threading.Event()
        # A zmq socket is not thread-safe: with a background thread, the test's sends are
        # handed to it.
        self._outq = queue.SimpleQueue()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    # ----- shared by both modes

    def _record(self, frames):
        """Decodes and records one message; returns (kind, body)."""
        ident, kind, raw = frames
        kind = kind.decode()
        body = json.loads(raw)
        now = time.monotonic()
        with self.lock:
            self.history.append((kind, body))
            self.senders.append(ident)
            if kind in ("hello", "stats"):
                (self.hellos if kind == "hello" else self.stats).append(body)
                resume = body.get("resume_seq")
                if resume and resume - 1 > self.high:
                    self.high = resume - 1
                    self._ahead = {s for s in self._ahead if s > self.high}
                    self._advance()
            elif kind == "reading":
                seq = body["seq"]
                self.arrivals.append((seq, body["values"], raw))
                self.arrival_times.append(now)
                if seq > self.high:
                    self._ahead.add(seq)
                    self._advance()
        return kind, body

    def _advance(self):
        while self.high + 1 in self._ahead:
            self._ahead.discard(self.high + 1)
            self.high += 1

    def _send_ack(self):
        self._ack_now.clear()
        with self.lock:
            high = self.high
        try:
            self.sock.send_multipart([self.gateway_id, b"ack",
                                      json.dumps({"seq": high}).encode()], zmq.NOBLOCK)
            with self.lock:
                self.acks_sent.append(high)
        except zmq.ZMQError:
            pass

    def set_ack(self, on):
        """Turns acking on or off; on: acks ``high`` at once."""
        self.acking = on
        if on:
            self._ack_now.set()

    def seqs(self):
        with self.lock:
            return [a[0] for a in self.arrivals]

    def last_stats(self):
        with self.lock:
            return self.stats[-1] if self.stats else None

    def of_kind(self, kind):
        """Every message of ``kind`` received so far (consumed or not)."""
        with self.lock:
            return [b for k, b in self.history if k == kind]

    # ----- background mode

    def _run(self):
        while not self._stop.is_set():
            events = dict(self.poller.poll(2))
            while True:
                try:
                    frames = self._outq.get_nowait()
                except queue.Empty:
                    break
                try:
                    self.sock.send_multipart(frames)
                except zmq.ZMQError:
                    pass
            got_reading = False
            while self.sock in events:
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 3:
                    continue
                kind, _ = self._record(frames)
                got_reading |= kind == "reading"
            if self.senders and self.acking and (got_reading or self._ack_now.is_set()):
                self._send_ack()

    # ----- driven by the test

    def recv(self, timeout):
        """One message as (kind, body), or None after ``timeout`` seconds."""
        assert self._thread is None, "a background peer receives in its thread"
        if not self.poller.poll(int(timeout * 1000)):
            return None
        frames = self.sock.recv_multipart()
        assert len(frames) == 3, f"expected [id, kind, JSON], got {frames!r}"
        assert frames[0] == self.gateway_id, frames
        m = self._record(frames)
        if self.acking and m[0] == "reading":
            self._send_ack()
        return m

    def expect(self, kind, pred=None, timeout=5.0):
        """The first not yet consumed message of ``kind`` matching ``pred``."""
        for i, (k, b) in enumerate(self.backlog):
            if k == kind and (pred is None or pred(b)):
                del self.backlog[i]
                return b
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                recent = self.backlog[-10:]
                pytest.fail(f"no {kind} message within {timeout} s; unconsumed: {recent!r}")
            m = self.recv(left)
            if m is None:
                continue
            k, b = m
            if k == kind and (pred is None or pred(b)):
                return b
            self.backlog.append(m)

    def expect_none(self, kind, pred=None, within=0.3):
        """Asserts that no ``kind`` message matching ``pred`` arrives within ``within`` s."""
        deadline = time.monotonic() + within
        while True:
            for k, b in self.backlog:
                assert not (k == kind and (pred is None or pred(b))), f"unexpected {kind}: {b}"
            left = deadline - time.monotonic()
            if left <= 0:
                return
            m = self.recv(left)
            if m is not None:
                self.backlog.append(m)

    def recv_until(self, pred, timeout=10.0):
        """Receives (into ``history`` and the backlog) until ``pred()`` holds; returns
        whether it did within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                return bool(pred())
            m = self.recv(min(left, 0.1))
            if m is not None:
                self.backlog.append(m)
        return True

    def reading(self, timeout=5.0):
        return self.expect("reading", timeout=timeout)

    def reply(self, cid, timeout=5.0):
        return self.expect("reply", lambda b: b.get("id") == cid, timeout)

    def send(self, kind, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_frames([kind.encode(), data])

    def send_frames(self, frames):
        frames = [self.gateway_id] + list(frames)
        if self._thread is not None:
            self._outq.put(frames)
        else:
            self.sock.send_multipart(frames)

    def command(self, cmd):
        self.send("command", cmd)

    def ack(self, seq):
        self.send("ack", {"seq": seq})

    def close(self):
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self.sock.close(0)


class RefBackend:
    """``zgate backend --bind EP``: stdout JSON lines into a queue (:meth:`expect`) and a list
    (:meth:`of_kind`), commands via stdin, stderr to ``<name>.stderr`` (:meth:`log`)."""

    def __init__(self, tmp_path, endpoint, extra=(), name="backend"):
        self.log_path = tmp_path / f"{name}.stderr"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [ZGATE_BIN, "backend", "--bind", endpoint, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=zgate_env(),
        )
        self.lines = queue.Queue()
        self.raw = []
        self.backlog = []
        self._printed = []
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._reader, daemon=True)
        self._t.start()

    def _reader(self):
        for raw in self.proc.stdout:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                d = json.loads(text)  # dicts keep the printed key order
            except ValueError:
                d = {"kind": "<unparsable>", "line": text}
            with self._lock:
                self.raw.append(text)
                self._printed.append(d)
            self.lines.put(d)

    def expect(self, kind, pred=None, timeout=5.0):
        """The first unconsumed line of ``kind`` matching ``pred`` as (dict, key order)."""
        def match(d):
            return d.get("kind") == kind and (pred is None or pred(d))

        for i, d in enumerate(self.backlog):
            if match(d):
                del self.backlog[i]
                return d, list(d)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"backend printed no {kind} line within {timeout} s; "
                            f"last lines: {self.raw[-10:]!r}")
            try:
                d = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if match(d):
                return d, list(d)
            self.backlog.append(d)

    def printed(self):
        """Every line printed so far, parsed (consumed by :meth:`expect` or not)."""
        with self._lock:
            return list(self._printed)

    def of_kind(self, kind):
        return [d for d in self.printed() if d.get("kind") == kind]

    def readings(self):
        return self.of_kind("reading")

    def last_stats(self):
        s = self.of_kind("stats")
        return s[-1] if s else None

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def command(self, gateway, cmd):
        line = json.dumps({"gateway": gateway, "command": cmd}) + "\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()

    def stop(self):
        """SIGTERM (SIGKILL after 5 s); waits for the exit and the last stdout line."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._t.join(5)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if not self._log.closed:
            self._log.close()


class _Timex(ctypes.Structure):
    # struct timex as far as `status`, then room for the rest (the kernel writes all of it).
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("rest", ctypes.c_byte * 256)]


def clock_synced():
    """The kernel's answer, as the gateway reads it: adjtimex returns a state other than
    TIME_ERROR (5) and STA_UNSYNC (0x40) is clear."""
    tx = _Timex()
    state = _LIBC.adjtimex(ctypes.byref(tx))
    return state >= 0 and state != 5 and not tx.status & 0x40


def reading_keys():
    """The keys a reading made now has (the clock fields while the clock is unsynced)."""
    return READING_KEYS if clock_synced() else READING_KEYS | UNSYNCED_KEYS


def check_reading(body, seq, source, values):
    """Asserts the exact reading envelope."""
    assert set(body) == reading_keys(), body
    if not clock_synced():
        assert body["clock"] == "unsynced" and isinstance(body["mono_ms"], int), body
    assert body["gateway"] == GW_ID
    assert body["seq"] == seq, body
    assert body["source"] == source, body
    assert TIME_RE.match(body["time"]), body["time"]
    assert body["values"] == values, body
    # Exact JSON types: 40 must stay an integer, 21.5 a float, true a bool.
    for k, v in values.items():
        assert type(body["values"][k]) is type(v), (k, body["values"][k], v)


# --------------------------------------------------------------------------- the spool on disk
# docs/design.md, "The on-disk spool": records and the state file.

MAGIC = b"\x5a\xd1"
HEADER = 26
OVERHEAD = 30


def read_segment(path):
    """Parses a well-formed segment file: a list of (offset, size, seq, payload)."""
    data = Path(path).read_bytes()
    out = []
    off = 0
    while off + HEADER <= len(data):
        assert data[off:off + 2] == MAGIC, f"{path}: no record at offset {off}"
        (length,) = struct.unpack_from("<I", data, off + 2)
        (seq,) = struct.unpack_from("<Q", data, off + 6)
        size = OVERHEAD + length
        out.append((off, size, seq, data[off + HEADER:off + HEADER + length]))
        off += size
    assert off == len(data), f"{path}: trailing bytes"
    return out


def segments(data_dir):
    return sorted((Path(data_dir) / "spool").glob("*.seg"))


def records_on_disk(data_dir):
    """Every record of every segment, or None while the gateway is changing the files (a
    segment deleted under us, an append in progress)."""
    try:
        return [r for p in segments(data_dir) for r in read_segment(p)]
    except (AssertionError, FileNotFoundError, struct.error):
        return None


def spool_state(data_dir):
    """The `state` file's numeric fields, at least {"floor": N, "acked": M}."""
    text = (Path(data_dir) / "spool" / "state").read_text()
    fields = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)\b", text) if k != "crc"}
    assert "floor" in fields and "acked" in fields, text
    return fields
