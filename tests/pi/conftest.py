"""Fixtures of the emulated-Pi test (tests/pi/README.md). One guest is booted per run and
shared by every test in test_pi.py, which run in file order: each step builds on the last, as
docs/deploy.md's steps do."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "py"))
sys.path.insert(0, str(HERE))

from guest import Pi  # noqa: E402
from helpers import RefBackend, free_tcp_port  # noqa: E402,F401

def pytest_collection_modifyitems(config, items):
    if os.environ.get("ZGATE_PI") != "1":
        skip = pytest.mark.skip(reason="boots an emulated Pi: run `make test-pi` (sets ZGATE_PI=1)")
        for item in items:
            if HERE in Path(str(item.fspath)).parents:
                item.add_marker(skip)


RUN_DIR = Path(os.environ.get("ZGATE_PI_RUN_DIR") or REPO / "target" / "test-pi")
TIMINGS = {}


def record(name, seconds):
    TIMINGS[name] = round(seconds, 1)
    (RUN_DIR / "timings.json").write_text(json.dumps(TIMINGS, indent=1) + "\n")


@pytest.fixture(scope="session")
def run_dir():
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    return RUN_DIR


@pytest.fixture(scope="session")
def image_dir(run_dir):
    t0 = time.monotonic()
    out = subprocess.run([str(HERE / "image")], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        pytest.fail("tests/pi/image failed (its output is above)")
    record("image_s", time.monotonic() - t0)
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def deb():
    path = Path(os.environ.get("ZGATE_PI_DEB")
                or REPO / "target" / "debian" / "zgate_latest_arm64.deb").resolve()
    if not path.exists():
        pytest.fail(f"{path} is missing: `make deb CROSS_ARCHES=aarch64` (make test-pi does)")
    return path


@pytest.fixture(scope="module")
def pi(run_dir, image_dir, deb):
    """The raspi3b guest of test_pi.py, stopped when that module ends (before another boots)."""
    t0 = time.monotonic()
    p = Pi(run_dir / "guest", image_dir, deb)
    try:
        p.start()
        record("boot_to_agent_s", time.monotonic() - t0)
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="session")
def host_keys(run_dir):
    """The backend's CURVE key pair and its allow list directory (filled by the key test)."""
    from helpers import ZGATE_BIN
    d = run_dir / "backend"
    allow = d / "allow"
    allow.mkdir(parents=True, exist_ok=True)
    for f in allow.iterdir():
        f.unlink()
    for f in d.glob("server.*"):
        f.unlink()
    subprocess.run([ZGATE_BIN, "keygen", "--out", str(d / "server")], check=True,
                   capture_output=True)
    return d


@pytest.fixture(scope="session")
def backend(run_dir, host_keys):
    """The reference backend on the host as a CURVE server with an allow list, on loopback:
    the guest reaches it at 10.0.2.2 through qemu's user networking."""
    port = free_tcp_port()
    b = RefBackend(run_dir, f"tcp://127.0.0.1:{port}",
                   extra=("--secret-key", str(host_keys / "server.key"),
                          "--allow", str(host_keys / "allow")))
    b.port = port
    yield b
    b.stop()
    b.kill()
