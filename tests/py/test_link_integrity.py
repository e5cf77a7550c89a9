"""The gateway's side of link integrity (docs/protocol.md): a connection on which the backend
is not heard within ``[backend] hello_timeout_s`` of the hello is made again (with backoff),
and an ack above what was sent on the connection is refused. The backend is a pyzmq ROUTER
driven by the test."""

import os
import time

import pytest

from conftest import ZGATE_BIN, free_port, make_config, records_on_disk, wait_until

pytestmark = pytest.mark.skipif(not os.path.exists(ZGATE_BIN),
                                reason=f"zgate binary not built: {ZGATE_BIN}")

UNHEARD = r"backend not heard within hello_timeout_s=1 of the hello"


def config(tmp_path, endpoint, pty, hello_timeout_s, spool=None):
    """One kv sensor on ``pty``, stats every second, no GPIO."""
    return make_config(tmp_path, endpoint, serial=[("sensor", pty.path, "kv", None)],
                       stats_interval_s=1, inputs=(), outputs=(),
                       backend=[f"hello_timeout_s = {hello_timeout_s}"], spool=spool)


def start(gateways, text):
    gw = gateways(text)
    gw.wait_serial_open("sensor", timeout=10, since_start=True)
    return gw


def test_unheard_connection_is_made_again(tmp_path, gateways, peers, pty_factory, feeds):
    """A backend that takes the hello but never answers: after hello_timeout_s the gateway
    warns (naming ROUTER_HANDOVER and unanswered hellos), counts the connection and connects
    again; the readings sent on the dead connection come again after the new hello. The next
    forced reconnect waits for the backoff (10 s), not for hello_timeout_s."""
    pty = pty_factory("sensor", nonblocking=True)
    peer = peers(handover=True)
    gw = start(gateways, config(tmp_path, peer.endpoint, pty, hello_timeout_s=1))
    first = peer.expect("hello", timeout=10)
    t_first = time.monotonic()
    feeds(pty).write_now(3)
    assert [peer.reading()["seq"] for _ in range(3)] == [1, 2, 3]
    second = peer.expect("hello", timeout=10)
    waited = time.monotonic() - t_first
    assert 0.8 <= waited <= 8, f"second hello {waited:.2f} s after the first"
    assert first["resume_seq"] == second["resume_seq"] == 1
    # Nothing was acked: the same readings follow the new hello, in order.
    assert [peer.reading()["seq"] for _ in range(3)] == [1, 2, 3]
    log = gw.wait_match(UNHEARD + r".*").group(0)
    assert "ZMQ_ROUTER_HANDOVER" in log and "does not answer hello" in log, log
    stats = peer.expect("stats", lambda b: b["counters"]["unheard_connections"] >= 1)
    assert stats["counters"]["reconnects"] >= 1
    # The second connection is unheard too, but the backoff holds the next reconnect.
    peer.expect_none("hello", within=5)
    gw.assert_alive()


@pytest.mark.parametrize("answer", ["ack", "command"])
def test_answered_hello_keeps_the_connection(tmp_path, gateways, peers, pty_factory, answer):
    """Any message from the backend after the hello counts as heard: no warning, no forced
    reconnect, nothing counted."""
    pty = pty_factory("sensor", nonblocking=True)
    peer = peers(handover=True)
    gw = start(gateways, config(tmp_path, peer.endpoint, pty, hello_timeout_s=1))
    hello = peer.expect("hello", timeout=10)
    if answer == "ack":
        peer.ack(hello["resume_seq"] - 1)
    else:
        peer.command({"id": "c-1", "target": "nothing", "action": "set", "value": 1})
        assert peer.reply("c-1")["ok"] is False
    peer.expect_none("hello", within=3.5)
    stats = peer.expect("stats", timeout=3)
    assert stats["counters"]["unheard_connections"] == 0, stats
    assert stats["counters"]["reconnects"] == 0, stats
    assert "not heard" not in gw.log()


