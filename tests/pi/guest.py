"""The emulated Raspberry Pi 3 (qemu-system-aarch64 -M raspi3b) and the host's hands on it.

- :class:`Pi` boots the cached image (tests/pi/image) with the project's .deb copied into
  /root of a fresh copy of the SD card, and gives:
  - ``run(script)``: a shell script run as root in the guest by the test agent on the console
    UART (ttyS1), returning (exit status, output);
  - ``qmp(cmd)`` / ``gplev0()``: QEMU's monitor, e.g. the BCM2835 GPIO level register GPLEV0
    (0x3f200034), which the guest's pinctrl-bcm2835 driver drives;
  - ``sensor``: the host end of the Pi's PL011 UART (guest /dev/ttyAMA0), a pty.
Everything the console prints goes to ``console.log`` in the run directory.

``machine="virt"`` boots the same image on QEMU's generic ``virt`` board instead (virtio disk
and network, the PL011 is the console there): its PL061 GPIO controller has a line the host can
move, line 3, which QEMU pulses on ``system_powerdown`` (the device tree's gpio-keys node that
would claim it is removed), so an input edge goes through a real kernel GPIO driver.
"""

import base64
import itertools
import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

GPLEV0 = 0x3F200034
ANSWER = re.compile(rb"@@R (\d+) (-?\d+) ([A-Za-z0-9+/=]*)@@")
READY = b"@@AGENT-READY@@"


class GuestError(AssertionError):
    pass


