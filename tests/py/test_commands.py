"""Commands end to end against a pyzmq ROUTER peer: set/toggle/pulse/write, refusals,
duplicates."""

import signal
import time

import pytest

from conftest import check_reading, make_config, read_pin, wait_until


@pytest.fixture
def rig(tmp_path, gateways, peers, pty_factory):
    peer = peers()
    sensor = pty_factory("weather")
    cfg = make_config(tmp_path, peer.endpoint, serial=[("weather", sensor.path, "kv", "\r\n")],
                      stats_interval_s=1)
    gw = gateways(cfg)
    gw.wait_serial_open("weather")
    peer.expect("hello")
    assert read_pin(tmp_path, 27) == "0\n"
    assert read_pin(tmp_path, 22) == "1\n", "relay2 starts at initial = 1"
    assert read_pin(tmp_path, 17) == "1\n"
    return gw, peer, sensor


def ok(peer, cid):
    r = peer.reply(cid)
    assert r == {"id": cid, "ok": True}, r
    return r


def refused(peer, cid):
    r = peer.reply(cid)
    assert set(r) == {"id", "ok", "error"}, r
    assert r["ok"] is False, r
    assert isinstance(r["error"], str) and r["error"].strip(), r
    return r


def test_set_and_toggle(tmp_path, rig):
    gw, peer, _ = rig
    steps = [
        ("set", 1, "1\n"), ("set", 0, "0\n"), ("set", True, "1\n"), ("set", False, "0\n"),
        ("set", 0, "0\n"),  # already 0: still ok
        ("toggle", None, "1\n"), ("toggle", None, "0\n"),
    ]
    for n, (action, value, want) in enumerate(steps):
        cmd = {"id": f"c-{n}", "target": "relay1", "action": action}
        if value is not None:
            cmd["value"] = value
        peer.command(cmd)
        ok(peer, cmd["id"])
        # The reply is sent after the level took effect.
        assert read_pin(tmp_path, 27) == want, (cmd, read_pin(tmp_path, 27))
    assert read_pin(tmp_path, 22) == "1\n", "other output untouched"
    peer.command({"id": "t-2", "target": "relay2", "action": "toggle"})
    ok(peer, "t-2")
    assert read_pin(tmp_path, 22) == "0\n"
    stats = peer.expect("stats", lambda b: b["counters"]["commands_ok"] == len(steps) + 1)
    assert stats["counters"]["commands_failed"] == 0
    gw.assert_alive()


def test_pulse_flips_then_restores(tmp_path, rig):
    gw, peer, _ = rig
    t0 = time.monotonic()
    peer.command({"id": "p-1", "target": "relay1", "action": "pulse", "value": {"ms": 300}})
    ok(peer, "p-1")
    assert read_pin(tmp_path, 27) == "1\n", "pulse is on when the reply arrives"
    wait_until(lambda: read_pin(tmp_path, 27) == "0\n", 3, "the pulse to end")
    elapsed = time.monotonic() - t0
    assert 0.28 <= elapsed <= 1.5, f"pulse lasted {elapsed:.3f} s, asked 300 ms"

    # A pulse on an output that is 1 pulses to 0 and restores 1.
    peer.command({"id": "p-2", "target": "relay2", "action": "pulse", "value": {"ms": 200}})
    ok(peer, "p-2")
    assert read_pin(tmp_path, 22) == "0\n"
    wait_until(lambda: read_pin(tmp_path, 22) == "1\n", 3, "relay2 to be restored")

    # A command during a pulse cancels the pulse: the level set stays.
    peer.command({"id": "p-3", "target": "relay1", "action": "pulse", "value": {"ms": 300}})
    ok(peer, "p-3")
    peer.command({"id": "s-3", "target": "relay1", "action": "set", "value": 1})
    ok(peer, "s-3")
    time.sleep(0.6)  # past the pulse's end: nothing may restore 0 now
    assert read_pin(tmp_path, 27) == "1\n"
    gw.assert_alive()


