"""SCD4x emulator: 16-bit commands, answers of CRC-protected words, periodic measurement.

Behaviour kept from the datasheet:
- a command is two bytes, MSB first; its answer can be read 1 ms later (earlier: NACK);
- the sensor does not answer in the first 30 ms after power-up, nor for 500 ms after a
  stop command;
- once periodic measurement is started, a new sample completes every 5 s on the grid set by
  the start (not 5 s after each read); the data-ready word's low 11 bits are non-zero while
  an unread sample is waiting; reading the measurement consumes it, and a read with no unread
  sample is NACKed;
- while measuring, only read measurement, data ready, stop and ambient pressure are
  accepted; everything else, start included, is NACKed.

Faults (``self.fault``): ``bad_crc`` (every answer's first CRC byte is wrong), ``stuck``
(measurement words frozen), ``wrong_id`` (the sensor-variant word names no known variant).
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable
from typing import ClassVar

from qrad_agent.sensors.base import sensirion_crc8
from qrad_agent.sim.chips.bus import EmulatedChip

POWER_UP_S = 0.030
EXECUTION_S = 0.001
STOP_S = 0.5
INTERVAL_S = 5.0
TIME_EPS = 1e-9  # simulated clocks add floats; a wait of exactly 1 ms must suffice

START_PERIODIC = 0x21B1
STOP_PERIODIC = 0x3F86
DATA_READY = 0xE4B8
READ_MEASUREMENT = 0xEC05
SERIAL_NUMBER = 0x3682
SENSOR_VARIANT = 0x202F
AMBIENT_PRESSURE = 0xE000
ALLOWED_WHILE_MEASURING = {STOP_PERIODIC, DATA_READY, READ_MEASUREMENT, AMBIENT_PRESSURE}
# only bits 15..12 name the variant
VARIANT_WORDS = {"SCD40": 0x0000, "SCD41": 0x1000, "SCD43": 0x5000}


def _words(values: list[int]) -> bytes:
    out = bytearray()
    for value in values:
        word = value.to_bytes(2, "big")
        out += word + bytes([sensirion_crc8(word)])
    return bytes(out)


def _clamp16(value: float) -> int:
    return max(0, min(0xFFFF, round(value)))


class SCD4xChip(EmulatedChip):
    FAULTS: ClassVar[frozenset[str]] = frozenset({"bad_crc", "stuck", "wrong_id"})

    def __init__(
        self,
        co2_ppm: float = 600.0,
        temperature_c: float = 21.0,
        humidity_pct: float = 45.0,
        clock: Callable[[], float] | None = None,
        serial: int = 0x3C4F_8B07_21E9,
        variant: str = "SCD41",
    ) -> None:
        super().__init__(clock)
        if variant not in VARIANT_WORDS:
            raise ValueError(f"unknown SCD4x variant {variant!r}; allowed: SCD40, SCD41, SCD43")
        self.co2_ppm = co2_ppm
        self.temperature_c = temperature_c
        self.humidity_pct = humidity_pct
        self.serial = serial
        self.variant = variant
        self.pressure_hpa = 1013
        self.powered_at = self.clock()
        self.measuring_since: float | None = None
        self.samples_read = 0  # samples consumed since the start, on the 5 s grid
        self.command_counts: dict[int, int] = {}  # accepted commands, for tests
        self._busy_until = self.powered_at + POWER_UP_S
        self._answer: bytes | None = None
        self._answer_at = 0.0
        self._last_sample: list[int] | None = None


    @property
    def measuring(self) -> bool:
        return self.measuring_since is not None

    def samples_done(self) -> int:
        if self.measuring_since is None:
            return 0
        return math.floor((self.clock() - self.measuring_since + TIME_EPS) / INTERVAL_S)

    def data_ready(self) -> bool:
        return self.samples_done() > self.samples_read

    # -- wire -----------------------------------------------------------------------------
    def i2c_write(self, data: bytes) -> None:
        now = self.clock()
        if now < self._busy_until - TIME_EPS:
            raise OSError(errno.EREMOTEIO, "SCD4x busy (starting up or stopping)")
        if len(data) < 2:
            raise OSError(errno.EREMOTEIO, f"SCD4x needs a 2-byte command, got {bytes(data).hex()}")
        command = (data[0] << 8) | data[1]
        if self.measuring and command not in ALLOWED_WHILE_MEASURING:
            raise OSError(errno.EREMOTEIO, f"SCD4x refuses command 0x{command:04x} while measuring")
        self._answer = None
        self._answer_at = now + EXECUTION_S
        if command == START_PERIODIC:
            self.measuring_since = now
            self.samples_read = 0
        elif command == STOP_PERIODIC:
            self.measuring_since = None
            self._busy_until = now + STOP_S
        elif command == DATA_READY:
            self._answer = self._reply([0x8006 if self.data_ready() else 0x8000])
        elif command == READ_MEASUREMENT:
            if self.data_ready():
                self.samples_read = self.samples_done()
                self._answer = self._reply(self._measurement())
        elif command == SERIAL_NUMBER:
            s = self.serial
            self._answer = self._reply([(s >> 32) & 0xFFFF, (s >> 16) & 0xFFFF, s & 0xFFFF])
        elif command == SENSOR_VARIANT:
            word = 0xF000 if self.fault == "wrong_id" else VARIANT_WORDS[self.variant]
            self._answer = self._reply([word])
        elif command == AMBIENT_PRESSURE:
            if len(data) >= 5:
                self.pressure_hpa = (data[2] << 8) | data[3]
            else:
                self._answer = self._reply([self.pressure_hpa])
        else:
            raise OSError(errno.EREMOTEIO, f"SCD4x does not know command 0x{command:04x}")
        self.command_counts[command] = self.command_counts.get(command, 0) + 1

    def i2c_read(self, length: int) -> bytes:
        if self.clock() < self._busy_until - TIME_EPS:
            raise OSError(errno.EREMOTEIO, "SCD4x busy (starting up or stopping)")
        if self._answer is None:
            raise OSError(errno.EREMOTEIO, "SCD4x has nothing to send")
        if self.clock() < self._answer_at - TIME_EPS:
            raise OSError(errno.EREMOTEIO, "SCD4x still executing the command (1 ms)")
        answer, self._answer = self._answer, None
        return (answer + b"\xff" * length)[:length]

    # -- model ----------------------------------------------------------------------------
    def encode(self) -> list[int]:
        return [
            _clamp16(self.co2_ppm),
            _clamp16((self.temperature_c + 45.0) * 65535.0 / 175.0),
            _clamp16(self.humidity_pct * 65535.0 / 100.0),
        ]

    def _measurement(self) -> list[int]:
        if self.fault != "stuck" or self._last_sample is None:
            self._last_sample = self.encode()
        return self._last_sample

    def _reply(self, words: list[int]) -> bytes:
        data = bytearray(_words(words))
        if self.fault == "bad_crc":
            data[2] ^= 0x5A
        return bytes(data)
