"""Board temperatures: hwmon chips and thermal zones from sysfs, psutil where sysfs has none.

hwmon (``/sys/class/hwmon/hwmon*``): ``name`` names the chip (coretemp, k10temp, nvme, …);
``temp<N>_input`` is milli °C, with optional ``temp<N>_label``, ``temp<N>_crit`` and
``temp<N>_fault``. Kernels before 3.x kept these under ``hwmonN/device/``, which is looked at
too. Thermal zones (``/sys/class/thermal/thermal_zone*``): ``type`` and ``temp`` (milli °C),
and trip points, of which the ``critical`` one is the zone's critical limit.

A sensor that cannot be read right now (``EIO``/``ENODATA`` from a sleeping NVMe drive, a
zone whose device is down) is left out of that poll rather than failing the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qrad_agent.sysfs import Sysfs

TemperatureSource = Callable[[], Mapping[str, Sequence[Any]]]

_TEMP_INPUT = re.compile(r"temp(\d+)_input$")
_TRIP_TYPE = re.compile(r"trip_point_(\d+)_type$")
# Chips and zones that measure the CPU die itself: Intel coretemp and its package zone, AMD
# k10temp/zenpower, ARM SoC zones ("cpu-thermal", "cpu0-thermal", "soc_thermal"), and the
# processor thermal device's zones (TCPU, B0D4). acpitz and PCH sensors are elsewhere.
_CPU_CHIP = re.compile(r"coretemp|k10temp|zenpower|cpu|x86_pkg_temp|^soc|^tcpu|^b0d4", re.I)


@dataclass(frozen=True, slots=True)
class BoardTemperature:
    """One temperature on the board. ``source`` names where and which chip
    ("hwmon:coretemp", "thermal:x86_pkg_temp", "psutil:k10temp"); ``label`` which channel
    ("Package id 0", "Tctl", "temp1", "thermal_zone0")."""

    source: str
    label: str
    temperature_c: float
    critical_c: float | None = None

    @property
    def chip(self) -> str:
        return self.source.partition(":")[2]


def _psutil_temperatures() -> Mapping[str, Sequence[Any]]:
    import psutil

    reader = getattr(psutil, "sensors_temperatures", None)  # absent on macOS and Windows
    if reader is None:
        return {}
    result: Mapping[str, Sequence[Any]] = reader()
    return result


def board_temperatures(
    sysfs: Sysfs | None = None, fallback: TemperatureSource | None = _psutil_temperatures
) -> list[BoardTemperature]:
    """Every readable temperature from hwmon, then thermal zones.

    Only if sysfs yields none, ``fallback`` (``psutil.sensors_temperatures`` by default; pass
    ``None`` for none) is asked; its entries need ``label``, ``current`` and ``critical``.
    """
    sysfs = sysfs or Sysfs("/")
    found = _hwmon(sysfs) + _thermal_zones(sysfs)
    if found or fallback is None:
        return found
    out = []
    for chip, entries in fallback().items():
        for entry in entries:
            if entry.current is None:
                continue
            out.append(
                BoardTemperature(
                    f"psutil:{chip}",
                    entry.label or chip,
                    float(entry.current),
                    float(entry.critical) if entry.critical else None,
                )
            )
    return out


def is_cpu(temperature: BoardTemperature) -> bool:
    return bool(_CPU_CHIP.search(temperature.chip))


def hottest_cpu(temperatures: Iterable[BoardTemperature]) -> BoardTemperature | None:
    """The hottest reading from a CPU package, core or die sensor; ``None`` if there is none.

    The hottest, not an average: a safety trip must follow the worst spot (on AMD parts whose
    Tctl carries an offset above Tdie, that errs towards caution).
    """
    cpus = [t for t in temperatures if is_cpu(t)]
    return max(cpus, key=lambda t: t.temperature_c, default=None)


def _read_milli(sysfs: Sysfs, rel: str) -> float | None:
    try:
        return sysfs.read_int(rel) / 1000.0
    except (OSError, ValueError):
        return None


def _read_text(sysfs: Sysfs, rel: str) -> str | None:
    try:
        return sysfs.read(rel)
    except OSError:
        return None


def _hwmon(sysfs: Sysfs) -> list[BoardTemperature]:
    out = []
    for hwmon in sysfs.glob("sys/class/hwmon/hwmon*"):
        base = hwmon if sysfs.exists(f"{hwmon}/name") else f"{hwmon}/device"
        name = _read_text(sysfs, f"{base}/name")
        if name is None:
            continue
        for rel in sysfs.glob(f"{base}/temp*_input"):
            match = _TEMP_INPUT.search(rel)
            if match is None:
                continue
            channel = f"{base}/temp{match.group(1)}"
            if _read_text(sysfs, f"{channel}_fault") == "1":
                continue
            value = _read_milli(sysfs, rel)
            if value is None:
                continue
            label = _read_text(sysfs, f"{channel}_label") or f"temp{match.group(1)}"
            critical = _read_milli(sysfs, f"{channel}_crit")
            out.append(BoardTemperature(f"hwmon:{name}", label, value, critical))
    return out


def _thermal_zones(sysfs: Sysfs) -> list[BoardTemperature]:
    out = []
    for zone in sysfs.glob("sys/class/thermal/thermal_zone*"):
        kind = _read_text(sysfs, f"{zone}/type")
        value = _read_milli(sysfs, f"{zone}/temp")
        if kind is None or value is None:
            continue
        critical = None
        for rel in sysfs.glob(f"{zone}/trip_point_*_type"):
            match = _TRIP_TYPE.search(rel)
            if match and _read_text(sysfs, rel) == "critical":
                critical = _read_milli(sysfs, f"{zone}/trip_point_{match.group(1)}_temp")
                break
        out.append(BoardTemperature(f"thermal:{kind}", zone.rsplit("/", 1)[-1], value, critical))
    return out
