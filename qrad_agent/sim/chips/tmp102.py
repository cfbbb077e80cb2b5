"""TMP102 emulator: temperature register 0x00, configuration 0x01, T_LOW 0x02, T_HIGH 0x03.

Power-up: the temperature register reads 0 until the first conversion completes (~26 ms
typical, 35 ms max); conversions then repeat at 4 Hz by default. Extended mode (EM, config bit
4 of the low byte) gives 13-bit results with bit 0 of the temperature register set.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from qrad_agent.sim.chips.bus import RegisterChip

FIRST_CONVERSION_S = 0.035
EM_BIT = 0x10  # configuration register, second byte


class TMP102Chip(RegisterChip):
    def __init__(self, temperature_c: float = 21.0, clock: Callable[[], float] | None = None):
        super().__init__(clock)
        self.temperature_c = temperature_c
        self.powered_at = self.clock()
        self.config = bytes([0x60, 0xA0])  # the power-on default
        self.registers = {
            0x00: b"\x00\x00", 0x01: self.config, 0x02: b"\x4b\x00", 0x03: b"\x50\x00"
        }

    @property
    def extended(self) -> bool:
        return bool(self.config[1] & EM_BIT)

    def encode(self, temperature_c: float) -> bytes:
        if self.extended:
            counts = max(-4096, min(4095, round(temperature_c / 0.0625)))
            word = ((counts << 3) | 1) & 0xFFFF
        else:
            counts = max(-2048, min(2047, round(temperature_c / 0.0625)))
            word = (counts << 4) & 0xFFFF
        return word.to_bytes(2, "big")

    def refresh(self) -> None:
        if self.clock() - self.powered_at < FIRST_CONVERSION_S:
            self.registers[0x00] = b"\x00\x00"
            return
        if self.fault == "stuck" and self.registers[0x00] != b"\x00\x00":
            return  # a stuck chip keeps sending the last word it converted
        self.registers[0x00] = self.encode(self.temperature_c)

    def write_register(self, register: int, data: bytes) -> None:
        if register == 0x01 and len(data) == 2:
            self.config = data
            self.registers[0x01] = data
        elif register in (0x02, 0x03) and len(data) == 2:
            self.registers[register] = data
        else:
            raise OSError(errno.EREMOTEIO, f"TMP102 register 0x{register:02x} not writable")
