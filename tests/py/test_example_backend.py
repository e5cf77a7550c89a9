"""examples/backend.py, the Python backend users copy, against the real gateway over tcp
127.0.0.1 (and against a pyzmq DEALER playing a gateway, for the rules a healthy gateway
never exercises: duplicates, gaps, lost acks, a foreign protocol, an impostor).

The example prints JSON lines on stdout (parsed as the reference backend's are) and logs to
stderr (``<name>.stderr``, printed when a test fails)."""

import json
import queue
import re
import shutil
import subprocess
import sys
import threading

import pytest
import zmq

import conftest
from conftest import (GW_ID, REPO, ZGATE_BIN, RefBackend, free_tcp_port, make_config, read_pin,
                      wait_until)

EXAMPLE = REPO / "examples" / "backend.py"
ID_RE = re.compile(r"py-[0-9a-f]{12}-\d+")


class ExampleBackend(RefBackend):
    """``python3 examples/backend.py --bind EP ...``: the RefBackend helpers (expect, of_kind,
    command as a JSON line, log) over the example's stdout and stderr."""

    def __init__(self, tmp_path, args, name="example"):
        # The fields RefBackend's methods use, with the example as the process.
        self.log_path = tmp_path / f"{name}.stderr"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(EXAMPLE), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log)
        self.lines = queue.Queue()
        self.raw = []
        self.backlog = []
        self._printed = []
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._reader, daemon=True)
        self._t.start()

    def line(self, text):
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_log(self, needle, timeout=10):
        wait_until(lambda: needle in self.log(), timeout, f"{needle!r} in the example's log",
                   interval=0.05)


@pytest.fixture
def examples(request, tmp_path):
    made = []

    def start(endpoint, *extra, name=None):
        b = ExampleBackend(tmp_path, ["--bind", endpoint, *extra],
                           name=name or f"example{len(made)}")
        made.append(b)
        b.wait_log("listening bind=")
        return b

    yield start
    failed = conftest.test_failed(request)
    for b in made:
        b.kill()
        if failed:
            sys.stderr.write(f"\n----- {b.log_path.name} -----\n{b.log()[-4000:]}\n"
                             "----- its stdout (last lines) -----\n" + "\n".join(b.raw[-30:]))


