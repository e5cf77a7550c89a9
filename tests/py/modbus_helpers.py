"""A pymodbus RTU server on a pseudo-terminal, linked to the gateway's pty by a small relay.

Two pty pairs: the gateway opens the slave of one (through the symlink ``gw_path``), pymodbus
the slave of the other; a relay thread copies bytes between the two masters, and can corrupt
what the server sends (``corrupt``: probability of flipping bits in each chunk) or add noise.
"""

import asyncio
import os
import random
import select
import threading
import time
import tty
from pathlib import Path

from pymodbus.datastore import (ModbusDeviceContext, ModbusSequentialDataBlock,
                                ModbusServerContext)
from pymodbus.server import ModbusSerialServer

try:  # pymodbus >= 3.7
    from pymodbus import FramerType
    RTU = FramerType.RTU
except ImportError:  # pragma: no cover
    from pymodbus.framer import FramerType
    RTU = FramerType.RTU

#: Registers/coils each table holds; addresses beyond answer "illegal data address".
TABLE = 200


def _pty(link=None):
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    if link is not None:
        tmp = Path(str(link) + ".new")
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(path, tmp)
        os.replace(tmp, link)
    return master, slave, path


class Relay:
    """Copies bytes between two pty masters; ``corrupt`` (0..1) is the chance that a chunk
    from the server gets a byte flipped, ``noise`` the chance that junk bytes follow it."""

    def __init__(self, gw_link):
        self.gw_master, self._gw_slave, _ = _pty(gw_link)
        self.srv_master, self._srv_slave, self.srv_path = _pty()
        self.corrupt = 0.0
        self.noise = 0.0
        self.corrupted = 0
        self.rng = random.Random(7)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        pairs = {self.gw_master: self.srv_master, self.srv_master: self.gw_master}
        while not self._stop.is_set():
            r, _, _ = select.select(list(pairs), [], [], 0.05)
            for fd in r:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                if fd == self.srv_master:
                    data = self._mangle(data)
                try:
                    os.write(pairs[fd], data)
                except OSError:
                    pass

    def _mangle(self, data):
        if data and self.rng.random() < self.corrupt:
            b = bytearray(data)
            i = self.rng.randrange(len(b))
            b[i] ^= 1 << self.rng.randrange(8)
            self.corrupted += 1
            data = bytes(b)
        if self.rng.random() < self.noise:
            data += bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 6)))
            self.corrupted += 1
        return data

    def close(self):
        self._stop.set()
        self._t.join(2)
        for fd in (self.gw_master, self._gw_slave, self.srv_master, self._srv_slave):
            try:
                os.close(fd)
            except OSError:
                pass


class ModbusServer:
    """pymodbus's RTU server for ``units`` on the relay's server pty, in a thread of its own
    (asyncio). ``ctx[unit]`` is the device context: ``set(fc, address, values)`` and
    ``get(fc, address, count)`` use the function code's table (3 holding, 4 input, 1 coil,
    2 discrete)."""

    def __init__(self, relay, units, baud=9600):
        self.units = units
        self.devices = {
            u: ModbusDeviceContext(
                di=ModbusSequentialDataBlock(0, [0] * TABLE),
                co=ModbusSequentialDataBlock(0, [0] * TABLE),
                hr=ModbusSequentialDataBlock(0, [0] * TABLE),
                ir=ModbusSequentialDataBlock(0, [0] * TABLE),
            )
            for u in units
        }
        self.context = ModbusServerContext(devices=self.devices, single=False)
        self.relay = relay
        self.baud = baud
        self.loop = None
        self.server = None
        self._ready = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        assert self._ready.wait(10), "pymodbus server did not start"

    def _run(self):
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)

        async def main():
            self.server = ModbusSerialServer(
                self.context, framer=RTU, port=self.relay.srv_path, baudrate=self.baud,
                ignore_missing_devices=True)
            self.loop.call_soon(self._ready.set)
            await self.server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except Exception:  # noqa: BLE001 (stopped)
            pass

    def set(self, unit, fc, address, values):
        self.loop.call_soon_threadsafe(self.devices[unit].setValues, fc, address, list(values))
        time.sleep(0.01)

    def get(self, unit, fc, address, count=1):
        return self.devices[unit].getValues(fc, address, count)

    def stop(self):
        if self.loop and self.server:
            fut = asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop)
            try:
                fut.result(5)
            except Exception:  # noqa: BLE001
                pass
        self._t.join(5)


def words_f32(x, little=False):
    import struct
    hi, lo = struct.unpack(">HH", struct.pack(">f", x))
    return [lo, hi] if little else [hi, lo]


def words_32(x, little=False):
    x &= 0xFFFFFFFF
    hi, lo = x >> 16, x & 0xFFFF
    return [lo, hi] if little else [hi, lo]


def bus_toml(name, path, devices, timeout_ms=100, retries=1, baud=9600):
    """``[[modbus]]`` text; ``devices``: (name, unit, poll_ms, [register dicts][, {device
    keys}])."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        return repr(v)

    lines = ["[[modbus]]", f'name = "{name}"', f'path = "{path}"', f"baud = {baud}",
             f"timeout_ms = {timeout_ms}", f"retries = {retries}"]
    for dname, unit, poll_ms, regs, *more in devices:
        lines += ["", "[[modbus.device]]", f'name = "{dname}"', f"unit = {unit}",
                  f"poll_ms = {poll_ms}"]
        for extra in more:
            lines += [f"{k} = {val(v)}" for k, v in extra.items()]
        for r in regs:
            lines += ["", "[[modbus.device.register]]"]
            lines += [f"{k} = {val(v)}" for k, v in r.items()]
    return "\n".join(lines) + "\n"
