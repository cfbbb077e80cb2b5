"""Closed-loop simulation: the agent (or a baseline controller) against a simulated room.

Runs as fast as the machine allows and scores the run. KPI definitions (docs/simulation.md):

- The first simulated day is a warm-up and is not scored (the controller learns, the walls
  settle); energy and discomfort are taken over the scored days.
- ``discomfort_kh``: the true air temperature's distance outside the comfort band, integrated
  over time, in kelvin-hours. In scheduled comfort periods the band is
  [comfort − 0.5 K, comfort + 1.0 K]; otherwise [eco − 0.5 K, comfort + 1.0 K].
- ``rms_error_k``: RMS of air − setpoint in comfort periods, leaving out the 3 h after each
  setpoint rise (schedule or override), the time from a window opening to 1 h after it
  closes, and the moments when free heat (sun, people) and the board's idle power alone would
  hold the room at or above the setpoint: no heater can take heat back out.
- ``max_overshoot_k``: the largest excess of the air over the highest temperature the occupant
  asked for at that moment: the comfort setpoint, or an override above it. (Preheating ahead
  of a comfort period is not overshoot; heat past comfort is, whoever caused it.)
- ``worker_starts``: worker slot starts (resuming a paused slot is not a start);
  ``switches``: on/off switches of the heater, both ways (a bang-bang thermostat's relay
  clicks; for the other controllers, going from no slots to some and back).
- ``compute_core_hours``: core-hours of computation at full-speed equivalence
  (slots x quota x frequency / max frequency).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qrad_agent.actuators.cpufreq import CpufreqLever
from qrad_agent.agent import Agent, make_allocator, make_controller
from qrad_agent.config import AgentConfig
from qrad_agent.core.models import Role
from qrad_agent.core.schedule import WeeklySchedule
from qrad_agent.metering import energy_file, open_power
from qrad_agent.metering.energy import EnergyAccumulator
from qrad_agent.sensors.factory import open_configured
from qrad_agent.sensors.health import SensorMonitor
from qrad_agent.sim.scenario import Scenario
from qrad_agent.sim.world import SimWorld, config_for_scenario

WARMUP_S = 86400.0
AFTER_RISE_S = 3 * 3600.0
AFTER_WINDOW_S = 3600.0
AFTER_FALL_S = 3600.0  # an override ending above comfort: the room needs time to cool


@dataclass
class Kpis:
    scenario: str
    controller: str
    discomfort_kh: float = 0.0
    energy_kwh: float = 0.0
    rms_error_k: float = 0.0
    max_overshoot_k: float = 0.0
    worker_starts: int = 0
    switches: int = 0
    compute_core_hours: float = 0.0
    mean_power_w: float = 0.0
    sim_days: float = 0.0
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class Trace:
    """Samples for plots, one a minute."""

    t_h: list[float] = field(default_factory=list)
    air_c: list[float] = field(default_factory=list)
    outdoor_c: list[float] = field(default_factory=list)
    setpoint_c: list[float] = field(default_factory=list)
    band_lo: list[float] = field(default_factory=list)
    band_hi: list[float] = field(default_factory=list)
    target_c: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)


def build_sim_agent(
    cfg: AgentConfig,
    scenario: Scenario,
    controller: str = "agent",
    workdir: Path | None = None,
    metered: bool = True,
) -> tuple[Agent, SimWorld]:
    """The agent's real code wired to a simulated radiator in ``scenario``'s room.

    ``metered`` adds power reading and energy accounting as on a board (for status); the
    scoring simulation leaves it out: the world integrates the true energy itself, and the
    accountant's periodic fsync would be most of a fast run's cost.
    """
    cfg = config_for_scenario(cfg, scenario)
    world = SimWorld(cfg, scenario, workdir)

    def sim_sleep(seconds: float) -> None:
        world.io_time += seconds

    monitors = [
        SensorMonitor.from_config(
            s, open_configured(
                s, bus_for=world.sensors.bus_for, sysfs=world.sensors.sysfs, sleep=sim_sleep
            )
        )
        for s in cfg.sensors
    ]
    cpufreq = CpufreqLever(world.sysfs)
    info = cpufreq.discover()
    r = scenario.radiator
    allocator = make_allocator(
        cfg, r.cores, info.range.get("min_khz", r.min_freq_khz),
        info.range.get("max_khz", r.max_freq_khz), list(info.range.get("available_khz", [])),
    )
    ctl = make_controller(controller, cfg, allocator)
    agent = Agent(cfg, monitors, [cpufreq, world.slots, world.quota], ctl,
                  outdoor=lambda: world.outdoor_c)
    if metered:
        # no meter and no RAPL on the simulated board: the power model says what it draws
        metering = cfg.metering.model_copy(update={"rapl": False})
        power = open_power(metering, world.sysfs, allocator.model)
        agent.attach_power(power, EnergyAccumulator(energy_file(world.root)))
    return agent, world


def simulate(
    cfg: AgentConfig,
    scenario: Scenario,
    controller: str = "agent",
    trace: Trace | None = None,
    days: float | None = None,
) -> Kpis:
    started = time.perf_counter()
    # The controller reads only the latest poll at each tick, so polling in between changes
    # nothing it decides: the fast simulation polls once per tick and steps the room (exactly)
    # by a whole control period. `run --sim` polls at sensor_period_s, as a board does.
    control = cfg.control.model_copy(update={"sensor_period_s": cfg.control.period_s})
    agent, world = build_sim_agent(cfg.model_copy(update={"control": control}), scenario,
                                   controller, metered=False)
    acfg = agent.cfg
    comfort_c, eco_c = acfg.thermostat.comfort_c, acfg.thermostat.eco_c
    schedule = WeeklySchedule(acfg.thermostat.schedule)
    overrides = scenario.override_starts()
    dt = acfg.control.sensor_period_s
    end = (days if days is not None else scenario.days) * 86400.0
    k = Kpis(scenario.name, controller)
    sq_err, n_err = 0.0, 0
    energy_at_warmup = 0.0
    prev_setpoint = None
    quiet_until = -math.inf  # no RMS scoring until then (after a rise or a window)
    no_overshoot_until = -math.inf
    core_s = 0.0
    fmax = scenario.radiator.max_freq_khz
    next_sample = 0.0
    try:
        while world.t < end:
            world.step(dt)
            t = world.t
            local = world.local
            for target, duration in world.due_overrides():
                agent.controller.set_override(target, t, duration)
            agent.service(t, local)
            comfort = schedule.is_comfort(local)
            setpoint = comfort_c if comfort else eco_c
            for start, target, dur in overrides:
                if start <= t < start + dur:
                    setpoint = target
            if prev_setpoint is not None and setpoint > prev_setpoint:
                quiet_until = max(quiet_until, t + AFTER_RISE_S)
            if prev_setpoint is not None and setpoint < prev_setpoint:
                no_overshoot_until = max(no_overshoot_until, t + AFTER_FALL_S)
            prev_setpoint = setpoint
            if world.window_open:
                quiet_until = max(quiet_until, t + AFTER_WINDOW_S)
            air = world.room.air_c
            if t <= WARMUP_S:
                energy_at_warmup = world.energy_wh
            else:
                lo = (comfort_c if comfort else eco_c) - 0.5
                hi = comfort_c + 1.0
                gap = lo - air if air < lo else (air - hi if air > hi else 0.0)
                k.discomfort_kh += gap * dt / 3600.0
                if comfort and t >= quiet_until and not free_heat_holds(world, setpoint):
                    sq_err += (air - setpoint) ** 2
                    n_err += 1
                if t >= no_overshoot_until:
                    k.max_overshoot_k = max(k.max_overshoot_k, air - max(comfort_c, setpoint))
                core_s += (world.slots.running * world.quota.quota
                           * world.sysfs.effective_max_khz() / fmax) * dt
            if trace is not None and t >= next_sample:
                next_sample = t + 60.0
                d = agent.stats.last_decision
                trace.t_h.append(t / 3600.0)
                trace.air_c.append(air)
                trace.outdoor_c.append(world.outdoor_c)
                trace.setpoint_c.append(setpoint)
                trace.band_lo.append((comfort_c if comfort else eco_c) - 0.5)
                trace.band_hi.append(comfort_c + 1.0)
                trace.target_c.append(d.target_c if d and d.target_c is not None else math.nan)
                trace.power_w.append(world.power_w)
                trace.slots.append(world.slots.running)
    finally:
        agent.stop()
        world.close()
    scored_h = max(1e-9, (world.t - WARMUP_S) / 3600.0)
    k.energy_kwh = (world.energy_wh - energy_at_warmup) / 1000.0
    k.mean_power_w = k.energy_kwh * 1000.0 / scored_h
    k.rms_error_k = math.sqrt(sq_err / n_err) if n_err else 0.0
    k.worker_starts = world.slots.starts
    k.switches = int(getattr(agent.controller, "switches", agent.controller.allocator.switches))
    k.compute_core_hours = core_s / 3600.0
    k.sim_days = world.t / 86400.0
    k.wall_s = time.perf_counter() - started
    return k


def free_heat_holds(world: SimWorld, setpoint: float) -> bool:
    """Would the sun, people and the idle board alone keep the room at ``setpoint``?"""
    needed = world.room.steady_state_power_w(setpoint, world.outdoor_c)
    return world.scenario.gains_w(world.t) + world.model.idle_w >= needed


def room_sensor_names(cfg: AgentConfig) -> list[str]:
    return [s.name for s in cfg.sensors if s.role is Role.ROOM]
