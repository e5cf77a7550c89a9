"""examples/consumer.py, the NATS consumer users copy, against a real JetStream server
(Debian's nats-server, started here on loopback).

- Against a single server holding the stream ZGATE with readings published the way the bridge
  publishes them (subject, body, Nats-Msg-Id): the durable pull consumer prints each once,
  and a second run resumes after the last reading acked.
- A command to a gateway no bridge holds: "no responders", at once, exit status 3.
- End to end: a real gateway fed by a pty, a real `zgate-bridge` (ZGATE_BRIDGE_BIN, default
  target/debug/zgate-bridge): the example prints the gateway's readings under their message
  ids, its command comes back with the gateway's reply and drives the (sim) GPIO output, and
  once the gateway is gone the same command gets no responders.
The example's stderr goes to ``<name>.stderr`` in the test's tmp dir."""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_port, make_config, read_pin, wait_until, zgate_env
from helpers import die_with_parent

EXAMPLE = REPO / "examples" / "consumer.py"
BRIDGE_BIN = os.environ.get("ZGATE_BRIDGE_BIN") or str(REPO / "target" / "debug" / "zgate-bridge")
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"

nats = pytest.importorskip("nats", reason="nats-py is installed by tests/setup")
if not shutil.which("nats-server") and not (REPO / NATS_SERVER).exists():
    pytest.skip("nats-server is installed by tests/setup", allow_module_level=True)