def test_write_to_serial_reaches_the_port_before_the_reply(tmp_path, rig):
    gw, peer, sensor = rig
    for n, text in enumerate(["PING", "", "héllo wörld", "x" * 1000]):
        cid = f"w-{n}"
        peer.command({"id": cid, "target": "weather", "action": "write", "value": text})
        ok(peer, cid)
        want = text.encode() + b"\r\n"
        # The reply is sent once the bytes reached the tty: they are readable right now.
        got = sensor.pending_now()
        if len(got) < len(want):  # the kernel moves pty bytes to the master in a work item
            got += sensor.read_available(len(want) - len(got), 0.2)
        assert got == want, (cid, got[:80])
    gw.assert_alive()


BAD = [
    # (command body, target whose pin must not change, why)
    ({"id": "b-1", "target": "nosuch", "action": "set", "value": 1}, None, "unknown target"),
    ({"id": "b-2", "target": "relay1", "action": "write", "value": "x"}, 27, "write to output"),
    ({"id": "b-3", "target": "weather", "action": "set", "value": 1}, None, "set on serial"),
    ({"id": "b-4", "target": "door", "action": "set", "value": 0}, 17, "set on an input"),
    ({"id": "b-5", "target": "door", "action": "toggle"}, 17, "toggle an input"),
    ({"id": "b-6", "target": "relay1", "action": "set", "value": 2}, 27, "value 2"),
    ({"id": "b-7", "target": "relay1", "action": "set", "value": "1"}, 27, "value as string"),
    ({"id": "b-8", "target": "relay1", "action": "set", "value": -1}, 27, "value -1"),
    ({"id": "b-9", "target": "relay1", "action": "set"}, 27, "set without value"),
    ({"id": "b-10", "target": "relay1", "action": "pulse", "value": {"ms": 2001}}, 27,
     "pulse over max_pulse_ms"),
    ({"id": "b-11", "target": "relay1", "action": "pulse", "value": {"ms": 0}}, 27, "pulse 0"),
    ({"id": "b-12", "target": "relay1", "action": "pulse", "value": 300}, 27, "pulse bare ms"),
    ({"id": "b-13", "target": "relay1", "action": "toggle", "value": 1}, 27, "toggle value"),
    ({"id": "b-14", "target": "relay1"}, 27, "missing action"),
    ({"id": "b-15", "action": "toggle"}, 27, "missing target"),
    ({"id": "b-16", "target": "relay1", "action": "fly"}, 27, "unknown action"),
    ({"id": "b-17", "target": "relay1", "action": "toggle", "extra": 1}, 27, "unknown field"),
    ({"id": "b-18", "target": 27, "action": "toggle"}, 27, "target not a string"),
    ({"id": "b-19", "target": "weather", "action": "write", "value": 7}, None, "write non-string"),
    ({"id": "b-20", "target": "weather", "action": "toggle"}, None, "toggle on serial"),
]


@pytest.mark.parametrize("cmd,pin,why", BAD, ids=[b[2] for b in BAD])
def test_bad_command_refused_without_change(tmp_path, rig, cmd, pin, why):
    gw, peer, sensor = rig
    before = {p: read_pin(tmp_path, p) for p in (17, 22, 27)}
    peer.command(cmd)
    refused(peer, cmd["id"])
    assert {p: read_pin(tmp_path, p) for p in (17, 22, 27)} == before, why
    assert sensor.pending_now() == b"", "nothing written to the serial port"
    # Still working afterwards.
    peer.command({"id": "after", "target": "relay1", "action": "toggle"})
    ok(peer, "after")
    assert read_pin(tmp_path, 27) == ("1\n" if before[27] == "0\n" else "0\n")
    gw.assert_alive()


