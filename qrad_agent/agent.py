"""The composition root: builds the ports from the config and runs the control loop.

Only this module knows which concrete sensors and levers exist; the core sees readings and
returns decisions, the ports see plans. One thread mutates the agent: the loop.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from qrad_agent.actuators.base import Lever, LeverInfo
from qrad_agent.config import AgentConfig
from qrad_agent.core.allocator import Allocator
from qrad_agent.core.controller import Controller, Decision, HeatingController
from qrad_agent.core.fusion import RoomEstimate, fuse_room
from qrad_agent.core.models import Plan, Reading
from qrad_agent.core.power import PowerModel
from qrad_agent.core.safety import SafetyEvent, SafetyInputs, SafetySupervisor, SafetyVerdict
from qrad_agent.metering import PowerChooser, PowerReading
from qrad_agent.metering.energy import EnergyAccumulator
from qrad_agent.sensors.health import SensorMonitor

log = logging.getLogger("qrad_agent")

EVENTS_KEPT = 200  # safety events kept on the agent for status (each is also logged)


@dataclass
class AgentStats:
    ticks: int = 0
    polls: int = 0
    lever_errors: int = 0
    last_decision: Decision | None = None
    last_room: RoomEstimate = field(default_factory=lambda: RoomEstimate(None, 0, 0))
    last_verdict: SafetyVerdict | None = None


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        sensors: list[SensorMonitor],
        levers: list[Lever],
        controller: Controller,
        outdoor: Callable[[], float | None] | None = None,
        state_file: Path | None = None,
        supervisor: SafetySupervisor | None = None,
    ) -> None:
        self.cfg = cfg
        self.sensors = sensors
        self.levers = levers
        self.controller = controller
        self.outdoor = outdoor or (lambda: None)
        self.state_file = state_file
        self.readings: dict[str, Reading] = {}
        self.stats = AgentStats()
        self.inventory: list[LeverInfo] = [lever.discover() for lever in levers]
        # safety is on unless a caller brings its own supervisor
        self.supervisor = supervisor or SafetySupervisor(cfg.safety, cfg.control.period_s)
        self.power: PowerChooser | None = None
        self.energy: EnergyAccumulator | None = None
        self.last_power: PowerReading | None = None
        # the fleet connection's parts (connect.py), for the status snapshot: anything here
        # with a status() shows in `qrad-agent status`
        self.link_bridge: Any = None
        self.jobs_bridge: Any = None
        self.events: deque[SafetyEvent] = deque(maxlen=EVENTS_KEPT)
        self._next_poll = float("-inf")
        self._next_tick = float("-inf")
        self._next_save = float("-inf")
        self._load_state()

    # -- the loop's two beats ---------------------------------------------------------------
    def service(self, now: float, local: datetime) -> Decision | None:
        """Run whatever is due at ``now``: a sensor poll, a control tick. Returns a new decision."""
        if now >= self._next_poll:
            self.poll(now)
            self._next_poll = now + self.cfg.control.sensor_period_s
        if now < self._next_tick:
            return None
        self._next_tick = now + self.cfg.control.period_s
        return self.tick(now, local)

    def next_due(self) -> float:
        return min(self._next_poll, self._next_tick)

    def poll(self, now: float) -> RoomEstimate:
        for s in self.sensors:
            self.readings[s.name] = s.poll(now)
        self.stats.polls += 1
        # room sensors the supervisor found misplaced are left out of the room temperature
        self.stats.last_room = fuse_room(
            r for r in self.readings.values() if r.sensor not in self.supervisor.distrusted
        )
        return self.stats.last_room

    def protect(self, now: float) -> SafetyVerdict:
        """The safety supervisor's verdict on the latest readings; its events are kept and
        logged. Called by every tick before the controller decides."""
        last = self.stats.last_decision
        verdict = self.supervisor.evaluate(now, SafetyInputs(
            readings=tuple(self.readings.values()),
            target_c=last.target_c if last else None,
            demand=last.demand if last else 0.0,
            cpu_critical_c=self._cpu_critical_c(),
            outdoor_c=self.outdoor(),
            room=self.stats.last_room,  # poll fused it without the distrusted sensors
        ))
        for event in verdict.events:
            self.events.append(event)
            level = logging.INFO if event.kind in ("reset", "step_up") else logging.WARNING
            log.log(level, "safety %s %s: %s", event.check, event.kind, event.reason)
        self.stats.last_verdict = verdict
        self.stats.last_room = verdict.room
        return verdict

    def _cpu_critical_c(self) -> float | None:
        """The critical limit of the hottest CPU sensor, as its driver found it (hwmon
        temp*_crit or a thermal zone's critical trip point)."""
        limits = []
        for s in self.sensors:
            last = getattr(s.driver, "last", None)
            crit = getattr(last, "critical_c", None)
            if isinstance(crit, int | float):
                limits.append(float(crit))
        return min(limits) if limits else None

    def attach_power(self, power: PowerChooser, energy: EnergyAccumulator) -> None:
        """Measure what the board draws (meter, RAPL or model) and keep the energy total."""
        self.power, self.energy = power, energy

    def tick(self, now: float, local: datetime) -> Decision:
        if self.power is not None:
            # read before the new plan: the model source must see the plan that drew the power
            self.last_power = self.power.read(now)
            if self.energy is not None:
                self.energy.add(self.last_power)
        verdict = self.protect(now)
        decision = self.controller.decide(
            now, local, verdict.room, self.outdoor(), limit=verdict.limit,
            floor=verdict.force_demand or 0.0,
        )
        self.apply(decision.plan)
        if self.power is not None:
            self.power.observe(decision.plan)
        self.stats.ticks += 1
        self.stats.last_decision = decision
        if now >= self._next_save:
            self._save_state()
            self._next_save = now + 300.0
        return decision

    def apply(self, plan: Plan) -> None:
        for lever in self.levers:
            try:
                lever.apply(plan)
            except Exception as exc:  # a broken lever must not stop the loop or the others
                self.stats.lever_errors += 1
                log.error("lever %s failed to apply %s: %s", lever.name, plan.describe(), exc)

    def stop(self) -> None:
        """Put every lever back as the board had it, and keep the controller's state."""
        for lever in self.levers:
            try:
                lever.restore()
            except Exception as exc:
                log.error("lever %s failed to restore: %s", lever.name, exc)
        self._save_state()
        if self.energy is not None:
            self.energy.close()
        if self.power is not None:
            self.power.close()

    # -- controller state across restarts ---------------------------------------------------
    def _load_state(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        export = getattr(self.controller, "import_state", None)
        try:
            state = json.loads(self.state_file.read_text())
            if export is not None:
                export(state)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable controller state %s: %s", self.state_file, exc)

    def _save_state(self) -> None:
        export = getattr(self.controller, "export_state", None)
        if self.state_file is None or export is None:
            return
        try:
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(export()))
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.warning("cannot save controller state to %s: %s", self.state_file, exc)

    # -- what a person asks ----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        d = self.stats.last_decision
        room = self.stats.last_room
        return {
            "room_c": room.temperature_c,
            "room_sensors_healthy": room.healthy,
            "room_sensors": room.configured,
            "target_c": d.target_c if d else None,
            "reason": d.reason if d else None,
            "demand": d.demand if d else None,
            "plan": d.plan.describe() if d else None,
            "readings": {
                name: {"quality": r.quality.value, "temperature_c": r.temperature_c,
                       "detail": r.detail}
                for name, r in self.readings.items()
            },
            "levers": {i.name: i.available for i in self.inventory},
            "sensors": {m.name: m.counters_dict() for m in self.sensors},
            "power": self.last_power.as_dict() if self.last_power else None,
            "energy_wh": self.energy.total_wh if self.energy else None,
            "ticks": self.stats.ticks,
            "safety": self.stats.last_verdict.summary() if self.stats.last_verdict else None,
            "events": [e.as_dict() for e in list(self.events)[-20:]],
        }


def make_allocator(cfg: AgentConfig, slots: int, min_khz: int, max_khz: int,
                   table: list[int]) -> Allocator:
    pm = cfg.power_model
    model = PowerModel(pm.idle_w, pm.slot_w, pm.freq_exponent, max_khz)
    return Allocator(cfg.allocator, cfg.allocator.slots or slots, model, min_khz, table)


def make_controller(name: str, cfg: AgentConfig, allocator: Allocator) -> Controller:
    if name == "agent":
        return HeatingController(cfg, allocator)
    if name == "bangbang":
        from qrad_agent.sim.baselines import BangBang

        return BangBang(cfg, allocator)
    if name == "simple-pid":
        from qrad_agent.sim.baselines import SimplePid

        return SimplePid(cfg, allocator)
    raise ValueError(f"unknown controller {name!r}; allowed: agent, bangbang, simple-pid")
