"""TE HTU21D and Silicon Labs Si7013/Si7020/Si7021: one protocol, one driver.

Measurements use the "no hold master" commands so the bus stays free during the conversion;
the chip NACKs the read until it is done, so the driver sleeps the slowest family member's
maximum first. Words carry two status bits in the LSB (bit 1: 0 = temperature, 1 = humidity)
which must be cleared before converting. CRC-8 is poly 0x31 like Sensirion's, but from 0x00.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ClassVar

from qrad_agent.sensors.base import I2CBus, Measurement, WrongChip, checked_words, command_read

CMD_TEMPERATURE = b"\xf3"  # no hold master
CMD_HUMIDITY = b"\xf5"  # no hold master
CMD_ID_SECOND_HALF = b"\xfc\xc9"  # electronic ID, second access: SNB_3 is the device id
TEMPERATURE_WAIT_S = 0.051  # HTU21D at 14 bit: 50 ms max (Si7021: 10.8 ms), + timer slack
HUMIDITY_WAIT_S = 0.023  # Si7021 at 12 bit: RH 12 ms + its temperature 10.8 ms (HTU21D: 16)
STATUS_BITS = 0x0003
CRC_INIT = 0x00

# SNB_3 of the electronic ID. 0x00 and 0xFF are Silicon Labs engineering samples.
DEVICE_IDS = {
    0x0D: "Si7013", 0x14: "Si7020", 0x15: "Si7021", 0x32: "HTU21D",
    0x00: "Si70xx engineering sample", 0xFF: "Si70xx engineering sample",
}


class HTU21D:
    kind: ClassVar[str] = "htu21d"
    addresses: ClassVar[tuple[int, ...]] = (0x40,)
    temperature_range_c: ClassVar[tuple[float, float]] = (-40.0, 125.0)
    dithers: ClassVar[bool] = True

    def __init__(
        self, bus: I2CBus, address: int = 0x40, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.bus = bus
        self.address = address
        self.sleep = sleep

    def identify(self) -> str:
        # Only the first word: whether the second word's CRC also covers the first differs
        # between descriptions of the family, and the device id is all we need.
        data = command_read(self.bus, self.address, CMD_ID_SECOND_HALF, 3, 0.0, self.sleep)
        (word,) = checked_words(data, "HTU21D/Si70xx electronic ID", CRC_INIT)
        device_id = word >> 8
        name = DEVICE_IDS.get(device_id)
        if name is None:
            known = ", ".join(f"0x{k:02X} ({v})" for k, v in DEVICE_IDS.items())
            raise WrongChip(
                f"HTU21D/Si70xx device id: expected one of {known}; found 0x{device_id:02X}"
            )
        return f"{name} (device id 0x{device_id:02X})"

    def read(self) -> Measurement:
        t_word = self._measure(CMD_TEMPERATURE, TEMPERATURE_WAIT_S, "temperature")
        rh_word = self._measure(CMD_HUMIDITY, HUMIDITY_WAIT_S, "humidity")
        rh = -6.0 + 125.0 * rh_word / 65536.0
        return Measurement(
            temperature_c=-46.85 + 175.72 * t_word / 65536.0,
            # the datasheets allow clipping the few counts the offset formula puts outside
            humidity_pct=min(100.0, max(0.0, rh)),
            raw=t_word,
        )

    def _measure(self, command: bytes, wait_s: float, what: str) -> int:
        data = command_read(self.bus, self.address, command, 3, wait_s, self.sleep)
        (word,) = checked_words(data, f"HTU21D {what}", CRC_INIT)
        return word & ~STATUS_BITS