def test_ack_above_what_was_sent_is_refused(tmp_path, gateways, peers, pty_factory, feeds):
    """60 readings wait in the spool when the backend comes; the replay is paced (10/s), so
    right after the hello only the first few were sent. An ack of 10**18 and an ack of 40 at
    that moment are refused: counted, logged, nothing deleted. Every reading still arrives in
    order, and an ack of what was really sent is taken."""
    n = 60
    pty = pty_factory("sensor", nonblocking=True)
    ep = f"tcp://127.0.0.1:{free_port()}"
    gw = start(gateways, config(tmp_path, ep, pty, hello_timeout_s=60,
                                spool={"replay_max_per_s": 10, "retransmit_s": 600}))
    feeds(pty).write_now(n)
    data_dir = tmp_path / "data"
    wait_until(lambda: len(records_on_disk(data_dir) or []) == n, 10, what=f"{n} records")
    peer = peers(ep, handover=True)
    hello = peer.expect("hello", timeout=10)
    assert hello["resume_seq"] == 1
    peer.ack(10**18)
    peer.ack(40)
    stats = peer.expect("stats", lambda b: b["counters"]["bad_acks"] >= 2, timeout=5)
    assert stats["counters"]["bad_acks"] == 2, stats
    assert stats["counters"]["acked"] == 0, stats
    assert stats["spool"]["acked"] == 0 and stats["resume_seq"] == 1, stats
    gw.wait_match(r"ack seq=1000000000000000000 refused")
    gw.wait_match(r"ack seq=40 refused")
    # Nothing was lost: every reading arrives, in order.
    assert peer.recv_until(lambda: len(peer.seqs()) >= n, timeout=20), peer.seqs()
    assert peer.seqs() == list(range(1, n + 1))
    # With all 60 sent, 10**18 is still above what was sent; 60 is not.
    peer.ack(10**18)
    peer.ack(n)
    stats = peer.expect("stats", lambda b: b["counters"]["acked"] == n, timeout=5)
    assert stats["counters"]["bad_acks"] == 3, stats
    assert stats["spool"]["acked"] == n and stats["resume_seq"] == n + 1, stats
    assert gw.term() == 0


def test_spool_id_survives_a_restart_and_changes_with_a_wiped_spool(tmp_path, gateways, peers,
                                                                    pty_factory):
    """hello and stats carry the spool's identity: the same after a restart (seqs go on), a new
    one after data_dir was wiped (seqs start again at 1), so a backend never mistakes the new
    readings for old ones."""
    import re
    import shutil

    pty = pty_factory("sensor")
    # Handover: the restarted gateway reconnects under the same routing id at once.
    peer = peers(auto_ack=True, handover=True)
    gw = start(gateways, config(tmp_path, peer.endpoint, pty, hello_timeout_s=10))
    first = peer.expect("hello", timeout=10)
    assert re.fullmatch(r"[0-9a-f]{32}", first["spool_id"]), first
    pty.line(b"n=1")
    assert peer.reading()["seq"] == 1
    stats = peer.expect("stats", timeout=5)
    assert stats["spool"]["spool_id"] == first["spool_id"], stats

    assert gw.term() == 0
    gw.start()
    gw.wait_serial_open("sensor", timeout=10, since_start=True)
    again = peer.expect("hello", timeout=10)
    assert again["spool_id"] == first["spool_id"], (first, again)
    assert again["resume_seq"] == 2, again

    assert gw.term() == 0
    shutil.rmtree(tmp_path / "data")
    gw.start()
    gw.wait_serial_open("sensor", timeout=10, since_start=True)
    wiped = peer.expect("hello", timeout=10)
    assert re.fullmatch(r"[0-9a-f]{32}", wiped["spool_id"]), wiped
    assert wiped["spool_id"] != first["spool_id"], (first, wiped)
    assert wiped["resume_seq"] == 1, wiped
    pty.line(b"n=2")
    r = peer.reading()
    assert (r["seq"], r["values"]) == (1, {"n": 2}), r
