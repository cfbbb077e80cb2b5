"""Sensirion SCD40/SCD41/SCD43: CO2, temperature and humidity, in periodic measurement mode.

The sensor measures every 5 s on its own once started, and keeps doing so across restarts of
the agent (it only stops on power loss or a stop command). While measuring it refuses every
command except reading, the data-ready query and stop, so:
- ``read()`` starts periodic measurement when it has not started it; a refused start means
  the sensor is already measuring, which the data-ready query that follows confirms;
- ``identify()`` stops measurement first (the serial number is refused while measuring) and
  leaves the sensor idle; the next ``read()`` starts it again.
Every word the sensor sends is followed by a Sensirion CRC-8.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import ClassVar

from qrad_agent.sensors.base import (
    I2CBus,
    Measurement,
    NotReady,
    WrongChip,
    checked_words,
    command_read,
    i2c_write,
)

CMD_START_PERIODIC = 0x21B1
CMD_STOP_PERIODIC = 0x3F86
CMD_DATA_READY = 0xE4B8
CMD_READ_MEASUREMENT = 0xEC05
CMD_SERIAL_NUMBER = 0x3682
CMD_SENSOR_VARIANT = 0x202F

EXECUTION_S = 0.001  # before the answer to a read-type command can be fetched
STOP_S = 0.5  # the sensor takes no command until a stop has completed
DATA_READY_MASK = 0x07FF
VARIANTS = {0x0: "SCD40", 0x1: "SCD41", 0x5: "SCD43"}  # bits 15..12 of the variant word

# A running sensor has data at least every 5 s; this many "not ready" answers in a row
# (at the fastest poll, 0.5 s, that is 10 s) means it lost its mode, typically to a power
# glitch, so start is sent again. Sent to a sensor that is measuring, start is just refused.
RESTART_AFTER_NOT_READY = 20


class SCD4x:
    kind: ClassVar[str] = "scd4x"
    addresses: ClassVar[tuple[int, ...]] = (0x62,)
    temperature_range_c: ClassVar[tuple[float, float]] = (-10.0, 60.0)
    dithers: ClassVar[bool] = True

    def __init__(
        self, bus: I2CBus, address: int = 0x62, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.bus = bus
        self.address = address
        self.sleep = sleep
        self._started = False
        self._not_ready_in_a_row = 0

    def identify(self) -> str:
        self._send(CMD_STOP_PERIODIC)
        self.sleep(STOP_S)
        self._started = False
        high, mid, low = self._query(CMD_SERIAL_NUMBER, 3)
        serial = (high << 32) | (mid << 16) | low
        try:
            (variant_word,) = self._query(CMD_SENSOR_VARIANT, 1)
        except OSError:
            # Firmware before the variant command NACKs it; the serial is proof enough.
            return f"SCD4x serial 0x{serial:012x} (variant not reported)"
        name = VARIANTS.get(variant_word >> 12)
        if name is None:
            known = ", ".join(f"{v} = {n}" for n, v in sorted(VARIANTS.items()))
            raise WrongChip(
                f"device at 0x{self.address:02x} reports sensor variant word "
                f"0x{variant_word:04x}; bits 15..12 = {variant_word >> 12}, known: {known}"
            )
        return f"{name} serial 0x{serial:012x}"

    def read(self) -> Measurement:
        try:
            if not self._started:
                self._start()
            (ready,) = self._query(CMD_DATA_READY, 1)
            if not ready & DATA_READY_MASK:
                self._not_ready_in_a_row += 1
                if self._not_ready_in_a_row % RESTART_AFTER_NOT_READY == 0:
                    self._started = False
                raise NotReady(
                    f"SCD4x at 0x{self.address:02x} has no new measurement yet "
                    f"(data-ready word 0x{ready:04x}; one arrives every 5 s)"
                )
            co2, t_word, rh_word = self._query(CMD_READ_MEASUREMENT, 3)
        except OSError:
            self._started = False  # the sensor may have been reset; start it again next time
            raise
        self._not_ready_in_a_row = 0
        if co2 == 0:
            raise NotReady(
                f"SCD4x at 0x{self.address:02x} reported 0 ppm CO2, its placeholder for a "
                f"sample that is not valid yet"
            )
        return Measurement(
            temperature_c=-45.0 + 175.0 * t_word / 65535.0,
            humidity_pct=100.0 * rh_word / 65535.0,
            co2_ppm=float(co2),
            raw=t_word,
        )

    def _start(self) -> None:
        # Refused if already measuring, or absent: the data-ready query that follows tells which.
        with contextlib.suppress(OSError):
            self._send(CMD_START_PERIODIC)
        self._started = True
        self._not_ready_in_a_row = 0

    def _send(self, command: int) -> None:
        i2c_write(self.bus, self.address, command.to_bytes(2, "big"))

    def _query(self, command: int, words: int) -> list[int]:
        data = command_read(
            self.bus, self.address, command.to_bytes(2, "big"), 3 * words, EXECUTION_S,
            self.sleep,
        )
        # word by word, so a CRC error names which word of the answer was corrupted
        return [
            checked_words(
                data[3 * i : 3 * i + 3],
                f"SCD4x at 0x{self.address:02x}, command 0x{command:04x}, word {i}",
            )[0]
            for i in range(words)
        ]
