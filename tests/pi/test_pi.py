"""The .deb on an emulated Raspberry Pi 3, installed and driven as docs/deploy.md says.

qemu-system-aarch64 -M raspi3b boots Debian bookworm arm64 (systemd); the project's arm64 .deb
is installed with apt/dpkg (the postinst runs for real) and systemd runs zgate.service as user
zgate under the hardened unit. The host drives it through real kernel drivers: the sensor line
is the Pi's PL011 UART (guest /dev/ttyAMA0, a pty on the host), the relay is GPIO27 on
pinctrl-bcm2835 through the cdev backend (the host reads the SoC's GPLEV0 register over QMP),
and the backend is the reference backend on the host, CURVE with an allow list, reached by the
guest at 10.0.2.2 (qemu's user networking). Tests run in file order and share the guest.
"""

import os
import re
import threading
import time
import tty

import pytest

from conftest import record

GW = "gw-01"
RELAY_PIN = 27
STEP_TIMEOUT = 180


def cfg(endpoint, server_key, stats_interval_s=30):
    # docs/deploy.md step 5, with the backend's address and key, and the sensor on the PL011
    # (/dev/ttyAMA0: plain Debian has no /dev/serial0 symlink, Raspberry Pi OS has).
    return f"""\
[gateway]
id = "{GW}"
data_dir = "/var/lib/zgate"
stats_interval_s = {stats_interval_s}

[backend]
endpoint = "{endpoint}"
server_public_key = "{server_key}"
secret_key_file = "/etc/zgate/gateway.key"

[gpio]
backend = "cdev"

[[gpio.input]]
name = "door"
pin = 17
pull = "up"
edge = "both"
debounce_ms = 20

[[gpio.output]]
name = "relay1"
pin = {RELAY_PIN}
initial = 0
max_pulse_ms = 60000

[[serial]]
name = "weather"
path = "/dev/ttyAMA0"
baud = 9600
format = "kv"
line_ending = "\\n"
"""


