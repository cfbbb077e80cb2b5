"""LM75 / LM75A emulator: temperature 0x00, configuration 0x01 (one byte), T_HYST 0x02,
T_OS 0x03 (power-on 75 °C and 80 °C).

The chip converts continuously (about every 100 ms) and the temperature register holds the
last finished conversion, so a change of ``temperature_c`` shows up at the next conversion
boundary of ``clock``, and the register reads 0 until the first one. The original LM75
resolves 9 bits (0.5 °C), the LM75A 11 bits (0.125 °C); lower bits read 0.

Faults (``fault``): ``stuck`` freezes the temperature register at its last value. The chip has
no CRC and no identity register, so ``bad_crc`` and ``wrong_id`` do not apply and are refused.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable
from typing import ClassVar

from qrad_agent.sim.chips.bus import RegisterChip

CONVERSION_S = 0.1
SLACK_S = 1e-9  # a clock advanced by whole periods in floats must still reach the boundary


class LM75Chip(RegisterChip):
    FAULTS: ClassVar[frozenset[str]] = frozenset({"stuck"})
    bits: ClassVar[int] = 9

    def __init__(
        self, temperature_c: float = 21.0, clock: Callable[[], float] | None = None
    ) -> None:
        super().__init__(clock)
        self.temperature_c = temperature_c
        self.powered_at = self.clock()
        self._conversions = 0  # how many conversions have been latched
        self.registers = {
            0x00: b"\x00\x00", 0x01: b"\x00", 0x02: b"\x4b\x00", 0x03: b"\x50\x00",
        }


    @property
    def step_c(self) -> float:
        return 2.0 ** (8 - self.bits)

    def encode(self, temperature_c: float) -> bytes:
        half_range = 1 << (self.bits - 1)
        counts = max(-half_range, min(half_range - 1, round(temperature_c / self.step_c)))
        return ((counts << (16 - self.bits)) & 0xFFFF).to_bytes(2, "big")

    def refresh(self) -> None:
        done = math.floor((self.clock() - self.powered_at + SLACK_S) / CONVERSION_S)
        if done > self._conversions:
            self._conversions = done
            if self.fault != "stuck":
                self.registers[0x00] = self.encode(self.temperature_c)

    def write_register(self, register: int, data: bytes) -> None:
        if register == 0x01 and len(data) == 1:
            self.registers[0x01] = data
        elif register in (0x02, 0x03) and len(data) == 2:
            # only the top nine bits of the limit registers exist
            self.registers[register] = bytes([data[0], data[1] & 0x80])
        else:
            raise OSError(
                errno.EREMOTEIO,
                f"LM75 register 0x{register:02x} does not take {len(data)} byte(s); writable: "
                "0x01 (1 byte), 0x02 and 0x03 (2 bytes)",
            )


class LM75AChip(LM75Chip):
    bits: ClassVar[int] = 11
