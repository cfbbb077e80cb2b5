"""Microchip MCP9808: ±0.25 °C sensor with JEDEC manufacturer and device ID registers.

The ambient-temperature register's top three bits are live alert-comparator flags, not data:
with the power-on limits (all 0 °C) a room-temperature chip reports two of them set, so they
must be masked before the sign bit is read.
"""

from __future__ import annotations

from typing import ClassVar

from qrad_agent.sensors.base import I2CBus, Measurement, WrongChip, swap16

REG_AMBIENT = 0x05
REG_MANUFACTURER_ID = 0x06
REG_DEVICE_ID = 0x07
MANUFACTURER_ID = 0x0054
DEVICE_ID = 0x04  # upper byte of register 0x07; the lower byte is the revision
TEMPERATURE_BITS = 0x1FFF  # 13-bit two's complement, 1/16 °C; bit 12 is the sign
SIGN_BIT = 0x1000


class MCP9808:
    kind: ClassVar[str] = "mcp9808"
    addresses: ClassVar[tuple[int, ...]] = tuple(range(0x18, 0x20))
    temperature_range_c: ClassVar[tuple[float, float]] = (-40.0, 125.0)
    dithers: ClassVar[bool] = True

    def __init__(self, bus: I2CBus, address: int = 0x18) -> None:
        self.bus = bus
        self.address = address

    def identify(self) -> str:
        manufacturer = swap16(self.bus.read_word_data(self.address, REG_MANUFACTURER_ID))
        if manufacturer != MANUFACTURER_ID:
            raise WrongChip(
                f"MCP9808 manufacturer ID (register 0x06): expected 0x{MANUFACTURER_ID:04X}, "
                f"found 0x{manufacturer:04X}"
            )
        device = swap16(self.bus.read_word_data(self.address, REG_DEVICE_ID))
        if device >> 8 != DEVICE_ID:
            raise WrongChip(
                f"MCP9808 device ID (register 0x07 upper byte): expected 0x{DEVICE_ID:02X}, "
                f"found 0x{device >> 8:02X}"
            )
        return f"MCP9808 (manufacturer 0x{manufacturer:04X}, device 0x{device >> 8:02X}, " \
            f"revision 0x{device & 0xFF:02X})"

    def read(self) -> Measurement:
        raw = swap16(self.bus.read_word_data(self.address, REG_AMBIENT)) & TEMPERATURE_BITS
        counts = raw - 0x2000 if raw & SIGN_BIT else raw
        return Measurement(temperature_c=counts / 16.0, raw=raw)
