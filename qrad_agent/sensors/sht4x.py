"""Sensirion SHT4x (SHT40/41/45): temperature and humidity, one-byte commands.

Same framing as the SHT3x (two words, each followed by CRC-8 init 0xFF). Humidity uses an
offset formula that can leave 0..100 % near the extremes; the datasheet says to clip it.
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

CMD_MEASURE_HIGH = b"\xfd"  # high precision (repeatability)
CMD_SERIAL = b"\x89"
MEASURE_WAIT_S = 0.009  # datasheet maximum 8.3 ms
SERIAL_WAIT_S = 0.01  # Sensirion's own driver waits this long; the datasheet gives no figure


class SHT4x:
    kind: ClassVar[str] = "sht4x"
    addresses: ClassVar[tuple[int, ...]] = (0x44, 0x45, 0x46)
    temperature_range_c: ClassVar[tuple[float, float]] = (-40.0, 125.0)
    dithers: ClassVar[bool] = True

    def __init__(
        self, bus: I2CBus, address: int = 0x44, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.bus = bus
        self.address = address
        self.sleep = sleep

    def identify(self) -> str:
        data = command_read(self.bus, self.address, CMD_SERIAL, 6, SERIAL_WAIT_S, self.sleep)
        reject_blank(data, "SHT4x serial number (command 0x89)", "two words with valid CRCs")
        high, low = checked_words(data, "SHT4x serial number")
        return f"SHT4x serial {high << 16 | low:08X}"

    def read(self) -> Measurement:
        data = command_read(
            self.bus, self.address, CMD_MEASURE_HIGH, 6, MEASURE_WAIT_S, self.sleep
        )
        t_raw, rh_raw = checked_words(data, "SHT4x measurement")
        rh = -6.0 + 125.0 * rh_raw / 65535.0
        return Measurement(
            temperature_c=-45.0 + 175.0 * t_raw / 65535.0,
            humidity_pct=min(100.0, max(0.0, rh)),
            raw=t_raw,
        )
