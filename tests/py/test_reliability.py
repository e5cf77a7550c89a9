"""Reliable delivery end to end (spool, acks, rewind, retransmit, drop policies, crash and
corruption recovery). Every wait is bounded."""

import os
import random
import re
import shutil
import time

import pytest

from conftest import (
    ZGATE_BIN, free_port, make_config, read_segment, records_on_disk, segments, sensor_line,
    spool_state, wait_until,
)

SEED = int(os.environ.get("ZGATE_TEST_SEED", "20261128"))

pytestmark = pytest.mark.skipif(not os.path.exists(ZGATE_BIN),
                                reason=f"zgate binary not built: {ZGATE_BIN}")


def config(tmp_path, endpoint, pty, spool=None):
    """One kv sensor on `pty`, stats every second, no GPIO."""
    return make_config(tmp_path, endpoint, serial=[("sensor", pty.path, "kv", None)],
                       stats_interval_s=1, outbox_max=10000, shutdown_flush_ms=1000,
                       inputs=(), outputs=(), spool=spool)


def sensor_pty(pty_factory):
    """The sensor's pty: its master stays open across gateway restarts, and a full tty buffer
    (no gateway reading) refuses a line instead of blocking the writer."""
    return pty_factory("sensor", nonblocking=True)


def acking_peer(peers, endpoint="tcp://127.0.0.1:*", ack=True):
    """A peer receiving in a thread that acks the highest contiguous seq (when `ack`)."""
    return peers(endpoint, handover=True, auto_ack=ack, background=True)


def start_gateway(gateways, cfg_text):
    gw = gateways(cfg_text)
    gw.wait_serial_open("sensor", timeout=10, since_start=True)
    return gw


def restart(gw):
    gw.start()
    gw.wait_serial_open("sensor", timeout=10, since_start=True)


def settle(peer, timeout=20):
    """Waits until the gateway has nothing new to store and the peer holds (and the gateway
    took the ack for) everything: the last two stats agree on next_seq with acked =
    next_seq - 1. Returns that next_seq."""

    def done():
        with peer.lock:
            last2 = peer.stats[-2:]
        if len(last2) < 2:
            return None
        a, b = (x["spool"] for x in last2)
        nxt = b["next_seq"]
        if a["next_seq"] == nxt and a["acked"] == b["acked"] == nxt - 1 and peer.high >= nxt - 1:
            return nxt
        return None

    return wait_until(done, timeout, interval=0.1, what="delivery to settle")


def check_values_consistent(arrivals):
    """Every seq always carries the same values (no seq reused for another reading), and the
    counters n grow with the seq (order preserved)."""
    by_seq = {}
    for seq, values, _ in arrivals:
        prev = by_seq.setdefault(seq, values)
        assert prev == values, f"seq {seq} arrived with different values: {prev} / {values}"
    ns = [by_seq[s]["n"] for s in sorted(by_seq)]
    assert all(a < b for a, b in zip(ns, ns[1:])), "counters n not increasing with seq"
    for s, v in by_seq.items():
        assert v == sensor_line(v["n"])[1], f"seq {s}: values {v} do not match line n={v['n']}"
    return by_seq


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fsync", ["interval", "always"])
def test_kill9_under_load_no_gap(tmp_path, gateways, peers, pty_factory, feeds, fsync):
    # Under "always" readings are sent only after the spool's helper thread synced them.
    rng = random.Random(SEED)
    peer = acking_peer(peers)
    pty = sensor_pty(pty_factory)
    gw = start_gateway(gateways, config(tmp_path, peer.endpoint, pty,
                                        spool={"retransmit_s": 2, "fsync": fsync}))
    sensor = feeds(pty, rate=200)
    sensor.start()
    kills = 6
    for _ in range(kills):
        time.sleep(rng.uniform(0.3, 1.2))
        gw.kill9()
        time.sleep(rng.uniform(0.0, 0.3))
        restart(gw)
    time.sleep(rng.uniform(0.3, 1.0))
    sensor.stop()
    last = settle(peer)
    assert gw.term() == 0, gw.log()[-2000:]
    n_stored = spool_state(tmp_path / "data")["floor"] - 1
    assert n_stored == last - 1
    seqs = peer.seqs()
    received = set(seqs)
    missing = sorted(set(range(1, n_stored + 1)) - received)
    assert not missing, f"{len(missing)} seqs never arrived, first {missing[:20]}"
    assert max(received) == n_stored, "a seq above the last stored one arrived"
    by_seq = check_values_consistent(peer.arrivals)
    duplicates = len(seqs) - len(received)
    # Not vacuous: most of what the sensor wrote while a gateway was up became readings.
    assert n_stored >= 0.5 * len(sensor.written), (n_stored, len(sensor.written))
    assert len(by_seq) == n_stored
    print(f"kill -9 x{kills}: {n_stored} readings, {duplicates} duplicates, "
          f"{len(sensor.written)} lines written, {sensor.lost} lost at the tty")


