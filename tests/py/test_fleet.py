"""Fleet: gateways -> zgate-bridge -> a 3-node NATS JetStream cluster (issue "Fleet").

Real parts only: Debian's nats-server (3 nodes on loopback, stream with 3 replicas), real
`zgate` gateways fed by ptys, real `zgate-bridge` processes, nats-py as the independent
consumer that checks every reading is in the stream exactly once by its message id.
"""

import json
import time
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
