"""Outdoor temperature for a simulated run: a synthetic climate or a measured CSV series.

Synthetic: ``mean_c`` plus a daily swing (coldest at 05:00, warmest at 15:00, as on a clear
winter day the minimum comes near dawn and the maximum mid-afternoon), a linear trend, a
piecewise-linear ``profile`` of offsets (a cold snap, a thaw) and smooth seeded noise (an
AR(1) process sampled hourly and interpolated, so the air never jumps). With ``csv`` the
measured series replaces the mean and the swing; trend, profile and noise still add to it.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import math
import random
from datetime import datetime
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

_DAY_S = 86400.0
_COLDEST_H = 5.0
_WARMEST_H = 15.0
_SCAN_STEP_S = 300.0  # fine enough that the scan misses the true minimum by millikelvins


class ProfilePoint(BaseModel):
    """An offset added to the outdoor temperature from ``day`` days after the start."""

    model_config = ConfigDict(extra="forbid")

    day: Annotated[float, Field(ge=0, le=366)]
    offset_c: Annotated[float, Field(ge=-40, le=40)]


class WeatherParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mean_c: Annotated[float, Field(ge=-50, le=50)] | None = Field(
        default=None, description="daily mean outdoor temperature (°C); required unless csv is set"
    )
    daily_amplitude_c: Annotated[float, Field(ge=0, le=20)] = Field(
        default=0.0, description="half the daily swing (K): mean - amplitude at 05:00, "
        "mean + amplitude at 15:00"
    )
    trend_c_per_day: Annotated[float, Field(ge=-10, le=10)] = Field(
        default=0.0, description="linear drift from the start (K per day)"
    )
    noise_c: Annotated[float, Field(ge=0, le=10)] = Field(
        default=0.0, description="standard deviation of the seeded, smooth weather noise (K)"
    )
    noise_hours: Annotated[float, Field(gt=0, le=240)] = Field(
        default=6.0, description="correlation time of the noise (hours): how long a warm or cold "
        "spell lasts"
    )
    csv: str | None = Field(
        default=None, description="CSV file with columns hours,outdoor_c (hours since the start); "
        "relative paths are taken from the scenario file's folder"
    )
    profile: list[ProfilePoint] = Field(
        default_factory=list, description="offsets (K) at given days, linearly interpolated "
        "and held beyond the first and last point"
    )

    @model_validator(mode="after")
    def _consistent(self) -> WeatherParams:
        if self.csv is None and self.mean_c is None:
            raise ValueError("set mean_c (°C) or csv (a file of hours,outdoor_c)")
        if self.csv is not None:
            clash = sorted({"mean_c", "daily_amplitude_c"} & self.model_fields_set)
            if clash:
                raise ValueError(
                    f"csv replaces {' and '.join(clash)}; remove "
                    f"{'them' if len(clash) > 1 else 'it'} or remove csv"
                )
        days = [p.day for p in self.profile]
        if any(b <= a for a, b in itertools.pairwise(days)):
            raise ValueError(f"profile days must increase strictly; got {days}")
        return self


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), held constant outside; xs strictly increasing."""
    i = bisect.bisect_right(xs, x)
    if i == 0:
        return ys[0]
    if i == len(xs):
        return ys[-1]
    x0, x1 = xs[i - 1], xs[i]
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)


