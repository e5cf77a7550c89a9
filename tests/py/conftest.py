"""Fixtures for zgate's integration tests. The helpers they hand out live in helpers.py and
are re-exported here, so a test file imports everything from ``conftest``.

Fixtures (each a factory; whatever it made is stopped in teardown, and when the test failed
the gateway logs and the backend output are printed):

- ``gateways(config_text, name=None, exe=None)`` -> :class:`Gateway`
- ``peers(endpoint=..., rcvhwm=None, ...)`` -> :class:`Peer`
- ``backends(endpoint, extra=(), name=None)`` -> :class:`RefBackend`
- ``pty_factory(name="weather", nonblocking=False)`` -> :class:`PtySensor`
- ``feeds(pty, rate=200, start=1, line=None)`` -> :class:`Feed` (stopped first in teardown)
- ``short_dir``: a short directory for ipc:// endpoints.
"""

import os
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import (  # noqa: F401 (re-exported to the tests)
    GW_ID, HEADER, MAGIC, OVERHEAD, READING_KEYS, REPO, TIME_RE, UNSYNCED_KEYS, ZGATE_BIN, Feed,
    Gateway, Peer, PtySensor, RefBackend, check_reading, clock_synced, free_port, free_tcp_port,
    make_config, reading_keys,
    pin_file, read_pin, read_segment, records_on_disk, segments, sensor_line, set_input,
    spool_state, toml_value, wait_until, zgate_env,
)


@pytest.fixture
def short_dir():
    """A short directory for ipc:// endpoints (sun_path is limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="zg", dir="/tmp")
    yield Path(d)
    for p in Path(d).iterdir():
        try:
            p.unlink()
        except OSError:
            pass
    try:
        os.rmdir(d)
    except OSError:
        pass


@pytest.fixture
def pty_factory(tmp_path):
    made = []

    def make(name="weather", nonblocking=False):
        s = PtySensor(tmp_path / f"tty-{name}", nonblocking=nonblocking)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def feeds(pty_factory):
    made = []

    def make(pty, rate=200.0, start=1, line=None):
        f = Feed(pty, rate=rate, start=start, line=line)
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def test_failed(request):
    return any(getattr(getattr(request.node, "rep_" + w, None), "failed", False)
               for w in ("setup", "call"))


@pytest.fixture
def gateways(request, tmp_path):
    """Factory: ``gateways(config_text)`` starts a gateway; all are killed in teardown, and
    their logs are printed when the test failed."""
    started = []

    def start(config_text, name=None, exe=None):
        gw = Gateway(tmp_path, config_text, name or f"gw{len(started)}", exe=exe)
        started.append(gw)
        return gw

    yield start
    failed = test_failed(request)
    for gw in started:
        gw.kill()
        if failed:
            sys.stderr.write(f"\n----- {gw.log_path.name} -----\n{gw.log()[-6000:]}\n")


@pytest.fixture
def peers():
    made = []

    def make(*a, **kw):
        p = Peer(*a, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def backends(request, tmp_path):
    made = []

    def start(endpoint, extra=(), name=None):
        b = RefBackend(tmp_path, endpoint, extra, name or f"backend{len(made)}")
        made.append(b)
        return b

    yield start
    failed = test_failed(request)
    for b in made:
        b.kill()
        if failed:
            sys.stderr.write(f"\n----- {b.log_path.name} -----\n{b.log()[-3000:]}\n"
                             f"----- backend stdout (last lines) -----\n"
                             + "\n".join(b.raw[-30:]) + "\n")
