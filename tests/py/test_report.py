"""Report on change and honest timestamps end to end: known series through real ptys and a
simulated GPIO input to a pyzmq ROUTER peer; the clock fields as the kernel's clock status
says; both backends re-dating unsynced readings (fed by a pyzmq DEALER gateway)."""

import calendar
import json
import time
from pathlib import Path

import zmq

from conftest import (GW_ID, check_reading, clock_synced, free_tcp_port, make_config,
                      reading_keys, set_input)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def ms_of(rfc3339):
    """'2026-12-03T06:10:00.123Z' -> ms since the epoch."""
    return calendar.timegm(time.strptime(rfc3339[:19], "%Y-%m-%dT%H:%M:%S")) * 1000 \
        + int(rfc3339[20:23])


def start(tmp_path, gateways, peers, pty_factory, serial, inputs=()):
    peer = peers()
    sensors = {name: pty_factory(name) for name, _ in serial}
    ports = [(name, sensors[name].path, "kv", "\n", *lines) for name, lines in serial]
    gw = gateways(make_config(tmp_path, peer.endpoint, serial=ports, inputs=inputs,
                              outputs=(), stats_interval_s=1))
    for name in sensors:
        gw.wait_serial_open(name)
    peer.expect("hello")
    return gw, peer, sensors


def test_deadband_series_sends_exactly_the_changes(tmp_path, gateways, peers, pty_factory):
    on_change = ['report = "on_change"', "deadband = 0.5", "deadbands = { h = 2 }"]
    gw, peer, s = start(tmp_path, gateways, peers, pty_factory, [("weather", on_change)])
    series = [
        b"t=20.0 h=40",          # the first: sent
        b"t=20.3 h=41",          # within both deadbands
        b"t=20.5 h=42",          # exactly the deadbands: not more, not sent
        b"t=20.6 h=40",          # t moved 0.6 from the 20.0 sent: sent
        b"t=20.6 h=40",          # the same
        b"t=20.6 h=37.9",        # h moved 2.1: sent
        b"t=20.6 h=37.9 s=ok",   # a key more: sent
        b"t=20.6 h=37.9 s=ok",
        b"t=20.6 h=37.9 s=bad",  # a string differs: sent
    ]
    s["weather"].write(b"".join(line + b"\n" for line in series))
    expected = [{"t": 20.0, "h": 40}, {"t": 20.6, "h": 40}, {"t": 20.6, "h": 37.9},
                {"t": 20.6, "h": 37.9, "s": "ok"}, {"t": 20.6, "h": 37.9, "s": "bad"}]
    for seq, values in enumerate(expected, start=1):
        check_reading(peer.reading(), seq, "weather", values)
    peer.expect_none("reading", within=0.5)
    stats = peer.expect("stats", lambda b: b["counters"]["suppressed"].get("weather") == 4)
    assert stats["counters"]["suppressed"] == {"weather": 4}, stats
    gw.assert_alive()


def test_min_interval_holds_the_last_change_and_heartbeats_repeat_it(
        tmp_path, gateways, peers, pty_factory):
    """min_interval_ms = 1500: a burst sends its first line at once and its last when the
    interval ends, with the time it was read. max_interval_s = 3: a line that changed nothing
    goes out as a heartbeat 3 s after the last reading sent; a silent device sends none."""
    lines = ['report = "on_change"', "min_interval_ms = 1500", "max_interval_s = 3"]
    gw, peer, s = start(tmp_path, gateways, peers, pty_factory, [("press", lines)])
    sent_at = time.time()
    s["press"].write(b"p=1\np=2\np=3\n")
    first = peer.reading()
    check_reading(first, 1, "press", {"p": 1})
    held = peer.reading(timeout=5)
    got_held = time.time()
    check_reading(held, 2, "press", {"p": 3})
    assert "heartbeat" not in held
    # Sent when the interval ended, dated when it was read.
    assert got_held - sent_at >= 1.4, got_held - sent_at
    assert ms_of(held["time"]) - ms_of(first["time"]) < 500, (first, held)
    # The same value again: suppressed now, repeated as the heartbeat 3 s after p=3 went out.
    s["press"].write(b"p=3\n")
    repeat_at = time.time()
    peer.expect_none("reading", within=1.5)
    hb = peer.reading(timeout=5)
    got_hb = time.time()
    assert hb["seq"] == 3 and hb["values"] == {"p": 3} and hb["heartbeat"] is True, hb
    assert set(hb) == reading_keys() | {"heartbeat"}, hb
    assert got_hb - got_held >= 2.8, got_hb - got_held
    assert abs(ms_of(hb["time"]) / 1000 - repeat_at) < 1.0, (hb, repeat_at)
    # Nothing read since: no heartbeat (the silence shows).
    peer.expect_none("reading", within=4)
    # The next line is sent at once, as the heartbeat that is overdue (it changed nothing).
    s["press"].write(b"p=3\n")
    r = peer.reading()
    assert r["seq"] == 4 and r["values"] == {"p": 3} and r["heartbeat"] is True, r
    stats = peer.expect("stats", lambda b: b["counters"]["suppressed"].get("press") == 2)
    assert stats["counters"]["suppressed"] == {"press": 2}
    gw.assert_alive()


