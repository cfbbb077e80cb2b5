"""The one shape every sensor driver has.

A driver owns one chip at one bus address. ``identify()`` checks the chip where it has an
identity register (and says so), ``read()`` returns a ``Measurement`` or raises a
``SensorError`` whose ``quality`` says what went wrong. Drivers never retry and never judge
plausibility: that is the health monitor's job (``sensors/health.py``), so every chip gets the
same treatment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

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
