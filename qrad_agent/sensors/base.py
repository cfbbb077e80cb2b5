"""The one shape every sensor driver has.

A driver owns one chip at one bus address. ``identify()`` checks the chip where it has an
identity register (and says so), ``read()`` returns a ``Measurement`` or raises a
``SensorError`` whose ``quality`` says what went wrong. Drivers never retry and never judge
plausibility: that is the health monitor's job (``sensors/health.py``), so every chip gets the
same treatment.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from smbus2 import i2c_msg

from qrad_agent.core.models import Quality


class I2CBus(Protocol):
    """The subset of ``smbus2.SMBus`` that drivers use. Emulators implement the same."""

    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int: ...
    def read_word_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int: ...
    def read_i2c_block_data(
        self, i2c_addr: int, register: int, length: int, force: bool | None = None
    ) -> list[int]: ...
    def write_byte_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None: ...
    def write_i2c_block_data(
        self, i2c_addr: int, register: int, data: list[int], force: bool | None = None
    ) -> None: ...
    def i2c_rdwr(self, *i2c_msgs: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class Measurement:
    """Physical values from one read of a chip; ``None`` where the chip has no such sensor."""

    temperature_c: float | None = None
    humidity_pct: float | None = None
    pressure_pa: float | None = None
    co2_ppm: float | None = None
    raw: int | None = None  # the raw temperature word, for stuck-value detection


class SensorError(Exception):
    """A read that produced no usable value. ``quality`` classifies it."""

    quality: Quality = Quality.IO_ERROR


class CrcError(SensorError):
    quality = Quality.CRC_ERROR


class WrongChip(SensorError):
    quality = Quality.WRONG_CHIP


class OutOfRange(SensorError):
    quality = Quality.OUT_OF_RANGE


class NotReady(SensorError):
    """The chip has no fresh conversion yet (busy bit, data-ready flag clear)."""

    quality = Quality.STALE


class SensorDriver(Protocol):
    """Shape of every driver class in ``qrad_agent.sensors``."""

    kind: ClassVar[str]
    addresses: ClassVar[tuple[int, ...]]  # the addresses the chip can strap to; first = default
    temperature_range_c: ClassVar[tuple[float, float]]  # the chip's physical range
    dithers: ClassVar[bool]  # whether consecutive raw readings normally differ (for stuck checks)

    address: int

    def identify(self) -> str:
        """Check the chip is what it claims; return an identity string (serial, id).

        Raises ``WrongChip`` if an identity register disagrees, ``SensorError`` on bus errors.
        Chips without identity registers return a short description without touching the bus.
        """
        ...

    def read(self) -> Measurement: ...


def sensirion_crc8(data: bytes | list[int], init: int = 0xFF) -> int:
    """CRC-8, polynomial 0x31 (x^8 + x^5 + x^4 + 1), no reflection, no final XOR.

    Sensirion (SHT3x, SHT4x, SCD4x) and AHT20 start from 0xFF; HTU21D/Si7021 start from 0x00.
    """
    crc = init
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def swap16(word: int) -> int:
    """SMBus word reads arrive low byte first; most temperature chips send MSB first."""
    return ((word & 0xFF) << 8) | (word >> 8)


def int16(value: int) -> int:
    return value - 0x10000 if value & 0x8000 else value


# -- raw transfers for command-driven chips (SHT3x, SHT4x, HTU21D, AHT20, SCD4x) ------------
# These chips have no register pointer: the host writes a command and later reads an answer,
# each as its own I2C transfer. SMBus block calls would put a register byte in front, so the
# transfers go through ``i2c_rdwr``.


def i2c_write(bus: I2CBus, address: int, data: bytes) -> None:
    """One write transfer of ``data`` (a command and its arguments)."""
    bus.i2c_rdwr(i2c_msg.write(address, data))


def i2c_read(bus: I2CBus, address: int, length: int) -> bytes:
    """One read transfer of ``length`` bytes."""
    msg = i2c_msg.read(address, length)
    bus.i2c_rdwr(msg)
    return ctypes.string_at(msg.buf, length)


def command_read(
    bus: I2CBus, address: int, command: bytes, length: int, wait_s: float,
    sleep: Callable[[float], None],
) -> bytes:
    """Write ``command``, sleep ``wait_s``, read ``length`` bytes, as two I2C transfers.

    A NACK or timeout surfaces as the bus's ``OSError``: the caller cannot tell "still busy"
    from "gone", and the health monitor classifies both as io_error.
    """
    i2c_write(bus, address, command)
    if wait_s > 0:
        sleep(wait_s)
    return i2c_read(bus, address, length)


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
