"""Sensirion SHT3x (SHT30/31/35): temperature and humidity, 16-bit words with CRC-8.

The chip has no register pointer: the host writes a 16-bit command, waits for the conversion
and reads the answer. A read header sent before the conversion is done is NACKed, so the
driver sleeps the datasheet maximum before reading rather than polling.

The two helpers below (``command_read``, ``checked_words``) serve every command-then-read
chip with Sensirion-style word+CRC framing, so the SHT4x and HTU21D drivers use them too.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from typing import ClassVar

from smbus2 import i2c_msg

from qrad_agent.sensors.base import CrcError, I2CBus, Measurement, WrongChip, sensirion_crc8

CMD_MEASURE_HIGH = b"\x24\x00"  # single shot, high repeatability, no clock stretching
CMD_SERIAL = b"\x37\x80"  # read serial number, no clock stretching
MEASURE_WAIT_S = 0.016  # datasheet maximum 15.5 ms, plus margin for the chip's own clock
SERIAL_WAIT_S = 0.001


def command_read(
    bus: I2CBus, address: int, command: bytes, length: int, wait_s: float,
    sleep: Callable[[float], None],
) -> bytes:
    """Write ``command``, sleep ``wait_s``, read ``length`` bytes, as two I2C transfers.

    A NACK or timeout surfaces as the bus's ``OSError``: the caller cannot tell "still busy"
    from "gone", and the health monitor classifies both as io_error.
    """
    bus.i2c_rdwr(i2c_msg.write(address, command))
    if wait_s > 0:
        sleep(wait_s)
    answer = i2c_msg.read(address, length)
    bus.i2c_rdwr(answer)
    return ctypes.string_at(answer.buf, length)


def checked_words(data: bytes, what: str, init: int = 0xFF) -> list[int]:
    """Split ``data`` into (msb, lsb, crc) triples and return the 16-bit words.

    Raises ``CrcError`` naming the triple, the CRC the bytes call for and the one received.
    """
    if len(data) % 3:
        raise ValueError(f"{what}: {len(data)} bytes is not a whole number of word+CRC triples")
    words = []
    for i in range(0, len(data), 3):
        msb, lsb, crc = data[i], data[i + 1], data[i + 2]
        expected = sensirion_crc8([msb, lsb], init)
        if crc != expected:
            raise CrcError(
                f"{what}: bytes 0x{msb:02X} 0x{lsb:02X} need CRC 0x{expected:02X}, "
                f"chip sent 0x{crc:02X}"
            )
        words.append(msb << 8 | lsb)
    return words


def reject_blank(data: bytes, what: str, expected: str) -> None:
    """All-0x00 or all-0xFF is what a device that does not implement the command puts on the
    wire (nobody drives SDA, or the wrong chip holds it low), not a corrupted frame."""
    if data in (b"\x00" * len(data), b"\xff" * len(data)):
        raise WrongChip(
            f"{what}: expected {expected}, found {data.hex(' ').upper()} "
            "(the device does not answer this command)"
        )


class SHT3x:
    kind: ClassVar[str] = "sht3x"
    addresses: ClassVar[tuple[int, ...]] = (0x44, 0x45)
    temperature_range_c: ClassVar[tuple[float, float]] = (-40.0, 125.0)
    dithers: ClassVar[bool] = True

    def __init__(
        self, bus: I2CBus, address: int = 0x44, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.bus = bus
        self.address = address
        self.sleep = sleep

    def identify(self) -> str:
        data = command_read(self.bus, self.address, CMD_SERIAL, 6, SERIAL_WAIT_S, self.sleep)
        reject_blank(data, "SHT3x serial number (command 0x3780)", "two words with valid CRCs")
        high, low = checked_words(data, "SHT3x serial number")
        return f"SHT3x serial {high << 16 | low:08X}"

    def read(self) -> Measurement:
        data = command_read(
            self.bus, self.address, CMD_MEASURE_HIGH, 6, MEASURE_WAIT_S, self.sleep
        )
        t_raw, rh_raw = checked_words(data, "SHT3x measurement")
        return Measurement(
            temperature_c=-45.0 + 175.0 * t_raw / 65535.0,
            humidity_pct=100.0 * rh_raw / 65535.0,
            raw=t_raw,
        )
