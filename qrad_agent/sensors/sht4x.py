"""Sensirion SHT4x (SHT40/41/45): temperature and humidity, one-byte commands.

Same framing as the SHT3x (two words, each followed by CRC-8 init 0xFF). Humidity uses an
offset formula that can leave 0..100 % near the extremes; the datasheet says to clip it.
"""

from __future__ import annotations

from typing import ClassVar

from qrad_agent.sensors.sht3x import SHT3x

CMD_MEASURE_HIGH = b"\xfd"  # high precision (repeatability)
CMD_SERIAL = b"\x89"
MEASURE_WAIT_S = 0.009  # datasheet maximum 8.3 ms
SERIAL_WAIT_S = 0.01  # Sensirion's own driver waits this long; the datasheet gives no figure


class SHT4x(SHT3x):
    kind: ClassVar[str] = "sht4x"
    addresses: ClassVar[tuple[int, ...]] = (0x44, 0x45, 0x46)
    name: ClassVar[str] = "SHT4x"
    cmd_measure: ClassVar[bytes] = CMD_MEASURE_HIGH
    cmd_serial: ClassVar[bytes] = CMD_SERIAL
    measure_wait_s: ClassVar[float] = MEASURE_WAIT_S
    serial_wait_s: ClassVar[float] = SERIAL_WAIT_S

    @staticmethod
    def humidity(raw: int) -> float:
        return min(100.0, max(0.0, -6.0 + 125.0 * raw / 65535.0))
