"""The fleet's world for a simulation: rooms (one per radiator) and a job trace, both drawn
from one seed, so the same seed gives the same fleet, the same weather and the same jobs.

Rooms vary as real buildings do: floor area (the winter-week room scaled 0.6x to 1.6x),
insulation (new, average, old walls and glazing), orientation (when the sun comes in, and
how much) and occupancy (who is home when: the comfort schedule and the people's heat). Each
room becomes a :class:`~qrad_agent.sim.scenario.Scenario`, so gains and the schedule are the
simulator's own code. The radiator in each room is sized for it: enough 120 W cores to hold
comfort at the week's coldest hour with a margin of about 1.4x (2 to 16 cores).

The trace is a Poisson stream of jobs whose rate follows the working day (busier from 08:00
to 20:00, quieter at night and at weekends), with a priority mix, a core count and a pure run
time each. Work is measured in core-seconds at full speed: a job of ``work_s`` on ``cores``
cores takes ``work_s / cores`` seconds on a radiator at its highest frequency, unthrottled.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime

from qrad_agent.config import ComfortPeriod
from qrad_agent.core.jobs import Priority
from qrad_agent.sim.room import Room2R2C, RoomParams
from qrad_agent.sim.scenario import GainPoint, RadiatorParams, Scenario
from qrad_agent.sim.weather import ProfilePoint, Weather, WeatherParams

START = datetime(2027, 1, 4)  # a Monday
DAY_S = 86400.0

# the winter-week room (16 m², well insulated) at size 1.0 and insulation 1.0
_BASE = RoomParams(
    c_air_j_per_k=3.5e5, c_mass_j_per_k=8.0e6, g_air_mass_w_per_k=70.0,
    g_mass_out_w_per_k=8.0, g_air_out_w_per_k=5.0, g_window_w_per_k=35.0, heater_to_air=0.8,
)
INSULATION = {"new": 0.6, "average": 1.0, "old": 1.7}  # multiplies the losses to the outside
# hour of the sun's peak in the room and its peak watts per unit of room size
# (a January sun: the mild-autumn scenario's October sun peaks at 180 W in the same room)
ORIENTATION = {"south": (13.0, 150.0), "east": (10.0, 100.0), "west": (15.0, 100.0),
               "north": (13.0, 30.0)}
PEOPLE_W = 80.0  # sensible heat of the occupants, per unit of room size
# comfort schedules, and when the occupants are home
OCCUPANCY: dict[str, tuple[list[ComfortPeriod], list[tuple[str, str]]]] = {
    "home": ([ComfortPeriod(days="mon-sun", start="06:00", end="22:00")],
             [("07:00", "22:00")]),
    "commuter": ([ComfortPeriod(days="mon-fri", start="06:00", end="08:00"),
                  ComfortPeriod(days="mon-fri", start="17:30", end="22:30"),
                  ComfortPeriod(days="sat-sun", start="08:00", end="23:00")],
                 [("06:00", "08:00"), ("17:30", "22:30")]),
    "office": ([ComfortPeriod(days="mon-fri", start="07:30", end="18:30")],
               [("08:00", "18:00")]),
}
SLOT_W = 120.0
IDLE_W = 20.0
SIZING_MARGIN = 1.4


def fleet_weather(seed: int) -> WeatherParams:
    """A January week around 0 °C with a two-day cold spell down to about -8 °C midweek."""
    del seed  # the noise is seeded by the Weather object; the shape is the same for all seeds
    return WeatherParams(
        mean_c=1.0, daily_amplitude_c=2.5, noise_c=1.0, noise_hours=6.0,
        profile=[ProfilePoint(day=0.0, offset_c=1.0), ProfilePoint(day=2.0, offset_c=-1.0),
                 ProfilePoint(day=3.0, offset_c=-6.0), ProfilePoint(day=4.5, offset_c=-6.0),
                 ProfilePoint(day=6.0, offset_c=0.0)],
    )


@dataclass(frozen=True, slots=True)
class RoomSpec:
    """One radiator's room, and what it was drawn as (for tables and docs)."""

    node: str
    scenario: Scenario
    size: float
    insulation: str
    orientation: str
    occupancy: str


def _gains(size: float, orientation: str, occupancy: str) -> list[GainPoint]:
    peak_h, peak_w = ORIENTATION[orientation]
    sun: dict[float, float] = {}
    for h in range(24):
        # a bell four hours wide at half height, a winter sun's day
        w = peak_w * size * math.exp(-(((h - peak_h) / 2.4) ** 2))
        sun[float(h)] = w if w >= 1.0 else 0.0
    people: dict[float, float] = dict.fromkeys(sun, 0.0)
    for begin, end in OCCUPANCY[occupancy][1]:
        b = int(begin[:2]) + int(begin[3:]) / 60.0
        e = int(end[:2]) + int(end[3:]) / 60.0
        for hour in sun:
            if b <= hour < e:
                people[hour] = PEOPLE_W * size
    return [GainPoint(at=f"{int(h):02d}:00", w=round(sun[h] + people[h], 1)) for h in sun]


