"""Modbus RTU master end to end: zgate polls pymodbus's RTU server (an implementation nobody
here wrote) through a pty relay; a pyzmq ROUTER is the backend."""

import time

import pytest

from conftest import make_config, wait_until
from modbus_helpers import (ModbusServer, Relay, bus_toml, words_32, words_f32)

HR, IR, CO, DI = 3, 4, 1, 2

METER_REGS = [
    {"name": "u16", "kind": "input", "address": 0, "type": "u16"},
    {"name": "i16", "kind": "input", "address": 1, "type": "i16", "scale": 0.5, "offset": 1.0},
    {"name": "u32", "kind": "input", "address": 2, "type": "u32"},
    {"name": "i32", "kind": "input", "address": 4, "type": "i32", "word_order": "little"},
    {"name": "f32", "kind": "input", "address": 6, "type": "f32"},
    {"name": "volts", "kind": "holding", "address": 10, "type": "u16", "scale": 0.1},
    {"name": "temp", "kind": "holding", "address": 11, "type": "i16", "scale": 0.01,
     "offset": -40.0},
    {"name": "total", "kind": "holding", "address": 12, "type": "u32", "word_order": "little",
     "scale": 0.001},
    {"name": "setpoint", "kind": "holding", "address": 20, "type": "f32", "writable": True},
    {"name": "limit", "kind": "holding", "address": 22, "type": "i16", "scale": 0.1,
     "writable": True},
    {"name": "relay", "kind": "coil", "address": 3, "writable": True},
    {"name": "lamp", "kind": "coil", "address": 4},
    {"name": "door", "kind": "discrete", "address": 0},
]


def fill_meter(server, unit=1):
    server.set(unit, IR, 0, [65000, (-8) & 0xFFFF] + words_32(70000) + words_32(-5, little=True)
               + words_f32(-12.25))
    server.set(unit, HR, 10, [2301, 4500 & 0xFFFF] + words_32(123456, little=True))
    server.set(unit, HR, 20, words_f32(0.5) + [55])
    server.set(unit, CO, 3, [1, 0])
    server.set(unit, DI, 0, [1])


@pytest.fixture
def modbus_rig(tmp_path, gateways, peers, request):
    """Builds relay + server + gateway; ``make(devices, units, **bus)``."""
    made = []

    def make(devices, units, stats_interval_s=1, **bus):
        relay = Relay(tmp_path / "tty-bus1")
        server = ModbusServer(relay, units)
        made.append((server, relay))
        peer = peers()
        extra = bus_toml("bus1", tmp_path / "tty-bus1", devices, **bus)
        cfg = make_config(tmp_path, peer.endpoint, stats_interval_s=stats_interval_s,
                          inputs=(), outputs=(), extra=extra)
        gw = gateways(cfg)
        peer.expect("hello")
        return gw, peer, server, relay

    yield make
    for server, relay in made:
        server.stop()
        relay.close()


def test_every_type_with_scale_and_offset(modbus_rig):
    gw, peer, server, _ = modbus_rig([("meter1", 1, 200, METER_REGS)], [1])
    fill_meter(server)
    want = {
        "u16": 65000, "i16": -3.0, "u32": 70000, "i32": -5, "f32": -12.25,
        "volts": 230.1, "temp": 5.0, "total": 123.456, "setpoint": 0.5, "limit": 5.5,
        "relay": True, "lamp": False, "door": True,
    }
    # The first polls may predate fill_meter: wait for one with every value (a poll is 4
    # requests, so one may straddle the filling).
    r = peer.expect("reading", lambda b: b["source"] == "meter1" and b["values"] == want,
                    timeout=5)
    assert list(r["values"]) == [x["name"] for x in METER_REGS], "configuration order"
    later = peer.expect("reading", lambda b: b["source"] == "meter1" and b["seq"] > r["seq"])
    assert later["values"] == want, later
    stats = peer.expect("stats", lambda b: b["modbus"]["bus1"]["meter1"]["ok"] >= 2)
    m = stats["modbus"]["bus1"]["meter1"]
    assert set(m) == {"polls", "ok", "timeouts", "crc_errors", "exceptions"}
    assert m["timeouts"] == m["crc_errors"] == m["exceptions"] == 0, m
    gw.assert_alive()


