"""Outputs report their levels as readings (cause start/command/pulse_end), and command ids
survive a gateway restart (data_dir/commands.log), against a pyzmq ROUTER peer and the sim
GPIO files."""

import time

import pytest

from conftest import check_reading, make_config, read_pin, wait_until

# make_config's defaults: relay1 on pin 27 (initial 0), relay2 on pin 22 (initial 1).


def lv(level, cause):
    return {"level": level, "cause": cause}


def output_readings(peer, source=None):
    """Every reading from an output received so far: (seq, source, values)."""
    return [(b["seq"], b["source"], b["values"]) for b in peer.of_kind("reading")
            if b["source"] in ("relay1", "relay2") and (source is None or b["source"] == source)]


def test_level_readings_start_command_pulse_end(tmp_path, gateways, peers):
    peer = peers(handover=True)
    gw = gateways(make_config(tmp_path, peer.endpoint, stats_interval_s=1))
    peer.expect("hello")
    check_reading(peer.reading(), 1, "relay1", lv(0, "start"))
    check_reading(peer.reading(), 2, "relay2", lv(1, "start"))
    peer.ack(2)

    peer.command({"id": "c-1", "target": "relay1", "action": "set", "value": 1})
    assert peer.reply("c-1") == {"id": "c-1", "ok": True}
    check_reading(peer.reading(), 3, "relay1", lv(1, "command"))
    # The same level again: answered, but no state change to report.
    peer.command({"id": "c-2", "target": "relay1", "action": "set", "value": 1})
    assert peer.reply("c-2") == {"id": "c-2", "ok": True}
    peer.expect_none("reading", within=0.3)

    t0 = time.monotonic()
    peer.command({"id": "p-1", "target": "relay2", "action": "pulse", "value": {"ms": 300}})
    assert peer.reply("p-1") == {"id": "p-1", "ok": True}
    check_reading(peer.reading(), 4, "relay2", lv(0, "command"))
    end = peer.reading(timeout=3)
    elapsed = time.monotonic() - t0
    check_reading(end, 5, "relay2", lv(1, "pulse_end"))
    assert elapsed >= 0.28, f"pulse_end after {elapsed:.3f} s, pulse was 300 ms"
    assert read_pin(tmp_path, 22) == "1\n"
    peer.ack(5)
    stats = peer.expect("stats", lambda b: b["counters"]["acked"] == 5, timeout=5)
    assert stats["resume_seq"] == 6, stats

    # A pulse still running at SIGTERM is restored on the way out, and its pulse_end reading
    # leaves before the exit.
    peer.command({"id": "p-2", "target": "relay1", "action": "pulse", "value": {"ms": 2000}})
    assert peer.reply("p-2") == {"id": "p-2", "ok": True}
    check_reading(peer.reading(), 6, "relay1", lv(0, "command"))
    gw.terminate()
    check_reading(peer.reading(timeout=5), 7, "relay1", lv(1, "pulse_end"))
    assert gw.proc.wait(10) == 0
    assert read_pin(tmp_path, 27) == "1\n"

    # Unacked, they are sent again after a restart, before the new start readings.
    gw.start()
    peer.expect("hello", lambda b: b["resume_seq"] == 6)
    got = [peer.reading() for _ in range(4)]
    assert [(b["seq"], b["source"], b["values"]) for b in got] == [
        (6, "relay1", lv(0, "command")), (7, "relay1", lv(1, "pulse_end")),
        # relay1 has initial = 0: the gateway drove it back to 0 at start.
        (8, "relay1", lv(0, "start")), (9, "relay2", lv(1, "start")),
    ]
    peer.ack(9)
    peer.expect("stats", lambda b: b["counters"]["acked"] == 4, timeout=5)


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_command_ids_survive_a_restart(tmp_path, gateways, peers, stop):
    """SIGKILL too: the entry was written (page cache) before the reply left."""
    peer = peers(handover=True)
    gw = gateways(make_config(tmp_path, peer.endpoint))
    peer.expect("hello")
    peer.command({"id": "d-1", "target": "relay1", "action": "toggle"})
    first = peer.reply("d-1")
    assert first == {"id": "d-1", "ok": True}
    assert read_pin(tmp_path, 27) == "1\n"
    peer.command({"id": "p-1", "target": "relay2", "action": "pulse", "value": {"ms": 200}})
    assert peer.reply("p-1") == {"id": "p-1", "ok": True}
    wait_until(lambda: read_pin(tmp_path, 22) == "1\n", 3, "the pulse to end")
    bad = {"id": "b-1", "target": "relay1", "action": "set", "value": 7}
    peer.command(bad)
    refusal = peer.reply("b-1")
    assert refusal["ok"] is False, refusal

    if stop == "SIGTERM":
        assert gw.term() == 0
    else:
        gw.kill9()
    # Not acked: readings up to here are sent again after the restart.
    peer.recv_until(lambda: False, timeout=0.3)
    last_seq = max((b["seq"] for b in peer.of_kind("reading")), default=0)
    # relay1 has initial = 0: the restart drives it back to 0, so a toggle run again shows.
    gw.start()
    peer.expect("hello", lambda b: b["levels"]["relay1"] == 0)
    assert read_pin(tmp_path, 27) == "0\n"

    peer.command({"id": "d-1", "target": "relay1", "action": "toggle"})
    assert peer.reply("d-1") == first, "the original reply"
    assert read_pin(tmp_path, 27) == "0\n", "d-1 not toggled again"
    peer.command({"action": "pulse", "value": {"ms": 200}, "target": "relay2", "id": "p-1"})
    assert peer.reply("p-1") == {"id": "p-1", "ok": True}
    peer.command(bad)
    assert peer.reply("b-1") == refusal
    # A reused id with another command stays refused, and nothing runs.
    peer.command({"id": "d-1", "target": "relay1", "action": "set", "value": 1})
    reused = peer.reply("d-1")
    assert reused["ok"] is False and "reused with a different command" in reused["error"], reused

    # Nothing was executed: no pin changed, no command or pulse_end reading.
    peer.expect_none("reading", lambda b: b["seq"] > last_seq
                     and b["values"].get("cause") in ("command", "pulse_end"), within=0.6)
    assert read_pin(tmp_path, 27) == "0\n", "d-1 not toggled again"
    assert read_pin(tmp_path, 22) == "1\n", "p-1 not pulsed again"
    new = [(seq, v) for seq, _, v in output_readings(peer) if seq > last_seq]
    assert [v for _, v in new] == [lv(0, "start"), lv(1, "start")], new
    gw.wait_log("duplicate command id=d-1", since_start=True)
    assert (tmp_path / "data" / "commands.log").exists()
