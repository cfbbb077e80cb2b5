"""HTU21D / Si7021 emulator: command-driven, 3-byte answers (msb, lsb, CRC-8 init 0x00).

Commands: 0xF3 / 0xF5 start a temperature / humidity conversion without holding the bus; the
chip NACKs reads until it ends, then answers once. 0xE3 / 0xE5 (hold master) answer at once,
because the clock stretching that covers the conversion is invisible at this level. 0xE7 reads
and 0xE6 writes the user register, 0xFE resets, 0xFC 0xC9 returns the second half of the
electronic ID (SNB_3 = device id, SNB_2, CRC, SNB_1, SNB_0, CRC; each CRC over its own pair).

Words are left-justified at the default resolution (14-bit temperature, 12-bit humidity) with
the status bits in the two LSBs: bit 1 set for humidity.

``variant`` picks the device id and conversion times: "htu21d" (0x32; 50 ms T, 16 ms RH) or
"si7021" (0x15; 10.8 ms T, 22.8 ms RH, which includes a temperature conversion).

Faults (``fault``): ``bad_crc`` inverts every CRC byte; ``stuck`` repeats the last words;
``wrong_id`` answers the ID command with a device id no family member uses (0x5A).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import ClassVar

from qrad_agent.sensors.base import sensirion_crc8
from qrad_agent.sim.chips.bus import EmulatedChip

VARIANTS = {  # device id, temperature conversion s, humidity conversion s
    "htu21d": (0x32, 0.050, 0.016),
    "si7021": (0x15, 0.0108, 0.0228),
}
USER_REGISTER_DEFAULT = {"htu21d": 0x02, "si7021": 0x3A}
WRONG_DEVICE_ID = 0x5A
HUMIDITY_STATUS = 0x02


def _nack(why: str) -> OSError:
    return OSError(errno.EREMOTEIO, f"Remote I/O error ({why})")


class HTU21DChip(EmulatedChip):
    FAULTS: ClassVar[frozenset[str]] = frozenset({"bad_crc", "stuck", "wrong_id"})

    def __init__(
        self,
        temperature_c: float = 21.0,
        humidity_pct: float = 45.0,
        variant: str = "htu21d",
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(clock)
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
        self.variant = variant
        self.temperature_c = temperature_c
        self.humidity_pct = humidity_pct
        self.user_register = USER_REGISTER_DEFAULT[variant]
        self.serial_b = 0x00A1B2  # SNB_2, SNB_1, SNB_0
        self._answer: bytes | None = None
        self._ready_at = 0.0
        self._last: dict[str, int] = {}


    def temperature_word(self) -> int:
        counts = round((self.temperature_c + 46.85) * 16384 / 175.72)
        return max(0, min(0x3FFF, counts)) << 2

    def humidity_word(self) -> int:
        counts = round((self.humidity_pct + 6.0) * 4096 / 125.0)
        return max(0, min(0xFFF, counts)) << 4 | HUMIDITY_STATUS

    def frame(self, *pairs: tuple[int, int]) -> bytes:
        out = bytearray()
        for pair in pairs:
            crc = sensirion_crc8(list(pair), init=0x00)
            out += bytes([*pair, crc ^ 0xFF if self.fault == "bad_crc" else crc])
        return bytes(out)

    def _measure(self, what: str, word: int, conversion_s: float) -> None:
        if self.fault == "stuck" and what in self._last:
            word = self._last[what]
        self._last[what] = word
        self._answer = self.frame((word >> 8, word & 0xFF))
        self._ready_at = self.clock() + conversion_s

    def _busy(self) -> bool:
        return self._answer is not None and self.clock() < self._ready_at

    def i2c_write(self, data: bytes) -> None:
        if self._busy():
            raise _nack(f"{self.variant} is converting")
        if not data:
            return  # a quick write: the address phase alone, as presence probes send
        device_id, t_s, rh_s = VARIANTS[self.variant]
        command = data.hex().upper()
        if command in ("F3", "E3"):
            self._measure("t", self.temperature_word(), t_s if command == "F3" else 0.0)
        elif command in ("F5", "E5"):
            self._measure("rh", self.humidity_word(), rh_s if command == "F5" else 0.0)
        elif command == "E7":
            self._answer, self._ready_at = bytes([self.user_register]), self.clock()
        elif len(data) == 2 and data[0] == 0xE6:
            self.user_register = data[1]
        elif command == "FE":
            self._answer = None
            heater = self.user_register & 0x04  # the one bit a soft reset keeps
            self.user_register = USER_REGISTER_DEFAULT[self.variant] | heater
        elif command == "FCC9":
            first = WRONG_DEVICE_ID if self.fault == "wrong_id" else device_id
            b = self.serial_b
            self._answer = self.frame((first, b >> 16), ((b >> 8) & 0xFF, b & 0xFF))
            self._ready_at = self.clock()
        else:
            raise _nack(f"{self.variant} does not know command 0x{command}")

    def i2c_read(self, length: int) -> bytes:
        if self._answer is None:
            raise _nack(f"{self.variant} has no data to send")
        if self._busy():
            raise _nack(f"{self.variant} is converting")
        answer, self._answer = self._answer, None
        return (answer + b"\xff" * length)[:length]
