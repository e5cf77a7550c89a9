"""An input edge through a real kernel GPIO driver, on QEMU's `virt` board.

qemu's BCM2835 GPIO (the raspi3b of test_pi.py) has no input levels and no edge interrupts, so
there a GPIO input never changes. QEMU's generic `virt` board has an ARM PL061 GPIO controller
whose line 3 QEMU drives itself: `system_powerdown` (QMP) raises it and lowers it 100 ms later.
With the device tree's gpio-keys node removed, that line is free for zgate's cdev line request
with edge detection, so the edges arrive through the kernel's gpio-pl061 driver and its
interrupt, as a button's would on a Pi.

The same image and .deb (installed with `dpkg -i`); this gateway runs the plaintext test setup
of docs/deploy.md step 4 ("Without CURVE": `insecure = true`) against a plaintext reference
backend on the host. Runs after test_pi.py (the raspi3b guest is stopped by then).
"""

import time

import pytest

from conftest import RefBackend, free_tcp_port, record
from guest import Pi

GW = "gw-virt"


@pytest.fixture(scope="module")
def virt(run_dir, image_dir, deb):
    t0 = time.monotonic()
    p = Pi(run_dir / "virt", image_dir, deb, machine="virt")
    try:
        p.start()
        record("virt_boot_to_agent_s", time.monotonic() - t0)
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def plain_backend(run_dir):
    port = free_tcp_port()
    b = RefBackend(run_dir, f"tcp://127.0.0.1:{port}", name="backend-virt")
    b.port = port
    yield b
    b.stop()
    b.kill()


def test_pl061_edge_reaches_the_backend(virt, plain_backend, deb):
    virt.sh(f"date -u -s @{int(time.time())} >/dev/null")
    virt.sh("systemctl is-system-running --wait || true", timeout=900)
    virt.sh("for i in $(seq 120); do ip -4 route | grep -q '^default' && exit 0; sleep 1; done; "
            "ip addr; exit 1", timeout=150)
    out = virt.sh(f"dpkg -i /root/{deb.name} 2>&1; gpiodetect", timeout=300)
    # The chip's number depends on probe order: name it by its label.
    chip = next((line.split()[0] for line in out.splitlines()
                 if line.startswith("gpiochip") and "pl061" in line), None)
    assert chip, out
    virt.sh(f"""cat > /etc/zgate/zgate.toml <<'EOF'
[gateway]
id = "{GW}"
data_dir = "/var/lib/zgate"

[backend]
endpoint = "tcp://10.0.2.2:{plain_backend.port}"
insecure = true

[gpio]
backend = "cdev"
chip = "/dev/{chip}"

[[gpio.input]]
name = "button"
pin = 3
pull = "none"
edge = "both"
debounce_ms = 10
EOF
sudo -u zgate zgate check-config /etc/zgate/zgate.toml""")
    rc, out = virt.run("systemctl restart zgate; r=$?; [ $r = 0 ] || "
                       "journalctl -u zgate -b --no-pager -o cat | tail -40; exit $r",
                       timeout=180, check=False)
    assert rc == 0, out
    hello, _ = plain_backend.expect("hello", timeout=180)
    assert hello["gateway"] == GW and hello["insecure"] is True, hello
    assert hello["levels"]["button"] == 0, hello
    assert "INSECURE" in virt.sh("journalctl -u zgate -b --no-pager -o cat")
    # The power button: QEMU raises PL061 line 3 and lowers it 100 ms later.
    virt.qmp("system_powerdown")
    up, _ = plain_backend.expect("reading", lambda d: d["source"] == "button", timeout=60)
    down, _ = plain_backend.expect("reading", lambda d: d["source"] == "button", timeout=60)
    assert (up["values"], down["values"]) == ({"level": 1}, {"level": 0}), (up, down)
    assert down["seq"] == up["seq"] + 1
    assert virt.sh("systemctl is-active zgate").strip() == "active"
