"""Watts from RAPL energy counters (``energy_uj`` of the powercap zones).

Which zones: ``psys`` (the whole platform, on parts that have it) alone, as it already
includes the packages; otherwise every CPU package plus its ``dram`` subzone where there is
one. Subzones ``core``/``uncore`` are parts of their package and would count twice.

A counter runs from 0 to ``max_energy_range_uj`` and then starts again at 0 (it is the
32-bit MSR times the energy unit, so every value in that range, both ends included, occurs):
a new value below the old one means one wrap, and the energy is ``new + range + 1 - old``.
Two wraps between samples cannot be told from one, so a sample is trusted only if the
interval is shorter than the time the counter takes to wrap at ``max_w``; longer gaps (a
stalled loop, a suspended board) start a new baseline instead of a wrong figure. A figure
above ``max_w`` (a counter reset by the firmware) is refused the same way.

The first read gives only a baseline; the watts come from the second. ``energy_uj`` is
readable by root only since Linux 5.10 (a side channel was found in it).
"""

from __future__ import annotations

import errno
from typing import Any

from qrad_agent.actuators.rapl import RaplZone, find_zones, why_no_rapl
from qrad_agent.core.models import Quality
from qrad_agent.metering import RAPL, PowerReading
from qrad_agent.sysfs import Sysfs


def energy_zones(sysfs: Sysfs) -> list[RaplZone]:
    zones = find_zones(sysfs)
    psys = [z for z in zones if z.top_level and z.label == "psys"]
    if psys:
        return psys[:1]
    packages = {z.id for z in zones if z.top_level and z.label.startswith("package")}
    dram = [z for z in zones if not z.top_level and z.label == "dram"
            and z.id.rsplit(":", 1)[0] in packages]
    return [z for z in zones if z.id in packages] + dram


class RaplEnergySource:
    name = RAPL

    def __init__(self, sysfs: Sysfs, max_w: float = 1000.0) -> None:
        self._sysfs = sysfs
        self.max_w = max_w
        self.zones = energy_zones(sysfs)
        self._range: dict[str, int] = {}
        self._last: dict[str, int] | None = None
        self._last_at = 0.0
        self.samples = 0
        self.wraps = 0
        self.refused = 0  # samples not trusted: too long an interval, or too many watts

    def unavailable(self) -> str:
        """Why this board's RAPL counters cannot be used, or "" if they can."""
        if not self.zones:
            return why_no_rapl(self._sysfs)
        try:
            self._counters()
        except _Unreadable as exc:
            return str(exc)
        return ""

    def read(self, now: float) -> PowerReading:
        try:
            counters = self._counters()
        except _Unreadable as exc:
            self._last = None
            return PowerReading(self.name, now, None, Quality.IO_ERROR, str(exc))
        last, last_at = self._last, self._last_at
        self._last, self._last_at = counters, now
        self.samples += 1
        if last is None or set(last) != set(counters):
            return PowerReading(
                self.name, now, None, Quality.STALE, "first counter sample: watts need two"
            )
        dt = now - last_at
        if dt <= 0:
            return PowerReading(self.name, now, None, Quality.STALE, "no time between samples")
        uj = 0
        for zid, value in counters.items():
            if value >= last[zid]:
                uj += value - last[zid]
            else:
                self.wraps += 1
                uj += value + self._range[zid] + 1 - last[zid]
        shortest_wrap_s = min(self._range.values()) / 1e6 / self.max_w
        if dt > shortest_wrap_s:
            self.refused += 1
            return PowerReading(
                self.name, now, None, Quality.STALE,
                f"{dt:.0f} s between samples: the counter may have wrapped more than once "
                f"(it wraps in {shortest_wrap_s:.0f} s at {self.max_w:.0f} W); new baseline",
            )
        watts = uj / 1e6 / dt
        if watts > self.max_w:
            self.refused += 1
            return PowerReading(
                self.name, now, None, Quality.IMPLAUSIBLE_RATE,
                f"{watts:.0f} W is above rapl_max_w ({self.max_w:.0f} W): a counter reset?",
            )
        return PowerReading(self.name, now, watts, Quality.OK, "", {"energy_j": uj / 1e6})

    def describe(self) -> dict[str, Any]:
        return {
            "zones": [f"{z.id} ({z.label})" for z in self.zones],
            "samples": self.samples, "wraps": self.wraps, "refused": self.refused,
        }

    def _counters(self) -> dict[str, int]:
        out = {}
        for z in self.zones:
            rel = f"{z.dir}/energy_uj"
            try:
                out[z.id] = self._sysfs.read_int(rel)
                if z.id not in self._range:
                    self._range[z.id] = self._sysfs.read_int(f"{z.dir}/max_energy_range_uj")
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM):
                    raise _Unreadable(
                        f"permission denied reading {rel}: root only since Linux 5.10"
                    ) from exc
                raise _Unreadable(f"cannot read {rel}: {exc.strerror or exc}") from exc
            except ValueError as exc:
                raise _Unreadable(f"{rel} does not hold a number: {exc}") from exc
        return out


class _Unreadable(Exception):
    pass
