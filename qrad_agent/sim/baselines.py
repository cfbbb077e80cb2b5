"""Controllers the agent is measured against in ``qrad-agent simulate`` and the benchmark.

- ``bangbang``: an on/off thermostat with ±0.3 K hysteresis around the scheduled setpoint
  (the defaults of Home Assistant's generic_thermostat), switching the whole radiator.
- ``simple-pid``: the ``simple-pid`` package with the agent's own gains, through the agent's
  allocator, without optimal start.
"""

from __future__ import annotations

from datetime import datetime

from qrad_agent.config import AgentConfig
from qrad_agent.core.allocator import Allocator
from qrad_agent.core.controller import Decision
from qrad_agent.core.fusion import RoomEstimate
from qrad_agent.core.models import Plan
from qrad_agent.core.schedule import WeeklySchedule


class BangBang:
    name = "bangbang"

    def __init__(self, cfg: AgentConfig, allocator: Allocator, hysteresis_k: float = 0.3) -> None:
        self.allocator = allocator  # only for its geometry: bang-bang switches every slot at once
        self.schedule = WeeklySchedule(cfg.thermostat.schedule)
        self.comfort_c, self.eco_c = cfg.thermostat.comfort_c, cfg.thermostat.eco_c
        self.hysteresis_k = hysteresis_k
        self.on = False
        self.switches = 0  # on/off switches: the relay clicks of a bang-bang thermostat
        self._override: tuple[float, float] | None = None  # (target, until)

    def set_override(self, target_c: float, now: float, duration_s: float) -> None:
        self._override = (target_c, now + duration_s)

    def decide(
        self, now: float, local: datetime, room: RoomEstimate, outdoor_c: float | None,
        limit: float = 1.0, floor: float = 0.0,
    ) -> Decision:
        comfort = self.schedule.is_comfort(local)
        target = self.comfort_c if comfort else self.eco_c
        if self._override is not None and now < self._override[1]:
            target = self._override[0]
        t = room.temperature_c
        if t is None:
            self.switches += self.on
            self.on = False
        elif t <= target - self.hysteresis_k and not self.on:
            self.on = True
            self.switches += 1
        elif t >= target + self.hysteresis_k and self.on:
            self.on = False
            self.switches += 1
        a = self.allocator
        # the safety cap in whole slots (rounded down, never above it); a floor switches on
        slots = a.n_max if limit >= 1.0 else int(a.n_max * max(0.0, limit))
        on = (self.on or floor > 0) and slots > 0
        plan = Plan(slots, a.max_freq_khz, 1.0) if on else Plan(0, a.min_freq_khz, 1.0)
        if on and a.running == 0:
            a.starts += plan.slots
        a.running = plan.slots
        demand = plan.slots / a.n_max if on else 0.0
        return Decision(target, "comfort" if comfort else "eco", comfort, demand, plan)


class SimplePid:
    name = "simple-pid"

    def __init__(self, cfg: AgentConfig, allocator: Allocator) -> None:
        from simple_pid import PID as SimplePID  # an optional dependency, for comparison only

        from qrad_agent.core.thermostat import Thermostat

        th_cfg = cfg.thermostat.model_copy(
            update={"optimal_start": cfg.thermostat.optimal_start.model_copy(
                update={"enabled": False})}
        )
        self.thermostat = Thermostat(th_cfg)
        self.allocator = allocator
        g = cfg.pid
        self.pid = SimplePID(g.kp, g.ki, g.kd, output_limits=(0.0, 1.0), sample_time=None)
        self._last: float | None = None
        self.demand = 0.0

    def decide(
        self, now: float, local: datetime, room: RoomEstimate, outdoor_c: float | None,
        limit: float = 1.0, floor: float = 0.0,
    ) -> Decision:
        th = self.thermostat.update(now, local, room.temperature_c, self.demand)
        dt = 0.0 if self._last is None else now - self._last
        self._last = now
        if th.target_c is None or room.temperature_c is None:
            self.demand = 0.0
        else:
            self.pid.setpoint = th.target_c
            out = self.pid(room.temperature_c, dt=dt if dt > 0 else 1e-6)
            self.demand = float(out) if out is not None else 0.0
        self.demand = 0.0 if limit <= 0 else min(limit, max(self.demand, floor), 1.0)
        plan = self.allocator.allocate(now, self.demand, limit)
        return Decision(th.target_c, th.reason, th.comfort_now, self.demand, plan)

    def set_override(self, target_c: float, now: float, duration_s: float) -> None:
        self.thermostat.set_override(target_c, now, duration_s)
