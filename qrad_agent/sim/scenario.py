"""Scenario files: the simulated world a run takes place in (room, radiator, weather,
occupants), loaded from TOML and validated like the agent's configuration.

Times of day are naive local time; the simulated world has no daylight-saving jumps.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

import qrad_agent
from qrad_agent.config import (
    ComfortPeriod,
    ConfigError,
    describe_errors,
    parse_days,
    read_toml,
)
from qrad_agent.sim.room import Room2R2C, RoomParams
from qrad_agent.sim.weather import Weather, WeatherParams

_DAY_S = 86400.0
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _seconds_of_day(hhmm: str) -> float:
    h, m = hhmm.split(":")
    return int(h) * 3600.0 + int(m) * 60.0


def _check_hhmm(v: str) -> str:
    if not _HHMM.match(v):
        raise ValueError(f"{v!r} is not a time of day; use HH:MM from 00:00 to 23:59")
    return v


_TimeOfDay = Annotated[str, AfterValidator(_check_hhmm)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RadiatorParams(_Strict):
    """The simulated board: its cores and its power model (watts at each frequency)."""

    cores: Annotated[int, Field(ge=1, le=64)] = 4
    slot_w: Annotated[float, Field(gt=0, le=1000)] = 120.0  # one busy core at max frequency
    idle_w: Annotated[float, Field(ge=0, le=2000)] = 20.0
    freq_exponent: Annotated[float, Field(ge=0.5, le=3)] = 1.5
    min_freq_khz: Annotated[int, Field(ge=100_000)] = 800_000
    max_freq_khz: Annotated[int, Field(ge=100_000)] = 3_000_000
    freq_step_khz: Annotated[int, Field(ge=1_000)] = 100_000

    @model_validator(mode="after")
    def _freqs(self) -> RadiatorParams:
        if self.min_freq_khz > self.max_freq_khz:
            raise ValueError(
                f"min_freq_khz ({self.min_freq_khz}) must not exceed "
                f"max_freq_khz ({self.max_freq_khz})"
            )
        return self

    @property
    def max_power_w(self) -> float:
        return self.idle_w + self.cores * self.slot_w


class WindowEvent(_Strict):
    """A window opened at ``at`` for ``minutes`` on ``days``, from day index ``from_day`` on."""

    at: _TimeOfDay
    minutes: Annotated[float, Field(gt=0, le=1440)]
    days: str = "daily"
    from_day: Annotated[int, Field(ge=0)] = 0

    @field_validator("days")
    @classmethod
    def _days(cls, v: str) -> str:
        parse_days(v)
        return v


class OverrideEvent(_Strict):
    """An occupant sets ``target_c`` for ``hours`` at ``at`` on day index ``day``."""

    day: Annotated[int, Field(ge=0)]
    at: _TimeOfDay
    target_c: Annotated[float, Field(ge=5, le=30)]
    hours: Annotated[float, Field(gt=0, le=48)]


class GainPoint(_Strict):
    """Free heat (sun, people, appliances) at a time of day, in watts; repeats every day."""

    at: _TimeOfDay
    w: Annotated[float, Field(ge=0, le=20_000)]


def _default_schedule() -> list[ComfortPeriod]:
    return [ComfortPeriod(days="mon-sun", start="06:00", end="22:00")]


_WindowSpan = tuple[float, float, frozenset[int], int]  # start s, end s, weekdays, from_day


@dataclass(frozen=True, slots=True, eq=False)
class _Tables:
    """Lookups derived from a scenario's fields, built once so per-step queries are cheap."""

    start: datetime
    windows: list[WindowEvent]
    gains: list[GainPoint]
    offset_s: float  # seconds from the start's midnight to the start
    weekday0: int  # weekday of the start's date, Monday = 0
    spans: list[_WindowSpan]
    gain_x: list[float]  # seconds of day, wrapped across midnight
    gain_y: list[float]

    def __eq__(self, other: object) -> bool:
        # pydantic compares private attributes in Scenario.__eq__; a cache, built or not,
        # must not make two equal scenarios unequal.
        return other is None or isinstance(other, _Tables)