def test_refusals_are_counted(tmp_path, rig):
    gw, peer, sensor = rig
    before = {p: read_pin(tmp_path, p) for p in (17, 22, 27)}
    for cmd, _, why in BAD:
        peer.command(cmd)
        refused(peer, cmd["id"])
    assert {p: read_pin(tmp_path, p) for p in (17, 22, 27)} == before
    assert sensor.pending_now() == b""
    stats = peer.expect("stats", lambda b: b["counters"]["commands_failed"] == len(BAD))
    assert stats["counters"]["commands_ok"] == 0
    assert stats["counters"]["bad_messages"] == 0
    gw.assert_alive()


def test_unanswerable_messages_change_nothing(tmp_path, rig):
    gw, peer, sensor = rig
    before = {p: read_pin(tmp_path, p) for p in (17, 22, 27)}
    peer.send("command", b'{"id": "m-1", "target": "relay1", "action": "toggle"')  # truncated
    peer.send("command", b"\xff\xfe")
    peer.send("command", b"[1, 2]")
    peer.send("command", {"target": "relay1", "action": "toggle"})  # no id
    peer.send("command", {"id": 5, "target": "relay1", "action": "toggle"})
    peer.send("command", {"id": "", "target": "relay1", "action": "toggle"})
    peer.send("command", {"id": "x" * 129, "target": "relay1", "action": "toggle"})
    peer.send_frames([b"command"])  # one frame
    peer.send_frames([b"command", b'{"id":"m-9","target":"relay1","action":"toggle"}', b"x"])
    peer.send("ack", b"{oops")
    peer.send("bogus", {"no": "id"})
    # An unknown kind with an id is answered (ok: false), and executes nothing.
    peer.send("kommand", {"id": "k-1", "target": "relay1", "action": "toggle"})
    refused(peer, "k-1")
    peer.command({"id": "alive", "target": "relay2", "action": "toggle"})
    ok(peer, "alive")
    assert read_pin(tmp_path, 27) == before[27]
    assert read_pin(tmp_path, 17) == before[17]
    assert read_pin(tmp_path, 22) != before[22]
    assert sensor.pending_now() == b""
    assert [b["id"] for k, b in peer.history if k == "reply"].count("k-1") == 1
    assert not any(k == "reply" and b["id"] not in ("k-1", "alive") for k, b in peer.history)
    stats = peer.expect("stats", lambda b: b["counters"]["commands_ok"] == 1)
    # 7 unparsable commands + the unknown kind with an id.
    assert stats["counters"]["commands_failed"] == 8, stats
    # 2 wrong frame counts + bad ack + 2 unknown kinds.
    assert stats["counters"]["bad_messages"] == 5, stats
    gw.assert_alive()


def test_write_while_port_unplugged_is_refused(tmp_path, rig):
    gw, peer, sensor = rig
    sensor.unplug()
    gw.wait_log("serial port lost name=weather")
    peer.command({"id": "w-off", "target": "weather", "action": "write", "value": "x"})
    r = refused(peer, "w-off")
    assert "not connected" in r["error"], r
    gw.assert_alive()


def test_duplicate_ids_execute_once(tmp_path, rig):
    gw, peer, sensor = rig
    cmd = {"id": "dup-1", "target": "relay1", "action": "toggle"}
    peer.command(cmd)
    first = peer.reply("dup-1")
    assert read_pin(tmp_path, 27) == "1\n"
    peer.command(cmd)
    second = peer.reply("dup-1")
    assert first == second == {"id": "dup-1", "ok": True}
    assert read_pin(tmp_path, 27) == "1\n", "toggled once only"

    # Sent back to back (the second arrives before the first is answered).
    peer.command({"id": "dup-2", "target": "relay2", "action": "toggle"})
    peer.command({"id": "dup-2", "target": "relay2", "action": "toggle"})
    assert peer.reply("dup-2") == peer.reply("dup-2") == {"id": "dup-2", "ok": True}
    assert read_pin(tmp_path, 22) == "0\n"

    # A refused command repeated is refused the same way.
    bad = {"id": "dup-3", "target": "relay1", "action": "set", "value": 7}
    peer.command(bad)
    r1 = refused(peer, "dup-3")
    peer.command(bad)
    assert refused(peer, "dup-3") == r1

    # A serial write sent twice reaches the port once.
    w = {"id": "dup-4", "target": "weather", "action": "write", "value": "ONCE"}
    peer.command(w)
    peer.command(w)
    ok(peer, "dup-4")
    got = sensor.read_available(len(b"ONCE\r\n") * 2, 0.5)
    assert got == b"ONCE\r\n", got

    stats = peer.expect("stats", lambda b: b["counters"]["commands_ok"] == 3)
    assert stats["counters"]["commands_failed"] == 1
    # Readings still flow after all that.
    sensor.line(b"after=1")
    check_reading(peer.reading(), 1, "weather", {"after": 1})
    gw.assert_alive()


