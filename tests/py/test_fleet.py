"""Fleet: gateways -> zgate-bridge -> a 3-node NATS JetStream cluster (issue "Fleet").

Real parts only: Debian's nats-server (3 nodes on loopback, stream with 3 replicas), real
`zgate` gateways fed by ptys, real `zgate-bridge` processes, nats-py as the independent
consumer that checks every reading is in the stream exactly once by its message id.
"""

import json
import os
import signal
import time
from pathlib import Path
from collections import Counter

import pytest

from conftest import free_port, make_config, sensor_line, wait_until
from nats_cluster import (  # noqa: F401 (fixtures)
    bridge_config, bridges, kv_get, nats_cluster, request, stream_messages,
)


def gw_config(tmp_path, gw_id, port, pty=None, *, outputs=(), backend=(), stats=3600):
    serial = [("weather", pty.path, "kv", "lf")] if pty is not None else []
    return make_config(
        tmp_path / gw_id, f"tcp://127.0.0.1:{port}", serial=serial,
        stats_interval_s=stats, outbox_max=None, shutdown_flush_ms=200,
        inputs=(), outputs=outputs, gateway_id=gw_id,
        spool={"retransmit_s": 2}, backend=["hello_timeout_s = 3", *backend])


def readings_of(msgs, gw_id):
    """(msg id, body) of every reading of ``gw_id`` in the stream."""
    prefix = f"zgate.{gw_id}.reading."
    return [(h.get("Nats-Msg-Id"), json.loads(b)) for s, h, b in msgs if s.startswith(prefix)]


def check_exactly_once(cluster, gw_id, written, timeout=40):
    """Waits until every line counter in ``written`` is in the stream; then checks each
    reading is there once, under the id <gw>:<spool_id>:<seq>, with seqs 1..max."""
    want = set(written)

    def complete():
        rs = readings_of(stream_messages(cluster.urls, f"zgate.{gw_id}.reading.>"), gw_id)
        return rs if want <= {b["values"]["n"] for _, b in rs} else None

    rs = wait_until(complete, timeout, f"every reading of {gw_id} in the stream", interval=1)
    ids = Counter(i for i, _ in rs)
    dup = [i for i, n in ids.items() if n > 1]
    assert not dup, f"{gw_id}: message ids stored twice: {dup[:10]}"
    ns = Counter(b["values"]["n"] for _, b in rs)
    assert not [n for n, c in ns.items() if c > 1], f"{gw_id}: a line stored twice"
    seqs = sorted(b["seq"] for _, b in rs)
    assert seqs == list(range(1, len(seqs) + 1)), f"{gw_id}: seqs not 1..N: {seqs[:20]}"
    for mid, b in rs:
        g, spool, seq = mid.split(":")
        assert (g, int(seq)) == (gw_id, b["seq"]) and len(spool) == 32, mid
        assert b["gateway"] == gw_id and b["source"] == "weather"
    return rs


@pytest.fixture
def fleet(tmp_path, nats_cluster, bridges):
    cluster = nats_cluster()

    def bridge(name, port, **keys):
        cfg = bridge_config(name, f"tcp://127.0.0.1:{port}", cluster.urls, **keys)
        b = bridges(cfg, name)
        b.wait_log("stream ready", 30)
        return b

    return cluster, bridge


def test_kv_bucket_shows_connect_and_disconnect(tmp_path, fleet, gateways, pty_factory, feeds):
    cluster, bridge = fleet
    port = free_port()
    b = bridge("bridge-kv", port)
    pty = pty_factory("weather", nonblocking=True)
    feed = feeds(pty, rate=20).start()
    gw = gateways(gw_config(tmp_path, "gw-kv", port, pty), "gw-kv")
    b.wait_log("gateway connected gateway=gw-kv")
    v = wait_until(lambda: (kv_get(cluster.urls, "gw-kv") or {}).get("connected") and
                   kv_get(cluster.urls, "gw-kv"), 10, "gw-kv connected in the bucket",
                   interval=0.2)
    assert v["bridge"] == "bridge-kv" and v["security"] == "none"
    assert set(v) == {"bridge", "connected", "since", "last_seen", "version", "security",
                      "resume_seq"}
    time.sleep(1)
    feed.stop()
    gw.term()
    wait_until(lambda: kv_get(cluster.urls, "gw-kv")["connected"] is False, 10,
               "gw-kv disconnected in the bucket", interval=0.2)
    check_exactly_once(cluster, "gw-kv", feed.written)


