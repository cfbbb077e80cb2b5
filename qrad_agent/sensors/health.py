"""Judges every poll of a sensor: turns a driver's result or error into a ``Reading`` with a
quality. Bad readings are never passed on as values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qrad_agent.core.models import Quality, Reading, Role
from qrad_agent.sensors.base import SensorDriver, SensorError


@dataclass
class SensorCounters:
    reads: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    last_good_at: float | None = None


class SensorMonitor:
    """One configured sensor: its driver, its role and its health."""

    def __init__(self, name: str, role: Role, driver: SensorDriver, stale_after_polls: int = 3):
        self.name = name
        self.role = role
        self.driver = driver
        self.stale_after_polls = stale_after_polls
        self.counters = SensorCounters()
        self._bad_in_a_row = 0
        self.last: Reading | None = None

    def poll(self, now: float) -> Reading:
        self.counters.reads += 1
        try:
            m = self.driver.read()
        except (SensorError, OSError) as exc:
            quality = exc.quality if isinstance(exc, SensorError) else Quality.IO_ERROR
            reading = self._bad(now, quality, str(exc))
        else:
            lo, hi = self.driver.temperature_range_c
            t = m.temperature_c
            if t is not None and not lo <= t <= hi:
                reading = self._bad(now, Quality.OUT_OF_RANGE, f"{t:.2f} °C outside {lo}..{hi}")
            else:
                self._bad_in_a_row = 0
                self.counters.last_good_at = now
                reading = Reading(self.name, self.role, Quality.OK, now, t, m.humidity_pct,
                                  m.pressure_pa, m.co2_ppm)
        self.last = reading
        return reading

    def _bad(self, now: float, quality: Quality, detail: str) -> Reading:
        self._bad_in_a_row += 1
        self.counters.errors[quality.value] = self.counters.errors.get(quality.value, 0) + 1
        if self.counters.last_good_at is None and self._bad_in_a_row >= self.stale_after_polls:
            quality = Quality.MISSING
        return Reading(self.name, self.role, quality, now, detail=detail)
