"""The reference backend's side of the link contract (docs/protocol.md, "What a backend must
do"), checked with independent pyzmq DEALERs playing gateways against `zgate backend`:

- a gateway that reconnects with the same routing id while its old connection still looks
  alive here takes over (ZMQ_ROUTER_HANDOVER);
- every `hello` is answered at once with an ack of at least `resume_seq - 1`, never above what
  the gateway sent on that connection;
- de-duplication is per (gateway, spool_id, seq): a gateway whose spool was replaced starts
  again at seq 1 under a new spool_id, and those readings are printed and acked as new.
"""

import json
import time

import zmq

from conftest import GW_ID, free_port, wait_until

SPOOL_A = "0123456789abcdef0123456789abcdef"
SPOOL_B = "fedcba9876543210fedcba9876543210"


class Dealer:
    """A gateway's socket: a DEALER with routing id ``GW_ID`` connected to ``endpoint``."""

    def __init__(self, endpoint, routing_id=GW_ID):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, routing_id.encode())
        self.sock.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)

    def send(self, kind, body):
        self.sock.send_multipart([kind.encode(), json.dumps(body).encode()])

    def hello(self, resume_seq, spool_id=SPOOL_A, **extra):
        body = {"gateway": GW_ID, "protocol": 1, "version": "test", "inputs": [],
                "outputs": [], "serial": [], "resume_seq": resume_seq, "security": "none",
                "insecure": False, **extra}
        if spool_id is not None:
            body["spool_id"] = spool_id
        self.send("hello", body)

    def reading(self, seq, **values):
        self.send("reading", {"gateway": GW_ID, "seq": seq, "source": "weather",
                              "time": "2026-12-01T00:00:00.000Z", "values": values or {"n": seq}})

    def recv(self, timeout):
        """The next message as (kind, body), or None after ``timeout`` seconds."""
        if not self.poller.poll(int(timeout * 1000)):
            return None
        kind, body = self.sock.recv_multipart()
        return kind.decode(), json.loads(body)

    def ack(self, timeout=5.0):
        """The seq of the next message, which must be an ack."""
        m = self.recv(timeout)
        assert m is not None, f"no ack within {timeout} s"
        kind, body = m
        assert kind == "ack", m
        return body["seq"]

    def ack_reaching(self, seq, timeout=5.0):
        """Reads acks until one covers ``seq``; returns every ack seen."""
        seen = []
        deadline = time.monotonic() + timeout
        while not seen or seen[-1] < seq:
            left = deadline - time.monotonic()
            assert left > 0, f"no ack reaching {seq} within {timeout} s; acks: {seen}"
            seen.append(self.ack(left))
        return seen

    def nothing(self, within=0.3):
        m = self.recv(within)
        assert m is None, f"unexpected message {m!r}"

    def close(self):
        self.sock.close(0)


def endpoint():
    return f"tcp://127.0.0.1:{free_port()}"


def test_reconnect_with_same_routing_id_takes_over(backends):
    ep = endpoint()
    be = backends(ep)
    old = Dealer(ep)
    new = None
    try:
        old.hello(1)
        be.expect("hello", lambda h: h["resume_seq"] == 1, timeout=10)
        assert old.ack() == 0
        old.reading(1)
        be.expect("reading", lambda r: r["seq"] == 1)
        assert old.ack_reaching(1)[-1] == 1

        # The old connection never closed (a frozen link looks like that to the backend);
        # the gateway reconnects with the same routing id on a new one.
        new = Dealer(ep)
        new.hello(2, version="reconnected")
        hello, _ = be.expect("hello", lambda h: h.get("version") == "reconnected", timeout=5)
        assert hello["gateway"] == GW_ID
        assert new.ack() == 1, "the hello on the new connection must be answered there"
        new.reading(2)
        r, _ = be.expect("reading", lambda r: r["seq"] == 2)
        assert r["values"] == {"n": 2}
        assert new.ack_reaching(2)[-1] == 2
        # Commands now go to the new connection.
        be.command(GW_ID, {"id": "c-1", "target": "relay1", "action": "toggle"})
        m = new.recv(5)
        assert m is not None and m[0] == "command" and m[1]["id"] == "c-1", m
    finally:
        old.close()
        if new is not None:
            new.close()