def test_backend_down_then_back(tmp_path, gateways, backends, pty_factory, feeds):
    port = free_port()
    ep = f"tcp://127.0.0.1:{port}"
    pty = sensor_pty(pty_factory)
    started = [backends(ep)]
    gw = start_gateway(gateways, config(tmp_path, ep, pty))
    sensor = feeds(pty, rate=200)
    sensor.start()
    wait_until(lambda: len(started[0].readings()) >= 100, 10, what="first readings")
    started[0].stop()
    down_at = sensor.next
    time.sleep(3)
    assert sensor.next - down_at >= 300, "sensor did not keep writing"
    started.append(backends(ep))
    time.sleep(1)
    sensor.stop()
    written = list(sensor.written)

    def delivered():
        s = started[1].last_stats()
        return (s is not None and s["spool"]["next_seq"] == len(written) + 1
                and s["spool"]["acked"] == len(written))

    wait_until(delivered, 30, interval=0.1, what="all readings acked after the backend came back")
    first = {}
    order = []
    for b in started:
        for r in b.readings():
            if r["seq"] not in first:
                first[r["seq"]] = r
                order.append(r["seq"])
    n = len(written)
    assert order == list(range(1, n + 1)), "seqs not contiguous in order of first arrival"
    # Readings written while the backend was away came through the spool.
    assert first[down_at]["seq"] == written.index(down_at) + 1
    for i, seq in enumerate(order):
        assert first[seq]["values"] == sensor_line(written[i])[1], f"seq {seq}"
    s = started[1].last_stats()
    assert s["counters"]["dropped"] == 0 and s["counters"]["bad_lines"]["sensor"] == 0
    assert gw.term() == 0


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_spool_full(tmp_path, gateways, backends, pty_factory, feeds, policy):
    max_bytes = 4096 * 4   # segments of 4 KiB
    port = free_port()
    ep = f"tcp://127.0.0.1:{port}"
    pty = sensor_pty(pty_factory)
    gw = start_gateway(gateways, config(tmp_path, ep, pty,
                                        spool={"max_bytes": max_bytes, "when_full": policy}))
    sensor = feeds(pty)
    m = 400
    for _ in range(m // 20):
        sensor.write_now(20)
        time.sleep(0.02)
    # No backend yet. Wait until the gateway consumed every line (the spool stops changing),
    # then look at the segment files.
    data_dir = tmp_path / "data"
    gw.wait_match(r"spool full", timeout=10)

    seen = {"recs": None, "since": None}

    def stable():
        recs = records_on_disk(data_dir)
        if not recs:
            return None
        key = [(r[2], r[1]) for r in recs]
        if key != seen["recs"]:
            seen["recs"], seen["since"] = key, time.monotonic()
            return None
        return recs if time.monotonic() - seen["since"] >= 0.6 else None

    recs = wait_until(stable, 15, interval=0.1, what="spool to stop changing")
    disk_bytes = sum(p.stat().st_size for p in segments(data_dir))
    assert disk_bytes <= max_bytes
    disk_seqs = [r[2] for r in recs]
    assert disk_seqs == list(range(disk_seqs[0], disk_seqs[-1] + 1)), "gap on disk"
    if policy == "drop_newest":
        assert disk_seqs[0] == 1
        # Full: the next reading (at least as large as the last stored) does not fit.
        assert disk_bytes + recs[-1][1] > max_bytes, (disk_bytes, recs[-1][1])
    else:
        assert disk_seqs[-1] == m
        # Whole oldest segments went: the oldest file left starts at the first seq kept.
        assert segments(data_dir)[0].name == f"{disk_seqs[0]:020d}.seg"

    backend = backends(ep)

    def final_stats():
        s = backend.last_stats()
        if s and s["counters"]["readings"] + s["spool"]["dropped_newest"] == m:
            return s
        return None

    s = wait_until(final_stats, 20, interval=0.1, what="stats covering all lines")
    stored = s["counters"]["readings"]
    last_seq = stored
    assert s["spool"]["next_seq"] == last_seq + 1
    assert s["counters"]["bad_lines"]["sensor"] == 0

    def acked():
        t = backend.last_stats()
        return t if t["spool"]["acked"] == last_seq else None

    t = wait_until(acked, 20, interval=0.1, what=f"final ack to reach seq {last_seq}")
    got = {}
    for r in backend.readings():
        got.setdefault(r["seq"], r)
    if policy == "drop_newest":
        dropped = m - stored
        assert dropped > 0, "spool never got full: test is vacuous"
        assert s["counters"]["dropped"] == dropped
        assert s["spool"]["dropped_newest"] == dropped
        assert s["spool"]["dropped_oldest"] == 0
        # Exactly the first `stored` lines made it, in order; the rest were refused.
        assert sorted(got) == list(range(1, stored + 1))
        for seq, r in got.items():
            assert r["values"] == sensor_line(seq)[1]
    else:
        assert stored == m, "drop_oldest stores every reading"
        dropped = s["spool"]["dropped_oldest"]
        assert dropped > 0, "spool never got full: test is vacuous"
        assert s["counters"]["dropped"] == dropped
        assert s["spool"]["dropped_newest"] == 0
        never = set(range(1, m + 1)) - set(got)
        assert len(never) == dropped, (len(never), dropped)
        assert never == set(range(1, dropped + 1)), "not the oldest that were dropped"
        for seq, r in got.items():
            assert r["values"] == sensor_line(seq)[1]
    assert t["spool"]["acked"] == last_seq
    assert gw.term() == 0
    print(f"{policy}: {m} lines, {stored} stored, dropped {dropped}")


def fill_spool_offline(tmp_path, gateways, pty_factory, feeds, count):
    """Runs the gateway without a backend, writes `count` lines, stops it with SIGTERM.
    Returns (pty, sensor, the newest segment's path, its records)."""
    pty = sensor_pty(pty_factory)
    ep = f"tcp://127.0.0.1:{free_port()}"
    gw = start_gateway(gateways, config(tmp_path, ep, pty))
    sensor = feeds(pty)
    sensor.write_now(count)
    data_dir = tmp_path / "data"
    wait_until(lambda: len(records_on_disk(data_dir) or []) == count, 10,
               what=f"{count} records on disk")
    assert gw.term() == 0
    assert spool_state(data_dir)["floor"] == count + 1
    seg = segments(data_dir)[-1]
    return pty, sensor, seg, read_segment(seg)


def test_corrupt_newest_segment_end_to_end(tmp_path, gateways, peers, pty_factory, feeds):
    count = 30
    rng = random.Random(SEED + 1)
    pty, _, seg, recs = fill_spool_offline(tmp_path, gateways, pty_factory, feeds, count)
    assert len(recs) == count, "expected one segment with default max_bytes"
    pristine = tmp_path / "pristine"
    shutil.copytree(tmp_path / "data", pristine)
    last_off, last_size, _, _ = recs[-1]
    prev_off, prev_size, _, _ = recs[-2]
    # (label, damage(segment bytes) -> bytes, seqs that must not arrive, bytes the start-up
    # must report as discarded)
    cases = []
    for cut in (1, 13, 25, 26, 27, last_size // 2, last_size - 1):
        cases.append((f"truncate last record at +{cut}",
                      lambda d, c=cut: d[:last_off + c], {count}, cut))
    for cut in (5, prev_size - 3):
        cases.append((f"truncate second-to-last at +{cut}",
                      lambda d, c=cut: d[:prev_off + c], {count - 1, count}, cut))

    def flip(d, off, bit):
        b = bytearray(d)
        b[off] ^= 1 << bit
        return bytes(b)

    for _ in range(3):
        pos = rng.randrange(last_size)
        bit = rng.randrange(8)
        cases.append((f"flip bit {bit} at last+{pos}",
                      lambda d, p=pos, b=bit: flip(d, last_off + p, b), {count}, last_size))
    pos = rng.randrange(prev_size)
    bit = rng.randrange(8)
    # A corrupt record in the middle is skipped; the valid record after it still arrives.
    cases.append((f"flip bit {bit} at second-to-last+{pos}",
                  lambda d, p=pos, b=bit: flip(d, prev_off + p, b), {count - 1}, prev_size))

    data_dir = tmp_path / "data"
    original = seg.read_bytes()
    for label, damage, damaged, discarded in cases:
        shutil.rmtree(data_dir)
        shutil.copytree(pristine, data_dir)
        seg.write_bytes(damage(original))
        peer = acking_peer(peers)
        gw = gateways(config(tmp_path, peer.endpoint, pty))
        expected = set(range(1, count + 1)) - damaged
        wait_until(lambda: expected <= set(peer.seqs()), 15,
                   what=f"{label}: valid records delivered")
        assert gw.alive(), f"{label}: gateway exited"
        log = gw.log(since_start=True)
        m = re.search(r"spool: .*?(\d+) bytes discarded", log)
        assert m and int(m.group(1)) == discarded, f"{label}: log says {m and m.group(0)!r}, " \
                                                   f"expected {discarded} discarded bytes\n{log}"
        assert gw.term() == 0, label
        got = set(peer.seqs())
        assert not (got & damaged), f"{label}: damaged seqs {sorted(got & damaged)} delivered"
        check_values_consistent(peer.arrivals)
        peer.close()
    print(f"corruption: {len(cases)} cases: " + "; ".join(c[0] for c in cases))


def test_restart_continues_seq(tmp_path, gateways, peers, pty_factory, feeds):
    peer = acking_peer(peers)
    pty = sensor_pty(pty_factory)
    gw = start_gateway(gateways, config(tmp_path, peer.endpoint, pty))
    sensor = feeds(pty)
    sensor.write_now(20)
    last = settle(peer) - 1
    assert last == 20
    assert gw.term() == 0
    before = len(peer.arrivals)
    restart(gw)
    wait_until(lambda: len(peer.hellos) >= 2, 10, what="hello after restart")
    assert peer.hellos[-1]["resume_seq"] == last + 1
    sensor.write_now(5)
    wait_until(lambda: len(peer.arrivals) >= before + 5, 10, what="new readings")
    new = [a[0] for a in peer.arrivals[before:]]
    assert new == list(range(last + 1, last + 6)), new
    check_values_consistent(peer.arrivals)
    assert gw.term() == 0


def test_retransmit_until_acked(tmp_path, gateways, peers, pty_factory, feeds):
    peer = acking_peer(peers, ack=False)
    pty = sensor_pty(pty_factory)
    gw = start_gateway(gateways, config(tmp_path, peer.endpoint, pty, spool={"retransmit_s": 1}))
    wait_until(lambda: peer.hellos, 10, what="hello")
    time.sleep(1.5)   # connected a while before the readings are sent
    sensor = feeds(pty)
    sensor.write_now(10)
    wait_until(lambda: len(peer.arrivals) >= 20, 10, what="one retransmission")
    with peer.lock:
        arrivals = list(peer.arrivals)
        times = list(peer.arrival_times)
    first, again = arrivals[:10], arrivals[10:20]
    assert [a[0] for a in first] == list(range(1, 11))
    assert [a[0] for a in again] == list(range(1, 11)), "resent: same seqs, in order"
    assert [a[2] for a in again] == [a[2] for a in first], "resent: same bodies"
    gap = times[10] - times[9]
    assert 0.8 <= gap <= 3.0, f"resent after {gap:.2f} s, retransmit_s = 1"
    peer.set_ack(True)
    wait_until(lambda: peer.acks_sent and peer.acks_sent[-1] == 10, 5, what="ack 10 sent")
    time.sleep(0.3)   # whatever was already in flight
    n = len(peer.arrivals)
    time.sleep(2.5)
    assert len(peer.arrivals) == n, "still resending after the ack"
    s = peer.last_stats()
    assert s["spool"]["acked"] == 10
    assert gw.term() == 0


@pytest.mark.parametrize("rate", [400, 0])
def test_backlog_replay_is_paced(tmp_path, gateways, peers, pty_factory, feeds, rate):
    """[spool] replay_max_per_s paces the drain of a backlog (issue 6: unpaced, a drain keeps
    the CPU busy and commands wait for it); 0 drains as fast as the link takes it. Either way
    every reading arrives, in order."""
    n = 1600
    pty = sensor_pty(pty_factory)
    ep = f"tcp://127.0.0.1:{free_port()}"
    start_gateway(gateways, config(tmp_path, ep, pty, spool={"replay_max_per_s": rate}))
    sensor = feeds(pty, rate=4000)
    sensor.start()
    wait_until(lambda: len(sensor.written) >= n, 20, what=f"{n} lines written")
    sensor.stop()
    count = len(sensor.written)
    data_dir = tmp_path / "data"
    wait_until(lambda: len(records_on_disk(data_dir) or []) == count, 10,
               what=f"{count} records spooled")
    peer = acking_peer(peers, ep)
    wait_until(lambda: peer.high >= count, 60, interval=0.05, what="the backlog delivered")
    with peer.lock:
        arrivals = list(zip(peer.arrival_times, (a[0] for a in peer.arrivals)))
    first = {}
    for t, seq in arrivals:
        first.setdefault(seq, t)
    assert sorted(first) == list(range(1, count + 1))
    assert [s for _, s in sorted((t, s) for s, t in first.items())] == list(range(1, count + 1))
    span = first[count] - first[1]
    print(f"replay_max_per_s={rate}: {count} readings in {span:.3f} s")
    if rate:
        # Burst: max(rate / 10, min(rate, 256)) = 256 readings; the rest at `rate` per second.
        expected = (count - 256) / rate
        assert span >= 0.8 * expected, f"{count} readings in {span:.2f} s: not paced"
        assert span <= expected + 5, f"{count} readings in {span:.2f} s: too slow"
    else:
        assert span < 1.0, f"unpaced drain of {count} readings took {span:.2f} s"


def test_warns_when_readings_outpace_replay(tmp_path, gateways, peers, pty_factory, feeds):
    """Readings arriving at or above [spool] replay_max_per_s mean that a backlog (after any
    outage) can never drain: the gateway says so, naming the key, but not while the reading
    rate stays below it."""
    pty = sensor_pty(pty_factory)
    peer = acking_peer(peers)
    gw = start_gateway(gateways, config(tmp_path, peer.endpoint, pty,
                                        spool={"replay_max_per_s": 40}))
    warning = r"readings arrive at (\d+)/s, at least \[spool\] replay_max_per_s = 40"
    slow = feeds(pty, rate=10)
    slow.start()
    time.sleep(3.5)  # three stats intervals (1 s) at 10 readings/s
    slow.stop()
    assert len(slow.written) >= 20
    assert not re.search(warning, gw.log()), gw.log()[-2000:]
    fast = feeds(pty, rate=200, start=slow.next)
    fast.start()
    m = gw.wait_match(warning, timeout=10)
    fast.stop()
    assert int(m.group(1)) >= 40, m.group(0)