def test_gpio_edges_stay_edges_with_a_heartbeat(tmp_path, gateways, peers, pty_factory):
    extra = '\nreport = "on_change"\nmax_interval_s = 1\n'
    peer = peers()
    cfg = make_config(tmp_path, peer.endpoint, inputs=[("door", 17, "up")], outputs=(),
                      stats_interval_s=1)
    # The input's table is the last before [[serial]]-less end: append its report keys.
    gw = gateways(cfg.rstrip("\n") + extra)
    peer.expect("hello")
    # Heartbeats count from the start: any that come first say the level it has (1).
    set_input(tmp_path, 17, 0)
    edge = peer.expect("reading", lambda b: "heartbeat" not in b)
    assert edge["values"] == {"level": 0}, edge
    before = [b for k, b in peer.history if k == "reading" and b["seq"] < edge["seq"]]
    assert all(b["heartbeat"] is True and b["values"] == {"level": 1} for b in before), before
    hb = peer.reading(timeout=3)
    assert hb["seq"] == edge["seq"] + 1 and hb["values"] == {"level": 0}, hb
    assert hb["heartbeat"] is True and set(hb) == reading_keys() | {"heartbeat"}, hb
    set_input(tmp_path, 17, 1)
    r = peer.expect("reading", lambda b: "heartbeat" not in b, timeout=3)
    assert r["values"] == {"level": 1}, r
    gw.assert_alive()


def test_clock_fields_follow_the_kernel(tmp_path, gateways, peers, pty_factory):
    """hello and stats always carry clock, boot_id and mono_ms (CLOCK_BOOTTIME); readings
    carry them while the kernel says the clock is not synchronised (this machine's answer
    decides which branch is checked)."""
    synced = clock_synced()
    word = "synced" if synced else "unsynced"
    gw, peer, s = start(tmp_path, gateways, peers, pty_factory, [("weather", [])])
    hello = peer.hellos[-1]
    stats = peer.expect("stats")
    now_mono = time.clock_gettime(time.CLOCK_BOOTTIME) * 1000
    for m in (hello, stats):
        assert (m["clock"], m["boot_id"]) == (word, BOOT_ID), m
        # The same clock as ours, read when the message was made (within the last seconds).
        assert 0 <= now_mono - m["mono_ms"] < 10_000, (now_mono, m)
    assert hello["mono_ms"] <= stats["mono_ms"], (hello, stats)
    before = time.clock_gettime(time.CLOCK_BOOTTIME) * 1000
    s["weather"].line(b"t=1")
    r = peer.reading()
    after = time.clock_gettime(time.CLOCK_BOOTTIME) * 1000
    check_reading(r, 1, "weather", {"t": 1})
    if not synced:
        assert (r["clock"], r["boot_id"]) == ("unsynced", BOOT_ID), r
        assert before - 1 <= r["mono_ms"] <= after + 1, (before, r, after)
    gw.assert_alive()


def fake_gateway(endpoint):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, GW_ID.encode())
    sock.connect(endpoint)
    return sock


def send(sock, kind, body):
    sock.send_multipart([kind.encode(), json.dumps(body).encode()])


SPOOL = "0123456789abcdef0123456789abcdef"


def redating_series(sock):
    """The worked example of docs/protocol.md: a reading made 42 s after boot while the
    clock said 1970; the synced stats at boot + 600 s says 06:10:00."""
    base = {"gateway": GW_ID, "protocol": 1, "spool_id": SPOOL, "resume_seq": 1,
            "boot_id": "b1"}
    send(sock, "hello", {**base, "clock": "unsynced", "mono_ms": 40_000,
                         "time": "1970-01-01T00:00:40.000Z"})
    send(sock, "reading", {"gateway": GW_ID, "seq": 1, "source": "weather",
                           "time": "1970-01-01T00:00:42.000Z", "clock": "unsynced",
                           "mono_ms": 42_000, "boot_id": "b1", "values": {"t": 1}})
    send(sock, "stats", {"gateway": GW_ID, "time": "2026-12-03T06:10:00.000Z",
                         "clock": "synced", "boot_id": "b1", "mono_ms": 600_000,
                         "resume_seq": 1, "spool": {"spool_id": SPOOL}})
    send(sock, "reading", {"gateway": GW_ID, "seq": 2, "source": "weather",
                           "time": "1970-01-01T00:09:59.500Z", "clock": "unsynced",
                           "mono_ms": 599_500, "boot_id": "b1", "values": {"t": 2}})


def check_redated(be):
    r1, _ = be.expect("reading", lambda d: d["seq"] == 1)
    assert "time_corrected" not in r1, r1
    fix, _ = be.expect("time_corrected")
    assert fix == {"kind": "time_corrected", "gateway": GW_ID, "spool_id": SPOOL, "seq": 1,
                   "source": "weather", "time_corrected": "2026-12-03T06:00:42.000Z"}, fix
    r2, _ = be.expect("reading", lambda d: d["seq"] == 2)
    assert r2["time_corrected"] == "2026-12-03T06:09:59.500Z", r2


def test_reference_backend_redates_unsynced_readings(backends):
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    be = backends(endpoint)
    sock = fake_gateway(endpoint)
    try:
        redating_series(sock)
        check_redated(be)
    finally:
        sock.close(0)


def test_example_backend_redates_unsynced_readings(tmp_path):
    import test_example_backend as ex  # its ExampleBackend runs examples/backend.py
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    be = ex.ExampleBackend(tmp_path, ["--bind", endpoint])
    sock = None
    try:
        be.wait_log("listening bind=")
        sock = fake_gateway(endpoint)
        redating_series(sock)
        check_redated(be)
    finally:
        if sock is not None:
            sock.close(0)
        be.kill()
