"""Helpers for the reliability tests (tests/py/test_reliability.py).

- Pty / Sensor: a pseudo-terminal whose slave path is the gateway's serial port; the test
  keeps the master open across gateway restarts and a thread writes `n=<i> ...` lines to it.
- write_config: a gateway config with data_dir and sim_dir inside the test's tmp dir.
- GatewayProc: runs `zgate run`, stderr to a log file (one per test, appended across restarts).
- RefBackend: runs `zgate backend`, reads its stdout JSON lines in a thread.
- Peer: an independent pyzmq ROUTER peer that records every reading received (duplicates
  included) and acks the highest contiguous seq (or not at all).
- read_segment / spool_state: a small reader of the spool's on-disk format (docs/design.md).
"""

import errno
import json
import os
import re
import signal
import struct
import subprocess
import threading
import time
import tty
from pathlib import Path

import zmq

from conftest import free_port, wait_until  # noqa: F401 (re-exported to the tests)

ZGATE_BIN = os.environ.get("ZGATE_BIN") or str(
    Path(__file__).resolve().parents[2] / "target" / "debug" / "zgate"
)
GATEWAY_ID = "gw-rel"


# ---------------------------------------------------------------------------------------------
# Sensor on a pty


class Pty:
    """A pty pair. The slave is closed at once (the gateway opens it by path); the master stays
    open for the whole test, so the path stays valid across gateway restarts."""

    def __init__(self):
        self.master, slave = os.openpty()
        self.path = os.ttyname(slave)
        # termios set on the master apply to the slave side: raw, no echo, until the gateway
        # sets its own.
        tty.setraw(slave)
        os.close(slave)
        os.set_blocking(self.master, False)

    def write_line(self, text, stop=None):
        """Writes one line. False when nothing could be written (tty buffer full: nobody is
        reading). A partial write is completed (never leave a mangled line behind)."""
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
                    n += len(data)  # give up at the end of the test
                time.sleep(0.001)
        return True

    def drain(self):
        """Discards anything the slave side wrote (echo, command writes)."""
        try:
            while os.read(self.master, 4096):
                pass
        except OSError:
            pass

    def close(self):
        os.close(self.master)


def sensor_line(i):
    """The line with counter i, and the `values` the gateway must make of it (kv format)."""
    line = f"n={i} temp={20 + i % 7}.5 ok={'true' if i % 2 else 'false'}"
    values = {"n": i, "temp": 20 + i % 7 + 0.5, "ok": bool(i % 2)}
    return line, values


class Sensor:
    """Writes sensor_line(1), sensor_line(2), ... at a steady rate in a thread. `written`
    holds the counters of the lines that reached the tty (complete)."""

    def __init__(self, pty, rate=200.0, start=1):
        self.pty = pty
        self.rate = rate
        self.next = start
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
            line, _ = sensor_line(self.next)
            if self.pty.write_line(line, self._stop):
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
        """Synchronous: writes `count` lines now (no thread), returns their counters."""
        out = []
        for _ in range(count):
            line, _ = sensor_line(self.next)
            assert self.pty.write_line(line), "tty buffer full"
            out.append(self.next)
            self.written.append(self.next)
            self.next += 1
        return out


# ---------------------------------------------------------------------------------------------
# Config and processes


def write_config(tmp_path, endpoint, serial_path, spool=None, stats_interval_s=1,
                 outbox_max=10000, shutdown_flush_ms=1000, name="zgate.toml"):
    tmp_path = Path(tmp_path)
    data_dir = tmp_path / "data"
    sim_dir = tmp_path / "sim"
    sim_dir.mkdir(exist_ok=True)
    spool_lines = []
    for k, v in (spool or {}).items():
        spool_lines.append(f"{k} = {json.dumps(v)}")
    text = f"""
[gateway]
id = "{GATEWAY_ID}"
data_dir = "{data_dir}"
stats_interval_s = {stats_interval_s}

[backend]
endpoint = "{endpoint}"
outbox_max = {outbox_max}
shutdown_flush_ms = {shutdown_flush_ms}

[gpio]
backend = "sim"
sim_dir = "{sim_dir}"

[spool]
{chr(10).join(spool_lines)}

[[serial]]
name = "sensor"
path = "{serial_path}"
baud = 115200
format = "kv"
"""
    path = tmp_path / name
    path.write_text(text)
    return path


