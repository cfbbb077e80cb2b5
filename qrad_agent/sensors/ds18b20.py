"""Maxim DS18B20 1-Wire thermometer, read through the kernel's ``w1_therm`` sysfs file.

Reading ``/sys/bus/w1/devices/28-*/w1_slave`` makes the kernel run a conversion (about
750 ms at 12 bit) and print two lines: the nine scratchpad bytes with the kernel's CRC verdict,
then bytes again and ``t=<milli °C>``. Only a ``YES`` line is used; on ``NO`` the second line
still carries a temperature, computed from the corrupt bytes. 85 °C (``t=85000``) is the
power-on value of the temperature register: a conversion that did not run, typically for want
of power on a parasite-powered bus.

The 1-Wire ROM serial (the 48 bits after the family code) is the driver's ``address``.
"""

from __future__ import annotations

import re
from typing import ClassVar

from qrad_agent.sensors.base import CrcError, Measurement, NotReady, SensorError, int16
from qrad_agent.sysfs import Sysfs

DEVICES_DIR = "sys/bus/w1/devices"
FAMILY = "28"
POWER_ON_MILLI_C = 85000

_ID = re.compile(r"^28-[0-9a-f]{12}$")
_CRC_LINE = re.compile(r"^((?:[0-9a-f]{2} ){9}): crc=([0-9a-f]{2}) (YES|NO)$")
_TEMP_LINE = re.compile(r"^(?:[0-9a-f]{2} ){9}t=(-?\d+)$")


def dallas_crc8(data: bytes) -> int:
    """Dallas/Maxim 1-Wire CRC-8: x^8 + x^5 + x^4 + 1, LSB first (0x8C reflected), init 0."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8C if crc & 1 else crc >> 1
    return crc


def list_ds18b20(sysfs: Sysfs) -> list[str]:
    """Ids of the DS18B20s the kernel has found (``28-…``), sorted by serial number."""
    found = sysfs.glob(f"{DEVICES_DIR}/{FAMILY}-*/w1_slave")
    return sorted(path.split("/")[-2] for path in found)  # equal-length hex: text order


class DS18B20:
    kind: ClassVar[str] = "ds18b20"
    addresses: ClassVar[tuple[int, ...]] = ()  # not an I2C chip: found by id on the w1 bus
    temperature_range_c: ClassVar[tuple[float, float]] = (-55.0, 125.0)
    # Sealed probes have enough thermal mass to hold one 1/16 °C code for many minutes.
    dithers: ClassVar[bool] = False

    def __init__(self, sysfs: Sysfs, device_id: str) -> None:
        if not _ID.match(device_id):
            raise ValueError(
                f"DS18B20 id {device_id!r} is not of the form 28-0316a2790eff "
                f"(family 28, a dash, 12 lowercase hex digits)"
            )
        self.sysfs = sysfs
        self.device_id = device_id
        self.address = int(device_id[3:], 16)
        self.path = f"{DEVICES_DIR}/{device_id}/w1_slave"

    def identify(self) -> str:
        if not self.sysfs.exists(self.path):
            raise SensorError(f"no DS18B20 {self.device_id}: {self.sysfs.path(self.path)} missing")
        return f"DS18B20 {self.device_id}"

    def read(self) -> Measurement:
        try:
            text = self.sysfs.path(self.path).read_text()
        except FileNotFoundError:
            raise SensorError(
                f"no DS18B20 {self.device_id}: {self.sysfs.path(self.path)} missing "
                f"(unplugged, or the w1 bus master lost it)"
            ) from None
        lines = text.strip().splitlines()
        if len(lines) != 2:
            # newer kernels return an empty file when the bus read itself failed
            raise SensorError(
                f"DS18B20 {self.device_id}: w1_slave has {len(lines)} lines, expected 2 "
                f"(bus error or conversion in progress): {text[:120]!r}"
            )
        crc_line = _CRC_LINE.match(lines[0].strip())
        temp_line = _TEMP_LINE.match(lines[1].strip())
        if crc_line is None or temp_line is None:
            raise SensorError(f"DS18B20 {self.device_id}: unrecognised w1_slave {text[:120]!r}")
        scratchpad = bytes.fromhex(crc_line.group(1))
        if crc_line.group(3) != "YES":
            raise CrcError(
                f"DS18B20 {self.device_id}: kernel reports a CRC mismatch "
                f"(scratchpad {scratchpad.hex(' ')}, computed crc={crc_line.group(2)})"
            )
        if dallas_crc8(scratchpad[:8]) != scratchpad[8]:
            raise CrcError(
                f"DS18B20 {self.device_id}: w1_slave says YES but the scratchpad "
                f"{scratchpad.hex(' ')} does not check (CRC 0x{dallas_crc8(scratchpad[:8]):02x})"
            )
        if not any(scratchpad):
            # zeros have a zero CRC, so the kernel passes them: the data line is held low
            raise SensorError(
                f"DS18B20 {self.device_id}: all-zero scratchpad, the data line is shorted to "
                f"ground or the sensor is dead"
            )
        milli_c = int(temp_line.group(1))
        if milli_c == POWER_ON_MILLI_C:
            raise NotReady(
                f"DS18B20 {self.device_id} reports 85.000 °C, its power-on value: the "
                f"conversion did not run (often too little power on a parasite-powered bus)"
            )
        return Measurement(
            temperature_c=milli_c / 1000.0, raw=int16(scratchpad[0] | (scratchpad[1] << 8))
        )
