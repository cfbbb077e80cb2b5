"""One control decision: thermostat -> PID -> allocator. Pure; the agent feeds it.

Every controller (this one, and the baselines the simulator compares it to) has the same
``decide`` signature, so the agent and the simulator can swap them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from qrad_agent.config import AgentConfig
from qrad_agent.core.allocator import Allocator
from qrad_agent.core.fusion import RoomEstimate
from qrad_agent.core.models import Mode, Plan
from qrad_agent.core.pid import PID
from qrad_agent.core.thermostat import Thermostat


@dataclass(frozen=True, slots=True)
class Decision:
    target_c: float | None
    reason: str  # why this target: comfort, eco, preheat, window, off, no-sensor, …
    comfort_now: bool
    demand: float
    plan: Plan


class Controller(Protocol):
    name: str
    allocator: Allocator

    def decide(
        self, now: float, local: datetime, room: RoomEstimate, outdoor_c: float | None,
        limit: float = 1.0, floor: float = 0.0,
    ) -> Decision:
        """One tick. ``limit`` and ``floor`` come from the safety supervisor: the demand
        applied is ``min(limit, max(demand, floor))``, and ``limit <= 0`` stops every worker
        at once. ``Decision.demand`` is the demand applied."""
        ...

    def set_override(self, target_c: float, now: float, duration_s: float) -> None: ...


class HeatingController:
    """The agent's own controller."""

    name = "agent"

    def __init__(self, cfg: AgentConfig, allocator: Allocator) -> None:
        self.cfg = cfg
        self.allocator = allocator
        self.thermostat = Thermostat(cfg.thermostat)
        g = cfg.pid
        self.pid = PID(g.kp, g.ki, g.kd, g.d_filter_s)
        self.demand = 0.0
        self._filtered: float | None = None
        self._filtered_at = 0.0
        self._dynamic_w = allocator.n_max * allocator.model.slot_w

    def set_mode(self, mode: Mode, now: float) -> None:
        self.thermostat.set_mode(mode, now)

    def set_override(self, target_c: float, now: float, duration_s: float) -> None:
        self.thermostat.set_override(target_c, now, duration_s)

    def decide(
        self, now: float, local: datetime, room: RoomEstimate, outdoor_c: float | None,
        limit: float = 1.0, floor: float = 0.0,
    ) -> Decision:
        # the thermostat learns warm-up rates from the demand that was applied, cap included
        th = self.thermostat.update(now, local, room.temperature_c, self.demand)
        measured = self._filter(now, room.temperature_c)
        if th.target_c is None or measured is None:
            # No target (mode off) or no healthy room sensor: no heat. The safety supervisor
            # decides about holds and frost protection on top of this.
            self.pid.disengage()
            wanted = 0.0
            reason = th.reason if room.temperature_c is not None else "no-room-sensor"
        else:
            ff = 0.0
            if outdoor_c is not None and self.cfg.pid.feedforward_w_per_k > 0:
                gap = max(0.0, th.target_c - outdoor_c)
                ff = self.cfg.pid.feedforward_w_per_k * gap / self._dynamic_w
            before = self.pid.integral
            wanted = self.pid.update(now, th.target_c, measured, ff)
            if wanted > limit and self.pid.integral > before:
                # conditional integration against the safety cap too: a capped room must
                # not wind the integral up and overshoot when the cap lifts
                self.pid.integral = before
            reason = th.reason
        self.demand = 0.0 if limit <= 0 else min(limit, max(wanted, floor), 1.0)
        plan = self.allocator.allocate(now, self.demand, limit)
        return Decision(th.target_c, reason, th.comfort_now, self.demand, plan)

    def _filter(self, now: float, room_c: float | None) -> float | None:
        if room_c is None:
            self._filtered = None
        elif self._filtered is None:
            self._filtered = room_c
        else:
            dt = max(0.0, now - self._filtered_at)
            self._filtered += dt / (self.cfg.pid.input_filter_s + dt) * (room_c - self._filtered)
        self._filtered_at = now
        return self._filtered

    def export_state(self) -> dict[str, dict[str, float]]:
        return {"pid": self.pid.export_state(), "thermostat": self.thermostat.export_state()}

    def import_state(self, state: dict[str, dict[str, float]]) -> None:
        self.pid.import_state(state.get("pid", {}))
        self.thermostat.import_state(state.get("thermostat", {}))
