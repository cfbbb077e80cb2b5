"""The safety supervisor: turns each tick's readings into a cap and a floor on the heat
demand, and events. Pure (sans-IO): every call takes ``now``; nothing reads a clock.

It runs between sensing and the controller:

    readings ──► SafetySupervisor.evaluate(now, inputs) ──► SafetyVerdict
                     limit (cap), force_demand (floor), room (trusted), events
    controller.decide(..., room=verdict.room, limit=verdict.limit, floor=verdict.force_demand)

The applied demand is ``min(limit, max(controller's demand, force_demand))``: a cap always
wins over a floor (a CPU at its limit stops even when the room is cold), and ``limit <= 0``
stops every worker at once (the allocator's emergency stop). The checks, their detection
bounds, reactions and reset rules are in ``core/safety_checks.py`` and docs/safety.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from qrad_agent.core.fusion import RoomEstimate, fuse_room
from qrad_agent.core.models import Reading
from qrad_agent.core.safety_checks import (
    LADDER,
    NO_HEAT,
    CheckResult,
    Context,
    CpuTemperatureCheck,
    FailsafeLadder,
    FrostCheck,
    HeatingResponseCheck,
    OverTemperatureCheck,
    SafetyEvent,
    SafetyInputs,
    StallCheck,
    build_context,
    gain_time_s,
)
from qrad_agent.safety_settings import RoomModelConfig, SafetyConfig

__all__ = [
    "LADDER",
    "NO_HEAT",
    "CheckResult",
    "SafetyCheck",
    "SafetyEvent",
    "SafetyInputs",
    "SafetySupervisor",
    "SafetyVerdict",
    "gain_time_s",
]


class SafetyCheck(Protocol):
    name: str

    def evaluate(self, now: float, ctx: Context) -> CheckResult: ...


@dataclass(frozen=True, slots=True)
class SafetyVerdict:
    limit: float  # cap on the demand; <= 0: stop every worker now
    force_demand: float | None  # floor on the demand (frost, failsafe hold); None: none
    events: tuple[SafetyEvent, ...]
    states: Mapping[str, str]  # check name -> its state, for people
    room: RoomEstimate  # the room temperature the controller should use (trusted sensors)
    distrusted: frozenset[str] = frozenset()
    latched: bool = False
    limited_by: str | None = None  # the check whose cap is the limit, if any caps

    def apply(self, demand: float) -> float:
        """The demand the levers get for a controller's ``demand``."""
        if self.limit <= 0:
            return 0.0
        floor = self.force_demand or 0.0
        return min(self.limit, max(demand, floor), 1.0)

    @property
    def stopped(self) -> bool:
        return self.limit <= 0

    def summary(self) -> dict[str, Any]:
        return {
            "limit": round(self.limit, 4),
            "force_demand": self.force_demand,
            "limited_by": self.limited_by,
            "latched": self.latched,
            "distrusted": sorted(self.distrusted),
            "checks": dict(self.states),
        }


class SafetySupervisor:
    """Runs every check once per control tick, in an order where later checks see what
    earlier ones decided: the stall and CPU checks first (they need nothing else), then the
    heating-response check (which may distrust room sensors), then, with the room temperature
    from the trusted sensors, the failsafe ladder, the over-temperature caps and frost."""

    def __init__(self, cfg: SafetyConfig | None = None, period_s: float = 10.0) -> None:
        self.cfg = cfg or SafetyConfig()
        c = self.cfg
        self.stall = StallCheck(c, period_s)
        self.cpu = CpuTemperatureCheck(c)
        self.heating = HeatingResponseCheck(c)
        self.ladder = FailsafeLadder(c)
        self.room_cap = OverTemperatureCheck(
            "room_over_temperature", "room", c.room.max_c, c.room.hysteresis_k,
            c.failsafe.hold_s)
        self.exhaust_cap = OverTemperatureCheck(
            "exhaust_over_temperature", "exhaust", c.room.exhaust_max_c,
            c.room.exhaust_hysteresis_k, c.failsafe.hold_s)
        self.frost = FrostCheck(c)
        # run first (they need nothing the others decide), the heating check last of them
        self._first: tuple[SafetyCheck, ...] = (self.stall, self.cpu, self.heating)
        self._then: tuple[SafetyCheck, ...] = (self.ladder, self.room_cap, self.exhaust_cap,
                                               self.frost)
        self.distrusted: frozenset[str] = frozenset()
        self.last: SafetyVerdict | None = None
        self._last_now: float | None = None

    @property
    def checks(self) -> tuple[SafetyCheck, ...]:
        return self._first + self._then

    def set_room_model(self, model: RoomModelConfig) -> None:
        """Use a fitted room model (from autotune) for the heating-response check."""
        self.heating.set_model(model)

    def trusted_room(self, readings: Iterable[Reading]) -> RoomEstimate:
        """The room temperature from the healthy room sensors not distrusted."""
        return fuse_room(r for r in readings if r.sensor not in self.distrusted)

    def evaluate(self, now: float, inputs: SafetyInputs) -> SafetyVerdict:
        dt = 0.0 if self._last_now is None else max(0.0, now - self._last_now)
        self._last_now = now
        ctx = build_context(now, dt, inputs, self.distrusted)
        if self.frost.active:
            reset_c = self.cfg.frost.frost_c + self.cfg.frost.hysteresis_k
            ctx.target_c = reset_c if ctx.target_c is None else max(ctx.target_c, reset_c)
        results: list[tuple[str, CheckResult]] = []
        for check in self._first:
            results.append((check.name, check.evaluate(now, ctx)))
        distrust = results[-1][1].distrust  # the heating-response check's
        if distrust != self.distrusted:
            self.distrusted = distrust
            ctx.distrusted = distrust
            ctx.room = ctx.trusted_room()
        for check in self._then:
            results.append((check.name, check.evaluate(now, ctx)))

        limit, limited_by = 1.0, None
        force: float | None = None
        events: list[SafetyEvent] = []
        latched = False
        states: dict[str, str] = {}
        for name, r in results:
            states[name] = r.state
            if r.limit < limit:
                limit, limited_by = r.limit, name
            if r.force_demand is not None:
                force = r.force_demand if force is None else max(force, r.force_demand)
            if r.events:
                events += r.events
            latched = latched or r.latched
        verdict = SafetyVerdict(max(0.0, limit), force, tuple(events), states, ctx.room,
                                self.distrusted, latched, limited_by)
        self.last = verdict
        return verdict

    def reset(self, now: float, check: str | None = None) -> tuple[SafetyEvent, ...]:
        """Clear latched trips (all, or the one named): a person's decision."""
        names = {c.name for c in self.checks}
        if check is not None and check not in names:
            raise ValueError(f"no safety check named {check!r}; checks: "
                             f"{', '.join(sorted(names))}")
        events: list[SafetyEvent] = []
        if check in (None, self.cpu.name):
            events += self.cpu.reset(now)
        return tuple(events)