def test_write_round_trip_and_set_while_polling(modbus_rig):
    gw, peer, server, _ = modbus_rig([("meter1", 1, 50, METER_REGS)], [1])
    fill_meter(server)
    peer.expect("reading", lambda b: b["values"]["door"] is True)
    # f32 holding (function 16), i16 with scale (06), coil (05), while polls go on at 20/s.
    for n, (target, value) in enumerate([("setpoint", 12.5), ("limit", -3.2), ("relay", 0),
                                         ("relay", True)]):
        cid = f"w-{n}"
        peer.command({"id": cid, "target": f"meter1.{target}", "action": "set", "value": value})
        assert peer.reply(cid) == {"id": cid, "ok": True}
        if target == "setpoint":
            assert server.get(1, HR, 20, 2) == words_f32(12.5)
        elif target == "limit":
            assert server.get(1, HR, 22, 1) == [(-32) & 0xFFFF]
        else:
            assert server.get(1, CO, 3, 1) == [bool(value)]
    # Read back by the next poll.
    peer.expect("reading", lambda b: b["values"]["setpoint"] == 12.5
                and b["values"]["limit"] == -3.2 and b["values"]["relay"] is True)
    # Refused without touching the bus: not writable, unknown register, out of range, device.
    for cid, cmd in [
        ("r-1", {"target": "meter1.volts", "action": "set", "value": 1}),
        ("r-2", {"target": "meter1.nope", "action": "set", "value": 1}),
        ("r-3", {"target": "meter1.limit", "action": "set", "value": 4000}),
        ("r-4", {"target": "meter1", "action": "set", "value": 1}),
        ("r-5", {"target": "meter1.setpoint", "action": "toggle"}),
    ]:
        peer.command({"id": cid, **cmd})
        r = peer.reply(cid)
        assert r["ok"] is False and r["error"], r
    assert server.get(1, HR, 22, 1) == [(-32) & 0xFFFF]
    gw.assert_alive()


def test_exception_response_named_in_log_and_counted(modbus_rig):
    regs = [{"name": "ok", "kind": "holding", "address": 0},
            {"name": "far", "kind": "holding", "address": 500}]  # beyond the server's table
    gw, peer, server, _ = modbus_rig([("meter1", 1, 100, regs)], [1])
    stats = peer.expect("stats", lambda b: b["modbus"]["bus1"]["meter1"]["exceptions"] >= 3)
    m = stats["modbus"]["bus1"]["meter1"]
    assert m["ok"] == 0 and m["polls"] >= m["exceptions"], m
    gw.wait_log("illegal data address", timeout=5, since_start=True)
    peer.expect_none("reading", lambda b: b["source"] == "meter1", within=0.5)


def test_write_exception_and_timeout_reply_false(modbus_rig):
    regs = [{"name": "x", "kind": "holding", "address": 0},
            {"name": "far", "kind": "holding", "address": 300, "writable": True}]
    ghost = [{"name": "g", "kind": "holding", "address": 0, "writable": True}]
    gw, peer, server, _ = modbus_rig([("meter1", 1, 200, regs[:1]),
                                      ("meter2", 1 + 1, 200, regs[1:]),
                                      ("ghost", 9, 1000, ghost)], [1, 2], timeout_ms=50)
    peer.command({"id": "e-1", "target": "meter2.far", "action": "set", "value": 3})
    r = peer.reply("e-1")
    assert r["ok"] is False and "illegal data address" in r["error"], r
    peer.command({"id": "e-2", "target": "ghost.g", "action": "set", "value": 3})
    r = peer.reply("e-2", timeout=5)
    assert r["ok"] is False and "no response" in r["error"], r
    gw.assert_alive()