class Qmp:
    """A minimal QMP client on a unix socket."""

    def __init__(self, path, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.file = self.sock.makefile("rwb")
        json.loads(self.file.readline())  # greeting
        self.lock = threading.Lock()
        self.execute("qmp_capabilities")

    def execute(self, cmd, **args):
        with self.lock:
            msg = {"execute": cmd}
            if args:
                msg["arguments"] = args
            self.file.write(json.dumps(msg).encode() + b"\n")
            self.file.flush()
            while True:
                line = self.file.readline()
                if not line:
                    raise GuestError(f"QMP closed during {cmd}")
                reply = json.loads(line)
                if "event" in reply:
                    continue
                if "error" in reply:
                    raise GuestError(f"QMP {cmd}: {reply['error']}")
                return reply["return"]

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Pi:
    def __init__(self, workdir: Path, image_dir: Path, deb: Path, boot_timeout=900,
                 machine="raspi3b"):
        self.machine = machine
        self.dir = Path(workdir)
        self.image = Path(image_dir)
        self.deb = Path(deb)
        self.boot_timeout = boot_timeout
        self.proc = None
        self.qmp_ = None
        self.buf = bytearray()
        self.cond = threading.Condition()
        self.ids = itertools.count(1)
        self.timings = {}

    # ----- life cycle

    def start(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        sd = self.dir / "sd.img"
        t0 = time.monotonic()
        subprocess.run(["cp", "--sparse=always", str(self.image / "sd-base.img"), str(sd)],
                       check=True)
        # The .deb goes to /root of the fresh SD copy, as `scp` would put it in a home.
        subprocess.run(["debugfs", "-w", "-R", f"write {self.deb} /root/{self.deb.name}",
                        str(sd)], check=True, capture_output=True)
        self.timings["sd_copy_s"] = time.monotonic() - t0
        con = self.dir / "con.sock"
        qmp = self.dir / "qmp.sock"
        for p in (con, qmp):
            p.unlink(missing_ok=True)
        agent = "systemd.wants=zgate-test-agent@{}.service"
        if self.machine == "raspi3b":
            cmd = [
                "qemu-system-aarch64", "-M", "raspi3b",
                "-kernel", str(self.image / "Image"), "-dtb", str(self.image / "rpi3b.dtb"),
                "-initrd", str(self.image / "initrd.img"),
                "-drive", f"file={sd},if=sd,format=raw",
                # first serial: the PL011 = guest /dev/ttyAMA0 (the sensor); second: the mini
                # UART ttyS1, the console with the test agent
                "-serial", "pty",
                "-chardev", f"socket,id=con,path={con},server=on,wait=on",
                "-serial", "chardev:con",
                "-netdev", "user,id=n0", "-device", "usb-net,netdev=n0",
                "-display", "none", "-monitor", "none", "-no-reboot",
                "-qmp", f"unix:{qmp},server=on,wait=off",
                "-append", "root=/dev/mmcblk0 rw rootwait console=ttyS1,115200 loglevel=5 "
                           "systemd.show_status=auto " + agent.format("ttyS1"),
            ]
        else:
            base = [
                "qemu-system-aarch64", "-M", "virt,acpi=off", "-cpu", "cortex-a53",
                "-m", "1024", "-smp", "2",
                "-drive", f"file={sd},if=none,id=d0,format=raw",
                "-device", "virtio-blk-device,drive=d0",
                "-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0",
                "-display", "none", "-monitor", "none", "-no-reboot",
            ]
            # The device tree QEMU would give this very machine, without gpio-keys: PL061
            # line 3 (the power button) is then free for a line request.
            dtb = self.dir / "virt.dtb"
            base0 = base.copy()
            base0[2] = f"virt,acpi=off,dumpdtb={dtb}"
            subprocess.run(base0, check=True, capture_output=True)
            subprocess.run(["fdtput", "-r", str(dtb), "/gpio-keys"], check=True)
            cmd = base + [
                "-kernel", str(self.image / "Image"), "-dtb", str(dtb),
                "-initrd", str(self.image / "initrd.img"),
                "-chardev", f"socket,id=con,path={con},server=on,wait=on",
                "-serial", "chardev:con",
                "-qmp", f"unix:{qmp},server=on,wait=off",
                "-append", "root=/dev/vda rw rootwait console=ttyAMA0 loglevel=5 "
                           "systemd.show_status=auto " + agent.format("ttyAMA0"),
            ]
        self.log = open(self.dir / "console.log", "wb")
        self.qemu_log = open(self.dir / "qemu.log", "wb")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.qemu_log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.con = socket.socket(socket.AF_UNIX)
                self.con.connect(str(con))
                break
            except OSError:
                self.con.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise GuestError(f"qemu did not start: {self.qemu_output()}")
                time.sleep(0.05)
        threading.Thread(target=self._reader, daemon=True).start()
        self.qmp_ = Qmp(qmp)
        for dev in self.qmp_.execute("query-chardev"):
            if dev["label"] == "serial0" and dev["filename"].startswith("pty:"):
                self.sensor_path = dev["filename"].removeprefix("pty:")
        self.wait_agent()
        self.timings["agent_ready_s"] = time.monotonic() - self.t_start

    def _reader(self):
        while True:
            try:
                data = self.con.recv(65536)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.closed = True
                    self.cond.notify_all()
                    return
                self.buf += data.replace(b"\r", b"")
                self.log.write(data)
                self.log.flush()
                self.cond.notify_all()

    def qemu_output(self):
        try:
            return (self.dir / "qemu.log").read_text(errors="replace")
        except OSError:
            return ""

    def console_tail(self, n=4000):
        with self.cond:
            return bytes(self.buf[-n:]).decode(errors="replace")

    def _wait_for(self, pattern, start, timeout):
        """Waits until ``pattern`` appears in the console output after offset ``start``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = pattern.search(self.buf, start)
                if m:
                    return m
                if self.proc.poll() is not None:
                    raise GuestError(f"qemu exited ({self.proc.returncode}); console:\n"
                                     f"{self.console_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 1.0))

    def _send(self, data: bytes):
        self.con.sendall(data)

    def wait_agent(self):
        deadline = time.monotonic() + self.boot_timeout
        ready = re.compile(re.escape(READY))
        while time.monotonic() < deadline:
            with self.cond:
                start = len(self.buf)
            if self._wait_for(ready, 0 if start == 0 else start, 10):
                return
            self._send(b"\nagent-ping\n")
        raise GuestError(f"no test agent on the console after {self.boot_timeout} s:\n"
                         f"{self.console_tail()}")

    def stop(self):
        if self.qmp_:
            try:
                self.qmp_.execute("quit")
            except (GuestError, OSError):
                pass
            self.qmp_.close()
        if self.proc:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            self.con.close()
        except (OSError, AttributeError):
            pass
        # The SD copy (up to 2 GiB) is not needed any more; the logs stay.
        (self.dir / "sd.img").unlink(missing_ok=True)

    # ----- guest shell

    def run(self, script, timeout=120, check=True):
        """Runs ``script`` with bash as root in the guest; returns (exit status, output)."""
        ident = next(self.ids)
        b64 = base64.b64encode(script.encode()).decode()
        with self.cond:
            start = len(self.buf)
        for i in range(0, len(b64), 512):
            self._send(b"+" + b64[i:i + 512].encode() + b"\n")
        self._send(f"!{ident}\n".encode())
        pattern = re.compile(rb"@@R " + str(ident).encode() + rb" (-?\d+) ([A-Za-z0-9+/=]*)@@")
        m = self._wait_for(pattern, start, timeout)
        if not m:
            raise GuestError(f"no answer from the guest within {timeout} s for:\n{script}\n"
                             f"console:\n{self.console_tail()}")
        rc = int(m.group(1))
        out = base64.b64decode(m.group(2)).decode(errors="replace")
        if check and rc != 0:
            raise GuestError(f"guest command failed (exit {rc}):\n{script}\n--- output:\n{out}")
        return rc, out

    def sh(self, script, timeout=120):
        """Runs ``script``; must succeed; returns its output."""
        return self.run(script, timeout=timeout)[1]

    # ----- QEMU monitor

    def qmp(self, cmd, **args):
        return self.qmp_.execute(cmd, **args)

    def gplev0(self):
        """The BCM2835 GPIO level register GPLEV0 (pins 0-31) as the emulated SoC holds it."""
        out = self.qmp("human-monitor-command", **{"command-line": f"xp /1wx {GPLEV0:#x}"})
        return int(out.split(":")[1].split()[0], 16)

    def pin(self, n):
        return (self.gplev0() >> n) & 1

    def wait_pin(self, n, level, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pin(n) == level:
                return time.monotonic()
            time.sleep(0.05)
        raise GuestError(f"GPIO{n} did not become {level} within {timeout} s "
                         f"(GPLEV0 = {self.gplev0():#010x})")
