"""The cross-built ARM binaries, run under qemu-user against the host.

The host side is real: a pseudo-terminal sensor, simulated GPIO files, and a pyzmq ROUTER
backend on loopback TCP. The gateway under test is the aarch64 (and armv7) release build from
`cross/build`, started through `cross/run-qemu` (qemu-user with Debian's ARM libzmq5).

Run by `make test-arm` (part of `make test`), which builds the binaries first and sets
ZGATE_QEMU_ARCHES. Without that variable these tests are skipped (plain `pytest tests/py`).
"""

import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_port, make_config, read_pin, set_input

ARCHES = os.environ.get("ZGATE_QEMU_ARCHES", "").split()
GW_ARM = "gw-arm"

pytestmark = pytest.mark.skipif(
    not ARCHES, reason="set ZGATE_QEMU_ARCHES (make test-arm builds and sets it)"
)


@pytest.fixture(params=ARCHES)
def arch(request):
    binary = REPO / "target" / {
        "aarch64": "aarch64-unknown-linux-gnu",
        "armv7": "armv7-unknown-linux-gnueabihf",
    }[request.param] / "release" / "zgate"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: run `cross/build {request.param}` (make test-arm does)")
    return request.param


def config(tmp_path, endpoint, tty):
    return make_config(tmp_path, endpoint, serial=[("weather", tty, "kv", None)],
                       stats_interval_s=60, outbox_max=None, shutdown_flush_ms=500,
                       outputs=(("relay1", 27, None, None),), gateway_id=GW_ARM)


def qemu(arch):
    return [str(REPO / "cross" / "run-qemu"), arch, "--"]


def test_arm_binary_reads_commands_and_stops_cleanly(arch, tmp_path, gateways, peers,
                                                     pty_factory):
    peer = peers(gateway_id=GW_ARM, auto_ack=True)
    sensor = pty_factory("weather")
    gw = gateways(config(tmp_path, peer.endpoint, sensor.path), exe=qemu(arch))
    hello = peer.expect("hello", timeout=60)
    assert hello["gateway"] == "gw-arm"
    assert hello["serial"] == ["weather"]
    # Wait until the gateway has the tty open, then send a sensor line.
    gw.wait_log("serial port open", timeout=30)
    sensor.line(b"temperature=21.5 humidity=40,ok=true")
    reading = peer.expect("reading", lambda m: m["source"] == "weather", timeout=30)
    assert reading["values"] == {"temperature": 21.5, "humidity": 40, "ok": True}
    assert reading["seq"] == 2, "seq 1 is relay1's start reading"
    start = peer.expect("reading", lambda m: m["source"] == "relay1", timeout=30)
    assert (start["seq"], start["values"]) == (1, {"level": 0, "cause": "start"})

    # A GPIO edge through the sim file (inotify under qemu).
    set_input(tmp_path, 17, 0)
    edge = peer.expect("reading", lambda m: m["source"] == "door", timeout=30)
    assert edge["values"] == {"level": 0}

    ident = peer.senders[0]
    assert ident == b"gw-arm"
    peer.command({"id": "c-1", "target": "relay1", "action": "set", "value": 1})
    reply = peer.expect("reply", lambda m: m["id"] == "c-1", timeout=30)
    assert reply == {"id": "c-1", "ok": True}
    assert read_pin(tmp_path, 27) == "1\n"

    t0 = time.monotonic()
    rc = gw.term(timeout=10)
    took = time.monotonic() - t0
    assert rc == 0, gw.log()
    assert took < 0.5 + 1.0, f"exit took {took:.2f}s (shutdown_flush_ms 500 + 1 s)"


def test_arm_binary_talks_to_systemd_watchdog(arch, tmp_path):
    cfg = tmp_path / "zgate.toml"
    cfg.write_text(config(tmp_path, f"tcp://127.0.0.1:{free_port()}", "/nonexistent/tty"))
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "deploy" / "check-watchdog"),
            "--watchdog-sec", "2",
            "--timeout", "60",
            "--",
            *qemu(arch), "run", "--config", str(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout, r.stdout