def executed(gw, cid):
    """How many times the gateway executed command ``cid`` on an output (its log line)."""
    return gw.log().count(f"command id={cid} target=")


def test_reused_id_with_a_different_command_is_refused(tmp_path, rig):
    gw, peer, sensor = rig
    cmd = {"id": "re-1", "target": "relay1", "action": "toggle"}
    peer.command(cmd)
    first = ok(peer, "re-1")
    assert read_pin(tmp_path, 27) == "1\n"
    # The same command again is a retry: answered as before, not executed again.
    peer.command(cmd)
    assert peer.reply("re-1") == first
    # The same id with another command is refused, and nothing of it happens.
    others = [
        {"id": "re-1", "target": "relay1", "action": "set", "value": 0},
        {"id": "re-1", "target": "relay2", "action": "toggle"},
        {"id": "re-1", "target": "relay1", "action": "pulse", "value": {"ms": 100}},
        {"id": "re-1", "target": "weather", "action": "write", "value": "RESET"},
    ]
    for other in others:
        peer.command(other)
        r = refused(peer, "re-1")
        assert "reused with a different command" in r["error"], r
    assert read_pin(tmp_path, 27) == "1\n"
    assert read_pin(tmp_path, 22) == "1\n"
    assert sensor.read_available(None, 0.3) == b"", "nothing written to the port"
    # The id still stands for its first command.
    peer.command(cmd)
    assert peer.reply("re-1") == first
    assert read_pin(tmp_path, 27) == "1\n"
    assert executed(gw, "re-1") == 1
    stats = peer.expect("stats", lambda b: b["counters"]["commands_failed"] == len(others))
    assert stats["counters"]["commands_ok"] == 1, stats
    gw.assert_alive()


