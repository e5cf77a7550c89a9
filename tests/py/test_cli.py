"""The command line: check-config, config-template, --version, demo."""

import json
import re
import subprocess
import time

import pytest

from conftest import GW_ID, REPO, TIME_RE, ZGATE_BIN, make_config


def zgate(*args, input=None, timeout=30, env=None):
    return subprocess.run([ZGATE_BIN, *args], input=input, capture_output=True, text=True,
                          timeout=timeout, env=env)


def cargo_version():
    text = (REPO / "Cargo.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def test_version():
    r = zgate("--version")
    assert r.returncode == 0
    assert r.stdout == f"zgate {cargo_version()}\n"


def good_config(tmp_path):
    return make_config(tmp_path, "tcp://127.0.0.1:5555",
                       serial=[("weather", "/dev/ttyUSB0", "kv", "\r\n")])


def test_check_config_good(tmp_path):
    f = tmp_path / "z.toml"
    f.write_text(good_config(tmp_path))
    r = zgate("check-config", str(f))
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{f}: ok\n", "")


def line_of(text, needle):
    return text.splitlines().index(needle) + 1


# (transform of the good text, the line that carries the error, expected "key K: message")
BAD_CONFIGS = [
    (lambda t: t.replace("max_pulse_ms = 2000\n", "max_pulse_ms = 2000\npinn = 3\n", 1),
     "pinn = 3", "key gpio.output.pinn: unknown field `pinn`"),
    (lambda t: t.replace("pin = 22", "pin = 27"), "pin = 27|2",
     "key gpio.output.pin: BCM pin 27 is used twice"),
    (lambda t: t.replace("pin = 22", "pin = 40"), "pin = 40",
     "key gpio.output.pin: BCM pin 40 does not exist"),
    (lambda t: t.replace('endpoint = "tcp://127.0.0.1:5555"', 'endpoint = "http://x"'),
     'endpoint = "http://x"', "key backend.endpoint:"),
    (lambda t: t.replace(f'id = "{GW_ID}"', 'id = "gw 01"'), 'id = "gw 01"',
     "key gateway.id: must be"),
    (lambda t: t.replace("outbox_max = 1000", "outbox_max = 0"), "outbox_max = 0",
     "key backend.outbox_max: must be between"),
    (lambda t: t.replace('format = "kv"', 'format = "xml"'), 'format = "xml"',
     "key serial.format: unknown variant `xml`"),
    (lambda t: t.replace("stats_interval_s = 30", 'stats_interval_s = "x"'),
     'stats_interval_s = "x"', "key gateway.stats_interval_s: invalid type"),
    (lambda t: t.replace('name = "relay2"', 'name = "door"'), 'name = "door"|2',
     "key gpio.output.name: \"door\" is used twice"),
    (lambda t: t.replace("initial = 1", "initial = 2"), "initial = 2",
     "key gpio.output.initial: 2 is not 0, 1 or \"keep\""),
]


@pytest.mark.parametrize("case", range(len(BAD_CONFIGS)))
def test_check_config_bad_names_file_line_key(tmp_path, case):
    change, needle, expected = BAD_CONFIGS[case]
    text = change(good_config(tmp_path))
    assert text != good_config(tmp_path)
    needle, _, nth = needle.partition("|")
    lines = text.splitlines()
    hits = [i + 1 for i, l in enumerate(lines) if l == needle]
    line = hits[int(nth or 1) - 1]
    f = tmp_path / "z.toml"
    f.write_text(text)
    r = zgate("check-config", str(f))
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert r.stderr.startswith(f"{f}:{line}: {expected}"), r.stderr
    assert r.stderr.endswith("\n") and r.stderr.count("\n") == 1, r.stderr


def test_check_config_syntax_error_and_missing_file(tmp_path):
    f = tmp_path / "z.toml"
    text = good_config(tmp_path).replace("outbox_max = 1000", "outbox_max = = 1000")
    f.write_text(text)
    r = zgate("check-config", str(f))
    assert r.returncode == 2
    assert r.stderr.startswith(f"{f}:{line_of(text, 'outbox_max = = 1000')}: "), r.stderr
    missing = tmp_path / "nope.toml"
    r = zgate("check-config", str(missing))
    assert r.returncode == 2
    assert r.stderr.startswith(f"{missing}:0: cannot read config file"), r.stderr
    # `run` refuses a bad config the same way, without starting.
    r = zgate("run", "--config", str(f))
    assert r.returncode != 0 and str(f) in r.stderr


def test_config_template_is_valid(tmp_path):
    t = zgate("config-template")
    assert t.returncode == 0 and "[gateway]" in t.stdout
    f = tmp_path / "template.toml"
    f.write_text(t.stdout)
    r = zgate("check-config", str(f))
    assert (r.returncode, r.stdout) == (0, f"{f}: ok\n"), r.stderr
    # Literally as in the docs: a pipe into /dev/stdin.
    r = subprocess.run(f"'{ZGATE_BIN}' config-template | '{ZGATE_BIN}' check-config /dev/stdin",
                       shell=True, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "/dev/stdin: ok\n"), r.stderr


def test_demo_runs_and_stops_cleanly():
    t0 = time.monotonic()
    r = zgate("demo", "--seconds", "6", timeout=30)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    msgs = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
    kinds = [m["kind"] for m in msgs]
    assert kinds[0] == "hello", kinds[:5]
    assert msgs[0]["gateway"] == "gw-01" and msgs[0]["serial"] == ["weather"]
    weather = [m for m in msgs if m["kind"] == "reading" and m["source"] == "weather"]
    assert len(weather) >= 8, f"2 Hz for 6 s, got {len(weather)}"
    assert [m["seq"] for m in msgs if m["kind"] == "reading"] == \
        list(range(1, 1 + kinds.count("reading")))
    for m in weather:
        assert set(m["values"]) == {"temperature", "humidity", "pressure"}, m
        assert all(isinstance(v, float) for v in m["values"].values()), m
        assert TIME_RE.match(m["time"])
    meter = [m for m in msgs if m["kind"] == "reading" and m["source"] == "meter1"]
    assert len(meter) >= 2, f"the simulated Modbus meter is polled every 2 s, got {len(meter)}"
    for m in meter:
        assert list(m["values"]) == ["voltage", "current", "power", "energy_kwh", "setpoint"], m
        assert 215 <= m["values"]["voltage"] <= 245, m
    replies = [m for m in msgs if m["kind"] == "reply"]
    assert {"kind": "reply", "gateway": "gw-01", "id": "demo-1", "ok": True} in replies, replies
    assert "stopped cleanly" in r.stderr
    assert elapsed < 6 + 3, elapsed