# ---------------------------------------------------------------- 1: exactly once in the stream


def fed_gateways(tmp_path, gateways, pty_factory, feeds, ids, port, rate=50):
    """Gateways ``ids`` on the bridge at ``port``, each fed by its own pty at ``rate``."""
    out = []
    for gw_id in ids:
        pty = pty_factory(gw_id, nonblocking=True)
        feed = feeds(pty, rate=rate).start()
        gw = gateways(gw_config(tmp_path, gw_id, port, pty), gw_id)
        out.append((gw_id, gw, feed))
    return out


def acked(bridge, gw_id):
    return bridge.log().count(f"ack gateway={gw_id} seq=")


def wait_flowing(bridge, gws, n=5):
    for gw_id, _, _ in gws:
        wait_until(lambda: bridge.log().count(f"ack gateway={gw_id} ") >= n
                   and "advanced=true" in bridge.log(), 20, f"acks to {gw_id}", interval=0.05)


def finish(cluster, gws, timeout=40):
    for _, _, feed in gws:
        feed.stop()
    for gw_id, gw, feed in gws:
        gw.assert_alive()
        assert len(feed.written) > 50, f"{gw_id}: only {len(feed.written)} lines fed"
        check_exactly_once(cluster, gw_id, feed.written, timeout)


def test_bridge_kill9_mid_stream_and_restart(tmp_path, fleet, gateways, pty_factory, feeds):
    cluster, bridge = fleet
    port = free_port()
    b = bridge("bridge-1a", port)
    gws = fed_gateways(tmp_path, gateways, pty_factory, feeds, ["gw-1a1", "gw-1a2"], port)
    wait_flowing(b, gws)
    time.sleep(1)
    b.kill9()
    time.sleep(1.5)
    b.start()
    b.wait_log("stream ready", 30, count=2)
    for gw_id, _, _ in gws:
        b.wait_log(f"gateway connected gateway={gw_id}", 20, count=2)
    time.sleep(2)
    finish(cluster, gws)


def test_nats_node_kill9_mid_stream(tmp_path, fleet, gateways, pty_factory, feeds):
    cluster, bridge = fleet
    port = free_port()
    b = bridge("bridge-1b", port)
    gws = fed_gateways(tmp_path, gateways, pty_factory, feeds, ["gw-1b1", "gw-1b2"], port)
    wait_flowing(b, gws)
    leader = wait_until(lambda: cluster.stream_leader("ZGATE") is not None
                        and [cluster.stream_leader("ZGATE")], 10, "the stream's leader")[0]
    cluster.kill9(leader)  # the node leading the stream: PubAcks stop until a new election
    time.sleep(8)
    cluster.restart(leader)
    time.sleep(2)
    finish(cluster, gws, timeout=60)


def test_whole_cluster_down_30s_nothing_acked_meanwhile(tmp_path, fleet, gateways, pty_factory,
                                                        feeds):
    cluster, bridge = fleet
    port = free_port()
    b = bridge("bridge-1c", port)
    gws = fed_gateways(tmp_path, gateways, pty_factory, feeds, ["gw-1c1", "gw-1c2"], port)
    wait_flowing(b, gws)
    cluster.stop()
    # PubAcks that were on their way when the cluster died may still confirm readings for a
    # moment; after that nothing may be acked until the cluster is back.
    time.sleep(3)
    quiet_from = len(b.log())
    fed_before = [len(f.written) for _, _, f in gws]
    time.sleep(27)
    outage_log = b.log()[quiet_from:]
    assert "advanced=true" not in outage_log, "the bridge acked readings while NATS was down"
    for (gw_id, gw, feed), n in zip(gws, fed_before):
        gw.assert_alive()
        assert len(feed.written) > n + 500, f"{gw_id} was not fed during the outage"
    cluster.start(timeout=60)
    b.wait_log("advanced=true", 60, count=outage_log.count("advanced=true")
               + b.log()[:quiet_from].count("advanced=true") + 1)
    time.sleep(2)
    finish(cluster, gws, timeout=90)


