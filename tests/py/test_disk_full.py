"""A full file system under data_dir, end to end: a real tmpfs (needs root), a real gateway, a
pyzmq backend. A full disk is treated like a full budget, readings the spool cannot store still
go out from memory while a backend is connected, and everything is counted in `stats`."""

import os
import subprocess

import pytest

from conftest import make_config, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(path, size):
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"mount -t tmpfs failed: {r.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for p in mounted:
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def fill(dir_, name="filler"):
    """Writes one file until the file system is full; returns its path."""
    path = dir_ / name
    with open(path, "wb", buffering=0) as f:
        chunk = b"\1" * 4096
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        # The last partial block too: down to the byte.
        try:
            while True:
                f.write(b"\1")
        except OSError:
            pass
    return path


def start(tmp_path, gateways, peers, pty_factory, spool):
    peer = peers(auto_ack=True, background=True)
    sensor = pty_factory("weather")
    cfg = make_config(tmp_path, peer.endpoint, serial=[("weather", sensor.path, "kv", "\n")],
                      stats_interval_s=1, outputs=(), inputs=(), spool=spool)
    gw = gateways(cfg)
    gw.wait_serial_open("weather")
    wait_until(lambda: peer.hellos, 5, "hello")
    return gw, peer, sensor


def delivered(peer):
    with peer.lock:
        return {values.get("n") for _, values, _ in peer.arrivals}


def test_max_bytes_beyond_the_disk_is_warned_at_start(tmp_path, gateways, peers, pty_factory,
                                                       tmpfs):
    tmpfs(tmp_path / "data", "256k")
    gw, _, _ = start(tmp_path, gateways, peers, pty_factory, {"max_bytes": 16 * 1024 * 1024})
    gw.wait_match(r"spool: max_bytes=16777216 exceeds the room on .*file system")


def test_full_disk_while_connected_readings_go_out_from_memory(tmp_path, gateways, peers,
                                                                pty_factory, tmpfs):
    data = tmpfs(tmp_path / "data", "1m")
    gw, peer, sensor = start(tmp_path, gateways, peers, pty_factory,
                             {"max_bytes": 512 * 1024, "fsync": "interval"})
    # Something else fills the file system before the first reading: the spool has nothing
    # of its own to free.
    filler = fill(data)
    for n in range(1, 31):
        sensor.line(b"n=%d" % n)
        wait_until(lambda: n in delivered(peer), 5, f"reading n={n} with the disk full")
    # A burst while the disk stays full.
    for n in range(31, 281):
        sensor.line(b"n=%d" % n)
    wait_until(lambda: set(range(1, 281)) <= delivered(peer), 15,
               "every reading delivered while the disk is full")

    def disk_full_counted():
        s = peer.last_stats()
        return s and s["spool"]["disk_full"] >= 1 and s["spool"]["not_stored"] >= 1
    wait_until(disk_full_counted, 5, "stats counting disk_full and not_stored")
    s = peer.last_stats()
    assert s["spool"]["spool_id"], s
    assert s["counters"]["readings"] >= 280, s
    gw.assert_alive()

    # Space again: readings are stored (and delivered) as before.
    filler.unlink()
    not_stored = peer.last_stats()["spool"]["not_stored"]
    for n in range(281, 331):
        sensor.line(b"n=%d" % n)
    wait_until(lambda: set(range(281, 331)) <= delivered(peer), 10, "readings after space is back")

    def stored_again():
        s = peer.last_stats()
        return s and s["spool"]["not_stored"] == not_stored and s["spool"]["readings"] == 0
    wait_until(stored_again, 5, "nothing more unstored, everything acked")
    gw.assert_alive()


def test_full_disk_without_a_backend_keeps_the_newest_and_counts_the_rest(
        tmp_path, gateways, peers, pty_factory, tmpfs):
    """No backend: a full disk under drop_oldest frees the oldest segments like a full budget;
    the gateway keeps running, keeps the newest readings and counts what it dropped."""
    tmpfs(tmp_path / "data", "200k")
    sensor = pty_factory("weather")
    from conftest import free_tcp_port
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    cfg = make_config(tmp_path, endpoint, serial=[("weather", sensor.path, "kv", "\n")],
                      stats_interval_s=1, outputs=(), inputs=(),
                      spool={"max_bytes": 4 * 1024 * 1024, "when_full": "drop_oldest"})
    gw = gateways(cfg)
    gw.wait_serial_open("weather")
    total = 3000
    pad = "x" * 60
    for n in range(1, total + 1):
        sensor.line(f"n={n} pad={pad}".encode())
    wait_until(lambda: f"seq={total}" in gw.log() or "disk full" in gw.log(), 20,
               "the disk filling up")
    gw.assert_alive()

    peer = peers(endpoint=endpoint, auto_ack=True, background=True)
    wait_until(lambda: total in delivered(peer), 30, "the newest reading delivered")
    got = delivered(peer)

    def stats_after_replay():
        s = peer.last_stats()
        return s and s["spool"]["readings"] == 0
    wait_until(stats_after_replay, 20, "the backlog replayed and acked")
    s = peer.last_stats()
    assert s["spool"]["disk_full"] >= 1, s
    dropped = s["spool"]["dropped_oldest"] + s["spool"]["not_stored"]
    # Every reading is either delivered or counted as dropped; none silently lost.
    assert len(got) + dropped >= total, (len(got), s["spool"])
    # The newest readings are the ones kept.
    assert set(range(total - 100, total + 1)) <= got
    gw.assert_alive()
