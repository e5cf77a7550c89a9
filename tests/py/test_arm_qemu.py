"""The cross-built ARM binaries, run under qemu-user against the host.

The host side is real: a pseudo-terminal sensor, simulated GPIO files, and a pyzmq ROUTER
backend on loopback TCP. The gateway under test is the aarch64 (and armv7) release build from
`cross/build`, started through `cross/run-qemu` (qemu-user with Debian's ARM libzmq5).

Run by `make test-arm` (part of `make test`), which builds the binaries first and sets
ZGATE_QEMU_ARCHES. Without that variable these tests are skipped (plain `pytest tests/py`).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
ARCHES = os.environ.get("ZGATE_QEMU_ARCHES", "").split()

pytestmark = pytest.mark.skipif(
    not ARCHES, reason="set ZGATE_QEMU_ARCHES (make test-arm builds and sets it)"
)




def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Peer:
    """A pyzmq ROUTER backend: records every message, acks readings."""

    def __init__(self, port):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.messages = []

    def pump(self, timeout_ms=20):
        if self.sock.poll(timeout_ms, zmq.POLLIN):
            while True:
                try:
                    ident, kind, body = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = json.loads(body)
                self.messages.append((ident, kind.decode(), msg))
                if kind == b"reading":
                    self.sock.send_multipart(
                        [ident, b"ack", json.dumps({"seq": msg["seq"]}).encode()]
                    )

    def expect(self, kind, pred=lambda m: True, timeout=30):
        def find():
            self.pump()
            for _, k, m in self.messages:
                if k == kind and pred(m):
                    return m
            return None

        return wait_for(find, timeout, f"a {kind} message")

    def send(self, ident, kind, body):
        self.sock.send_multipart([ident, kind.encode(), json.dumps(body).encode()])

    def close(self):
        self.sock.close()
        self.ctx.term()


@pytest.fixture(params=ARCHES)
def arch(request):
    binary = ROOT / "target" / {
        "aarch64": "aarch64-unknown-linux-gnu",
        "armv7": "armv7-unknown-linux-gnueabihf",
    }[request.param] / "release" / "zgate"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: run `cross/build {request.param}` (make test-arm does)")
    return request.param


def write_config(tmp_path, port, tty):
    cfg = tmp_path / "zgate.toml"
    cfg.write_text(
        f"""
[gateway]
id = "gw-arm"
data_dir = "{tmp_path}/data"
stats_interval_s = 60

[backend]
endpoint = "tcp://127.0.0.1:{port}"
shutdown_flush_ms = 500

[gpio]
backend = "sim"
sim_dir = "{tmp_path}/gpio"

[[gpio.input]]
name = "door"
pin = 17
pull = "up"

[[gpio.output]]
name = "relay1"
pin = 27

[[serial]]
name = "weather"
path = "{tty}"
baud = 9600
"""
    )
    return cfg


def test_arm_binary_reads_commands_and_stops_cleanly(arch, tmp_path):
    port = free_port()
    peer = Peer(port)
    master, slave = os.openpty()
    tty = os.ttyname(slave)
    cfg = write_config(tmp_path, port, tty)
    log = open(tmp_path / "gateway.log", "wb")
    proc = subprocess.Popen(
        [str(ROOT / "cross" / "run-qemu"), arch, "--", "run", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RUST_LOG": "info"},
    )
    try:
        hello = peer.expect("hello", timeout=60)
        assert hello["gateway"] == "gw-arm"
        assert hello["serial"] == ["weather"]
        # Wait until the gateway has the tty open, then send a sensor line.
        wait_for(lambda: b"serial port open" in (tmp_path / "gateway.log").read_bytes(), 30,
                 "the serial port to open")
        os.write(master, b"temperature=21.5 humidity=40,ok=true\n")
        reading = peer.expect("reading", lambda m: m["source"] == "weather")
        assert reading["values"] == {"temperature": 21.5, "humidity": 40, "ok": True}
        assert reading["seq"] == 1

        # A GPIO edge through the sim file (inotify under qemu).
        tmp = tmp_path / "gpio" / ".door.tmp"
        tmp.write_text("0\n")
        os.rename(tmp, tmp_path / "gpio" / "gpio17")
        edge = peer.expect("reading", lambda m: m["source"] == "door")
        assert edge["values"] == {"level": 0}

        ident = peer.messages[0][0]
        assert ident == b"gw-arm"
        peer.send(ident, "command", {"id": "c-1", "target": "relay1", "action": "set", "value": 1})
        reply = peer.expect("reply", lambda m: m["id"] == "c-1")
        assert reply == {"id": "c-1", "ok": True}
        assert (tmp_path / "gpio" / "gpio27").read_text() == "1\n"

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        took = time.monotonic() - t0
        assert rc == 0, (tmp_path / "gateway.log").read_text()
        assert took < 0.5 + 1.0, f"exit took {took:.2f}s (shutdown_flush_ms 500 + 1 s)"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        os.close(master)
        os.close(slave)
        peer.close()
        sys.stderr.write((tmp_path / "gateway.log").read_text()[-2000:])


def test_arm_binary_talks_to_systemd_watchdog(arch, tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port, "/nonexistent/tty")
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "deploy" / "check-watchdog"),
            "--watchdog-sec", "2",
            "--timeout", "60",
            "--",
            str(ROOT / "cross" / "run-qemu"), arch, "--", "run", "--config", str(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout, r.stdout
