"""Sensirion SHT3x (SHT30/31/35): temperature and humidity, 16-bit words with CRC-8.

The chip has no register pointer: the host writes a 16-bit command, waits for the conversion
and reads the answer. A read header sent before the conversion is done is NACKed, so the
driver sleeps the datasheet maximum before reading rather than polling.

The command-then-read transfers and the word+CRC framing are shared with the other
command-driven chips and live in ``base.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ClassVar

from qrad_agent.sensors.base import (
    I2CBus,
    Measurement,
    checked_words,
    command_read,
    reject_blank,
)

# The helpers moved to base.py; existing code imports them from here, so they stay exported.
__all__ = [
    "CMD_MEASURE_HIGH", "CMD_SERIAL", "MEASURE_WAIT_S", "SERIAL_WAIT_S", "SHT3x",
    "checked_words", "command_read", "reject_blank",
]

CMD_MEASURE_HIGH = b"\x24\x00"  # single shot, high repeatability, no clock stretching
CMD_SERIAL = b"\x37\x80"  # read serial number, no clock stretching
MEASURE_WAIT_S = 0.016  # datasheet maximum 15.5 ms, plus margin for the chip's own clock
SERIAL_WAIT_S = 0.001


class SHT3x:
    kind: ClassVar[str] = "sht3x"
    addresses: ClassVar[tuple[int, ...]] = (0x44, 0x45)
    temperature_range_c: ClassVar[tuple[float, float]] = (-40.0, 125.0)
    dithers: ClassVar[bool] = True
    # the command set; the SHT4x differs only here and in its humidity formula
    name: ClassVar[str] = "SHT3x"
    cmd_measure: ClassVar[bytes] = CMD_MEASURE_HIGH
    cmd_serial: ClassVar[bytes] = CMD_SERIAL
    measure_wait_s: ClassVar[float] = MEASURE_WAIT_S
    serial_wait_s: ClassVar[float] = SERIAL_WAIT_S

    def __init__(
        self, bus: I2CBus, address: int = 0x44, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.bus = bus
        self.address = address
        self.sleep = sleep

    def identify(self) -> str:
        data = command_read(
            self.bus, self.address, self.cmd_serial, 6, self.serial_wait_s, self.sleep
        )
        reject_blank(data, f"{self.name} serial number (command 0x{self.cmd_serial.hex()})",
                     "two words with valid CRCs")
        high, low = checked_words(data, f"{self.name} serial number")
        return f"{self.name} serial {high << 16 | low:08X}"

    def read(self) -> Measurement:
        data = command_read(
            self.bus, self.address, self.cmd_measure, 6, self.measure_wait_s, self.sleep
        )
        t_raw, rh_raw = checked_words(data, f"{self.name} measurement")
        return Measurement(
            temperature_c=-45.0 + 175.0 * t_raw / 65535.0,
            humidity_pct=self.humidity(rh_raw),
            raw=t_raw,
        )

    @staticmethod
    def humidity(raw: int) -> float:
        return 100.0 * raw / 65535.0
