"""Readings end to end against a pyzmq ROUTER peer: envelope, order, types, bad lines."""

from conftest import GW_ID, check_reading, make_config, wait_until


def start(tmp_path, gateways, peers, pty_factory, start_levels=(0, 1), **cfg):
    """The gateway and its peer after the hello and the outputs' start readings (one per
    output, seqs 1.., with ``start_levels``): the next reading's seq is
    ``len(start_levels) + 1``."""
    peer = peers()
    sensors = {
        "weather": pty_factory("weather"),
        "meter": pty_factory("meter"),
        "console": pty_factory("console"),
    }
    fmts = {"weather": "kv", "meter": "json", "console": "raw"}
    serial = [(n, s.path, fmts[n], "\n") for n, s in sensors.items()]
    gw = gateways(make_config(tmp_path, peer.endpoint, serial=serial, **cfg))
    for n in sensors:
        gw.wait_serial_open(n)
    hello = peer.expect("hello")
    outputs = [o[0] for o in cfg.get("outputs", (("relay1",), ("relay2",)))]
    for seq, (name, level) in enumerate(zip(outputs, start_levels, strict=True), start=1):
        check_reading(peer.reading(), seq, name, {"level": level, "cause": "start"})
    return gw, peer, sensors, hello


def test_hello_then_readings_in_order_with_exact_envelope(tmp_path, gateways, peers, pty_factory):
    gw, peer, s, hello = start(tmp_path, gateways, peers, pty_factory)
    assert hello["gateway"] == GW_ID
    assert hello["protocol"] == 1
    assert hello["inputs"] == ["door"]
    assert hello["outputs"] == ["relay1", "relay2"]
    assert hello["serial"] == ["weather", "meter", "console"]
    assert hello["resume_seq"] == 1
    assert peer.history[0][0] == "hello", "hello is the first message"

    expected = [
        ("weather", b"temperature=21.5 humidity=40,ok=true name=abc",
         {"temperature": 21.5, "humidity": 40, "ok": True, "name": "abc"}),
        ("meter", b'{"kwh": 12.25, "phase": [1, 2, 3], "id": "m-7", "on": false, "x": null}',
         {"kwh": 12.25, "phase": [1, 2, 3], "id": "m-7", "on": False, "x": None}),
        ("console", b"  hello, world = 1  ", {"line": "  hello, world = 1  "}),
        ("weather", b"t=-3 flag=false s=1.0e3 v=nan\r", {"t": -3, "flag": False, "s": 1000.0,
                                                           "v": "nan"}),
        ("console", "température 21°C".encode(), {"line": "température 21°C"}),
        ("meter", b'{"nested": {"a": {"b": 1}}}', {"nested": {"a": {"b": 1}}}),
    ]
    # One at a time: seq order across ports is then the order of the writes (after the two
    # start readings).
    for i, (port, line, values) in enumerate(expected, start=3):
        s[port].line(line)
        check_reading(peer.reading(), i, port, values)

    # A burst on one port keeps its order and consecutive seqs.
    s["weather"].write(b"".join(b"n=%d\n" % i for i in range(200)))
    for i in range(200):
        check_reading(peer.reading(), len(expected) + 3 + i, "weather", {"n": i})
    gw.assert_alive()


def test_bad_lines_are_counted_and_consume_no_seq(tmp_path, gateways, peers, pty_factory):
    gw, peer, s, _ = start(tmp_path, gateways, peers, pty_factory, stats_interval_s=1,
                           outputs=(), start_levels=())
    s["weather"].line(b"a=1")
    check_reading(peer.reading(), 1, "weather", {"a": 1})

    bad_kv = [b"a=1 b", b"=5", b"x=1 x=2", b"\xff\xfe=1", b"k=" + b"v" * 5000]
    for line in bad_kv:
        s["weather"].line(line)
    bad_json = [b"{oops", b"[1, 2]", b'"text"', b"\xc3\x28", b'{"a": "' + b"x" * 5000 + b'"}']
    for line in bad_json:
        s["meter"].line(line)
    bad_raw = [b"\xff\xfe\xfd", b"r" * 5000]
    for line in bad_raw:
        s["console"].line(line)

    s["weather"].line(b"a=2")
    check_reading(peer.reading(), 2, "weather", {"a": 2})
    s["meter"].line(b'{"a": 3}')
    check_reading(peer.reading(), 3, "meter", {"a": 3})
    s["console"].line(b"ok")
    check_reading(peer.reading(), 4, "console", {"line": "ok"})
    # A line of exactly 4096 bytes is still accepted; blank lines are skipped silently.
    s["console"].write(b"\n\r\n" + b"L" * 4096 + b"\n")
    check_reading(peer.reading(), 5, "console", {"line": "L" * 4096})
    gw.assert_alive()

    want = {"weather": len(bad_kv), "meter": len(bad_json), "console": len(bad_raw)}
    stats = peer.expect("stats", lambda b: b["counters"]["readings"] == 5, timeout=5)
    assert stats["counters"]["bad_lines"] == want, stats
    assert stats["serial"]["weather"]["overlong_lines"] == 1
    assert stats["serial"]["meter"]["overlong_lines"] == 1
    assert stats["serial"]["console"]["overlong_lines"] == 1
    for port in want:
        assert stats["serial"][port]["bad_lines"] == want[port]
        assert stats["serial"][port]["connected"] is True
        assert stats["serial"][port]["disconnects"] == 0
    assert stats["gateway"] == GW_ID
    assert stats["outbox_max"] == 1000
    peer.expect_none("reading", within=0.3)


def test_input_edges_become_readings(tmp_path, gateways, peers, pty_factory):
    gw, peer, s, _ = start(tmp_path, gateways, peers, pty_factory, outputs=(),
                           start_levels=())
    sim = tmp_path / "sim"
    assert wait_until(lambda: (sim / "gpio17").exists(), 2, "gpio17")
    assert (sim / "gpio17").read_text() == "1\n", "pull-up input starts at 1"
    for n, level in enumerate([0, 1, 0], start=1):
        tmp = sim / ".door.tmp"
        tmp.write_text(f"{level}\n")
        tmp.rename(sim / "gpio17")
        check_reading(peer.reading(), n, "door", {"level": level})
    gw.assert_alive()


def test_levels_at_start_are_read_not_assumed(tmp_path, gateways, peers, pty_factory):
    """A pull-up door contact already closed (0) at start keeps its 0, so its first opening is
    a reading; an output with initial = "keep" is not written at start, and its start reading
    has the level it was left at."""
    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "gpio17").write_text("0\n")
    (sim / "gpio27").write_text("1")  # no newline: any write at start would show
    outputs = [("relay1", 27, "keep", 1000)]
    gw, peer, s, hello = start(tmp_path, gateways, peers, pty_factory, outputs=outputs,
                               start_levels=(1,))
    # hello carries the level of every input and output as read, not as configured.
    assert hello["levels"] == {"door": 0, "relay1": 1}, hello
    assert (sim / "gpio17").read_text() == "0\n"
    assert (sim / "gpio27").read_text() == "1"
    tmp = sim / ".door.tmp"
    tmp.write_text("1\n")
    tmp.rename(sim / "gpio17")
    check_reading(peer.reading(), 2, "door", {"level": 1})
    gw.assert_alive()
