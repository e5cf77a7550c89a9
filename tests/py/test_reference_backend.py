"""The gateway against the reference backend (`zgate backend`): readings printed as JSON
lines, commands from stdin, replies printed, acks flowing, restart of the backend."""

import re

from conftest import (GW_ID, TIME_RE, clock_synced, free_tcp_port, make_config, read_pin,
                      wait_until)


def test_readings_commands_and_acks(tmp_path, gateways, backends, pty_factory):
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    be = backends(endpoint)
    sensor = pty_factory("weather")
    gw = gateways(make_config(tmp_path, endpoint, serial=[("weather", sensor.path, "kv", "\n")],
                              stats_interval_s=1))
    gw.wait_serial_open("weather")
    hello, keys = be.expect("hello", timeout=10)
    assert keys[0] == "kind"
    assert hello["gateway"] == GW_ID and hello["protocol"] == 1 and hello["resume_seq"] == 1
    # seqs 1 and 2: the outputs' start readings.
    for seq, name, level in ((1, "relay1", 0), (2, "relay2", 1)):
        r, _ = be.expect("reading")
        assert (r["seq"], r["source"], r["values"]) == (seq, name,
                                                        {"level": level, "cause": "start"})

    sensor.line(b"temperature=21.5 humidity=40,ok=true name=abc")
    r, keys = be.expect("reading")
    clock = [] if clock_synced() else ["clock", "mono_ms", "boot_id"]
    assert keys == ["kind", "gateway", "seq", "source", "time", *clock, "values"], keys
    assert r["seq"] == 3 and r["source"] == "weather" and r["gateway"] == GW_ID
    assert TIME_RE.match(r["time"])
    assert r["values"] == {"temperature": 21.5, "humidity": 40, "ok": True, "name": "abc"}
    assert type(r["values"]["humidity"]) is int and type(r["values"]["temperature"]) is float
    for i in range(2, 22):
        sensor.line(b"n=%d" % i)
    for i in range(2, 22):
        r, _ = be.expect("reading")
        assert (r["seq"], r["values"]) == (i + 2, {"n": i})

    be.command(GW_ID, {"id": "c-1", "target": "relay1", "action": "toggle"})
    reply, keys = be.expect("reply")
    assert reply == {"kind": "reply", "gateway": GW_ID, "id": "c-1", "ok": True}
    assert keys == ["kind", "gateway", "id", "ok"]
    assert read_pin(tmp_path, 27) == "1\n"
    # Without an id the backend makes one up, unique per run; the reply carries it.
    be.command(GW_ID, {"target": "relay1", "action": "set", "value": 0})
    reply, _ = be.expect("reply")
    assert re.fullmatch(r"b-[0-9a-f]{8}-1", reply.pop("id")), reply
    assert reply == {"kind": "reply", "gateway": GW_ID, "ok": True}
    assert read_pin(tmp_path, 27) == "0\n"
    be.command(GW_ID, {"id": "c-2", "target": "weather", "action": "write", "value": "GO"})
    reply, _ = be.expect("reply")
    assert reply["id"] == "c-2" and reply["ok"] is True
    assert sensor.read_available(3, 2) == b"GO\n"
    be.command(GW_ID, {"id": "c-3", "target": "relay1", "action": "set", "value": 2})
    reply, _ = be.expect("reply")
    assert reply["id"] == "c-3" and reply["ok"] is False and reply["error"]
    assert read_pin(tmp_path, 27) == "0\n"

    # A malformed stdin line is reported by the backend, and the gateway is unaffected.
    be.proc.stdin.write(b"not json\n")
    be.proc.stdin.flush()
    err, _ = be.expect("error")
    assert "not JSON" in err["error"]

    # The backend acks cumulatively: the gateway counts all 25 readings as acked (2 start,
    # 21 serial, 2 level changes by c-1 and the set to 0).
    stats, _ = be.expect("stats", lambda s: s["counters"]["acked"] == 25, timeout=5)
    assert stats["counters"]["readings"] == 25
    assert stats["counters"]["commands_ok"] == 3
    assert stats["counters"]["commands_failed"] == 1
    assert stats["resume_seq"] == 26
    gw.assert_alive()


def test_backend_restart(tmp_path, gateways, backends, pty_factory):
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    be = backends(endpoint)
    sensor = pty_factory("weather")
    gw = gateways(make_config(tmp_path, endpoint, serial=[("weather", sensor.path, "kv", "\n")],
                              stats_interval_s=1, outputs=()))
    gw.wait_serial_open("weather")
    be.expect("hello", timeout=10)
    sensor.line(b"a=1")
    assert be.expect("reading")[0]["seq"] == 1
    be.expect("stats", lambda s: s["counters"]["acked"] == 1)

    be.kill()
    gw.wait_log("backend disconnected", timeout=5)
    sensor.line(b"a=2")
    be2 = backends(endpoint)
    hello, _ = be2.expect("hello", timeout=10)
    assert hello["resume_seq"] == 2
    r, _ = be2.expect("reading")
    assert (r["seq"], r["values"]) == (2, {"a": 2})
    sensor.line(b"a=3")
    r, _ = be2.expect("reading")
    assert (r["seq"], r["values"]) == (3, {"a": 3})
    stats, _ = be2.expect("stats", lambda s: s["counters"]["acked"] == 3, timeout=5)
    assert stats["counters"]["reconnects"] == 1
    wait_until(lambda: gw.log().count("backend connected") == 2, 2, "second connect logged")
    gw.assert_alive()