def test_gateway_kill9_and_restart(tmp_path, fleet, gateways, pty_factory, feeds):
    cluster, bridge = fleet
    port = free_port()
    b = bridge("bridge-1d", port)
    gws = fed_gateways(tmp_path, gateways, pty_factory, feeds, ["gw-1d1", "gw-1d2"], port)
    wait_flowing(b, gws)
    gw_id, gw, feed = gws[0]
    # Lines the gateway has read are in its spool; those still in the tty when it dies may
    # be lost with the tty, so the feed stops just before the kill.
    feed.stop()
    time.sleep(0.2)
    gw.kill9()
    b.wait_log(f"gateway disconnected gateway={gw_id}", 10)
    gw.start()
    b.wait_log(f"gateway connected gateway={gw_id}", 20, count=2)
    feed2 = feeds(feed.pty, rate=50, start=feed.next).start()
    time.sleep(3)
    feed2.stop()
    feed.written += feed2.written
    finish(cluster, gws)


# ---------------------------------------------------------------- 2: commands by request-reply


def test_commands_reach_each_gateway_through_its_bridge(tmp_path, fleet, gateways):
    cluster, bridge = fleet
    ports = [free_port(), free_port()]
    bs = [bridge("bridge-2a", ports[0]), bridge("bridge-2b", ports[1])]
    relay = (("relay1", 27, 0, 2000),)
    gws = {}
    for gw_id, port, b in (("gw-2a", ports[0], bs[0]), ("gw-2b", ports[1], bs[1])):
        gws[gw_id] = gateways(gw_config(tmp_path, gw_id, port, outputs=relay), gw_id)
        b.wait_log(f"gateway connected gateway={gw_id}", 20)
    for n, gw_id in enumerate(gws):
        # The subscription may take a moment to reach every node of the cluster.
        cmd = {"id": f"t-{n}", "target": "relay1", "action": "set", "value": 1}
        r = wait_until(lambda: (r := request(cluster.urls, f"zgate.{gw_id}.command", cmd))[0]
                       == "reply" and r, 10, f"a reply from {gw_id}", interval=0.2)
        assert r[1] == {"id": f"t-{n}", "ok": True}, r
        assert (tmp_path / gw_id / "sim" / "gpio27").read_text().strip() == "1"
    # A gateway nobody holds: "no responders", at once.
    kind, took = request(cluster.urls, "zgate.gw-nobody.command", {"id": "x", "target": "relay1",
                                                                   "action": "toggle"})
    assert kind == "no_responders" and took < 1.0, (kind, took)
    # A gateway that went offline: the same, once its bridge saw the connection close.
    gws["gw-2b"].kill9()
    bs[1].wait_log("gateway disconnected gateway=gw-2b", 10)
    r = wait_until(lambda: (r := request(cluster.urls, "zgate.gw-2b.command",
                                         {"id": "y", "target": "relay1", "action": "toggle"}))[0]
                   == "no_responders" and r, 5, "no responders for gw-2b", interval=0.1)
    assert r[1] < 1.0, r
    # The other gateway still answers through its bridge.
    kind, body = request(cluster.urls, "zgate.gw-2a.command",
                         {"id": "z", "target": "relay1", "action": "set", "value": 0})
    assert (kind, body) == ("reply", {"id": "z", "ok": True})


# ---------------------------------------------------------------- 4: identity from the key