class GatewayProc:
    """`zgate run --config CFG`; stderr of every start goes to one log file."""

    def __init__(self, config, log_path):
        self.config = str(config)
        self.log_path = Path(log_path)
        self.proc = None
        self.starts = 0
        self._log_offset = 0

    def start(self):
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.log_path, "ab")
        self._log_offset = log.tell()
        env = dict(os.environ, RUST_LOG=os.environ.get("ZGATE_TEST_LOG", "info"))
        self.proc = subprocess.Popen(
            [ZGATE_BIN, "run", "--config", self.config],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
        )
        log.close()
        self.starts += 1
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self, whole=False):
        data = self.log_path.read_bytes()
        if not whole:
            data = data[self._log_offset:]
        return data.decode(errors="replace")

    def wait_log(self, pattern, timeout=10):
        rx = re.compile(pattern)

        def found():
            if not self.alive():
                raise AssertionError(f"gateway exited early rc={self.proc.returncode}:\n"
                                     + self.log()[-3000:])
            return rx.search(self.log())

        return wait_until(found, timeout, what=f"gateway log /{pattern}/")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def term(self, timeout=10):
        """SIGTERM; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cleanup(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait(5)


class RefBackend:
    """`zgate backend --bind EP`; every stdout JSON line is collected in `lines`."""

    def __init__(self, endpoint, ack=True, log_path=None):
        args = [ZGATE_BIN, "backend", "--bind", endpoint]
        if not ack:
            args.append("--no-ack")
        err = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=err)
        if log_path:
            err.close()
        self.lines = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for raw in self.proc.stdout:
            try:
                v = json.loads(raw)
            except ValueError:
                v = {"kind": "unparsable", "raw": raw.decode(errors="replace")}
            with self._lock:
                self.lines.append(v)

    def of_kind(self, kind):
        with self._lock:
            return [m for m in self.lines if m.get("kind") == kind]

    def readings(self):
        return self.of_kind("reading")

    def last_stats(self):
        s = self.of_kind("stats")
        return s[-1] if s else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._thread.join(5)


class Peer:
    """An independent backend: a pyzmq ROUTER in a thread. Records every message; `arrivals`
    lists every reading received, duplicates included, as (seq, values, raw body bytes).
    When `ack` is set it acks the highest contiguous seq after each batch, and honours
    `resume_seq` (hello/stats) like the reference backend."""

    def __init__(self, endpoint=None, ack=True):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        if endpoint is None:
            self.sock.bind("tcp://127.0.0.1:*")
            endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.sock.bind(endpoint)
        self.endpoint = endpoint
        self.ack = ack
        self.lock = threading.Lock()
        self.arrivals = []        # (seq, values, body bytes), every reading received
        self.arrival_times = []   # monotonic time of each arrival
        self.hellos = []
        self.stats = []
        self.acks_sent = []
        self.high = 0             # highest contiguous seq held (or skipped via resume_seq)
        self._ahead = set()
        self._ack_now = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _advance(self):
        while self.high + 1 in self._ahead:
            self._ahead.discard(self.high + 1)
            self.high += 1

    def _run(self):
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        ident = None
        while not self._stop.is_set():
            events = dict(poller.poll(20))
            got_reading = False
            while self.sock in events:
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 3:
                    continue
                ident, kind, body = frames
                msg = json.loads(body)
                now = time.monotonic()
                with self.lock:
                    if kind in (b"hello", b"stats"):
                        (self.hellos if kind == b"hello" else self.stats).append(msg)
                        resume = msg.get("resume_seq")
                        if resume and resume - 1 > self.high:
                            self.high = resume - 1
                            self._ahead = {s for s in self._ahead if s > self.high}
                            self._advance()
                    elif kind == b"reading":
                        seq = msg["seq"]
                        self.arrivals.append((seq, msg["values"], body))
                        self.arrival_times.append(now)
                        if seq > self.high:
                            self._ahead.add(seq)
                            self._advance()
                        got_reading = True
            if ident is not None and self.ack and (got_reading or self._ack_now.is_set()):
                self._ack_now.clear()
                with self.lock:
                    high = self.high
                try:
                    self.sock.send_multipart([ident, b"ack", json.dumps({"seq": high}).encode()],
                                             zmq.NOBLOCK)
                    with self.lock:
                        self.acks_sent.append(high)
                except zmq.ZMQError:
                    pass

    def set_ack(self, on):
        self.ack = on
        if on:
            self._ack_now.set()

    def seqs(self):
        with self.lock:
            return [a[0] for a in self.arrivals]

    def last_stats(self):
        with self.lock:
            return self.stats[-1] if self.stats else None

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)


# ---------------------------------------------------------------------------------------------
# The spool's on-disk format (docs/design.md, "Record format")

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
    """The `state` file's fields: {"floor": N, "acked": M}."""
    text = (Path(data_dir) / "spool" / "state").read_text()
    m = re.search(r"floor=(\d+) acked=(\d+)", text)
    assert m, text
    return {"floor": int(m.group(1)), "acked": int(m.group(2))}