def test_repeated_ids_flood_keeps_the_log_bounded(tmp_path, rig):
    """10,000 commands under one id (half retries, half reuses with another command) are
    each answered, execute nothing, and log a bounded number of lines."""
    gw, peer, _ = rig
    cmd = {"id": "flood", "target": "relay1", "action": "toggle"}
    other = {"id": "flood", "target": "relay1", "action": "set", "value": 0}
    peer.command(cmd)
    ok(peer, "flood")
    log_before = len(gw.log().splitlines())
    total, chunk = 10_000, 500
    got = {True: 0, False: 0}
    for start in range(0, total, chunk):
        for i in range(start, start + chunk):
            peer.command(cmd if i % 2 == 0 else other)
        want = start + chunk
        deadline = time.monotonic() + 20
        while got[True] + got[False] < want:
            assert time.monotonic() < deadline, f"replies {got} of {want}"
            m = peer.recv(1.0)
            if m and m[0] == "reply" and m[1]["id"] == "flood":
                got[m[1]["ok"]] += 1
    assert got == {True: total // 2, False: total // 2}, got
    assert read_pin(tmp_path, 27) == "1\n"
    assert executed(gw, "flood") == 1
    lines = gw.log().splitlines()[log_before:]
    dup = [x for x in lines if "duplicate command" in x]
    reused = [x for x in lines if "reused with a different command" in x]
    # Each kind: a burst of 10 per minute, then a summary when the next minute starts.
    assert 1 <= len(dup) <= 12, dup[:20]
    assert 1 <= len(reused) <= 12, reused[:20]
    assert len(lines) < 100, lines[:50]
    gw.assert_alive()


UNREADABLE = [
    # (raw body, id answered or None, what the error must mention)
    (b'{"id":"n-1","target":"relay1","action":"set","value":1e400}', "n-1", ""),
    (b'{"id":"n-2","target":"relay1","action":"set","value":-1e400}', "n-2", ""),
    (b'{"id":"n-3","target":"relay1","action":"set","value":' + b"9" * 5000 + b"}", "n-3", ""),
    (b'{"id":"n-4","target":"relay1","action":"pulse","value":{"ms":1' + b"0" * 5000 + b"}}",
     "n-4", ""),
    (b'{"id":"n-5","target":"relay1","action":"set","value":1,"value":0}', "n-5", "duplicate"),
    (b'{"id":"n-6","id":"n-6","target":"relay1","action":"toggle"}', "n-6", "duplicate"),
    (b'{"id":"n-7","target":"relay1","action":"pulse","value":{"ms":100,"ms":200}}', "n-7",
     "duplicate"),
    (b'{"id":"n-8","id":"n-9","target":"relay1","action":"toggle"}', None, ""),
]


def test_unreadable_values_and_repeated_keys_are_answered(tmp_path, rig):
    """Through the gateway: a command whose id can be read is answered even when a value is
    out of range for JSON numbers; a repeated key refuses the command; nothing runs."""
    gw, peer, _ = rig
    before = {p: read_pin(tmp_path, p) for p in (17, 22, 27)}
    for body, cid, why in UNREADABLE:
        peer.send("command", body)
    for body, cid, why in UNREADABLE:
        if cid is not None:
            r = refused(peer, cid)
            assert why in r["error"], (body[:80], r)
    peer.command({"id": "alive", "target": "relay2", "action": "toggle"})
    ok(peer, "alive")
    # Replies leave in order: any reply to the ambiguous ids would have come before.
    assert not [b for k, b in peer.history if k == "reply" and b["id"] in ("n-8", "n-9")]
    assert read_pin(tmp_path, 27) == before[27]
    assert read_pin(tmp_path, 22) != before[22]
    stats = peer.expect("stats", lambda b: b["counters"]["commands_failed"] == len(UNREADABLE))
    assert stats["counters"]["commands_ok"] == 1, stats
    gw.assert_alive()


def stays(tmp_path, pin, want, seconds):
    """Asserts that ``pin`` reads ``want`` the whole time for ``seconds`` (polled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = read_pin(tmp_path, pin)
        assert got == want, f"pin {pin} became {got!r}, expected {want!r} to stay"
        time.sleep(0.005)


def test_pulse_during_a_pulse_extends_it(tmp_path, rig):
    gw, peer, _ = rig
    peer.command({"id": "x-1", "target": "relay1", "action": "pulse", "value": {"ms": 600}})
    t1 = time.monotonic()
    ok(peer, "x-1")
    assert read_pin(tmp_path, 27) == "1\n"
    time.sleep(0.2)
    peer.command({"id": "x-2", "target": "relay1", "action": "pulse", "value": {"ms": 1000}})
    t2 = time.monotonic()
    ok(peer, "x-2")
    assert read_pin(tmp_path, 27) == "1\n", "a pulse during a pulse keeps the output active"
    # Past the first pulse's end (t1 + 0.6 s) up to shortly before the second's (t2 + 1 s).
    stays(tmp_path, 27, "1\n", t2 + 0.85 - time.monotonic())
    assert time.monotonic() > t1 + 0.6 + 0.2
    wait_until(lambda: read_pin(tmp_path, 27) == "0\n", 3, "the extended pulse to end")
    elapsed = time.monotonic() - t2
    assert 0.95 <= elapsed <= 2.5, f"extended pulse ended {elapsed:.3f} s after x-2"
    gw.wait_log("pulse extended target=relay1 ms=1000")
    gw.wait_log("pulse ended target=relay1 level=0")
    # relay2 (high at rest): the extended pulse stays low and restores high.
    peer.command({"id": "y-1", "target": "relay2", "action": "pulse", "value": {"ms": 300}})
    peer.command({"id": "y-2", "target": "relay2", "action": "pulse", "value": {"ms": 300}})
    ok(peer, "y-1")
    ok(peer, "y-2")
    assert read_pin(tmp_path, 22) == "0\n"
    wait_until(lambda: read_pin(tmp_path, 22) == "1\n", 3, "relay2 to be restored")
    gw.assert_alive()


def test_set_and_toggle_during_a_pulse_end_it(tmp_path, rig):
    gw, peer, _ = rig
    # toggle: ends the pulse as if it had run out, then inverts the restored level, so the
    # output keeps its pulsed level (pulse then toggle: the same end level at any timing).
    peer.command({"id": "t-p", "target": "relay1", "action": "pulse", "value": {"ms": 400}})
    ok(peer, "t-p")
    assert read_pin(tmp_path, 27) == "1\n"
    peer.command({"id": "t-t", "target": "relay1", "action": "toggle"})
    ok(peer, "t-t")
    stays(tmp_path, 27, "1\n", 0.7)
    peer.command({"id": "t-t2", "target": "relay1", "action": "toggle"})
    ok(peer, "t-t2")
    assert read_pin(tmp_path, 27) == "0\n"
    # set: drives its value; nothing is restored when the pulse would have ended.
    peer.command({"id": "s-p", "target": "relay1", "action": "pulse", "value": {"ms": 400}})
    ok(peer, "s-p")
    assert read_pin(tmp_path, 27) == "1\n"
    peer.command({"id": "s-0", "target": "relay1", "action": "set", "value": 0})
    ok(peer, "s-0")
    assert read_pin(tmp_path, 27) == "0\n"
    peer.command({"id": "s-p2", "target": "relay1", "action": "pulse", "value": {"ms": 400}})
    ok(peer, "s-p2")
    peer.command({"id": "s-1", "target": "relay1", "action": "set", "value": 1})
    ok(peer, "s-1")
    stays(tmp_path, 27, "1\n", 0.7)
    log = gw.log()
    assert "pulse ended by toggle target=relay1 level=1" in log, log[-2000:]
    assert "pulse ended by set target=relay1 level=0" in log
    assert "pulse ended by set target=relay1 level=1" in log
    assert "pulse ended target=relay1" not in log, "no pulse ran out"
    gw.assert_alive()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_during_a_pulse_restores_the_pin(tmp_path, gateways, peers, sig):
    peer = peers()
    cfg = make_config(tmp_path, peer.endpoint,
                      outputs=(("relay1", 27, 0, 60000), ("relay2", 22, 1, 60000)))
    gw = gateways(cfg)
    peer.expect("hello")
    for cid, target in (("p-1", "relay1"), ("p-2", "relay2")):
        peer.command({"id": cid, "target": target, "action": "pulse", "value": {"ms": 30000}})
        ok(peer, cid)
    assert (read_pin(tmp_path, 27), read_pin(tmp_path, 22)) == ("1\n", "0\n")
    gw.proc.send_signal(sig)
    assert gw.proc.wait(10) == 0, gw.log()[-2000:]
    assert read_pin(tmp_path, 27) == "0\n", "relay1 restored before exit"
    assert read_pin(tmp_path, 22) == "1\n", "relay2 restored before exit"
    log = gw.log()
    assert "shutdown: ending running pulses count=2" in log, log[-2000:]
    assert "pulse ended target=relay1 level=0" in log
    assert "pulse ended target=relay2 level=1" in log
