"""SHT3x emulator: a command-driven chip (no register pointer), as the datasheet describes.

A measurement command samples ``temperature_c`` / ``humidity_pct`` and starts a conversion;
until it ends (by ``clock``) the chip NACKs every transfer, after it the next read returns
T msb, T lsb, CRC, RH msb, RH lsb, CRC once (a second read is NACKed: no new data). Reading
fewer bytes is allowed; bytes past the answer read 0xFF (the master clocks an idle bus).
Unknown commands are NACKed.

Faults (``fault``): ``bad_crc`` inverts every CRC byte sent; ``stuck`` repeats the last
measured words; ``wrong_id`` answers the serial-number command with 0xFF bytes, as a device
that does not implement it would leave the bus.

``SensirionChip`` holds the protocol; ``SHT3xChip`` and ``SHT4xChip`` (sim/chips/sht4x.py)
supply their command tables and humidity scale.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import ClassVar

from qrad_agent.sensors.base import sensirion_crc8
from qrad_agent.sim.chips.bus import EmulatedChip


def _nack(why: str) -> OSError:
    return OSError(errno.EREMOTEIO, f"Remote I/O error ({why})")


class SensirionChip(EmulatedChip):
    FAULTS: ClassVar[frozenset[str]] = frozenset({"bad_crc", "stuck", "wrong_id"})
    name: ClassVar[str] = "Sensirion"
    command_length: ClassVar[int] = 2
    measure_s: ClassVar[dict[int, float]] = {}  # measurement command -> conversion time
    serial_command: ClassVar[int] = 0
    reset_command: ClassVar[int] = 0
    rh_offset: ClassVar[float] = 0.0  # RH = offset + span * S / 65535
    rh_span: ClassVar[float] = 100.0

    def __init__(
        self,
        temperature_c: float = 21.0,
        humidity_pct: float = 45.0,
        serial: int = 0x0C1A_5E77,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(clock)
        self.temperature_c = temperature_c
        self.humidity_pct = humidity_pct
        self.serial = serial
        self._answer: bytes | None = None
        self._ready_at = 0.0
        self._last_words: tuple[int, int] | None = None


    def words(self) -> tuple[int, int]:
        """The raw temperature and humidity words for the present physical state."""
        t = round((self.temperature_c + 45.0) * 65535.0 / 175.0)
        rh = round((self.humidity_pct - self.rh_offset) * 65535.0 / self.rh_span)
        return max(0, min(0xFFFF, t)), max(0, min(0xFFFF, rh))

    def frame(self, *words: int) -> bytes:
        out = bytearray()
        for word in words:
            pair = [word >> 8, word & 0xFF]
            crc = sensirion_crc8(pair)
            out += bytes([*pair, crc ^ 0xFF if self.fault == "bad_crc" else crc])
        return bytes(out)

    def _busy(self) -> bool:
        return self._answer is not None and self.clock() < self._ready_at

    def i2c_write(self, data: bytes) -> None:
        if self._busy():
            raise _nack(f"{self.name} is converting")
        if not data:
            return  # a quick write: the address phase alone, as presence probes send
        if len(data) != self.command_length:
            raise _nack(f"{self.name} commands are {self.command_length} byte(s), "
                        f"got {len(data)}")
        command = int.from_bytes(data, "big")
        width = 2 * self.command_length
        if command in self.measure_s:
            words = self.words()
            if self.fault == "stuck" and self._last_words is not None:
                words = self._last_words
            self._last_words = words
            self._answer = self.frame(*words)
            self._ready_at = self.clock() + self.measure_s[command]
        elif command == self.serial_command:
            if self.fault == "wrong_id":
                self._answer = b"\xff" * 6
            else:
                self._answer = self.frame(self.serial >> 16, self.serial & 0xFFFF)
            self._ready_at = self.clock()
        elif command == self.reset_command:
            self._answer = None
        else:
            raise _nack(f"{self.name} does not know command 0x{command:0{width}X}")

    def i2c_read(self, length: int) -> bytes:
        if self._answer is None:
            raise _nack(f"{self.name} has no data to send")
        if self._busy():
            raise _nack(f"{self.name} is converting")
        answer, self._answer = self._answer, None
        return (answer + b"\xff" * length)[:length]


class SHT3xChip(SensirionChip):
    name: ClassVar[str] = "SHT3x"
    # single shot without clock stretching: high, medium, low repeatability (maximum times)
    measure_s: ClassVar[dict[int, float]] = {0x2400: 0.0155, 0x240B: 0.0065, 0x2416: 0.0045}
    serial_command: ClassVar[int] = 0x3780
    reset_command: ClassVar[int] = 0x30A2