def _read_csv(path: Path) -> tuple[list[float], list[float]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read weather CSV {path}: {exc.strerror}") from None
    rows = list(csv.reader(text.splitlines()))
    header = [c.strip() for c in rows[0]] if rows else []
    if header != ["hours", "outdoor_c"]:
        raise ValueError(
            f"{path}: the first line must be the header 'hours,outdoor_c'; got {','.join(header)!r}"
        )
    hours: list[float] = []
    temps: list[float] = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise ValueError(f"{path}:{lineno}: expected 2 columns (hours,outdoor_c), got {row}")
        try:
            h, t = float(row[0]), float(row[1])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: not two numbers: {','.join(row)!r}") from None
        if not (math.isfinite(h) and math.isfinite(t)) or not -60 <= t <= 60:
            raise ValueError(f"{path}:{lineno}: hours must be finite and outdoor_c in -60..60")
        if hours and h * 3600.0 <= hours[-1]:
            raise ValueError(
                f"{path}:{lineno}: hours must increase strictly ({h:g} after {hours[-1] / 3600:g})"
            )
        hours.append(h * 3600.0)
        temps.append(t)
    if not hours:
        raise ValueError(f"{path}: no data rows after the header")
    return hours, temps


class Weather:
    """Outdoor temperature as a function of seconds since the scenario start."""

    def __init__(
        self, params: WeatherParams, start: datetime, seed: int, base_dir: Path | None = None
    ) -> None:
        self.params = params
        self._start_s = start.hour * 3600.0 + start.minute * 60.0 + start.second \
            + start.microsecond / 1e6
        self._csv: tuple[list[float], list[float]] | None = None
        if params.csv is not None:
            path = Path(params.csv)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            self._csv = _read_csv(path)
        self._profile_x = [p.day * _DAY_S for p in params.profile]
        self._profile_y = [p.offset_c for p in params.profile]
        # A string seed is hashed identically on every run (unlike hash()), and keeps the
        # weather independent of other users of the same scenario seed.
        self._rng = random.Random(f"qrad-weather-{seed}")
        self._phi = math.exp(-1.0 / params.noise_hours)
        self._noise: list[float] = [self._rng.gauss(0.0, params.noise_c)] \
            if params.noise_c > 0 else []

    @property
    def csv_end_s(self) -> float | None:
        """The last time (s since start) the CSV series covers; None without a CSV."""
        return self._csv[0][-1] if self._csv is not None else None

    def _noise_at(self, t_s: float) -> float:
        h = max(t_s, 0.0) / 3600.0
        k = int(h)
        noise = self._noise
        if k + 1 >= len(noise):
            sigma = self.params.noise_c * math.sqrt(1.0 - self._phi * self._phi)
            while k + 1 >= len(noise):
                noise.append(self._phi * noise[-1] + self._rng.gauss(0.0, sigma))
        frac = h - k
        return noise[k] + (noise[k + 1] - noise[k]) * frac

    def _swing(self, t_s: float) -> float:
        amp = self.params.daily_amplitude_c
        if amp == 0.0:
            return 0.0
        h = ((self._start_s + t_s) % _DAY_S) / 3600.0
        if _COLDEST_H <= h < _WARMEST_H:
            return -amp * math.cos(math.pi * (h - _COLDEST_H) / (_WARMEST_H - _COLDEST_H))
        falling = 24.0 - (_WARMEST_H - _COLDEST_H)
        return amp * math.cos(math.pi * ((h - _WARMEST_H) % 24.0) / falling)

    def outdoor_c(self, t_s: float) -> float:
        p = self.params
        if self._csv is not None:
            value = _interp(self._csv[0], self._csv[1], t_s)
        else:
            value = (p.mean_c or 0.0) + self._swing(t_s)
        if p.trend_c_per_day:
            value += p.trend_c_per_day * t_s / _DAY_S
        if self._profile_x:
            value += _interp(self._profile_x, self._profile_y, t_s)
        if self._noise:
            value += self._noise_at(t_s)
        return value

    def coldest_c(self, days: float) -> float:
        """The lowest outdoor temperature from the start to ``days`` days later."""
        end = days * _DAY_S
        times = [i * _SCAN_STEP_S for i in range(int(end // _SCAN_STEP_S) + 1)]
        times.append(end)
        # Knots of the piecewise-linear parts are where their minima sit.
        knots = self._profile_x + (self._csv[0] if self._csv is not None else [])
        times.extend(x for x in knots if 0.0 <= x <= end)
        return min(self.outdoor_c(t) for t in times)