class Sensor:
    """The host end of the Pi's PL011: qemu's pty, raw, kept open for the whole run."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        self.lock = threading.Lock()

    def line(self, text):
        with self.lock:
            os.write(self.fd, text.encode() + b"\n")


@pytest.fixture(scope="module")
def sensor(pi):
    s = Sensor(pi.sensor_path)
    yield s
    os.close(s.fd)


def readings(backend, source):
    return [d for d in backend.readings() if d.get("source") == source]


def wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def journal(pi, since="-10min"):
    return pi.sh(f"journalctl -u zgate --no-pager -o cat --since={since} || true")


# ------------------------------------------------------------------ deploy.md step 1: the system


def test_boot_to_multi_user(pi):
    t0 = time.monotonic()
    # The emulated Pi has no RTC: take the host's clock, as NTP would on a real one.
    pi.sh(f"date -u -s @{int(time.time())} >/dev/null")
    rc, state = pi.run("systemctl is-system-running --wait", timeout=900, check=False)
    record("boot_to_multi_user_s", time.monotonic() - t0 + pi.timings["agent_ready_s"])
    assert state.strip() in ("running", "degraded"), state
    if state.strip() == "degraded":
        print(pi.sh("systemctl --failed --no-pager"))
    out = pi.sh("dpkg --print-architecture; uname -m; grep VERSION_CODENAME /etc/os-release")
    assert out.split() == ["arm64", "aarch64", "VERSION_CODENAME=bookworm"], out
    # Step 2: the UART is the sensor's, no console on it.
    out = pi.sh("cat /proc/cmdline; stat -c '%G' /dev/ttyAMA0; "
                "cat /sys/class/tty/ttyAMA0/device/of_node/compatible | tr '\\0' ' '")
    assert "console=ttyAMA0" not in out and "dialout" in out and "arm,pl011" in out, out
    # The guest reaches the host (the backend's machine) over qemu's user network.
    pi.sh("for i in $(seq 120); do ip -4 route | grep -q '^default' && exit 0; sleep 1; done; "
          "ip addr; exit 1", timeout=150)


# ------------------------------------------------------------------ step 3: install


def test_install_the_deb(pi, deb):
    t0 = time.monotonic()
    # As deploy.md step 3 says (-y: no one answers the prompt here).
    out = pi.sh("cd /root && sudo apt install -y ./zgate_*_arm64.deb 2>&1", timeout=STEP_TIMEOUT)
    record("install_s", time.monotonic() - t0)
    assert "Setting up zgate" in out, out
    out = pi.sh("zgate --version; id zgate; systemctl is-enabled zgate; "
                "systemctl is-active zgate || true; stat -c '%U %G %a' /var/lib/zgate; "
                "stat -c '%G %a' /dev/gpiochip* | sort -u")
    lines = out.splitlines()
    assert lines[0].startswith("zgate "), out
    assert re.search(r"groups=.*\(zgate\)", lines[1]) and "(dialout)" in lines[1] \
        and "(gpio)" in lines[1], out
    assert lines[2:5] == ["enabled", "inactive", "zgate zgate 750"], out
    # The package's udev rule, triggered by the postinst, gave the chips to group gpio
    # (Debian's kernel makes them root:root 0600).
    assert lines[5:] == ["gpio 660"], out
    assert "pinctrl-bcm2835" in pi.sh("gpiodetect")


# ------------------------------------------------------------------ step 4: keys


def test_keys_as_deploy_md_says(pi, host_keys):
    out = pi.sh("zgate keygen --out /etc/zgate/gateway --id gw-01 2>&1; "
                "stat -c '%U %G %a' /etc/zgate/gateway.key")
    assert "gw-01.pub" in out, out
    assert out.splitlines()[-1] == "root root 600", out
    pi.sh("chown root:zgate /etc/zgate/gateway.key; chmod 0640 /etc/zgate/gateway.key")
    pub = pi.sh("cat /etc/zgate/gateway.pub")
    # Sent to the backend operator, saved as <gateway-id>.pub in the allow list.
    (host_keys / "allow" / "gw-01.pub").write_text(pub)


def test_configure_and_check_config_as_zgate(pi, backend, host_keys):
    server_pub = (host_keys / "server.pub").read_text().strip()  # 40 Z85 characters
    pi.sh("cat > /etc/zgate/zgate.toml <<'EOF'\n"
          + cfg(f"tcp://10.0.2.2:{backend.port}", server_pub) + "EOF\n")
    out = pi.sh("sudo -u zgate zgate check-config /etc/zgate/zgate.toml && echo OK")
    assert out.strip().endswith("OK"), out


def test_key_rule_check_config_and_postinst(pi, deb):
    # A key others may read: check-config (as the service user) refuses it, naming the fix.
    pi.sh("chmod 0644 /etc/zgate/gateway.key")
    rc, out = pi.run("sudo -u zgate zgate check-config /etc/zgate/zgate.toml", check=False)
    assert rc == 2 and "/etc/zgate/gateway.key" in out and "0640" in out, out
    # A key as `zgate keygen` writes it (root:root 0600): the service user cannot read it ...
    pi.sh("chown root:root /etc/zgate/gateway.key; chmod 0600 /etc/zgate/gateway.key")
    rc, out = pi.run("sudo -u zgate zgate check-config /etc/zgate/zgate.toml", check=False)
    assert rc == 2 and "/etc/zgate/gateway.key" in out, out
    # ... and the package's postinst, run for real by reinstalling, applies the key rule.
    out = pi.sh(f"dpkg -i /root/{deb.name} 2>&1; stat -c '%U %G %a' /etc/zgate/gateway.key",
                timeout=STEP_TIMEOUT)
    assert out.splitlines()[-1] == "root zgate 640", out
    out = pi.sh("sudo -u zgate zgate check-config /etc/zgate/zgate.toml && echo OK")
    assert out.strip().endswith("OK"), out


# ------------------------------------------------------------------ step 6: start and check


def test_start_type_notify_and_curve_hello(pi, backend):
    t0 = time.monotonic()
    pi.sh("systemctl restart zgate", timeout=STEP_TIMEOUT)
    record("systemctl_start_s", time.monotonic() - t0)
    assert pi.sh("systemctl is-active zgate").strip() == "active"
    hello, _ = backend.expect("hello", timeout=STEP_TIMEOUT)
    assert hello["gateway"] == GW
    assert hello["security"] == "curve" and hello["insecure"] is False, hello
    assert hello["outputs"] == ["relay1"] and hello["serial"] == ["weather"], hello
    pub = pi.sh("cat /etc/zgate/gateway.pub").strip()
    log = journal(pi)
    assert "CURVE on: gateway public key" in log, log
    assert pub.splitlines()[-1].strip()[-40:] in log, (pub, log)
    out = pi.sh("ps -o user=,group= -C zgate; systemctl status zgate --no-pager || true")
    assert out.split()[:2] == ["zgate", "zgate"], out
    assert "active (running)" in out, out
    # docs/deploy.md step 8.7: gpioinfo names zgate as the consumer of its lines.
    info = pi.sh("gpioinfo pinctrl-bcm2835")
    assert re.search(r"line\s+27:\s+\S+\s+\"zgate\"\s+output", info), info
    assert re.search(r"line\s+17:\s+\S+\s+\"zgate\"\s+input", info), info


def test_reading_through_the_pl011(pi, backend, sensor):
    backend.expect("reading", lambda d: d["source"] == "relay1", timeout=60)  # start level
    sensor.line("temperature=21.5 humidity=40")
    r, _ = backend.expect("reading", lambda d: d["source"] == "weather", timeout=60)
    assert r["values"] == {"temperature": 21.5, "humidity": 40}, r
    assert r["gateway"] == GW


def command(backend, cid, action, value, timeout=60):
    backend.command(GW, {"id": cid, "target": "relay1", "action": action, "value": value})
    reply, _ = backend.expect("reply", lambda d: d.get("id") == cid, timeout=timeout)
    assert reply["ok"] is True, reply
    return reply


def test_set_and_pulse_drive_the_emulated_gpio(pi, backend):
    assert pi.pin(RELAY_PIN) == 0
    command(backend, "pi-set-1", "set", 1)
    pi.wait_pin(RELAY_PIN, 1, timeout=10)
    command(backend, "pi-set-0", "set", 0)
    pi.wait_pin(RELAY_PIN, 0, timeout=10)
    # A pulse: high now, low again by itself, and the end reported as a reading.
    command(backend, "pi-pulse-1", "pulse", {"ms": 1500})
    pi.wait_pin(RELAY_PIN, 1, timeout=10)
    t_hi = time.monotonic()
    t_lo = pi.wait_pin(RELAY_PIN, 0, timeout=30)
    assert t_lo - t_hi < 20, "the pulse did not end in time"
    end, _ = backend.expect("reading", lambda d: d["source"] == "relay1"
                            and d["values"].get("cause") == "pulse_end", timeout=60)
    assert end["values"]["level"] == 0


def test_systemctl_stop_ends_a_running_pulse(pi, backend):
    command(backend, "pi-pulse-2", "pulse", {"ms": 60000})
    pi.wait_pin(RELAY_PIN, 1, timeout=10)
    t0 = time.monotonic()
    pi.sh("systemctl stop zgate", timeout=STEP_TIMEOUT)
    record("systemctl_stop_s", time.monotonic() - t0)
    assert pi.pin(RELAY_PIN) == 0, "systemctl stop left the relay on"
    assert pi.sh("systemctl is-active zgate || true").strip() == "inactive"
    pi.sh("systemctl start zgate", timeout=STEP_TIMEOUT)
    assert pi.pin(RELAY_PIN) == 0


def test_watchdog_pings_keep_it_alive(pi):
    def show():
        out = pi.sh("systemctl show zgate -p WatchdogUSec -p NRestarts -p MainPID "
                    "-p WatchdogTimestampMonotonic -p ActiveState")
        return dict(line.split("=", 1) for line in out.split())

    a = show()
    assert a["WatchdogUSec"] == "30s" and a["ActiveState"] == "active", a
    # Past one WatchdogSec: pings keep arriving (the timestamp of the last one moves) and
    # systemd has neither killed nor restarted the service.
    wait(lambda: int(show()["WatchdogTimestampMonotonic"]) > int(a["WatchdogTimestampMonotonic"]),
         60, "a watchdog ping")
    time.sleep(32)
    b = show()
    assert b["MainPID"] == a["MainPID"] and b["NRestarts"] == a["NRestarts"] == "0", (a, b)
    assert int(b["WatchdogTimestampMonotonic"]) > int(a["WatchdogTimestampMonotonic"])
    assert "Watchdog timeout" not in journal(pi)


def test_restart_under_a_steady_feed_loses_no_seq(pi, backend, sensor):
    stop = threading.Event()
    sent = []

    def feed():
        i = 0
        while not stop.is_set():
            i += 1
            sensor.line(f"n={i}")
            sent.append(i)
            time.sleep(0.2)

    before = {d["seq"] for d in backend.readings()}
    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        wait(lambda: len(readings(backend, "weather")) > 3, 60, "readings of the feed")
        t0 = time.monotonic()
        pi.sh("systemctl restart zgate", timeout=STEP_TIMEOUT)
        record("systemctl_restart_s", time.monotonic() - t0)
        first_after = len(backend.readings())
        wait(lambda: len(backend.readings()) > first_after + 5, 120,
             "readings after the restart")
    finally:
        stop.set()
        t.join()
    last = sent[-1]
    wait(lambda: any(d["values"].get("n") == last for d in readings(backend, "weather")), 120,
         f"the last line n={last}")
    seqs = {d["seq"] for d in backend.readings()} - before
    lo, hi = min(seqs), max(seqs)
    assert seqs == set(range(lo, hi + 1)), f"seqs missing: {set(range(lo, hi + 1)) - seqs}"
    assert len(backend.of_kind("hello")) >= 2
    assert pi.sh("systemctl show zgate -p NRestarts").strip() == "NRestarts=0"


def test_reload_applies_a_changed_config(pi, backend):
    pid = pi.sh("systemctl show zgate -p MainPID").strip()
    pi.sh("sed -i 's/^stats_interval_s = .*/stats_interval_s = 5/' /etc/zgate/zgate.toml")
    pi.sh("sudo -u zgate zgate check-config /etc/zgate/zgate.toml")
    since = pi.sh("date '+%Y-%m-%d %H:%M:%S'").strip()
    pi.sh("systemctl reload zgate", timeout=STEP_TIMEOUT)
    wait(lambda: "reload applied" in journal(pi, since=f"'{since}'"), 60,
         "`reload applied` in the journal")
    n = len(backend.of_kind("stats"))
    wait(lambda: len(backend.of_kind("stats")) >= n + 2, 60, "stats every 5 s")
    assert pi.sh("systemctl show zgate -p MainPID").strip() == pid
    assert pi.sh("systemctl is-active zgate").strip() == "active"


def test_watchdog_restarts_a_hung_gateway(pi, backend):
    # deploy.md step 6: "if it stops responding for 30 s, systemd restarts it (the journal
    # then says `Watchdog timeout`)". SIGSTOP freezes the loop, and with it the pings.
    pid = pi.sh("systemctl show zgate -p MainPID --value").strip()
    hellos = len(backend.of_kind("hello"))
    pi.sh(f"kill -STOP {pid}")
    wait(lambda: pi.sh("systemctl show zgate -p NRestarts --value").strip() == "1", 120,
         "systemd to restart the hung service")
    wait(lambda: pi.sh("systemctl is-active zgate || true").strip() == "active", 120,
         "the restarted service")
    assert pi.sh("systemctl show zgate -p MainPID --value").strip() != pid
    assert "Watchdog timeout" in pi.sh("journalctl -u zgate -b --no-pager")
    wait(lambda: len(backend.of_kind("hello")) > hellos, 120, "the new process's hello")


# ------------------------------------------------------------------ step 7: remove and purge


def test_remove_keeps_the_conffile_purge_deletes_it(pi):
    out = pi.sh("dpkg -r zgate 2>&1; systemctl is-active zgate || true; "
                "test -x /usr/bin/zgate && echo BIN || echo NOBIN; "
                "grep -c '^stats_interval_s = 5' /etc/zgate/zgate.toml; "
                "ls /etc/zgate /var/lib/zgate", timeout=STEP_TIMEOUT)
    assert "inactive" in out and "NOBIN" in out, out
    assert "gateway.key" in out and "\n1\n" in out, out  # the edited conffile stays
    assert pi.pin(RELAY_PIN) == 0
    out = pi.sh("dpkg --purge zgate 2>&1; ls -d /etc/zgate /var/lib/zgate 2>&1 || true; "
                "id zgate", timeout=STEP_TIMEOUT)
    assert "cannot access '/etc/zgate'" in out and "cannot access '/var/lib/zgate'" in out, out
    assert "uid=" in out, "the zgate user stays after a purge"
