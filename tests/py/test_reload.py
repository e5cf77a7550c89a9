"""SIGHUP reloads the config file; SIGUSR1 logs the stats; SIGUSR2 and SIGALRM are ignored.
A pyzmq ROUTER plays the backend, a pty the sensor. Every wait is bounded."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import (
    GW_ID, ZGATE_BIN, make_config, read_pin, sensor_line, set_input, wait_until,
)

pytestmark = pytest.mark.skipif(not os.path.exists(ZGATE_BIN),
                                reason=f"zgate binary not built: {ZGATE_BIN}")


def config(tmp_path, endpoint, pty, **kw):
    """One kv sensor on `pty`, stats every second, input door on 17."""
    kw.setdefault("stats_interval_s", 1)
    kw.setdefault("inputs", (("door", 17, "up"),))
    kw.setdefault("outputs", ())
    return make_config(tmp_path, endpoint, serial=[("sensor", pty.path, "kv", None)],
                       outbox_max=10000, **kw)


def start(tmp_path, gateways, peers, pty_factory, **kw):
    peer = peers(handover=True, auto_ack=True, background=True)
    pty = pty_factory("sensor", nonblocking=True)
    gw = gateways(config(tmp_path, peer.endpoint, pty, **kw))
    gw.wait_serial_open("sensor", timeout=10)
    wait_until(lambda: peer.hellos, 10, "hello")
    return gw, peer, pty


def reload(gw, text, count):
    """Writes `text` as the config file, sends SIGHUP and waits for the reload's
    `count`-th outcome line (applied or failed); returns that line."""
    gw.config.write_text(text)
    gw.proc.send_signal(signal.SIGHUP)
    rx = re.compile(r"reload (applied|failed)[^\n]*")

    def done():
        gw.assert_alive()
        found = rx.findall(gw.log())
        return len(found) >= count and rx.finditer(gw.log())

    lines = [m.group(0) for m in wait_until(done, 10, "the reload's outcome in the log")]
    return lines[count - 1]


def sensor_readings(peer, source="sensor"):
    with peer.lock:
        return [(s, v) for s, v, raw in peer.arrivals if json.loads(raw)["source"] == source]


def settle(peer, timeout=20):
    """Waits until two stats agree on next_seq, everything is acked and the peer holds it
    all; returns that next_seq."""
    def done():
        with peer.lock:
            last2 = peer.stats[-2:]
        if len(last2) < 2:
            return None
        a, b = (x["spool"] for x in last2)
        nxt = b["next_seq"]
        if a["next_seq"] == nxt and a["acked"] == b["acked"] == nxt - 1 and peer.high >= nxt - 1:
            return nxt
        return None

    return wait_until(done, timeout, interval=0.1, what="delivery to settle")


def test_reload_under_feed_changes_port_and_adds_input_without_loss(
        tmp_path, gateways, peers, pty_factory, feeds):
    gw, peer, pty = start(tmp_path, gateways, peers, pty_factory)
    feed = feeds(pty, rate=100)
    feed.start()
    wait_until(lambda: len(sensor_readings(peer)) >= 50, 10, "readings before the reload")

    new = config(tmp_path, peer.endpoint, pty,
                 inputs=(("door", 17, "up"), ("window", 18, "up")))
    new = new.replace("baud = 9600", 'baud = 19200\ninput_line_ending = "lf"\n'
                                     "write_timeout_ms = 500")
    n_at_reload = feed.next
    line = reload(gw, new, 1)
    assert "serial_added=0 serial_removed=0 serial_changed=1" in line, line
    assert "inputs_added=1 inputs_removed=0 inputs_changed=0" in line, line
    assert line.endswith("refused=0"), line
    gw.wait_log("serial port baud rate set name=sensor baud=19200")

    # The new input is live: a change on it becomes a reading.
    set_input(tmp_path, 18, 0)
    wait_until(lambda: sensor_readings(peer, "window"), 5, "a reading from the new input")
    # The port kept reading through the reload.
    wait_until(lambda: any(v["n"] > n_at_reload + 100 for _, v in sensor_readings(peer)),
               10, "readings well after the reload")
    feed.stop()
    last = settle(peer)

    seqs = sorted(set(peer.seqs()))
    assert seqs == list(range(1, last)), "a seq is missing"
    with peer.lock:
        hellos = list(peer.hellos)
        acks = list(peer.acks_sent)
    assert len(hellos) == 1, f"the connection was made again: {hellos}"
    assert acks and max(acks) == last - 1
    # Not a line lost: the port was reconfigured in place, never closed.
    got = [v for _, v in sorted(sensor_readings(peer), key=lambda r: r[0])]
    assert got == [sensor_line(n)[1] for n in feed.written], (
        f"{len(got)} readings for {len(feed.written)} lines")
    assert "serial port lost" not in gw.log()
    s = peer.last_stats()
    assert s["counters"]["reconnects"] == 0 and s["counters"]["dropped"] == 0
    assert gw.term() == 0


def test_invalid_config_is_logged_and_the_old_one_kept(tmp_path, gateways, peers, pty_factory):
    gw, peer, pty = start(tmp_path, gateways, peers, pty_factory)
    good = gw.config.read_text()
    bad = good.replace('pull = "up"', 'pull = "up"\npinn = 3')
    line = reload(gw, bad, 1)
    # The same words as check-config: file, line and key.
    check = subprocess.run([ZGATE_BIN, "check-config", str(gw.config)], capture_output=True,
                           text=True, timeout=10)
    assert check.returncode == 2
    why = check.stderr.strip()
    assert f"{gw.config}:" in why and "key gpio.input.pinn" in why, why
    assert f"reload failed: invalid configuration: {why}" in line, line
    gw.wait_match(r"ERROR [^\]]*\] reload failed: invalid configuration: " + re.escape(why))
    # Still running the old configuration: readings flow, the input works.
    pty.line(b"t=1")
    wait_until(lambda: any(v == {"t": 1} for _, v in sensor_readings(peer)), 5, "a reading")
    set_input(tmp_path, 17, 0)
    wait_until(lambda: sensor_readings(peer, "door"), 5, "a door reading")
    assert "reload applied" not in gw.log()
    with peer.lock:
        assert len(peer.hellos) == 1
    # A valid file afterwards applies.
    line = reload(gw, good.replace("stats_interval_s = 1", "stats_interval_s = 2"), 2)
    assert "stats_interval_s=2(new)" in line, line
    assert gw.term() == 0


def test_restart_keys_are_refused_and_named(tmp_path, gateways, peers, pty_factory):
    gw, peer, pty = start(tmp_path, gateways, peers, pty_factory, stats_interval_s=30)
    other = peers(handover=True, auto_ack=True, background=True, gateway_id="gw-other")
    new = config(tmp_path, other.endpoint, pty, stats_interval_s=1, gateway_id="gw-other")
    line = reload(gw, new, 1)
    assert line.endswith("refused=2"), line
    log = gw.log()
    assert 'reload refused key=gateway.id running="gw-01" file="gw-other"' in log
    assert f'reload refused key=backend.endpoint running="{peer.endpoint}"' in log
    # The rest applied: stats now every second, to the same backend, under the same id.
    n = len(peer.of_kind("stats"))
    wait_until(lambda: len(peer.of_kind("stats")) >= n + 2, 5, "stats every second")
    pty.line(b"t=2")
    wait_until(lambda: any(v == {"t": 2} for _, v in sensor_readings(peer)), 5, "a reading")
    with peer.lock:
        assert all(json.loads(raw)["gateway"] == GW_ID for _, _, raw in peer.arrivals)
        assert len(peer.hellos) == 1
    assert not other.history, "nothing reached the refused endpoint"
    assert gw.term() == 0


def test_usr1_logs_stats_usr2_and_alrm_are_ignored(tmp_path, gateways, peers, pty_factory,
                                                   monkeypatch):
    monkeypatch.setenv("ZGATE_TEST_LOG", "debug")
    gw, peer, pty = start(tmp_path, gateways, peers, pty_factory)
    pty.line(b"t=3")
    wait_until(lambda: sensor_readings(peer), 5, "a reading")
    gw.proc.send_signal(signal.SIGUSR1)
    m = gw.wait_match(r"INFO.*signal received signal=SIGUSR1: stats (\{.*\})\n")
    stats = json.loads(m.group(1))
    assert stats["gateway"] == GW_ID
    assert stats["counters"]["readings"] >= 1
    assert "spool" in stats and "serial" in stats
    for sig in (signal.SIGUSR2, signal.SIGALRM):
        gw.proc.send_signal(sig)
        gw.wait_match(rf"DEBUG.*signal received signal={sig.name}: ignored")
    gw.assert_alive()
    pty.line(b"t=4")
    wait_until(lambda: any(v == {"t": 4} for _, v in sensor_readings(peer)), 5, "a reading")
    with peer.lock:
        assert len(peer.hellos) == 1
    assert gw.term() == 0


def test_reload_adds_removes_and_moves_serial_ports(tmp_path, gateways, peers, pty_factory):
    peer = peers(handover=True, auto_ack=True, background=True)
    sensor, meter = pty_factory("sensor"), pty_factory("meter")

    def cfg(ports):
        return make_config(tmp_path, peer.endpoint, serial=ports, stats_interval_s=1,
                           inputs=(), outputs=())

    gw = gateways(cfg([("sensor", sensor.path, "kv", None), ("meter", meter.path, "json", None)]))
    gw.wait_serial_open("sensor", timeout=10)
    gw.wait_serial_open("meter", timeout=10)
    meter.line(b'{"m": 1}')
    wait_until(lambda: sensor_readings(peer, "meter"), 5, "a meter reading")

    # sensor moves to another tty, meter goes, console comes.
    moved, console = pty_factory("sensor2"), pty_factory("console")
    line = reload(gw, cfg([("sensor", moved.path, "kv", None),
                           ("console", console.path, "raw", None)]), 1)
    assert "serial_added=1 serial_removed=1 serial_changed=1" in line, line
    gw.wait_log(f"serial port open name=sensor path={moved.path} ")
    gw.wait_serial_open("console")
    moved.line(b"t=5")
    console.line(b"hello console")
    wait_until(lambda: any(v == {"t": 5} for _, v in sensor_readings(peer)), 5, "moved sensor")
    wait_until(lambda: sensor_readings(peer, "console"), 5, "a console reading")
    assert sensor_readings(peer, "console")[0][1] == {"line": "hello console"}
    # The old sensor tty and the removed meter are not read any more.
    sensor.line(b"t=6")
    meter.line(b'{"m": 2}')
    moved.line(b"t=7")
    wait_until(lambda: any(v == {"t": 7} for _, v in sensor_readings(peer)), 5, "t=7")
    assert not any(v in ({"t": 6}, {"m": 2}) for _, v in sensor_readings(peer) +
                   sensor_readings(peer, "meter"))
    # A command to the removed port is answered as to an unknown target.
    peer.command({"id": "w-1", "target": "meter", "action": "write", "value": "x"})
    reply = wait_until(lambda: [b for b in peer.of_kind("reply") if b["id"] == "w-1"], 5,
                       "the reply")[0]
    assert reply["ok"] is False and "unknown target" in reply["error"], reply
    wait_until(lambda: set((peer.last_stats() or {}).get("serial", ())) == {"sensor", "console"},
               5, "stats listing the new ports")
    seqs = sorted(set(peer.seqs()))
    assert seqs == list(range(1, len(seqs) + 1))
    with peer.lock:
        assert len(peer.hellos) == 1
    assert gw.term() == 0


def test_reload_keeps_outputs_and_their_pulses(tmp_path, gateways, peers, pty_factory):
    peer = peers(handover=True, auto_ack=True, background=True)
    pty = pty_factory("sensor")
    outputs = (("relay1", 27, 0, 10000), ("relay2", 22, 0, 10000), ("lamp", 24, 0, 10000))
    text = config(tmp_path, peer.endpoint, pty, outputs=outputs)
    gw = gateways(text)
    wait_until(lambda: peer.hellos, 10, "hello")

    def command(cid, target, action, value=None):
        body = {"id": cid, "target": target, "action": action}
        if value is not None:
            body["value"] = value
        peer.command(body)
        return wait_until(lambda: [b for b in peer.of_kind("reply") if b["id"] == cid], 5,
                          f"reply {cid}")[0]

    assert command("c-1", "relay1", "set", 1)["ok"]
    pulsed_at = time.monotonic()  # the pulses start after this
    assert command("c-2", "relay2", "pulse", {"ms": 8000})["ok"]
    assert command("c-3", "lamp", "pulse", {"ms": 5000})["ok"]
    assert (read_pin(tmp_path, 27), read_pin(tmp_path, 22), read_pin(tmp_path, 24)) == \
        ("1\n", "1\n", "1\n")

    # relay2 goes (its pulse ends first), siren comes (initial 1), relay1 and lamp stay
    # (their initial 0 is not driven again; lamp's pulse runs on).
    new = config(tmp_path, peer.endpoint, pty,
                 outputs=(("siren", 23, 1, 10000), ("lamp", 24, 0, 10000),
                          ("relay1", 27, 0, 10000)))
    line = reload(gw, new, 1)
    assert "outputs_added=1 outputs_removed=1 outputs_changed=0" in line, line
    assert read_pin(tmp_path, 22) == "0\n", "the removed output's pulse ended"
    assert read_pin(tmp_path, 27) == "1\n", "a kept output keeps its level"
    assert read_pin(tmp_path, 23) == "1\n", "a new output gets its initial level"
    assert time.monotonic() - pulsed_at < 5, "too slow to see the pulse still running"
    assert read_pin(tmp_path, 24) == "1\n", "a kept output's pulse runs on"
    wait_until(lambda: read_pin(tmp_path, 24) == "0\n", 10, "the pulse to end after the reload")
    assert time.monotonic() - pulsed_at >= 5 - 0.02, "the pulse ended early"
    assert command("c-4", "siren", "set", 0)["ok"]
    assert read_pin(tmp_path, 23) == "0\n"
    assert not command("c-5", "relay2", "set", 1)["ok"]
    assert read_pin(tmp_path, 22) == "0\n"
    assert gw.term() == 0