class NatsServer:
    """One nats-server with JetStream, its store in ``tmp_path``, on a free loopback port."""

    def __init__(self, tmp_path, name="nats"):
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        store = tmp_path / f"{name}-store"
        conf = tmp_path / f"{name}.conf"
        conf.write_text(f'server_name: {name}\nlisten: 127.0.0.1:{self.port}\n'
                        f'jetstream {{ store_dir: "{store}" }}\n')
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        wait_until(lambda: b"Server is ready" in self.log_path.read_bytes(), 10,
                   "nats-server ready", interval=0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def nats_server(tmp_path):
    s = NatsServer(tmp_path)
    yield s
    s.stop()


def run_consumer(tmp_path, url, *args, name="consumer", timeout=30):
    """Runs the example to completion: (exit status, parsed stdout lines, stderr text)."""
    err = tmp_path / f"{name}.stderr"
    with open(err, "wb") as e:
        p = subprocess.run([sys.executable, str(EXAMPLE), "--servers", url, *args],
                           stdout=subprocess.PIPE, stderr=e, timeout=timeout)
    lines = [json.loads(x) for x in p.stdout.decode().splitlines() if x.strip()]
    return p.returncode, lines, err.read_text()


async def _publish(url, msgs):
    """Creates the stream as the bridge does (if missing) and publishes ``msgs``:
    (subject, body bytes, msg id) with PubAcks."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="ZGATE", subjects=["zgate.*.reading.>", "zgate.*.hello",
                                                 "zgate.*.stats"])
    acks = []
    for subject, body, mid in msgs:
        acks.append(await js.publish(subject, body, headers={"Nats-Msg-Id": mid}))
    await nc.close()
    return acks


def reading(gw, spool, seq, source="weather"):
    body = json.dumps({"gateway": gw, "seq": seq, "source": source,
                       "time": "2026-12-03T05:00:00.000Z",
                       "values": {"temperature": 20 + seq, "ok": True}}).encode()
    return f"zgate.{gw}.reading.{source}", body, f"{gw}:{spool}:{seq}"


def test_durable_consumer_prints_each_reading_once_and_resumes(tmp_path, nats_server):
    spool = "5f0c3a9e21d84b7c9a6e0f1d2c3b4a59"
    msgs = [reading("gw-01", spool, s) for s in range(1, 6)]
    msgs += [reading("gw-02", spool, 1, source="door")]
    # A hello is in the stream too; the default filter leaves it out.
    msgs.insert(0, ("zgate.gw-01.hello", b'{"gateway":"gw-01","protocol":1}', "hello-1"))
    # The same reading again (a gateway resending after a lost ack): JetStream drops it.
    msgs.append(reading("gw-01", spool, 3))
    acks = asyncio.run(_publish(nats_server.url, msgs))
    assert [bool(a.duplicate) for a in acks] == [False] * 7 + [True]

    rc, first, err = run_consumer(tmp_path, nats_server.url, "read", "--durable", "t1",
                                  "--count", "4", name="first")
    assert rc == 0, err
    assert [x["msg_id"] for x in first] == [f"gw-01:{spool}:{s}" for s in range(1, 5)]
    for x, (subject, body, _) in zip(first, msgs[1:5]):
        assert x["subject"] == subject
        assert x["reading"] == json.loads(body)  # the body exactly as published
    assert [x["stream_seq"] for x in first] == [2, 3, 4, 5]

    # Runs again under the same durable: the rest, nothing printed twice.
    rc, rest, err = run_consumer(tmp_path, nats_server.url, "read", "--durable", "t1",
                                 "--idle-exit", "2", name="second")
    assert rc == 0, err
    assert [x["msg_id"] for x in rest] == [f"gw-01:{spool}:5", f"gw-02:{spool}:1"]
    assert rest[1]["subject"] == "zgate.gw-02.reading.door"
    assert "2 readings printed" in err

    rc, none, err = run_consumer(tmp_path, nats_server.url, "read", "--durable", "t1",
                                 "--idle-exit", "1", name="third")
    assert (rc, none) == (0, [])

    # Another durable is another reader: it starts at the beginning of the stream.
    rc, other, err = run_consumer(tmp_path, nats_server.url, "read", "--durable", "t2",
                                  "--subject", "zgate.gw-02.reading.>", "--idle-exit", "1",
                                  name="other")
    assert rc == 0, err
    assert [x["msg_id"] for x in other] == [f"gw-02:{spool}:1"]


def test_command_to_a_gateway_nobody_holds_is_no_responders_at_once(tmp_path, nats_server):
    t = time.monotonic()
    rc, out, err = run_consumer(tmp_path, nats_server.url, "command", "gw-nowhere", "relay1",
                                "set", "1", name="cmd")
    took = time.monotonic() - t
    assert rc == 3, err
    assert out == []
    assert "'gw-nowhere' is not connected to any bridge" in err
    assert "no responders on zgate.gw-nowhere.command" in err
    # Python's start and the connect are most of it; the request itself fails in ~1 ms.
    assert took < 5, took


def test_command_value_must_be_json(tmp_path, nats_server):
    rc, out, err = run_consumer(tmp_path, nats_server.url, "command", "gw-01", "weather",
                                "write", "GO", name="badvalue")
    assert rc == 64
    assert "VALUE must be JSON" in err


def test_unreachable_server_is_a_clear_error(tmp_path):
    url = f"nats://127.0.0.1:{free_port()}"
    rc, out, err = run_consumer(tmp_path, url, "--connect-timeout", "1", "read", "--count", "1",
                                name="noserver")
    assert rc == 4
    assert "no NATS server reachable within 1.0 s" in err and url in err
    assert err.count("Connect call failed") == 1  # each distinct problem said once


def test_command_subject_escapes_the_gateway_id_as_the_bridge_does(tmp_path, nats_server):
    # '.' would split the subject: the bridge's token escapes it as =2E (docs/fleet.md).
    rc, out, err = run_consumer(tmp_path, nats_server.url, "command", "site.7 gw", "relay1",
                                "toggle", name="escaped")
    assert rc == 3, err
    assert "no responders on zgate.site=2E7=20gw.command" in err


class BridgeProc:
    """``zgate-bridge run`` against ``servers``, plaintext on loopback, its log in tmp_path."""

    def __init__(self, tmp_path, port, servers, replicas=1):
        if not os.path.exists(BRIDGE_BIN):
            pytest.fail(f"{BRIDGE_BIN} not built (cargo build -p zgate-bridge)")
        conf = tmp_path / "bridge.toml"
        conf.write_text(f'[bridge]\nid = "bridge-c"\nbind = "tcp://127.0.0.1:{port}"\n\n'
                        f'[nats]\nservers = {json.dumps(servers)}\nreplicas = {replicas}\n')
        self.log_path = tmp_path / "bridge.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([BRIDGE_BIN, "run", "--config", str(conf)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(zgate_env(), RUST_LOG="info"),
                                     preexec_fn=die_with_parent)

    def wait_log(self, needle, timeout):
        wait_until(lambda: needle in self.log_path.read_text(errors="replace"), timeout,
                   f"{needle!r} in the bridge's log", interval=0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def bridge(request, tmp_path, nats_server):
    port = free_port()
    b = BridgeProc(tmp_path, port, [nats_server.url])
    b.endpoint = f"tcp://127.0.0.1:{port}"
    yield b
    b.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        sys.stderr.write(f"\n----- bridge.log -----\n{b.log_path.read_text()[-6000:]}\n")


def test_end_to_end_readings_and_a_command_through_a_bridge(tmp_path, nats_server, bridge,
                                                            gateways, pty_factory):
    bridge.wait_log("stream ready", 30)
    pty = pty_factory("weather")
    gw = gateways(make_config(tmp_path, bridge.endpoint,
                              serial=[("weather", pty.path, "kv", "lf")], inputs=(),
                              outputs=(("relay1", 27, 0, 2000),), outbox_max=None,
                              shutdown_flush_ms=200), "gw-01")
    bridge.wait_log("gateway connected gateway=gw-01", 20)
    for i in range(1, 6):
        pty.line(f"temperature=2{i}.5 n={i}")

    rc, got, err = run_consumer(tmp_path, nats_server.url, "read", "--durable", "e2e",
                                "--subject", "zgate.gw-01.reading.weather", "--count", "5",
                                name="e2e-read")
    assert rc == 0, err
    # Stream order is not seq order (publishes are pipelined: docs/fleet.md, "Order").
    got.sort(key=lambda x: x["reading"]["seq"])
    assert [x["reading"]["values"] for x in got] == [
        {"temperature": 20 + i + 0.5, "n": i} for i in range(1, 6)]
    spool_ids = set()
    for x in got:
        m = re.fullmatch(r"gw-01:([0-9a-f]{32}):(\d+)", x["msg_id"])
        assert m, x["msg_id"]
        assert int(m.group(2)) == x["reading"]["seq"]
        spool_ids.add(m.group(1))
        assert x["subject"] == "zgate.gw-01.reading.weather"
        assert x["reading"]["gateway"] == "gw-01" and x["reading"]["source"] == "weather"
    assert len(spool_ids) == 1

    # The command subscription reaches the server a moment after the gateway's hello.
    def command():
        r = run_consumer(tmp_path, nats_server.url, "command", "gw-01", "relay1", "set", "1",
                         name="e2e-cmd")
        return r if r[0] != 3 else None

    rc, out, err = wait_until(command, 10, "a reply from gw-01", interval=0.2)
    assert rc == 0, err
    assert out[0]["reply"] == {"id": out[0]["command"]["id"], "ok": True}
    assert out[0]["command"]["target"] == "relay1" and out[0]["command"]["value"] == 1
    assert read_pin(tmp_path, 27).strip() == "1"

    # The gateway gone: no responders, at once.
    gw.kill()
    bridge.wait_log("gateway disconnected gateway=gw-01", 10)

    def no_responders():
        r = run_consumer(tmp_path, nats_server.url, "command", "gw-01", "relay1", "set", "0",
                         name="e2e-gone")
        return r if r[0] == 3 else None

    rc, out, err = wait_until(no_responders, 10, "no responders for gw-01", interval=0.2)
    assert "'gw-01' is not connected to any bridge" in err