def test_every_hello_is_answered(backends):
    ep = endpoint()
    be = backends(ep)
    d = Dealer(ep)
    try:
        # Fresh ledger: exactly resume_seq - 1, for every hello, repeats included.
        for _ in range(3):
            d.hello(5)
            assert d.ack() == 4
        d.hello(1)
        assert d.ack() == 0
        for seq in (1, 2, 3):
            d.reading(seq)
        assert d.ack_reaching(3)[-1] == 3
        # The gateway missed that ack and reconnects with resume_seq 2: the answer is at
        # least resume_seq - 1 and not above what it sent on this connection (nothing yet).
        d.hello(2)
        assert d.ack() == 1
        d.reading(2)
        d.reading(3)
        assert d.ack_reaching(3)[-1] == 3
        wait_until(lambda: sum(1 for line in be.raw if '"kind":"hello"' in line) == 5, 5,
                   "five hellos printed")
    finally:
        d.close()


def test_hello_is_answered_by_a_backend_that_does_not_ack(backends):
    ep = endpoint()
    backends(ep, extra=["--no-ack"])
    d = Dealer(ep)
    try:
        d.hello(10)
        assert d.ack() == 9
        d.reading(10)
        d.reading(11)
        d.nothing(within=0.5)
        d.hello(10)
        assert d.ack() == 9
    finally:
        d.close()


def test_new_spool_id_starts_a_fresh_ledger(backends):
    ep = endpoint()
    be = backends(ep)
    d = Dealer(ep)
    n = 10
    try:
        d.hello(1, spool_id=SPOOL_A)
        assert d.ack() == 0
        for seq in range(1, n + 1):
            d.reading(seq, spool="a")
        for seq in range(1, n + 1):
            be.expect("reading", lambda r, s=seq: r["seq"] == s and r["values"]["spool"] == "a")
        assert d.ack_reaching(n)[-1] == n

        # The same spool again: its readings are duplicates, acked but not printed.
        d.hello(n + 1, spool_id=SPOOL_A)
        assert d.ack() == n
        d.reading(n, spool="a-again")
        assert d.ack_reaching(n)[-1] == n

        # The data_dir was wiped: a new spool_id, seqs from 1 again.
        d.hello(1, spool_id=SPOOL_B)
        assert d.ack() == 0
        for seq in range(1, n + 1):
            d.reading(seq, spool="b")
        for seq in range(1, n + 1):
            be.expect("reading", lambda r, s=seq: r["seq"] == s and r["values"]["spool"] == "b")
        assert d.ack_reaching(n)[-1] == n
        assert not any('"a-again"' in line for line in be.raw), "a duplicate was printed"
        wait_until(lambda: "spool_id changed" in be.log_path.read_text(), 5,
                   "the backend logging the new spool")
        log = be.log_path.read_text()
        assert SPOOL_A in log and SPOOL_B in log, log
    finally:
        d.close()


def test_malformed_spool_id_changes_nothing(backends):
    ep = endpoint()
    be = backends(ep)
    d = Dealer(ep)
    try:
        d.hello(1, spool_id=SPOOL_A)
        assert d.ack() == 0
        d.reading(1)
        assert d.ack_reaching(1)[-1] == 1
        d.hello(2, spool_id="not-hex")
        assert d.ack() == 1, "a hello with a bad spool_id is still answered"
        err, _ = be.expect("error", lambda e: "spool_id" in e["error"])
        assert err["gateway"] == GW_ID
        # The ledger was kept: seq 1 is still a duplicate.
        d.reading(1, dup=True)
        assert d.ack_reaching(1)[-1] == 1
        d.reading(2)
        be.expect("reading", lambda r: r["seq"] == 2)
        assert not any('"dup":true' in line for line in be.raw)
    finally:
        d.close()


def test_generated_command_ids_differ_between_runs(backends):
    """A restarted backend must not reuse the ids of its earlier run: the gateway would answer
    them from its cache (or refuse them) instead of executing the new commands."""
    ids = []
    for run in range(2):
        ep = endpoint()
        be = backends(ep, name=f"run{run}")
        d = Dealer(ep)
        try:
            d.hello(1)
            assert d.ack() == 0
            for _ in range(2):
                be.command(GW_ID, {"target": "relay1", "action": "toggle"})
                m = d.recv(5)
                assert m is not None and m[0] == "command", m
                ids.append(m[1]["id"])
        finally:
            d.close()
        be.kill()
    assert len(set(ids)) == 4, ids