def keygen(prefix):
    import subprocess
    from conftest import ZGATE_BIN
    r = subprocess.run([ZGATE_BIN, "keygen", "--out", str(prefix)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return (Path(f"{prefix}.key").read_text().strip(), Path(f"{prefix}.pub").read_text().strip())


def curve_dealer(ctx, port, routing_id, client, server_pub):
    import zmq
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, routing_id.encode())
    s.curve_secretkey, s.curve_publickey = client[0].encode(), client[1].encode()
    s.curve_serverkey = server_pub.encode()
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def send(s, kind, body):
    s.send_multipart([kind.encode(), json.dumps(body).encode()])


def got_command(s, within):
    import zmq
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if s.poll(50):
            frames = s.recv_multipart(zmq.NOBLOCK)
            if frames[0] == b"command":
                return frames
    return None


def test_identity_is_the_key_not_the_claimed_id(tmp_path, fleet, gateways):
    import zmq
    cluster, bridge = fleet
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    keys.mkdir()
    allow.mkdir()
    k = {n: keygen(keys / n) for n in ("server", "gw-4a", "gw-4b", "rogue")}
    for n in ("gw-4a", "gw-4b"):
        (allow / f"{n}.pub").write_text(k[n][1] + "\n")
    port = free_port()
    b = bridge("bridge-4", port, secret_key_file=str(keys / "server.key"), allow_dir=str(allow))
    spool = "ab" * 16
    ctx = zmq.Context()
    try:
        # A key that is not allowed: refused at the handshake.
        rogue = curve_dealer(ctx, port, "gw-rogue", k["rogue"], k["server"][1])
        send(rogue, "hello", {"gateway": "gw-rogue", "protocol": 1, "resume_seq": 1,
                              "spool_id": spool})
        b.wait_log("not in the allow list", 10)
        # gw-4b's key claiming gw-4a's id: its messages are dropped, it gets no commands.
        imp = curve_dealer(ctx, port, "gw-4a", k["gw-4b"], k["server"][1])
        send(imp, "hello", {"gateway": "gw-4a", "protocol": 1, "resume_seq": 1,
                            "spool_id": spool})
        send(imp, "reading", {"gateway": "gw-4a", "seq": 1, "source": "weather",
                              "time": "2026-01-01T00:00:00.000Z", "values": {"n": 1}})
        b.wait_log("(impersonation)", 10)
        kind, _ = request(cluster.urls, "zgate.gw-4a.command",
                          {"id": "i-1", "target": "relay1", "action": "toggle"})
        assert kind == "no_responders"
        assert got_command(imp, 0.5) is None
        imp.close()
        # The real gw-4a (a zgate gateway with its own key) is served ...
        secret = keys / "gw-4a.key"
        gw = gateways(gw_config(tmp_path, "gw-4a", port, outputs=(("relay1", 27, 0, 2000),),
                                backend=[f'server_public_key = "{k["server"][1]}"',
                                         f'secret_key_file = "{secret}"']), "gw-4a")
        b.wait_log("gateway connected gateway=gw-4a", 20)
        cmd = {"id": "i-2", "target": "relay1", "action": "set", "value": 1}
        r = wait_until(lambda: (r := request(cluster.urls, "zgate.gw-4a.command", cmd))[0]
                       == "reply" and r, 10, "a reply from gw-4a", interval=0.2)
        assert r[1] == {"id": "i-2", "ok": True}
        # ... and gw-4b's key taking its routing id over (ROUTER_HANDOVER gives the id to the
        # new connection; gw-4a is stopped so it cannot take it back) gets no command: once it
        # speaks, its key shows it is not gw-4a, and commands for gw-4a are refused.
        os.kill(gw.proc.pid, signal.SIGSTOP)
        imp = curve_dealer(ctx, port, "gw-4a", k["gw-4b"], k["server"][1])
        send(imp, "hello", {"gateway": "gw-4a", "protocol": 1, "resume_seq": 1,
                            "spool_id": spool})
        b.wait_log("(impersonation)", 10, count=3)
        for i in range(3):
            kind, body = request(cluster.urls, "zgate.gw-4a.command",
                                 {"id": f"i-3{i}", "target": "relay1", "action": "toggle"})
            assert kind == "no_responders" or (
                kind == "reply" and body["ok"] is False and "impersonation" in body["error"]), \
                (kind, body)
        assert got_command(imp, 1.0) is None, "the impersonator received a command"
        imp.close()
        gw.kill9()
        msgs = (stream_messages(cluster.urls, "zgate.gw-4a.reading.>")
                + stream_messages(cluster.urls, "zgate.gw-4a.hello"))
        forged = [m for m in msgs if spool in m[2].decode() or spool in str(m[1])]
        assert forged == [], "a message sent with another gateway's key reached the stream"
        # What the real gw-4a sent is there (its relay readings, its hello).
        assert any(s == "zgate.gw-4a.hello" for s, _, _ in msgs)
        assert not stream_messages(cluster.urls, "zgate.gw-rogue.hello")
    finally:
        ctx.destroy(linger=0)


def test_bad_readings_are_dropped_and_good_ones_still_land(tmp_path, fleet):
    """A reading without a seq is dropped with a log line and acked never; a reading the
    bridge's fast path does not take (a source that is not a string) still lands; the
    readings around them land once each and are acked."""
    import zmq
    cluster, bridge = fleet
    port = free_port()
    b = bridge("bridge-6", port)
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, b"gw-bad")
        s.connect(f"tcp://127.0.0.1:{port}")
        send(s, "hello", {"gateway": "gw-bad", "protocol": 1, "resume_seq": 1,
                          "spool_id": "cd" * 16})
        b.wait_log("gateway connected gateway=gw-bad", 10)
        reading = {"gateway": "gw-bad", "time": "2026-01-01T00:00:00.000Z", "values": {"n": 1}}
        send(s, "reading", dict(reading, source="weather"))
        b.wait_log('message dropped gateway=gw-bad reason="reading without seq"', 10)
        send(s, "reading", dict(reading, seq=1, source=7))
        send(s, "reading", dict(reading, seq=2, source="weather"))
        deadline = time.monotonic() + 10
        acked = 0
        while acked < 2:
            assert time.monotonic() < deadline, f"acked up to {acked}, not 2"
            if s.poll(50):
                kind, body = s.recv_multipart()
                if kind == b"ack":
                    acked = max(acked, json.loads(body)["seq"])
        msgs = stream_messages(cluster.urls, "zgate.gw-bad.reading.>")
        got = sorted((json.loads(body)["seq"], subj) for subj, _, body in msgs)
        assert got == [(1, "zgate.gw-bad.reading.="), (2, "zgate.gw-bad.reading.weather")], got
        assert b.alive()
    finally:
        ctx.destroy(linger=0)


