"""Deployment checks on the host build: systemd notify/watchdog protocol, the unit file."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ZGATE = os.environ.get("ZGATE_BIN", str(ROOT / "target" / "debug" / "zgate"))


def test_watchdog_ready_then_pings_then_clean_exit(tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text(
        f"""
[gateway]
id = "gw-wd"
data_dir = "{tmp_path}/data"
[backend]
endpoint = "ipc://{tmp_path}/nobody.ipc"
shutdown_flush_ms = 300
[gpio]
backend = "sim"
sim_dir = "{tmp_path}/gpio"
"""
    )
    r = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "check-watchdog"), "--watchdog-sec", "1",
         "--timeout", "20", "--", ZGATE, "run", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.index("READY=1") < out.index("WATCHDOG=1"), out
    assert "PASS" in out


def test_systemd_unit_verifies():
    r = subprocess.run([str(ROOT / "deploy" / "check-unit"), str(ROOT / "deploy" / "zgate.service")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    if "SKIP" in r.stdout:
        print(r.stdout)
