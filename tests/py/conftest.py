"""Fixtures and helpers for zgate's integration tests.

Everything here drives the real binary (``ZGATE_BIN``, default ``target/debug/zgate``):

- :class:`PtySensor`: a pseudo-terminal playing a serial sensor. The gateway's config points
  at a *symlink* in ``tmp_path``; :meth:`PtySensor.replug` closes the master (the gateway sees
  a hang-up) and puts a fresh pty behind the same symlink.
- :func:`make_config`: TOML text with tmp paths and the given endpoint.
- :class:`Gateway`: ``zgate run --config``; stderr goes to a file that is printed when a test
  fails; always killed in teardown.
- :class:`Peer`: an independent pyzmq ROUTER playing the backend.
- :class:`RefBackend`: ``zgate backend --bind``; stdout parsed line by line on a thread.

Waiting is always "poll until a deadline"; a fixed sleep is never a pass condition.
"""

import json
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import zmq

REPO = Path(__file__).resolve().parents[2]
ZGATE_BIN = os.environ.get("ZGATE_BIN", str(REPO / "target" / "debug" / "zgate"))

GW_ID = "gw-01"
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
READING_KEYS = {"gateway", "seq", "source", "time", "values"}


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def short_dir():
    """A short directory for ipc:// endpoints (sun_path is limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="zg", dir="/tmp")
    yield Path(d)
    for p in Path(d).iterdir():
        try:
            p.unlink()
        except OSError:
            pass
    try:
        os.rmdir(d)
    except OSError:
        pass


# --------------------------------------------------------------------------- serial sensor


class PtySensor:
    """A pty whose slave the gateway opens through the symlink ``self.path``."""

    def __init__(self, link: Path):
        self.path = link
        self.master = None
        self._open()

    def _open(self):
        master, slave = os.openpty()
        tty = os.ttyname(slave)
        # Only the gateway keeps the slave open: closing the master is then a real hang-up.
        os.close(slave)
        tmp = self.path.with_name(self.path.name + ".new")
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(tty, tmp)
        os.replace(tmp, self.path)
        self.master = master
        self.tty = tty

    def write(self, data: bytes):
        view = memoryview(data)
        while view:
            n = os.write(self.master, view)
            view = view[n:]

    def line(self, text):
        self.write((text if isinstance(text, bytes) else text.encode()) + b"\n")

    def read_available(self, want: int, timeout: float) -> bytes:
        """Reads from the master until ``want`` bytes arrived or the deadline passed."""
        out = b""
        deadline = time.monotonic() + timeout
        while len(out) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    out += os.read(self.master, 4096)
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

    def unplug(self):
        if self.master is not None:
            os.close(self.master)
            self.master = None

    def replug(self):
        self.unplug()
        self._open()

    def close(self):
        self.unplug()


@pytest.fixture
def pty_factory(tmp_path):
    made = []

    def make(name="weather"):
        s = PtySensor(tmp_path / f"tty-{name}")
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# --------------------------------------------------------------------------- config


def make_config(
    tmp_path,
    endpoint,
    serial=(),
    stats_interval_s=30,
    outbox_max=1000,
    shutdown_flush_ms=2000,
    inputs=(("door", 17, "up"),),
    outputs=(("relay1", 27, 0, 2000), ("relay2", 22, 1, 2000)),
):
    """TOML text. ``serial``: (name, path, format, line_ending) tuples."""
    sim = tmp_path / "sim"
    lines = [
        "[gateway]",
        f'id = "{GW_ID}"',
        f'data_dir = "{tmp_path / "data"}"',
        f"stats_interval_s = {stats_interval_s}",
        "",
        "[backend]",
        f'endpoint = "{endpoint}"',
        f"outbox_max = {outbox_max}",
        f"shutdown_flush_ms = {shutdown_flush_ms}",
        "",
        "[gpio]",
        'backend = "sim"',
        f'sim_dir = "{sim}"',
    ]
    for name, pin, pull in inputs:
        lines += ["", "[[gpio.input]]", f'name = "{name}"', f"pin = {pin}", f'pull = "{pull}"',
                  "debounce_ms = 0"]
    for name, pin, initial, max_pulse in outputs:
        lines += ["", "[[gpio.output]]", f'name = "{name}"', f"pin = {pin}",
                  f"initial = {initial}", f"max_pulse_ms = {max_pulse}"]
    for name, path, fmt, ending in serial:
        lines += ["", "[[serial]]", f'name = "{name}"', f'path = "{path}"', "baud = 9600",
                  f'format = "{fmt}"', f"line_ending = {json.dumps(ending)}"]
    return "\n".join(lines) + "\n"


def pin_file(tmp_path, pin):
    return tmp_path / "sim" / f"gpio{pin}"


def read_pin(tmp_path, pin):
    try:
        return pin_file(tmp_path, pin).read_text()
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- processes


class Gateway:
    def __init__(self, tmp_path, config_text, name="gw"):
        self.config = tmp_path / f"{name}.toml"
        self.config.write_text(config_text)
        self.log_path = tmp_path / f"{name}.stderr"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, RUST_LOG="info")
        self.proc = subprocess.Popen(
            [ZGATE_BIN, "run", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=env,
        )

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle, timeout=5, count=1):
        def found():
            self.assert_alive()
            return self.log().count(needle) >= count

        wait_until(found, timeout, f"{needle!r} (x{count}) in the gateway log")

    def wait_serial_open(self, name, timeout=5, count=1):
        self.wait_log(f"serial port open name={name} ", timeout, count)

    def alive(self):
        return self.proc.poll() is None

    def assert_alive(self):
        rc = self.proc.poll()
        assert rc is None, f"gateway exited with {rc}; log:\n{self.log()[-4000:]}"

    def terminate(self):
        self.proc.send_signal(signal.SIGTERM)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class Peer:
    """A pyzmq ROUTER backend. Every received message is kept in ``history``."""

    def __init__(self, endpoint="tcp://127.0.0.1:*", rcvhwm=None, ctx=None):
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if rcvhwm is not None:
            self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.history = []
        self.backlog = []

    def recv(self, timeout):
        """One message as (kind, body), or None after ``timeout`` seconds."""
        if not self.poller.poll(int(timeout * 1000)):
            return None
        frames = self.sock.recv_multipart()
        assert len(frames) == 3, f"expected [id, kind, JSON], got {frames!r}"
        assert frames[0] == GW_ID.encode(), frames
        kind = frames[1].decode()
        body = json.loads(frames[2])
        self.history.append((kind, body))
        return kind, body

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

    def reading(self, timeout=5.0):
        return self.expect("reading", timeout=timeout)

    def reply(self, cid, timeout=5.0):
        return self.expect("reply", lambda b: b.get("id") == cid, timeout)

    def send(self, kind, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.sock.send_multipart([GW_ID.encode(), kind.encode(), data])

    def send_frames(self, frames):
        self.sock.send_multipart([GW_ID.encode()] + list(frames))

    def command(self, cmd):
        self.send("command", cmd)

    def ack(self, seq):
        self.send("ack", {"seq": seq})

    def close(self):
        self.sock.close(0)


class RefBackend:
    """``zgate backend --bind EP``: stdout JSON lines into a queue, commands via stdin."""

    def __init__(self, tmp_path, endpoint, extra=(), name="backend"):
        self.log_path = tmp_path / f"{name}.stderr"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [ZGATE_BIN, "backend", "--bind", endpoint, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=dict(os.environ, RUST_LOG="info"),
        )
        self.lines = queue.Queue()
        self.raw = []
        self.backlog = []
        self._t = threading.Thread(target=self._reader, daemon=True)
        self._t.start()

    def _reader(self):
        for raw in self.proc.stdout:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            self.raw.append(text)
            try:
                self.lines.put(json.loads(text))  # dicts keep the printed key order
            except ValueError:
                self.lines.put({"kind": "<unparsable>", "line": text})

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

    def command(self, gateway, cmd):
        line = json.dumps({"gateway": gateway, "command": cmd}) + "\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


# --------------------------------------------------------------------------- fixtures


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def test_failed(request):
    return any(getattr(getattr(request.node, "rep_" + w, None), "failed", False)
               for w in ("setup", "call"))


@pytest.fixture
def gateways(request, tmp_path):
    """Factory: ``gateways(config_text)`` starts a gateway; all are killed in teardown, and
    their logs are printed when the test failed."""
    started = []

    def start(config_text, name=None):
        gw = Gateway(tmp_path, config_text, name or f"gw{len(started)}")
        started.append(gw)
        return gw

    yield start
    failed = test_failed(request)
    for gw in started:
        gw.kill()
        if failed:
            sys.stderr.write(f"\n----- {gw.log_path.name} -----\n{gw.log()[-6000:]}\n")


@pytest.fixture
def peers():
    made = []

    def make(*a, **kw):
        p = Peer(*a, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def backends(request, tmp_path):
    made = []

    def start(endpoint, extra=(), name=None):
        b = RefBackend(tmp_path, endpoint, extra, name or f"backend{len(made)}")
        made.append(b)
        return b

    yield start
    failed = test_failed(request)
    for b in made:
        b.kill()
        if failed:
            sys.stderr.write(f"\n----- backend stdout (last lines) -----\n"
                             + "\n".join(b.raw[-30:]) + "\n")


def check_reading(body, seq, source, values):
    """Asserts the exact reading envelope."""
    assert set(body) == READING_KEYS, body
    assert body["gateway"] == GW_ID
    assert body["seq"] == seq, body
    assert body["source"] == source, body
    assert TIME_RE.match(body["time"]), body["time"]
    assert body["values"] == values, body
    # Exact JSON types: 40 must stay an integer, 21.5 a float, true a bool.
    for k, v in values.items():
        assert type(body["values"][k]) is type(v), (k, body["values"][k], v)
