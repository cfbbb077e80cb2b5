"""A Linux 1-Wire sysfs tree with DS18B20s in it, written as the kernel's w1_therm shows it.

Each sensor's ``w1_slave`` file is rewritten whenever its temperature or fault changes, in the
kernel's format: nine scratchpad bytes, ``: crc=XX YES|NO`` with the CRC the kernel computed
over the first eight, then the last good bytes again and ``t=<milli °C>`` computed from the
bytes just read (truncating division, as the kernel's C does).

Faults (``fault``): ``bad_crc`` (a corrupted read: ``NO``), ``power_on`` (85 °C scratchpad, the
value of a conversion that never ran), ``shorted`` (all zeros, which passes the CRC).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qrad_agent.sensors.ds18b20 import DEVICES_DIR, dallas_crc8
from qrad_agent.sysfs import Sysfs

FAULTS = ("bad_crc", "power_on", "shorted")
POWER_ON_SCRATCHPAD = bytes([0x50, 0x05, 0x4B, 0x46, 0x7F, 0xFF, 0x0C, 0x10])
TH_DEFAULT, TL_DEFAULT = 0x4B, 0x46  # the alarm bytes as shipped


def scratchpad(temperature_c: float, resolution_bits: int = 12) -> bytes:
    """The nine bytes a DS18B20 at ``temperature_c`` returns, its CRC last."""
    if resolution_bits not in (9, 10, 11, 12):
        raise ValueError(f"DS18B20 resolution must be 9, 10, 11 or 12 bits, got {resolution_bits}")
    counts = max(-55 * 16, min(125 * 16, round(temperature_c * 16)))
    counts &= ~((1 << (12 - resolution_bits)) - 1)  # the undefined low bits read 0
    raw = counts & 0xFFFF
    config = 0x1F | ((resolution_bits - 9) << 5)
    # Genuine parts fill reserved byte 6 with 16 minus the low nibble (a DS18S20 leftover).
    count_remain = 0x10 - (raw & 0x0F)
    body = bytes([raw & 0xFF, raw >> 8, TH_DEFAULT, TL_DEFAULT, config, 0xFF, count_remain, 0x10])
    return body + bytes([dallas_crc8(body)])


def kernel_milli_c(pad: bytes) -> int:
    """``t=`` as w1_therm computes it for a DS18B20: counts * 1000 / 16, C division."""
    counts = int.from_bytes(pad[0:2], "little", signed=True)
    magnitude = abs(counts) * 1000 // 16
    return magnitude if counts >= 0 else -magnitude


def w1_slave_text(read: bytes, last_good: bytes) -> str:
    crc = dallas_crc8(read[:8])
    verdict = "YES" if crc == read[8] else "NO"
    line1 = "".join(f"{b:02x} " for b in read) + f": crc={crc:02x} {verdict}\n"
    line2 = "".join(f"{b:02x} " for b in last_good) + f"t={kernel_milli_c(read)}\n"
    return line1 + line2


class FakeDS18B20:
    def __init__(self, directory: Path, temperature_c: float, resolution_bits: int = 12) -> None:
        self.directory = directory
        self.device_id = directory.name
        self._temperature_c = temperature_c
        self._fault: str | None = None
        self.resolution_bits = resolution_bits
        self._last_good = bytes(9)  # the kernel's copy starts zeroed
        directory.mkdir(parents=True, exist_ok=True)
        self.write()

    @property
    def temperature_c(self) -> float:
        return self._temperature_c

    @temperature_c.setter
    def temperature_c(self, value: float) -> None:
        self._temperature_c = value
        self.write()

    @property
    def fault(self) -> str | None:
        return self._fault

    @fault.setter
    def fault(self, value: str | None) -> None:
        if value is not None and value not in FAULTS:
            raise ValueError(f"unknown DS18B20 fault {value!r}; allowed: {', '.join(FAULTS)}")
        self._fault = value
        self.write()

    def read_bytes(self) -> bytes:
        """The scratchpad as the bus master would receive it now."""
        if self._fault == "power_on":
            return POWER_ON_SCRATCHPAD + bytes([dallas_crc8(POWER_ON_SCRATCHPAD)])
        if self._fault == "shorted":
            return bytes(9)
        pad = scratchpad(self._temperature_c, self.resolution_bits)
        if self._fault == "bad_crc":
            pad = bytes([pad[0] ^ 0x24]) + pad[1:]  # a bit error in flight
        return pad

    def write(self) -> None:
        read = self.read_bytes()
        if dallas_crc8(read[:8]) == read[8]:
            self._last_good = read
        (self.directory / "w1_slave").write_text(w1_slave_text(read, self._last_good))


class W1Tree:
    """``sys/bus/w1/devices`` under ``root``, with a bus master and any number of sensors."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.devices = self.root / DEVICES_DIR
        (self.devices / "w1_bus_master1").mkdir(parents=True, exist_ok=True)
        self.sensors: dict[str, FakeDS18B20] = {}

    @property
    def sysfs(self) -> Sysfs:
        return Sysfs(self.root)

    def add(
        self, device_id: str, temperature_c: float = 21.0, resolution_bits: int = 12
    ) -> FakeDS18B20:
        sensor = FakeDS18B20(self.devices / device_id, temperature_c, resolution_bits)
        self.sensors[device_id] = sensor
        return sensor

    def remove(self, device_id: str) -> None:
        """Unplug a sensor: the kernel removes its directory."""
        self.sensors.pop(device_id)
        shutil.rmtree(self.devices / device_id)
