"""AHT20 emulator: a command chip (no register pointer), answering reads with its status frame.

Wire protocol, from the datasheet:
- any read returns the status byte first; a 7-byte read returns status, 20-bit humidity,
  20-bit temperature (sharing byte 3) and a CRC-8 over the six bytes before it;
- 0xBE 0x08 0x00 initialises (sets the calibration bit, status bit 3);
- 0xAC 0x33 0x00 starts a measurement; the busy bit (status bit 7) is set until it ends;
- 0xBA is a soft reset; 0x71 is accepted for drivers that "send" the status command.
The chip does not answer in the first 40 ms after power-up.

Faults (``self.fault``): ``bad_crc`` (wrong CRC byte), ``stuck`` (results frozen),
``wrong_id`` (never raises the calibration bit, as a different device at 0x38 would not),
``busy`` (the busy bit never clears).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import ClassVar

from qrad_agent.sensors.base import sensirion_crc8
from qrad_agent.sim.chips.bus import EmulatedChip

POWER_UP_S = 0.040
CONVERSION_S = 0.080
FULL_SCALE = 1 << 20
TIME_EPS = 1e-9  # simulated clocks add floats; 0.1 + 0.08 must count as 80 ms later

STATUS_BUSY = 0x80
STATUS_CALIBRATED = 0x08
STATUS_BASE = 0x10  # bit 4 reads 1 on parts seen in the field; the datasheet leaves it reserved


def _clamp20(value: float) -> int:
    return max(0, min(FULL_SCALE - 1, round(value)))


class AHT20Chip(EmulatedChip):
    FAULTS: ClassVar[frozenset[str]] = frozenset({"bad_crc", "stuck", "wrong_id", "busy"})

    def __init__(
        self,
        temperature_c: float = 21.0,
        humidity_pct: float = 45.0,
        clock: Callable[[], float] | None = None,
        calibrated: bool = True,
    ) -> None:
        super().__init__(clock)
        self.temperature_c = temperature_c
        self.humidity_pct = humidity_pct
        self.calibrated = calibrated  # False: a part that needs the 0xBE init first
        self.conversion_s = CONVERSION_S
        self.powered_at = self.clock()
        self.measure_started: float | None = None
        self.measurements = 0  # completed, for tests that count conversions
        self._latched: tuple[int, int] = (0, 0)  # (humidity raw, temperature raw)


    # -- wire -----------------------------------------------------------------------------
    def i2c_write(self, data: bytes) -> None:
        self._check_powered()
        command = bytes(data)
        if command == b"\xac\x33\x00":
            self._finish_measurement()
            self.measure_started = self.clock()
        elif command == b"\xbe\x08\x00":
            if self.fault != "wrong_id":
                self.calibrated = True
        elif command == b"\xba":
            self.measure_started = None
        elif command in (b"", b"\x71"):
            pass
        else:
            raise OSError(errno.EREMOTEIO, f"AHT20 does not know command {command.hex(' ')}")

    def i2c_read(self, length: int) -> bytes:
        self._check_powered()
        self._finish_measurement()
        frame = self.frame()
        return (frame + b"\xff" * length)[:length]  # past the frame the bus floats high

    # -- model ----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        if self.measure_started is None:
            return False
        elapsed = self.clock() - self.measure_started
        return self.fault == "busy" or elapsed < self.conversion_s - TIME_EPS

    def status(self) -> int:
        status = STATUS_BASE
        if self.busy:
            status |= STATUS_BUSY
        if self.calibrated and self.fault != "wrong_id":
            status |= STATUS_CALIBRATED
        return status

    def frame(self) -> bytes:
        rh, t = self._latched
        body = bytes(
            [
                self.status(),
                (rh >> 12) & 0xFF,
                (rh >> 4) & 0xFF,
                ((rh & 0x0F) << 4) | (t >> 16),
                (t >> 8) & 0xFF,
                t & 0xFF,
            ]
        )
        crc = sensirion_crc8(body)
        if self.fault == "bad_crc":
            crc ^= 0x5A
        return body + bytes([crc])

    def encode(self, temperature_c: float, humidity_pct: float) -> tuple[int, int]:
        return (
            _clamp20(humidity_pct / 100.0 * FULL_SCALE),
            _clamp20((temperature_c + 50.0) / 200.0 * FULL_SCALE),
        )

    def _finish_measurement(self) -> None:
        if self.measure_started is None or self.busy:
            return
        self.measure_started = None
        self.measurements += 1
        if self.fault == "stuck":
            return  # the result registers keep what they had
        self._latched = self.encode(self.temperature_c, self.humidity_pct)

    def _check_powered(self) -> None:
        if self.clock() - self.powered_at < POWER_UP_S - TIME_EPS:
            raise OSError(errno.EREMOTEIO, "AHT20 still starting up (40 ms after power-up)")
