"""Reconnects (serial and backend) and shutdown on SIGTERM."""

import re
import socket
import threading
import time

import zmq

from conftest import check_reading, free_tcp_port, make_config


def bind_peer(peers, endpoint, timeout=5):
    """Binds a new peer on ``endpoint``, retrying while the previous one releases it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return peers(endpoint)
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_serial_replugged_reconnects(tmp_path, gateways, peers, pty_factory):
    peer = peers()
    sensor = pty_factory("weather")
    gw = gateways(make_config(tmp_path, peer.endpoint, serial=[("weather", sensor.path, "kv",
                                                               "\n")], stats_interval_s=1,
                              outputs=()))
    gw.wait_serial_open("weather")
    peer.expect("hello")
    sensor.line(b"a=1")
    check_reading(peer.reading(), 1, "weather", {"a": 1})

    # Unplug and plug straight back in (a new pty behind the same path).
    t0 = time.monotonic()
    sensor.replug()
    gw.wait_log("serial port lost name=weather", timeout=3)
    gw.wait_serial_open("weather", timeout=5, count=2)
    print(f"\nreplug → reopened after {time.monotonic() - t0:.2f} s")
    sensor.line(b"a=2")
    check_reading(peer.reading(), 2, "weather", {"a": 2})

    # Unplugged for a while, path gone: retries with backoff until it is back.
    sensor.unplug()
    gw.wait_log("serial port lost name=weather", timeout=3, count=2)
    sensor.path.unlink()
    peer.command({"id": "w-1", "target": "weather", "action": "write", "value": "x"})
    assert "not connected" in peer.reply("w-1")["error"]
    time.sleep(1.5)  # at least one failed retry (1 s after the loss)
    t0 = time.monotonic()
    sensor.replug()
    gw.wait_serial_open("weather", timeout=8, count=3)
    print(f"path back → reopened after {time.monotonic() - t0:.2f} s")
    sensor.line(b"a=3")
    check_reading(peer.reading(), 3, "weather", {"a": 3})
    peer.command({"id": "w-2", "target": "weather", "action": "write", "value": "hi"})
    assert peer.reply("w-2") == {"id": "w-2", "ok": True}
    assert sensor.read_available(3, 2) == b"hi\n"

    stats = peer.expect("stats", lambda b: b["counters"]["readings"] == 3)
    assert stats["serial"]["weather"] == {"connected": True, "bad_lines": 0,
                                          "overlong_lines": 0, "disconnects": 2}
    gw.assert_alive()


def test_backend_restart_gets_hello_and_queued_readings(tmp_path, gateways, peers, pty_factory):
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    peer = peers(endpoint)
    sensor = pty_factory("weather")
    gw = gateways(make_config(tmp_path, endpoint, serial=[("weather", sensor.path, "kv", "\n")],
                              stats_interval_s=1, outputs=(("relay1", 27, 0, 2000),)))
    gw.wait_serial_open("weather")
    hello = peer.expect("hello")
    assert hello["resume_seq"] == 1
    check_reading(peer.reading(), 1, "relay1", {"level": 0, "cause": "start"})
    sensor.line(b"a=1")
    check_reading(peer.reading(), 2, "weather", {"a": 1})
    peer.ack(2)
    peer.expect("stats", lambda b: b["counters"]["acked"] == 2)

    peer.close()
    gw.wait_log("backend disconnected", timeout=5)
    # Readings while the backend is away wait in the outbox (ZMQ_IMMEDIATE: not in libzmq).
    sensor.line(b"a=2")
    sensor.line(b"a=3")
    time.sleep(0.1)
    peer2 = bind_peer(peers, endpoint)
    hello = peer2.expect("hello", timeout=10)
    assert hello["resume_seq"] == 3, hello
    assert peer2.history[0][0] == "hello", f"hello first after reconnect: {peer2.history[:3]}"
    check_reading(peer2.reading(), 3, "weather", {"a": 2})
    check_reading(peer2.reading(), 4, "weather", {"a": 3})
    sensor.line(b"a=4")
    check_reading(peer2.reading(), 5, "weather", {"a": 4})
    peer2.command({"id": "c-1", "target": "relay1", "action": "toggle"})
    assert peer2.reply("c-1") == {"id": "c-1", "ok": True}
    check_reading(peer2.reading(), 6, "relay1", {"level": 1, "cause": "command"})
    stats = peer2.expect("stats", lambda b: b["counters"]["readings"] == 6)
    assert stats["counters"]["reconnects"] == 1
    assert stats["counters"]["acked"] == 2
    assert stats["counters"]["dropped"] == 0
    assert gw.log().count("backend connected") == 2
    gw.assert_alive()


def test_sigterm_without_backend_exits_0_after_flush_time(tmp_path, gateways, pty_factory):
    sensor = pty_factory("weather")
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"  # nobody listens
    gw = gateways(make_config(tmp_path, endpoint, serial=[("weather", sensor.path, "kv", "\n")],
                              shutdown_flush_ms=500, outputs=()))
    gw.wait_serial_open("weather")
    sensor.line(b"a=1")
    time.sleep(0.2)  # let the reading reach the outbox (checked in the log below)
    t0 = time.monotonic()
    gw.terminate()
    rc = gw.proc.wait(timeout=10)
    elapsed = time.monotonic() - t0
    print(f"\nSIGTERM → exit {rc} after {elapsed:.3f} s (flush 500 ms, nothing can drain)")
    assert rc == 0, gw.log()
    log = gw.log()
    assert "shutdown: flushing outbox queued=1 for up to 500 ms" in log, log
    assert "messages not delivered count=1" in log, log
    assert 0.45 <= elapsed <= 1.5, elapsed


def test_sigterm_with_backend_flushes_and_exits_quickly(tmp_path, gateways, peers, pty_factory):
    peer = peers()
    sensor = pty_factory("weather")
    gw = gateways(make_config(tmp_path, peer.endpoint, serial=[("weather", sensor.path, "kv",
                                                               "\n")], shutdown_flush_ms=5000,
                              outputs=()))
    gw.wait_serial_open("weather")
    peer.expect("hello")
    sensor.write(b"".join(b"n=%d\n" % i for i in range(3000)))
    check_reading(peer.reading(), 1, "weather", {"n": 0})
    t0 = time.monotonic()
    gw.terminate()
    rc = gw.proc.wait(timeout=10)
    elapsed = time.monotonic() - t0
    print(f"\nSIGTERM → exit {rc} after {elapsed:.3f} s (flush up to 5000 ms, backend reading)")
    assert rc == 0, gw.log()
    assert elapsed < 1.0, f"took {elapsed:.3f} s although the outbox could drain"
    m = re.search(r"gateway stopped readings=(\d+) sent=(\d+)", gw.log())
    assert m, gw.log()
    emitted = int(m.group(1))
    print(f"emitted={emitted} sent={m.group(2)}")
    assert "messages not delivered" not in gw.log()
    # Everything emitted before the exit was delivered, in order.
    got = [1]
    while len(got) < emitted:
        r = peer.reading(timeout=3)
        check_reading(r, len(got) + 1, "weather", {"n": len(got)})
        got.append(r["seq"])
    peer.expect_none("reading", within=0.2)


class SlowProxy:
    """A TCP relay that forwards gateway→backend bytes at ``rate`` bytes/s: a slow link. The
    backend behind it never falls behind, so nothing is lost on its side."""

    def __init__(self, path, backend_port, rate):
        self.rate = rate
        self.backend_port = backend_port
        # A unix socket: the gateway's kernel send buffer is small and fixed (~200 KiB; TCP
        # would autotune it to MiBs and absorb the whole backlog), so the backlog stays in
        # the gateway: its libzmq pipe and its outbox.
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(str(path))
        self.lsock.listen(1)
        self.endpoint = f"ipc://{path}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        conn, _ = self.lsock.accept()
        up = socket.create_connection(("127.0.0.1", self.backend_port))
        threading.Thread(target=self._pump, args=(conn, up, self.rate), daemon=True).start()
        threading.Thread(target=self._pump, args=(up, conn, None), daemon=True).start()

    @staticmethod
    def _pump(src, dst, rate):
        try:
            while True:
                data = src.recv(4096)
                if not data:
                    break
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.lsock.close()


def test_sigterm_delivers_what_libzmq_still_holds(tmp_path, short_dir, gateways, peers,
                                                 pty_factory):
    """Messages already handed to libzmq but not yet on the wire are part of the flush: over
    a slow link they still reach the backend within shutdown_flush_ms. Before the fix
    (ZMQ_LINGER 0 at exit) up to SNDHWM (1000) of them were discarded as soon as the outbox
    was empty."""
    peer = peers("tcp://127.0.0.1:*", rcvhwm=0)
    proxy = SlowProxy(short_dir / "p.ipc", int(peer.endpoint.rsplit(":", 1)[1]), rate=400_000)
    try:
        sensor = pty_factory("weather")
        gw = gateways(make_config(tmp_path, proxy.endpoint,
                                  serial=[("weather", sensor.path, "kv", "\n")],
                                  shutdown_flush_ms=4000, outbox_max=10000, outputs=()))
        gw.wait_serial_open("weather")
        peer.expect("hello")
        sensor.write(b"".join(b"n=%d\n" % i for i in range(5000)))
        time.sleep(0.3)  # let the gateway read them all (the count is taken from its log)
        t0 = time.monotonic()
        gw.terminate()
        seqs = []
        exited_at = None
        while True:
            m = peer.recv(0.1)
            if exited_at is None and gw.proc.poll() is not None:
                exited_at = time.monotonic()
            if m is None:
                if exited_at is not None and time.monotonic() - exited_at > 1.0:
                    break
                assert time.monotonic() - t0 < 15, "gateway did not exit"
                continue
            if m[0] == "reading":
                seqs.append(m[1]["seq"])
        rc = gw.proc.wait(timeout=10)
        elapsed = exited_at - t0
    finally:
        proxy.close()
    log = gw.log()
    m = re.search(r"gateway stopped readings=(\d+) sent=(\d+)", log)
    assert m, log
    emitted = int(m.group(1))
    queued = re.search(r"flushing outbox queued=(\d+)", log)
    print(f"\nSIGTERM over a slow link: exit {rc} after ~{elapsed:.2f} s, queued at "
          f"SIGTERM={queued and queued.group(1)} emitted={emitted} received={len(seqs)}")
    assert rc == 0
    assert emitted == 5000
    assert "messages not delivered" not in log, log
    assert seqs == list(range(1, emitted + 1)), f"received {len(seqs)} of {emitted}"
    assert elapsed <= 4.0 + 1.0
