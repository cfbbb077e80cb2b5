"""LM75 family: the original 9-bit LM75 and the 11-bit LM75A. No identity register.

Both put the temperature left-justified in a 16-bit two's-complement register (MSB first);
they differ only in how many of the top bits are valid. Reading an LM75A as an LM75 is safe
(it just drops the extra bits); the reverse would report noise from undefined bits.
"""

from __future__ import annotations

from typing import ClassVar

from qrad_agent.sensors.base import I2CBus, Measurement, int16, swap16

REG_TEMPERATURE = 0x00


class LM75:
    """Original LM75: 9 bits, 0.5 °C per count."""

    kind: ClassVar[str] = "lm75"
    addresses: ClassVar[tuple[int, ...]] = tuple(range(0x48, 0x50))
    temperature_range_c: ClassVar[tuple[float, float]] = (-55.0, 125.0)
    # half-degree counts sit still for minutes in a steady room: not evidence of a fault
    dithers: ClassVar[bool] = False

    unused_bits: ClassVar[int] = 7
    resolution_c: ClassVar[float] = 0.5

    def __init__(self, bus: I2CBus, address: int = 0x48) -> None:
        self.bus = bus
        self.address = address

    def identify(self) -> str:
        return f"{self.kind.upper()} (no identity register)"

    def read(self) -> Measurement:
        raw = swap16(self.bus.read_word_data(self.address, REG_TEMPERATURE))
        counts = int16(raw) >> self.unused_bits
        # undefined low bits are left out of ``raw`` so they cannot fake or hide a stuck value
        valid = raw & (0xFFFF << self.unused_bits) & 0xFFFF
        return Measurement(temperature_c=counts * self.resolution_c, raw=valid)


class LM75A(LM75):
    """LM75A: 11 bits, 0.125 °C per count."""

    kind: ClassVar[str] = "lm75a"
    dithers: ClassVar[bool] = False  # 0.125 °C steps still hold still in a steady room
    unused_bits: ClassVar[int] = 5
    resolution_c: ClassVar[float] = 0.125