class Scenario(_Strict):
    """One simulated world. Treat it as immutable; derive variants with ``model_copy``."""

    name: str
    description: str = ""
    start: datetime = datetime(2027, 1, 4)  # a Monday, 00:00
    days: Annotated[float, Field(gt=0, le=366)]
    seed: int = 1
    comfort_c: Annotated[float, Field(ge=10, le=28)] = 21.0
    eco_c: Annotated[float, Field(ge=5, le=28)] = 18.0
    schedule: list[ComfortPeriod] = Field(default_factory=_default_schedule)
    room: RoomParams
    radiator: RadiatorParams = Field(default_factory=RadiatorParams)
    weather: WeatherParams
    windows: list[WindowEvent] = Field(default_factory=list)
    overrides: list[OverrideEvent] = Field(default_factory=list)
    gains: list[GainPoint] = Field(default_factory=list)
    source_path: Path | None = None  # set by load_scenario, never read from the file

    # Derived lookup tables, rebuilt whenever the fields they come from are replaced.
    _derived: _Tables | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                f"{v!r} is not a scenario name; use 1-64 letters, digits, '_', '.', '-'"
            )
        return v

    @field_validator("start")
    @classmethod
    def _naive(cls, v: datetime) -> datetime:
        if v.tzinfo is not None:
            raise ValueError(
                "scenario times are local; write start without an offset, "
                "e.g. 2027-01-04T00:00:00"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if self.eco_c > self.comfort_c:
            raise ValueError(
                f"eco_c ({self.eco_c}) must not exceed comfort_c ({self.comfort_c})"
            )
        last_day = int(self.days - 1e-9)
        for i, o in enumerate(self.overrides):
            if o.day > last_day:
                raise ValueError(
                    f"overrides.{i}.day: {o.day} is after the run's last day index "
                    f"({last_day} for days = {self.days})"
                )
        for i, w in enumerate(self.windows):
            if w.from_day > last_day:
                raise ValueError(
                    f"windows.{i}.from_day: {w.from_day} is after the run's last day index "
                    f"({last_day} for days = {self.days})"
                )
        times = [g.at for g in self.gains]
        if len(set(times)) != len(times):
            raise ValueError(f"gains: each time of day may appear once; got {times}")
        return self

    def _tables(self) -> _Tables:
        # Reading a private attribute the normal way goes through pydantic's __getattr__
        # (microseconds); this runs every simulated step, so read the storage directly.
        private = self.__pydantic_private__
        d: _Tables | None = private.get("_derived") if private is not None else None
        if d is not None and d.start is self.start and d.windows is self.windows \
                and d.gains is self.gains:
            return d
        start = self.start
        midnight = datetime(start.year, start.month, start.day)
        spans: list[_WindowSpan] = []
        for w in self.windows:
            begin = _seconds_of_day(w.at)
            spans.append((begin, begin + w.minutes * 60.0, frozenset(parse_days(w.days)),
                          w.from_day))
        pts = sorted((_seconds_of_day(g.at), g.w) for g in self.gains)
        # Repeat the day's last and first points across midnight so the profile wraps.
        gx: list[float] = []
        gy: list[float] = []
        if pts:
            gx = [pts[-1][0] - _DAY_S, *(p[0] for p in pts), pts[0][0] + _DAY_S]
            gy = [pts[-1][1], *(p[1] for p in pts), pts[0][1]]
        d = _Tables(start, self.windows, self.gains, (start - midnight).total_seconds(),
                    start.weekday(), spans, gx, gy)
        self._derived = d
        return d

    def window_open(self, t_s: float) -> bool:
        d = self._tables()
        local = d.offset_s + t_s
        day = int(local // _DAY_S)
        sec = local - day * _DAY_S
        weekday0 = d.weekday0
        for begin, end, weekdays, from_day in d.spans:
            if begin <= sec < end and day >= from_day and (weekday0 + day) % 7 in weekdays:
                return True
            # An opening that runs past midnight belongs to the day it started.
            if (
                end > _DAY_S
                and sec + _DAY_S < end
                and day - 1 >= from_day
                and (weekday0 + day - 1) % 7 in weekdays
            ):
                return True
        return False

    def gains_w(self, t_s: float) -> float:
        d = self._tables()
        gx = d.gain_x
        if not gx:
            return 0.0
        sec = (d.offset_s + t_s) % _DAY_S
        i = bisect.bisect_right(gx, sec)
        x0, y0 = gx[i - 1], d.gain_y[i - 1]
        return y0 + (d.gain_y[i] - y0) * (sec - x0) / (gx[i] - x0)

    def local_time(self, t_s: float) -> datetime:
        return self.start + timedelta(seconds=t_s)

    def override_starts(self) -> list[tuple[float, float, float]]:
        """(seconds since start, target °C, duration s) for each override, in time order."""
        offset_s = self._tables().offset_s
        return sorted(
            (o.day * _DAY_S + _seconds_of_day(o.at) - offset_s, o.target_c, o.hours * 3600.0)
            for o in self.overrides
        )

    def make_room(self) -> Room2R2C:
        """The room at its start state: both nodes at ``room.initial_c``, else at ``eco_c``."""
        start_c = self.room.initial_c if self.room.initial_c is not None else self.eco_c
        return Room2R2C(self.room, start_c)

    def make_weather(self) -> Weather:
        base = self.source_path.parent if self.source_path is not None else None
        return Weather(self.weather, self.start, self.seed, base)


class ScenarioError(ConfigError):
    """A scenario that cannot be used; ``problems`` holds one line per fault, for people."""


def _scenarios_dir() -> Path:
    # shipped inside the package so an installed agent has them; the repository's
    # top-level scenarios/ is a link to this folder
    return Path(qrad_agent.__file__).resolve().parent / "data" / "scenarios"


def shipped_scenarios() -> list[str]:
    folder = _scenarios_dir()
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def _resolve(name_or_path: str | Path) -> Path:
    if isinstance(name_or_path, Path):
        return name_or_path
    candidate = Path(name_or_path)
    looks_like_path = candidate.suffix == ".toml" or len(candidate.parts) > 1
    if looks_like_path or candidate.is_file():
        return candidate
    shipped = _scenarios_dir() / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    names = ", ".join(shipped_scenarios()) or "(none found in " + str(_scenarios_dir()) + ")"
    raise ScenarioError(
        name_or_path,
        [f"no shipped scenario of that name and no such file; shipped scenarios: {names}"],
    )


def _for_scenarios(line: str) -> str:
    # describe_errors speaks of the agent's config; point scenario authors to their own docs.
    line = line.replace("`qrad-agent config schema` lists every key", "docs/scenarios.md "
                        "lists every key")
    # Cross-field checks name their keys themselves.
    return line.removeprefix("(top level): ")


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Load a scenario TOML by path, or a shipped scenario by name ("winter-week")."""
    path = _resolve(name_or_path)
    source = str(path)
    data = read_toml(path, ScenarioError)
    if "source_path" in data:
        raise ScenarioError(source, ["source_path: set by the loader; remove it from the file"])
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(source, [_for_scenarios(p) for p in describe_errors(exc)]) from None
    scenario = scenario.model_copy(update={"source_path": path.resolve()})
    problems: list[str] = []
    try:
        weather = scenario.make_weather()
    except ValueError as exc:
        problems.append(f"weather.csv: {exc}")
    else:
        end = weather.csv_end_s
        if end is not None and end < scenario.days * _DAY_S:
            problems.append(
                f"weather.csv: the data ends at {end / 3600:g} h but the run lasts "
                f"{scenario.days * 24:g} h; add rows or shorten days"
            )
    if problems:
        raise ScenarioError(source, problems)
    return scenario
