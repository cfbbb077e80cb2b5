"""Room temperature from several sensors: the median of the healthy room sensors."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from statistics import median

from qrad_agent.core.models import Reading, Role


@dataclass(frozen=True, slots=True)
class RoomEstimate:
    temperature_c: float | None  # None when no room sensor is healthy
    healthy: int
    configured: int


def fuse_room(readings: Iterable[Reading]) -> RoomEstimate:
    room = [r for r in readings if r.role is Role.ROOM]
    good = [r.temperature_c for r in room if r.ok and r.temperature_c is not None]
    return RoomEstimate(median(good) if good else None, len(good), len(room))
