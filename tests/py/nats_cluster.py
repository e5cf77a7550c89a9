"""A NATS JetStream cluster on loopback and `zgate-bridge` processes, for the fleet tests.

NatsCluster(base_dir, nodes=3, name="zgate")
    Nodes n1..nN of Debian's ``nats-server``, each with its own client, cluster and monitoring
    port on 127.0.0.1 (free ports picked at construction, kept across restarts) and its
    JetStream store in ``base_dir/n<i>`` (kept across restarts: a restarted node comes back
    with its data). Nothing runs until :meth:`start`.

    start()            starts every node that is not running, then waits until the cluster is
                       ready (every running node sees a JetStream meta leader in /jsz).
    stop()             kill -9 of every node (the whole cluster down).
    kill9(i)           kill -9 of node i (0-based).
    restart(i)         starts node i again and waits until it sees a meta leader.
    wait_ready(timeout=30)   waits until every running node sees a meta leader.
    urls               ["nats://127.0.0.1:<port>", ...], one per node.
    jsz(i)             node i's /jsz as a dict (None when it does not answer).
    stream_leader(stream)    the index of the node leading ``stream`` (None if unknown).
    log(i)             node i's log text.
    close()            kill -9 of everything (the fixture's teardown does this).

Bridge(tmp_path, config_text, name="bridge")
    ``zgate-bridge run --config <name>.toml`` (binary: $ZGATE_BRIDGE_BIN or
    target/debug/zgate-bridge), stderr+stdout appended to ``<name>.log``, RUST_LOG from
    $ZGATE_BRIDGE_LOG (default ``info,zgate_bridge=debug``: every ack is logged as
    ``ack gateway=<id> seq=<n> advanced=<bool>``). Methods: start(), kill9(), term(), alive(),
    log(), wait_log(needle, timeout, count=1).

bridge_config(bridge_id, bind, servers, **keys) -> TOML text; keys go to [bridge] or [nats]
    by name (secret_key_file, allow_dir, insecure, max_inflight; creds_file, stream,
    replicas, duplicate_window_s).

Fixtures: ``nats_cluster(nodes=3)`` -> a started :class:`NatsCluster`; ``bridges(config_text,
name=None)`` -> a started :class:`Bridge`. Both are torn down after the test (logs printed
when it failed). Import them into a test module: ``from nats_cluster import nats_cluster,
bridges``.

Requires ``nats-server`` on PATH (tests/setup installs it) — the fixtures skip otherwise.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import REPO, die_with_parent, free_port, wait_until

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
BRIDGE_BIN = os.environ.get("ZGATE_BRIDGE_BIN") or str(REPO / "target" / "debug" / "zgate-bridge")


class NatsCluster:
    def __init__(self, base_dir, nodes=3, name="zgate"):
        self.base = Path(base_dir)
        self.base.mkdir(parents=True, exist_ok=True)
        self.n = nodes
        self.name = name
        self.procs = [None] * nodes
        self._configure()

    def _configure(self):
        self.ports = [(free_port(), free_port(), free_port()) for _ in range(self.n)]
        self.urls = [f"nats://127.0.0.1:{c}" for c, _, _ in self.ports]
        routes = ", ".join(f"nats-route://127.0.0.1:{r}" for _, r, _ in self.ports)
        for i, (client, route, http) in enumerate(self.ports):
            node = f"n{i + 1}"
            (self.base / f"{node}.conf").write_text(
                f"server_name: {node}\n"
                f"listen: 127.0.0.1:{client}\n"
                f"http: 127.0.0.1:{http}\n"
                f'jetstream {{ store_dir: "{self.base / node}" }}\n'
                f"cluster {{ name: {self.name}, listen: 127.0.0.1:{route}, "
                f"routes: [{routes}] }}\n"
            )

    def _start_node(self, i):
        if self.procs[i] is not None and self.procs[i].poll() is None:
            return
        node = f"n{i + 1}"
        log = open(self.base / f"{node}.log", "ab")
        self.procs[i] = subprocess.Popen(
            [NATS_SERVER, "-c", str(self.base / f"{node}.conf")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=die_with_parent)
        log.close()

    def running(self, i):
        return self.procs[i] is not None and self.procs[i].poll() is None

    def jsz(self, i, path="/jsz"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[i][2]}{path}",
                                        timeout=1) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def has_leader(self, i):
        j = self.jsz(i)
        return bool(j and (j.get("meta_cluster") or {}).get("leader"))

    def wait_ready(self, timeout=30):
        wait_until(lambda: all(self.has_leader(i) for i in range(self.n) if self.running(i)),
                   timeout, "a JetStream meta leader on every running node", interval=0.05)

    def start(self, timeout=30, attempts=3):
        """Starts every node and waits for a meta leader on all of them. A node that exits
        while the cluster forms (a port another process took after it was chosen) would leave
        the cluster a node short, so the whole cluster starts again on fresh ports."""
        for attempt in range(attempts):
            for i in range(self.n):
                self._start_node(i)
            self.wait_ready(timeout)
            dead = [f"n{i + 1}" for i in range(self.n) if not self.running(i)]
            if not dead:
                return self
            self.stop()
            if attempt + 1 == attempts:
                pytest.fail(f"nats nodes {dead} exited while the cluster formed "
                            f"(logs in {self.base})")
            for i in range(self.n):
                shutil.rmtree(self.base / f"n{i + 1}", ignore_errors=True)
            self._configure()
        return self

    def restart(self, i, timeout=30):
        self._start_node(i)
        wait_until(lambda: self.has_leader(i), timeout, f"node n{i + 1} sees a meta leader",
                   interval=0.05)

    def kill9(self, i):
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(5)

    def stop(self):
        for i in range(self.n):
            self.kill9(i)

    close = stop

    def stream_leader(self, stream):
        for i in range(self.n):
            j = self.jsz(i, "/jsz?streams=true")
            if not j:
                continue
            for acc in j.get("account_details") or []:
                for s in acc.get("stream_detail") or []:
                    leader = (s.get("cluster") or {}).get("leader")
                    if s.get("name") == stream and leader:
                        return int(leader.lstrip("n")) - 1
        return None

    def log(self, i):
        try:
            return (self.base / f"n{i + 1}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def bridge_config(bridge_id, bind, servers, **keys):
    bridge_keys = {"secret_key_file", "allow_dir", "insecure", "max_inflight"}

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(json.dumps(str(x)) for x in v) + "]"
        return json.dumps(str(v))

    b = [f"id = {val(bridge_id)}", f"bind = {val(bind)}"]
    n = [f"servers = {val(servers)}"]
    for k, v in keys.items():
        (b if k in bridge_keys else n).append(f"{k} = {val(v)}")
    return "[bridge]\n" + "\n".join(b) + "\n\n[nats]\n" + "\n".join(n) + "\n"


class Bridge:
    def __init__(self, tmp_path, config_text, name="bridge"):
        self.config = Path(tmp_path) / f"{name}.toml"
        self.config.write_text(config_text)
        self.log_path = Path(tmp_path) / f"{name}.log"
        self.log_path.write_bytes(b"")
        self.proc = None
        self.start()

    def start(self):
        assert self.proc is None or self.proc.poll() is not None, "still running"
        env = dict(os.environ, RUST_LOG=os.environ.get("ZGATE_BRIDGE_LOG",
                                                      "info,zgate_bridge=debug"))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [BRIDGE_BIN, "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                preexec_fn=die_with_parent)
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle, timeout=10, count=1):
        def found():
            assert self.alive(), f"bridge exited with {self.proc.poll()}:\n{self.log()[-3000:]}"
            return self.log().count(needle) >= count

        wait_until(found, timeout, f"{needle!r} (x{count}) in the bridge log", interval=0.02)

    def kill9(self):
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def term(self, timeout=10):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    kill = kill9


def _failed(request):
    return any(getattr(getattr(request.node, "rep_" + w, None), "failed", False)
               for w in ("setup", "call"))


@pytest.fixture
def nats_cluster(request, tmp_path):
    """Factory: ``nats_cluster(nodes=3)`` starts a cluster (stopped in teardown)."""
    if not Path(NATS_SERVER).exists():
        pytest.skip("nats-server is not installed (run tests/setup)")
    made = []

    def make(nodes=3):
        c = NatsCluster(tmp_path / f"nats{len(made)}", nodes=nodes)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.close()
        if _failed(request):
            for i in range(c.n):
                sys.stderr.write(f"\n----- nats n{i + 1} -----\n{c.log(i)[-2000:]}\n")


@pytest.fixture
def bridges(request, tmp_path):
    """Factory: ``bridges(config_text, name=None)`` starts a bridge (killed in teardown)."""
    made = []

    def make(config_text, name=None):
        b = Bridge(tmp_path, config_text, name or f"bridge{len(made)}")
        made.append(b)
        return b

    yield make
    for b in made:
        b.kill9()
        if _failed(request):
            sys.stderr.write(f"\n----- {b.log_path.name} -----\n{b.log()[-6000:]}\n")


# ------------------------------------------------------------------ an independent consumer


def nats_run(coro_fn, urls, timeout=30):
    """Runs ``await coro_fn(nc)`` with a fresh nats-py connection to ``urls``."""
    import asyncio

    import nats

    async def go():
        nc = await nats.connect(servers=list(urls), connect_timeout=2,
                                max_reconnect_attempts=5, allow_reconnect=True)
        try:
            return await coro_fn(nc)
        finally:
            await nc.close()

    return asyncio.run(asyncio.wait_for(go(), timeout))


def stream_messages(urls, subject="zgate.>", stream="ZGATE"):
    """Every message of ``stream`` matching ``subject``, read from the start by an ephemeral
    nats-py pull consumer: a list of (subject, headers dict, body bytes)."""
    import asyncio

    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    async def go(nc):
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            subject, durable=None, stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL))
        out = []
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=1)
            except (NatsTimeout, asyncio.TimeoutError):
                break
            out += [(m.subject, dict(m.headers or {}), m.data) for m in msgs]
        await sub.unsubscribe()
        return out

    # Right after a node restart or an election JetStream may time out creating the consumer:
    # a few more attempts, then the error stands.
    for attempt in range(5):
        try:
            return nats_run(go, urls)
        except (NatsTimeout, asyncio.TimeoutError):
            if attempt == 4:
                raise
            time.sleep(1)


def kv_get(urls, key, bucket="zgate_gateways"):
    """The JSON value of ``key`` in the bucket, or None when absent (or not answering yet)."""
    async def go(nc):
        import asyncio

        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.errors import BucketNotFoundError, KeyNotFoundError
        try:
            kv = await nc.jetstream().key_value(bucket)
            e = await kv.get(key)
        except (KeyNotFoundError, BucketNotFoundError):
            return None
        except (NatsTimeout, asyncio.TimeoutError):
            # A bucket just created answers once its replicas elected a leader.
            return None
        return json.loads(e.value)

    return nats_run(go, urls)


def request(urls, subject, body, timeout=5.0):
    """A NATS request: ("reply", body dict) or ("no_responders", seconds it took) or
    ("timeout", seconds)."""
    import nats.errors

    async def go(nc):
        t = time.monotonic()
        try:
            m = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
        except nats.errors.NoRespondersError:
            return ("no_responders", time.monotonic() - t)
        except nats.errors.TimeoutError:
            return ("timeout", time.monotonic() - t)
        return ("reply", json.loads(m.data))

    return nats_run(go, urls)
