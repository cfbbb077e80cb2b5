"""The room from several sensors: the median of the healthy room sensors.

The median, not the mean: with three sensors one wild value (a sensor in the sun, one that
drifted) moves the estimate not at all; with two it is their mean. Only ``ok`` readings of
role ``room`` count, and the estimate says how many did, so the loop always knows how many
healthy room sensors it has. Humidity and CO2 are fused the same way from the healthy room
sensors that measure them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from statistics import median

from qrad_agent.core.models import Reading, Role


@dataclass(frozen=True, slots=True)
class RoomEstimate:
    temperature_c: float | None  # None when no room sensor is healthy
    healthy: int  # healthy room sensors with a temperature
    configured: int  # room sensors configured
    humidity_pct: float | None = None  # None when no healthy room sensor measures it
    co2_ppm: float | None = None


def _middle(values: list[float]) -> float | None:
    # one value is by far the common case (one room sensor): skip median()'s sort
    if len(values) == 1:
        return values[0]
    return median(values) if values else None


def fuse_room(readings: Iterable[Reading]) -> RoomEstimate:
    configured = 0
    temperatures: list[float] = []
    humidities: list[float] = []
    co2s: list[float] = []
    for r in readings:
        if r.role is not Role.ROOM:
            continue
        configured += 1
        if not r.ok:
            continue
        if r.temperature_c is not None:
            temperatures.append(r.temperature_c)
        if r.humidity_pct is not None:
            humidities.append(r.humidity_pct)
        if r.co2_ppm is not None:
            co2s.append(r.co2_ppm)
    return RoomEstimate(
        _middle(temperatures), len(temperatures), configured, _middle(humidities), _middle(co2s)
    )
