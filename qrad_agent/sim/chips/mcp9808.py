"""MCP9808 emulator: config 0x01, T_UPPER 0x02, T_LOWER 0x03, T_CRIT 0x04, ambient 0x05,
manufacturer ID 0x06 (0x0054), device ID/revision 0x07 (0x0400), resolution 0x08 (one byte).

Conversions run continuously; the ambient register holds the last finished one (0x0000 until
the first), so the conversion time of the chosen resolution (30, 65, 130, 250 ms for 0.5 ..
0.0625 °C) decides when a change of ``temperature_c`` shows. The top three bits of the ambient
register are the comparator flags T ≥ T_CRIT, T > T_UPPER, T < T_LOWER, compared at the limit
registers' 0.25 °C resolution. The power-on limits are all 0 °C, so above freezing a fresh
chip raises the first two flags: the masking trap drivers must survive.

Faults (``fault``): ``stuck`` keeps the last conversion; ``wrong_id`` makes the ID registers
answer as another maker's JC-42.4 sensor (0x1131 / 0xA100). There is no CRC to corrupt.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable
from typing import ClassVar

from qrad_agent.sim.chips.bus import RegisterChip

CONVERSION_S = {0: 0.030, 1: 0.065, 2: 0.130, 3: 0.250}  # by resolution register value
FLAG_CRIT, FLAG_UPPER, FLAG_LOWER = 0x8000, 0x4000, 0x2000
LIMIT_BITS = 0x1FFC  # limit registers: 13-bit two's complement with 0.25 °C steps
SLACK_S = 1e-9  # a clock advanced by whole periods in floats must still reach the boundary
IDS = {0x06: b"\x00\x54", 0x07: b"\x04\x00"}
WRONG_IDS = {0x06: b"\x11\x31", 0x07: b"\xa1\x00"}


def _signed13(word: int) -> int:
    word &= 0x1FFF
    return word - 0x2000 if word & 0x1000 else word


class MCP9808Chip(RegisterChip):
    FAULTS: ClassVar[frozenset[str]] = frozenset({"stuck", "wrong_id"})

    def __init__(
        self, temperature_c: float = 21.0, clock: Callable[[], float] | None = None
    ) -> None:
        super().__init__(clock)
        self.temperature_c = temperature_c
        self.counts = 0  # the last conversion, 1/16 °C
        self._converted = False
        self._next_conversion_at = self.clock() + CONVERSION_S[3]
        self.registers = {
            0x01: b"\x00\x00", 0x02: b"\x00\x00", 0x03: b"\x00\x00", 0x04: b"\x00\x00",
            0x05: b"\x00\x00", **IDS, 0x08: b"\x03",
        }


    @property
    def resolution(self) -> int:
        return self.registers[0x08][0] & 0x03

    def convert(self, temperature_c: float) -> int:
        """The ambient register's 13 data bits for a temperature, at the set resolution."""
        sixteenths_per_step = 8 >> self.resolution
        steps = round(temperature_c * 16 / sixteenths_per_step)
        return max(-4096, min(4095, steps * sixteenths_per_step))

    def refresh(self) -> None:
        now = self.clock() + SLACK_S
        if now >= self._next_conversion_at:
            period = CONVERSION_S[self.resolution]
            missed = math.floor((now - self._next_conversion_at) / period)
            self._next_conversion_at += (missed + 1) * period
            if self.fault != "stuck":
                self.counts = self.convert(self.temperature_c)
                self._converted = True
        if self._converted:
            self.registers[0x05] = self.ambient_word().to_bytes(2, "big")
        self.registers.update(WRONG_IDS if self.fault == "wrong_id" else IDS)

    def ambient_word(self) -> int:
        def limit(register: int) -> int:
            return _signed13(int.from_bytes(self.registers[register], "big"))

        flags = 0
        if self.counts >= limit(0x04):
            flags |= FLAG_CRIT
        if self.counts > limit(0x02):
            flags |= FLAG_UPPER
        if self.counts < limit(0x03):
            flags |= FLAG_LOWER
        return flags | (self.counts & 0x1FFF)

    def write_register(self, register: int, data: bytes) -> None:
        if register in (0x01, 0x02, 0x03, 0x04) and len(data) == 2:
            mask = 0x07FF if register == 0x01 else LIMIT_BITS
            self.registers[register] = (int.from_bytes(data, "big") & mask).to_bytes(2, "big")
        elif register == 0x08 and len(data) == 1:
            self.registers[0x08] = bytes([data[0] & 0x03])
        else:
            raise OSError(
                errno.EREMOTEIO,
                f"MCP9808 register 0x{register:02x} does not take {len(data)} byte(s); "
                "writable: 0x01-0x04 (2 bytes), 0x08 (1 byte)",
            )
