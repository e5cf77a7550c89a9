"""Serial ports end to end against a pyzmq ROUTER peer: line endings, NUL bytes, and writes
to a device that stops taking data."""

import time

from conftest import check_reading, make_config, wait_until


def start(tmp_path, gateways, peers, pty_factory, fmt="kv", extra=""):
    peer = peers()
    sensor = pty_factory("weather")
    cfg = make_config(tmp_path, peer.endpoint, serial=[("weather", sensor.path, fmt, "\r\n")],
                      stats_interval_s=1) + extra
    gw = gateways(cfg)
    gw.wait_serial_open("weather")
    peer.expect("hello")
    return gw, peer, sensor


def port_stats(peer, pred=lambda p: True, timeout=5.0):
    stats = peer.expect("stats", lambda b: pred(b["serial"]["weather"]), timeout=timeout)
    return stats["serial"]["weather"]


def test_cr_terminated_lines_each_become_a_reading(tmp_path, gateways, peers, pty_factory):
    """A sensor that ends lines with CR alone (the default input_line_ending = "auto")."""
    gw, peer, sensor = start(tmp_path, gateways, peers, pty_factory)
    sensor.write(b"".join(b"n=%d\r" % i for i in range(2000)))
    for i in range(2000):
        check_reading(peer.reading(timeout=10), i + 1, "weather", {"n": i})
    stats = port_stats(peer)
    assert stats["bad_lines"] == 0 and stats["overlong_lines"] == 0, stats
    gw.assert_alive()


def test_mixed_endings_and_a_split_crlf(tmp_path, gateways, peers, pty_factory):
    gw, peer, sensor = start(tmp_path, gateways, peers, pty_factory)
    sensor.write(b"a=1\nb=2\rc=3\r\nd=4\r")
    for seq, values in enumerate([{"a": 1}, {"b": 2}, {"c": 3}, {"d": 4}], start=1):
        check_reading(peer.reading(), seq, "weather", values)
    # The LF of a CR LF arrives in a later read: it ends nothing (no empty line, no bad line).
    time.sleep(0.2)
    sensor.write(b"\ne=5\r")
    time.sleep(0.2)
    sensor.write(b"\n")
    sensor.write(b"f=6\n")
    check_reading(peer.reading(), 5, "weather", {"e": 5})
    check_reading(peer.reading(), 6, "weather", {"f": 6})
    peer.expect_none("reading", within=0.3)
    stats = port_stats(peer)
    assert stats["bad_lines"] == 0, stats
    gw.assert_alive()


def test_lines_with_nul_are_bad_and_never_sent(tmp_path, gateways, peers, pty_factory):
    gw, peer, sensor = start(tmp_path, gateways, peers, pty_factory)
    sensor.line(b"a=1\x00 b=2")
    sensor.line(b"k\x00=1")
    sensor.line(b"ok=1")
    check_reading(peer.reading(), 1, "weather", {"ok": 1})
    stats = port_stats(peer, lambda p: p["bad_lines"] >= 2)
    assert stats["bad_lines"] == 2, stats
    gw.wait_log("NUL")
    peer.expect_none("reading", within=0.3)


def test_json_lines_with_escaped_nul_are_bad(tmp_path, gateways, peers, pty_factory):
    gw, peer, sensor = start(tmp_path, gateways, peers, pty_factory, fmt="json")
    sensor.line(b'{"a": "x\\u0000"}')
    sensor.line(b'{"k\\u0000": 1}')
    sensor.line(b'{"ok": 1}')
    check_reading(peer.reading(), 1, "weather", {"ok": 1})
    stats = port_stats(peer, lambda p: p["bad_lines"] >= 2)
    assert stats["bad_lines"] == 2, stats


def test_write_to_a_device_that_stops_reading_times_out(tmp_path, gateways, peers,
                                                         pty_factory):
    """The master side is not read: once the pty's buffer is full the remaining writes fail
    after write_timeout_ms (default 2000 ms) with ok:false, a retry of such an id gets the
    same answer, and the port keeps working once the device reads again."""
    gw, peer, sensor = start(tmp_path, gateways, peers, pty_factory,
                             extra="\n[commands]\nmax_per_s = 1000\n")
    ids = [f"w-{i}" for i in range(40)]
    t0 = time.monotonic()
    for cid in ids:
        peer.command({"id": cid, "target": "weather", "action": "write", "value": "x" * 1000})
    replies = {cid: peer.reply(cid, timeout=6) for cid in ids}
    took = time.monotonic() - t0
    failed = [cid for cid, r in replies.items() if not r["ok"]]
    assert failed, "40 KB fit a pty buffer that nobody reads?"
    assert len(failed) < len(ids), "the first writes fit the buffer"
    for cid in failed:
        assert "timed out" in replies[cid]["error"], replies[cid]
    assert 1.9 <= took <= 4.5, f"the last reply came after {took:.2f} s (timeout 2 s)"
    gw.wait_log("serial write timed out name=weather")
    assert "serial port lost" not in gw.log()

    # A retry of a timed-out id is answered, with the same refusal.
    peer.command({"id": failed[0], "target": "weather", "action": "write", "value": "x" * 1000})
    assert peer.reply(failed[0]) == replies[failed[0]]

    # The device reads again: what reached the tty arrives, the rest was discarded.
    drained = sensor.read_available(1 << 20, timeout=1.0)
    assert len(drained) < len(ids) * 1002, len(drained)
    peer.command({"id": "w-after", "target": "weather", "action": "write", "value": "OK"})
    assert peer.reply("w-after") == {"id": "w-after", "ok": True}
    got = sensor.read_available(4, timeout=2.0)
    assert got == b"OK\r\n", got
    stats = peer.expect("stats", lambda b: b["counters"]["commands_failed"] >= len(failed))
    assert stats["serial"]["weather"]["connected"] is True, stats
    gw.assert_alive()