def make_rooms(n: int, seed: int, days: float) -> list[RoomSpec]:
    rng = random.Random(f"qrad-fleet-rooms-{seed}")
    weather = fleet_weather(seed)
    coldest = Weather(weather, START, seed).coldest_c(days)
    rooms: list[RoomSpec] = []
    for i in range(n):
        size = round(rng.uniform(0.6, 1.6), 3)
        insulation = rng.choice(sorted(INSULATION))
        orientation = rng.choice(sorted(ORIENTATION))
        occupancy = rng.choices(sorted(OCCUPANCY), weights=[3, 4, 1])[0]
        comfort = rng.choice([20.0, 20.5, 21.0, 21.5, 22.0])
        eco = comfort - rng.choice([2.0, 3.0, 4.0])
        k = INSULATION[insulation] * size
        params = _BASE.model_copy(update={
            "c_air_j_per_k": _BASE.c_air_j_per_k * size,
            "c_mass_j_per_k": _BASE.c_mass_j_per_k * size,
            "g_air_mass_w_per_k": _BASE.g_air_mass_w_per_k * size,
            "g_mass_out_w_per_k": _BASE.g_mass_out_w_per_k * k,
            "g_air_out_w_per_k": _BASE.g_air_out_w_per_k * k,
            "g_window_w_per_k": _BASE.g_window_w_per_k * size,
        })
        need_w = Room2R2C(params, comfort).steady_state_power_w(comfort, coldest)
        cores = max(2, min(16, math.ceil((need_w * SIZING_MARGIN - IDLE_W) / SLOT_W)))
        node = f"r{i:03d}"
        scenario = Scenario(
            name=node, days=max(days, 1.0), seed=seed, start=START, comfort_c=comfort, eco_c=eco,
            schedule=OCCUPANCY[occupancy][0], room=params, weather=weather,
            radiator=RadiatorParams(cores=cores, slot_w=SLOT_W, idle_w=IDLE_W),
            gains=_gains(size, orientation, occupancy),
        )
        rooms.append(RoomSpec(node, scenario, size, insulation, orientation, occupancy))
    return rooms


# ------------------------------------------------------------------------------- the trace

PRIORITY_MIX = ((Priority.HIGH, 0.15), (Priority.LOW, 0.45), (Priority.BACKGROUND, 0.40))
CORES_MIX = ((1, 0.7), (2, 0.2), (4, 0.1))
MEDIAN_RUN_S = 1800.0  # pure run time: log-normal around 30 min …
RUN_SIGMA = 1.0
MIN_RUN_S, MAX_RUN_S = 120.0, 8 * 3600.0  # … between 2 min and 8 h


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job of the trace. ``work_s``: core-seconds at full speed."""

    job_id: str
    seq: int
    arrival_s: float
    priority: Priority
    cores: int
    work_s: float

    @property
    def pure_run_s(self) -> float:
        """How long it takes alone on ``cores`` cores at full speed, never paused."""
        return self.work_s / self.cores


def _rate_shape(t_s: float) -> float:
    """Relative arrival rate: the working day is busy, nights and weekends are not."""
    day = int(t_s // DAY_S)
    hour = (t_s % DAY_S) / 3600.0
    weekend = (START.weekday() + day) % 7 >= 5
    busy = 8.0 <= hour < 20.0
    base = 1.6 if busy else 0.4
    return base * (0.5 if weekend else 1.0)


def make_trace(seed: int, days: float, core_hours_per_day: float,
               max_cores: int = 4) -> list[JobSpec]:
    """Jobs arriving over ``days`` days, ``core_hours_per_day`` of work on an average
    weekday (full-speed core-hours), in arrival order. ``max_cores`` below 4 puts wider
    jobs on fewer cores with the same work (the same stream of jobs otherwise)."""
    rng = random.Random(f"qrad-fleet-trace-{seed}")
    priorities = [p for p, _ in PRIORITY_MIX]
    p_weights = [w for _, w in PRIORITY_MIX]
    core_counts = [c for c, _ in CORES_MIX]
    c_weights = [w for _, w in CORES_MIX]
    mean_cores = sum(c * w for c, w in CORES_MIX)
    # mean of the clipped log-normal is close enough to the unclipped one for the rate
    mean_run_s = MEDIAN_RUN_S * math.exp(RUN_SIGMA ** 2 / 2.0)
    mean_work_h = mean_cores * mean_run_s / 3600.0
    weekday_mean_shape = (12 * 1.6 + 12 * 0.4) / 24.0
    jobs_per_s = core_hours_per_day / mean_work_h / DAY_S / weekday_mean_shape
    peak = jobs_per_s * 1.6
    out: list[JobSpec] = []
    t, end = 0.0, days * DAY_S
    while True:
        # thinning: candidates at the peak rate, kept in proportion to the rate at that time
        t += rng.expovariate(peak)
        if t >= end:
            break
        if rng.random() * 1.6 > _rate_shape(t):
            continue
        run_s = min(MAX_RUN_S, max(MIN_RUN_S, rng.lognormvariate(math.log(MEDIAN_RUN_S),
                                                                 RUN_SIGMA)))
        cores = rng.choices(core_counts, weights=c_weights)[0]
        out.append(JobSpec(f"j{len(out):06d}", len(out), t,
                           rng.choices(priorities, weights=p_weights)[0], min(cores, max_cores),
                           round(run_s * cores, 1)))
    return out