def test_dead_unit_counts_timeouts_and_others_keep_their_period(modbus_rig):
    regs = [{"name": "v", "kind": "input", "address": 0}]
    gw, peer, server, _ = modbus_rig(
        [("meter1", 1, 250, regs), ("ghost", 9, 1000, regs)], [1], timeout_ms=100, retries=1)
    peer.expect("reading", lambda b: b["source"] == "meter1")
    t0 = time.monotonic()
    times = []
    while time.monotonic() - t0 < 6:
        r = peer.expect("reading", lambda b: b["source"] == "meter1", timeout=3)
        times.append(time.monotonic())
        assert r["source"] != "ghost"
    mean = (times[-1] - times[0]) / (len(times) - 1)
    assert abs(mean - 0.25) <= 0.025, f"meter1 period {mean:.3f} s beside a dead unit"
    stats = peer.expect("stats", lambda b: b["modbus"]["bus1"]["ghost"]["timeouts"] >= 5)
    g = stats["modbus"]["bus1"]["ghost"]
    assert g["ok"] == 0 and g["polls"] - g["timeouts"] <= 1, g
    assert not [b for k, b in peer.history if k == "reading" and b["source"] == "ghost"]
    gw.wait_log("no response from ghost", timeout=5, since_start=True)


def test_garbage_link_counts_crc_errors_without_panic(modbus_rig):
    regs = [{"name": "a", "kind": "holding", "address": 0, "type": "u32"},
            {"name": "b", "kind": "coil", "address": 0}]
    gw, peer, server, relay = modbus_rig([("meter1", 1, 30, regs)], [1], retries=0,
                                         timeout_ms=60)
    server.set(1, HR, 0, words_32(77))
    first = peer.expect("reading", lambda b: b["values"]["a"] == 77)
    relay.corrupt = 0.5
    relay.noise = 0.2
    stats = peer.expect("stats", lambda b: b["modbus"]["bus1"]["meter1"]["crc_errors"] >= 10,
                        timeout=15)
    assert relay.corrupted >= 10
    m = stats["modbus"]["bus1"]["meter1"]
    assert m["ok"] + m["crc_errors"] + m["timeouts"] + m["exceptions"] <= m["polls"], m
    # Every reading that did come through is right.
    for k, b in peer.history:
        if k == "reading" and b["seq"] >= first["seq"]:
            assert b["values"] == {"a": 77, "b": False}, b
    relay.corrupt = relay.noise = 0.0
    n = len([1 for k, b in peer.history if k == "reading"])
    peer.recv_until(lambda: len([1 for k, b in peer.history if k == "reading"]) > n + 5)
    gw.assert_alive()
    assert "panicked" not in gw.log(since_start=True)


def test_report_on_change_with_a_deadband(modbus_rig):
    """A device polled every 50 ms with report = "on_change": a value that stays within the
    deadband sends nothing (counted as suppressed), one that moves beyond it is sent once."""
    regs = [{"name": "volts", "kind": "holding", "address": 10, "type": "u16", "scale": 0.1}]
    gw, peer, server, _ = modbus_rig(
        [("meter1", 1, 50, regs, {"report": "on_change", "deadband": 0.5})], [1])
    server.set(1, HR, 10, [2300])
    first = peer.expect("reading", lambda b: b["source"] == "meter1"
                        and b["values"]["volts"] == 230.0, timeout=5)
    # Within the deadband (0.3 V): polled, not sent.
    server.set(1, HR, 10, [2303])
    stats = peer.expect("stats", lambda b: b["counters"]["suppressed"].get("meter1", 0) >= 10,
                        timeout=5)
    assert stats["modbus"]["bus1"]["meter1"]["ok"] >= 10
    # Beyond it (1.0 V from the value last sent): sent once.
    server.set(1, HR, 10, [2310])
    moved = peer.expect("reading", lambda b: b["source"] == "meter1"
                        and b["seq"] > first["seq"], timeout=5)
    assert moved["values"]["volts"] == 231.0, moved
    # The next stats interval: still that one reading since.
    later = peer.expect("stats", lambda b: b["modbus"]["bus1"]["meter1"]["ok"]
                        >= stats["modbus"]["bus1"]["meter1"]["ok"] + 10, timeout=5)
    sent = [r for r in peer.of_kind("reading")
            if r["source"] == "meter1" and r["seq"] >= first["seq"]]
    assert [r["values"]["volts"] for r in sent] == [230.0, 231.0], sent
    assert later["counters"]["suppressed"]["meter1"] >= 20
    gw.assert_alive()
