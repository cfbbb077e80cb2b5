"""Value types shared by the core and the ports. Plain data: no IO, no clock."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Quality(StrEnum):
    """How far a reading can be trusted. Only ``ok`` readings feed the controller."""

    OK = "ok"
    STALE = "stale"  # no good reading for N polls
    OUT_OF_RANGE = "out_of_range"  # outside the chip's physical range
    IMPLAUSIBLE_RATE = "implausible_rate"  # changed faster than a room can
    CRC_ERROR = "crc_error"
    IO_ERROR = "io_error"  # NACK, timeout, remote I/O from the bus
    STUCK = "stuck"  # identical raw value for too long on a chip that dithers
    WRONG_CHIP = "wrong_chip"  # identity register does not match the configured kind
    MISSING = "missing"  # never answered


class Role(StrEnum):
    ROOM = "room"
    INTAKE = "intake"
    EXHAUST = "exhaust"
    BOARD = "board"


class Mode(StrEnum):
    OFF = "off"
    FROST = "frost"
    ECO = "eco"
    COMFORT = "comfort"
    BOOST = "boost"
    AUTO = "auto"


@dataclass(frozen=True, slots=True)
class Reading:
    """One poll of one sensor, as the health monitor judged it."""

    sensor: str
    role: Role
    quality: Quality
    at: float  # monotonic seconds of the poll
    temperature_c: float | None = None
    humidity_pct: float | None = None
    pressure_pa: float | None = None
    co2_ppm: float | None = None
    detail: str = ""  # why the quality is not ok, for people

    @property
    def ok(self) -> bool:
        return self.quality is Quality.OK


@dataclass(frozen=True, slots=True)
class Plan:
    """What the actuators should do: the allocator's output.

    ``freq_khz`` is a cap for every CPU policy; ``quota`` is the share of each running slot's
    CPU time (1.0 = unthrottled).
    """

    slots: int
    freq_khz: int
    quota: float

    def describe(self) -> str:
        return f"{self.slots} slots @ {self.freq_khz / 1e6:.2f} GHz x {self.quota:.0%}"
