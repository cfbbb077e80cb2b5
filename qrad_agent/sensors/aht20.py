"""Aosong AHT20: humidity and temperature, driven by commands rather than a register pointer.

The chip has no identity register. The nearest thing is its calibration flag (status bit 3),
which a genuine AHT20 raises after the 0xBE initialisation command; a device at 0x38 that
never does is not treated as an AHT20.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ClassVar

from qrad_agent.sensors.base import (
    CrcError,
    I2CBus,
    Measurement,
    NotReady,
    WrongChip,
    i2c_read,
    i2c_write,
    sensirion_crc8,
)

STATUS_BUSY = 0x80
STATUS_CALIBRATED = 0x08
CMD_INITIALISE = bytes([0xBE, 0x08, 0x00])
CMD_MEASURE = bytes([0xAC, 0x33, 0x00])

POWER_UP_S = 0.040  # the datasheet's wait after power-up before the first command
INITIALISE_S = 0.010
MEASURE_S = 0.080
POLL_S = 0.010
POLLS = 5  # after MEASURE_S, how many more POLL_S waits before calling the chip hung

FULL_SCALE = 1 << 20  # both fields are 20-bit


class AHT20:
    kind: ClassVar[str] = "aht20"
    addresses: ClassVar[tuple[int, ...]] = (0x38,)
    temperature_range_c: ClassVar[tuple[float, float]] = (-40.0, 85.0)
    dithers: ClassVar[bool] = True

    def __init__(
        self, bus: I2CBus, address: int = 0x38, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.bus = bus
        self.address = address
        self.sleep = sleep
        self._waited_power_up = False
        self._calibrated = False

    def identify(self) -> str:
        status = self._ensure_calibrated()
        return f"AHT20 (calibrated, status 0x{status:02x}; no identity register)"

    def read(self) -> Measurement:
        if not self._calibrated:
            self._ensure_calibrated()
        self._write(CMD_MEASURE)
        self.sleep(MEASURE_S)
        for _ in range(POLLS + 1):
            frame = self._read(7)
            if not frame[0] & STATUS_BUSY:
                break
            self.sleep(POLL_S)
        else:
            waited_ms = (MEASURE_S + POLLS * POLL_S) * 1000
            raise NotReady(
                f"AHT20 at 0x{self.address:02x} still busy (status 0x{frame[0]:02x}) "
                f"{waited_ms:.0f} ms after the measure command"
            )
        expected = sensirion_crc8(frame[:6])
        if frame[6] != expected:
            raise CrcError(
                f"AHT20 at 0x{self.address:02x}: CRC byte 0x{frame[6]:02x}, but bytes "
                f"{frame[:6].hex(' ')} give 0x{expected:02x}"
            )
        if not frame[0] & STATUS_CALIBRATED:
            # A brown-out resets the chip to uncalibrated; its values are then unreliable.
            self._calibrated = False
            raise NotReady(
                f"AHT20 at 0x{self.address:02x} lost its calibration flag "
                f"(status 0x{frame[0]:02x}); it is initialised again on the next read"
            )
        rh_raw = (frame[1] << 12) | (frame[2] << 4) | (frame[3] >> 4)
        t_raw = ((frame[3] & 0x0F) << 16) | (frame[4] << 8) | frame[5]
        return Measurement(
            temperature_c=t_raw / FULL_SCALE * 200.0 - 50.0,
            humidity_pct=rh_raw / FULL_SCALE * 100.0,
            raw=t_raw,
        )

    def _ensure_calibrated(self) -> int:
        if not self._waited_power_up:
            # The driver cannot know when the chip was powered; waiting once is cheap.
            self.sleep(POWER_UP_S)
            self._waited_power_up = True
        status = self._read(1)[0]
        if status & STATUS_CALIBRATED:
            self._calibrated = True
            return status
        self._write(CMD_INITIALISE)
        self.sleep(INITIALISE_S)
        status = self._read(1)[0]
        if not status & STATUS_CALIBRATED:
            raise WrongChip(
                f"device at 0x{self.address:02x} does not behave as an AHT20: the calibration "
                f"bit (status bit 3) is still 0 after the init command 0xBE 0x08 0x00 "
                f"(status 0x{status:02x})"
            )
        self._calibrated = True
        return status

    def _write(self, data: bytes) -> None:
        i2c_write(self.bus, self.address, data)

    def _read(self, length: int) -> bytes:
        return i2c_read(self.bus, self.address, length)