def keygen(prefix):
    r = subprocess.run([ZGATE_BIN, "keygen", "--out", str(prefix)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")


def gateway_config(base, endpoint, sensor, *, gateway_id=GW_ID, backend=()):
    """Serial port "weather", outputs relay1 (pin 27, starts at 0) and relay2 (pin 22, at 1),
    stats every second, unacked readings resent after 3 s."""
    base.mkdir(exist_ok=True)
    return make_config(base, endpoint, serial=[("weather", sensor.path, "kv", "\n")],
                       stats_interval_s=1, gateway_id=gateway_id, backend=list(backend),
                       outputs=(("relay1", 27, 0, 5000), ("relay2", 22, 1, 5000)),
                       spool={"retransmit_s": 3})


def test_readings_are_acked_and_a_wiped_spool_is_new_data(tmp_path, gateways, examples,
                                                           pty_factory):
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    be = examples(endpoint)
    sensor = pty_factory("weather")
    gw = gateways(gateway_config(tmp_path, endpoint, sensor))
    gw.wait_serial_open("weather")
    hello, _ = be.expect("hello", timeout=10)
    first_spool = hello["spool_id"]
    for i in range(1, 21):
        sensor.line(f"n={i}")
    weather = [be.expect("reading", lambda r: r["source"] == "weather")[0] for _ in range(20)]
    assert [r["values"] for r in weather] == [{"n": i} for i in range(1, 21)]
    assert all(r["gateway"] == GW_ID for r in weather)
    # Acked: the gateway counts every reading as acked, and with retransmit_s = 3 it resends
    # nothing over the next 4 s (a backend that did not ack would get them all again).
    s, _ = be.expect("stats", lambda s: s["counters"]["readings"] >= 20
                     and s["counters"]["acked"] == s["counters"]["readings"], timeout=10)
    later, _ = be.expect("stats", lambda t: t["uptime_s"] >= s["uptime_s"] + 4, timeout=10)
    assert later["counters"]["retransmits"] == 0, later
    assert later["spool"]["readings"] == 0, later
    old_seqs = [r["seq"] for r in be.readings()]
    assert old_seqs == list(range(1, len(old_seqs) + 1)), "a reading printed twice, or lost"

    # The gateway's storage is replaced: same id, new spool_id, seqs start again at 1. Every
    # new reading is printed (keyed on (gateway, spool_id, seq), not taken for a duplicate of
    # the old spool's reading with the same seq).
    assert gw.term() == 0
    shutil.rmtree(tmp_path / "data")
    gw.start()
    hello, _ = be.expect("hello", timeout=10)
    assert hello["spool_id"] != first_spool and hello["resume_seq"] == 1
    gw.wait_serial_open("weather", since_start=True)
    for i in range(101, 111):
        sensor.line(f"n={i}")
    new = [be.expect("reading", lambda r: r["source"] == "weather")[0] for _ in range(10)]
    assert [r["values"] for r in new] == [{"n": i} for i in range(101, 111)]
    assert all(r["seq"] <= 20 for r in new), [r["seq"] for r in new]  # seqs the old spool had
    be.expect("stats", lambda s: s["spool"]["spool_id"] == hello["spool_id"]
              and s["counters"]["readings"] >= 10
              and s["counters"]["acked"] == s["counters"]["readings"], timeout=10)
    be.wait_log(f"spool_id changed {first_spool} -> {hello['spool_id']}")
    gw.assert_alive()


def test_commands_from_a_file_and_stdin_reach_the_outputs(tmp_path, gateways, examples,
                                                          pty_factory):
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    # Read before the gateway exists: the command waits for its hello.
    commands = tmp_path / "commands.txt"
    commands.write_text("# first\ngw-01 relay1 set 1\n")
    be_file = examples(endpoint, "--commands", str(commands), name="from-file")
    sensor = pty_factory("weather")
    gw = gateways(gateway_config(tmp_path, endpoint, sensor))
    reply, keys = be_file.expect("reply", timeout=10)
    assert keys == ["kind", "gateway", "id", "ok", "command"], keys
    assert ID_RE.fullmatch(reply["id"]) and reply["ok"] is True, reply
    assert reply["command"] == {"target": "relay1", "action": "set", "value": 1,
                                "id": reply["id"]}
    assert read_pin(tmp_path, 27) == "1\n"
    be_file.kill()

    be = examples(endpoint, "--command-timeout", "5")
    be.expect("hello", timeout=15)
    gw.wait_serial_open("weather")
    # A pulse: its reply comes when the pulse has started (pin inverted), the restore later.
    be.line('gw-01 relay1 pulse {"ms": 3000}')
    reply, _ = be.expect("reply")
    assert reply["ok"] is True and reply["command"]["action"] == "pulse", reply
    assert read_pin(tmp_path, 27) == "0\n"
    wait_until(lambda: read_pin(tmp_path, 27) == "1\n", 8, "the pulse to end")
    # Three lines at once (text, JSON with its own id, a write with spaces): three replies.
    be.proc.stdin.write(b"gw-01 relay2 toggle\n"
                        b'{"gateway": "gw-01", "command": {"id": "w-1", "target": "weather",'
                        b' "action": "write", "value": "GO"}}\n'
                        b"gw-01 weather write HELLO WORLD\n")
    be.proc.stdin.flush()
    replies = [be.expect("reply")[0] for _ in range(3)]
    assert all(r["ok"] is True for r in replies), replies
    assert sorted(r["command"]["action"] for r in replies) == ["toggle", "write", "write"]
    assert "w-1" in [r["id"] for r in replies]
    assert read_pin(tmp_path, 22) == "0\n"  # relay2 starts at 1
    assert sensor.read_available(15, 3) == b"GO\nHELLO WORLD\n"
    ids = [r["id"] for r in be.of_kind("reply")]
    assert len(set(ids)) == len(ids) == 4
    # The gateway's refusal is printed as its reply; a line that is no command is refused
    # by the backend; a command for a gateway that never connects is given up, with a log.
    be.line("gw-01 relay1 set 7")
    reply, _ = be.expect("reply")
    assert reply["ok"] is False and reply["error"], reply
    be.line("gw-01 relay1")
    be.wait_log("refused: expected GATEWAY TARGET ACTION [VALUE]")
    be.line("gw-99 relay1 toggle")
    be.wait_log("waits for gateway=gw-99 to connect")  # ROUTER_MANDATORY: not "sent"
    be.wait_log("gateway=gw-99: no reply within 5.0 s")
    assert not [x for x in be.log().splitlines() if "command sent" in x and "gw-99" in x]
    assert read_pin(tmp_path, 27) == "1\n"
    gw.assert_alive()


@pytest.fixture
def pki(tmp_path):
    keys = tmp_path / "keys"
    allow = tmp_path / "allow"
    keys.mkdir()
    allow.mkdir()
    k = {name: keygen(keys / name) for name in ("server", GW_ID, "gw-02", "gw-03")}
    # gw-01 and gw-03 are allowed; gw-02's key is not on the list.
    for name in (GW_ID, "gw-03"):
        shutil.copy(k[name][1], allow / f"{name}.pub")
    return k, allow


def curve_lines(k, name):
    return [f'server_public_key = "{k["server"][1].read_text().strip()}"',
            f'secret_key_file = "{k[name][0]}"']


def test_curve_with_an_allow_list(tmp_path, gateways, examples, pty_factory, pki):
    k, allow = pki
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    be = examples(endpoint, "--secret-key", str(k["server"][0]), "--allow", str(allow))
    be.wait_log(f"backend public key {k['server'][1].read_text().strip()}")
    sensor = pty_factory("weather")
    gw = gateways(gateway_config(tmp_path, endpoint, sensor, backend=curve_lines(k, GW_ID)))
    hello, _ = be.expect("hello", timeout=10)
    assert hello["security"] == "curve"
    be.wait_log(f"gateway authenticated gateway={GW_ID}")
    gw.wait_serial_open("weather")
    sensor.line("n=1")
    r, _ = be.expect("reading", lambda r: r["source"] == "weather")
    assert r["values"] == {"n": 1}
    be.expect("stats", lambda s: s["counters"]["readings"] >= 1
              and s["counters"]["acked"] == s["counters"]["readings"], timeout=10)
    be.line("gw-01 relay1 toggle")
    assert be.expect("reply")[0]["ok"] is True
    assert read_pin(tmp_path, 27) == "1\n"

    # A gateway whose key is not on the list is refused at the handshake: no hello printed.
    other = pty_factory("other")
    gw2 = gateways(gateway_config(tmp_path / "gw2", endpoint, other, gateway_id="gw-02",
                                  backend=curve_lines(k, "gw-02")), name="gw2")
    pub2 = k["gw-02"][1].read_text().strip()
    be.wait_log("connection rejected peer=127.0.0.1")
    be.wait_log(f"key {pub2} is not in the allow list")
    gw2.wait_log("handshake failed", timeout=10)
    assert [h["gateway"] for h in be.of_kind("hello")] == [GW_ID]

    # An allowed key (gw-03's) speaking as gw-01 (gone meanwhile): every message dropped and
    # logged, and commands for gw-01 are not sent to that connection.
    assert gw.term() == 0
    ctx = zmq.Context.instance()
    imp = ctx.socket(zmq.DEALER)
    imp.setsockopt(zmq.LINGER, 0)
    imp.setsockopt(zmq.ROUTING_ID, b"gw-01")
    imp.curve_serverkey = k["server"][1].read_text().strip().encode()
    imp.curve_secretkey = k["gw-03"][0].read_text().strip().encode()
    imp.curve_publickey = k["gw-03"][1].read_text().strip().encode()
    imp.connect(endpoint)
    try:
        imp.send_multipart([b"hello", json.dumps({"gateway": "gw-01", "protocol": 1,
                                                  "resume_seq": 1}).encode()])
        be.wait_log("routing id 'gw-01' but the key is registered as 'gw-03'")
        be.line("gw-01 relay1 toggle")
        be.wait_log("was last used with the key of gw-03 (impersonation)")
        assert not imp.poll(300), "the impostor got a message"
        assert len(be.of_kind("hello")) == 1
    finally:
        imp.close(0)


class FakeGateway:
    """A pyzmq DEALER with routing id ``gw-fake``; each :meth:`connect` is a new connection."""

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.sock = None

    def connect(self, close_old=True):
        """A new connection; ``close_old=False`` leaves the old one open, as a link that froze
        without a FIN does (returned, to be closed by the caller)."""
        old = self.sock
        if old is not None and close_old:
            old.close(0)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, b"gw-fake")
        self.sock.connect(self.endpoint)
        return old

    def send(self, kind, body):
        self.sock.send_multipart([kind.encode(), json.dumps(body).encode()])

    def hello(self, spool_id, resume_seq, protocol=1):
        self.send("hello", {"gateway": "gw-fake", "protocol": protocol, "spool_id": spool_id,
                            "resume_seq": resume_seq})

    def reading(self, seq):
        self.send("reading", {"gateway": "gw-fake", "seq": seq, "source": "s",
                              "time": "2026-01-01T00:00:00.000Z", "values": {"seq": seq}})

    def recv(self, timeout=5.0):
        """The next (kind, body), or None."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        kind, body = self.sock.recv_multipart()
        return kind.decode(), json.loads(body)

    def ack(self):
        m = self.recv()
        assert m is not None and m[0] == "ack", m
        return m[1]["seq"]

    def no_message(self, within=0.5):
        assert not self.sock.poll(int(within * 1000)), self.recv(0)


SPOOL_A = "0123456789abcdef0123456789abcdef"
SPOOL_B = "fedcba9876543210fedcba9876543210"


def test_ack_rules_with_a_pyzmq_gateway(examples):
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    be = examples(endpoint)
    g = FakeGateway(endpoint)
    g.connect()
    try:
        g.hello(SPOOL_A, 1)
        assert g.ack() == 0, "a hello is answered at once"
        for seq in (1, 2, 3):
            g.reading(seq)
        wait_until(lambda: len(be.readings()) == 3, 5, "3 readings printed")
        acks = [g.ack()]
        while acks[-1] < 3:
            acks.append(g.ack())
        # Duplicates (the gateway missed the ack) are not printed, but acked again.
        g.reading(2)
        assert g.ack() == 3
        g.reading(3)
        assert g.ack() == 3
        # A gap holds the ack back until it is filled.
        g.reading(5)
        assert g.ack() == 3
        g.reading(4)
        assert g.ack() == 5
        assert [r["seq"] for r in be.readings()] == [1, 2, 3, 5, 4]
        # A new connection of the same spool that missed the last acks: the answer to its
        # hello is resume_seq - 1, never above what it sent on this connection.
        g.connect()
        g.hello(SPOOL_A, 4)
        assert g.ack() == 3
        g.reading(4)
        assert g.ack() == 4
        g.reading(5)
        assert g.ack() == 5
        assert len(be.readings()) == 5
        # The old connection still open (a frozen link): the new one takes over its routing id
        # (ROUTER_HANDOVER), and its hello is answered.
        stale = g.connect(close_old=False)
        g.hello(SPOOL_A, 6)
        assert g.ack() == 5
        stale.close(0)
        # A new spool_id: a fresh ledger, seq 1 is a new reading.
        g.connect()
        g.hello(SPOOL_B, 1)
        assert g.ack() == 0
        g.reading(1)
        assert g.ack() == 1
        # Reading 2 was dropped at the gateway: its stats say so (resume_seq 3), and the ack
        # moves over the gap.
        g.reading(3)
        assert g.ack() == 1
        g.send("stats", {"gateway": "gw-fake", "resume_seq": 3, "spool": {"spool_id": SPOOL_A}})
        g.no_message()  # the stats of another spool skip nothing
        g.send("stats", {"gateway": "gw-fake", "resume_seq": 3, "spool": {"spool_id": SPOOL_B}})
        assert g.ack() == 3
        wait_until(lambda: len(be.readings()) == 7, 5, "the new spool's readings printed")
        # A protocol the backend does not know: nothing acked, nothing stored.
        g.connect()
        g.hello(SPOOL_B, 2, protocol=2)
        g.reading(4)
        g.no_message()
        be.wait_log("speaks protocol 2")
        g.hello(SPOOL_B, 2)
        assert g.ack() == 1
        assert len(be.readings()) == 7

        # A command waits for a reply and goes again (same id) after the next hello.
        be.line("gw-fake relay1 toggle")
        kind, cmd = g.recv()
        assert kind == "command" and ID_RE.fullmatch(cmd["id"]), cmd
        g.connect()
        g.hello(SPOOL_B, 2)
        assert g.ack() == 1
        kind, again = g.recv()
        assert (kind, again) == ("command", cmd)
        g.send("reply", {"id": cmd["id"], "ok": True})
        reply, _ = be.expect("reply")
        assert reply["command"] == cmd and reply["ok"] is True
        g.connect()
        g.hello(SPOOL_B, 2)
        assert g.ack() == 1
        g.no_message()
    finally:
        g.sock.close(0)
