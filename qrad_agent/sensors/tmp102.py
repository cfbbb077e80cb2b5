"""TI TMP102: 12-bit (13-bit extended) digital temperature sensor, no identity register."""

from __future__ import annotations

from typing import ClassVar

from qrad_agent.sensors.base import I2CBus, Measurement, int16, swap16

REG_TEMPERATURE = 0x00
EXTENDED_MODE_BIT = 0x0001  # LSB bit 0 of the temperature register flags 13-bit mode


class TMP102:
    kind: ClassVar[str] = "tmp102"
    addresses: ClassVar[tuple[int, ...]] = (0x48, 0x49, 0x4A, 0x4B)
    temperature_range_c: ClassVar[tuple[float, float]] = (-55.0, 150.0)
    dithers: ClassVar[bool] = True

    def __init__(self, bus: I2CBus, address: int = 0x48) -> None:
        self.bus = bus
        self.address = address

    def identify(self) -> str:
        return "TMP102 (no identity register)"

    def read(self) -> Measurement:
        raw = swap16(self.bus.read_word_data(self.address, REG_TEMPERATURE))
        shift = 3 if raw & EXTENDED_MODE_BIT else 4
        return Measurement(temperature_c=(int16(raw) >> shift) * 0.0625, raw=raw)