# ---------------------------------------------------------------- subject tokens


def token(name):
    """The bridge's subject token (docs: A-Z a-z 0-9 _ - kept, every other byte =XX)."""
    return "".join(chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "_-")
                   else f"={b:02X}" for b in name.encode())


def test_ids_and_sources_that_would_break_a_subject_are_escaped(tmp_path, fleet, gateways,
                                                                 pty_factory, feeds):
    cluster, bridge = fleet
    port = free_port()
    b = bridge("bridge-5", port)
    gw_id, source = "site.A*>=1", "rain.gauge"
    assert (token(gw_id), token(source)) == ("site=2EA=2A=3E=3D1", "rain=2Egauge")
    pty = pty_factory("rain", nonblocking=True)
    feed = feeds(pty, rate=50).start()
    cfg = make_config(tmp_path / "gw5", f"tcp://127.0.0.1:{port}",
                      serial=[(source, pty.path, "kv", "lf")], stats_interval_s=3600,
                      outbox_max=None, shutdown_flush_ms=200, inputs=(),
                      outputs=(("relay1", 27, 0, 2000),), gateway_id=gw_id,
                      spool={"retransmit_s": 2})
    gateways(cfg, "gw5")
    b.wait_log(f"gateway connected gateway={gw_id}", 20)
    time.sleep(2)
    feed.stop()
    subject = f"zgate.{token(gw_id)}.reading.{token(source)}"

    def complete():
        rs = stream_messages(cluster.urls, subject)
        return rs if {json.loads(m[2])["values"]["n"] for m in rs} >= set(feed.written) else None

    rs = wait_until(complete, 30, "every reading under the escaped subject", interval=1)
    assert len(rs) == len(feed.written) > 20
    for s, h, body in rs:
        d = json.loads(body)
        assert s == subject and (d["gateway"], d["source"]) == (gw_id, source)
        assert h["Nats-Msg-Id"].startswith(f"{token(gw_id)}:") and \
            h["Nats-Msg-Id"].endswith(f":{d['seq']}")
    cmd = {"id": "e-1", "target": "relay1", "action": "set", "value": 1}
    kind, body = wait_until(
        lambda: (r := request(cluster.urls, f"zgate.{token(gw_id)}.command", cmd))[0]
        == "reply" and r, 10, "a reply through the escaped command subject", interval=0.2)
    assert body == {"id": "e-1", "ok": True}
    assert kv_get(cluster.urls, token(gw_id))["connected"] is True


# ---------------------------------------------------------------- the command line


def test_cli_config_template_and_check_config(tmp_path):
    import subprocess
    from nats_cluster import BRIDGE_BIN
    t = subprocess.run([BRIDGE_BIN, "config-template"], capture_output=True, text=True)
    assert t.returncode == 0 and "[bridge]" in t.stdout and "duplicate_window_s" in t.stdout
    good = tmp_path / "bridge.toml"
    good.write_text(t.stdout)
    r = subprocess.run([BRIDGE_BIN, "check-config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(t.stdout.replace("max_inflight = 1024", "max_inflight = 1024\nmax_inflite = 9"))
    r = subprocess.run([BRIDGE_BIN, "check-config", str(bad)], capture_output=True, text=True)
    line = t.stdout.splitlines().index(next(x for x in t.stdout.splitlines()
                                            if x.startswith("max_inflight"))) + 2
    assert r.returncode != 0
    assert f"{bad}:{line}: key bridge.max_inflite: unknown field" in r.stderr, r.stderr
