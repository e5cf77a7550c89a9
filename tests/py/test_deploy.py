"""Deployment checks on the host build: systemd notify/watchdog protocol, the unit file."""

import subprocess
import sys

from conftest import REPO, ZGATE_BIN, make_config


def test_watchdog_ready_then_pings_then_clean_exit(tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text(make_config(tmp_path, f"ipc://{tmp_path}/nobody.ipc", stats_interval_s=None,
                               outbox_max=None, shutdown_flush_ms=300, inputs=(), outputs=(),
                               gateway_id="gw-wd"))
    r = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "check-watchdog"), "--watchdog-sec", "1",
         "--timeout", "20", "--", ZGATE_BIN, "run", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.index("READY=1") < out.index("WATCHDOG=1"), out
    assert "PASS" in out


def test_systemd_unit_verifies():
    r = subprocess.run([str(REPO / "deploy" / "check-unit"), str(REPO / "deploy" / "zgate.service")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    if "SKIP" in r.stdout:
        print(r.stdout)
