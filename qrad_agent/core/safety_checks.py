"""The safety supervisor's checks. Pure: each takes ``now`` and the tick's context, keeps its
own small state, and returns a ``CheckResult``; nothing here reads a clock or does IO.

Every check has the same shape:

- ``evaluate(now, ctx) -> CheckResult``: a cap on the heat demand in [0, 1] (1 = no cap,
  0 = stop every worker at once), optionally a floor (``force_demand``: heat at least this
  much, for frost protection and the failsafe hold), whether a latch holds, the events of
  this tick, and a one-word state for people;
- ``reset(now)``: clear a latch (a person's decision); returns the events it caused.

docs/safety.md lists every check with its detection bound, reaction and reset rule; the
comments here say why each rule is what it is.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import median
from typing import Any, Literal

from qrad_agent.core.fusion import RoomEstimate, fuse_room
from qrad_agent.core.models import Reading, Role
from qrad_agent.safety_settings import RoomModelConfig, SafetyConfig

EventKind = Literal["trip", "reset", "step_down", "step_up", "notice"]

# A positive cap below every allocator's stop_demand: no heat, but workers are paused (frozen),
# not killed, and resume the moment it lifts. Room and exhaust over-temperature, a stalled loop
# and a CPU near its critical limit want no heat now; cap 0, the emergency stop that also ends
# the workers and returns their jobs, is kept for a cooling that keeps failing.
NO_HEAT = 1e-6
IDLE_DEMAND = 0.05  # at or below this the CPUs are idle enough to read the room off the board


@dataclass(frozen=True, slots=True)
class SafetyEvent:
    """One trip, reset or step, with the values that caused it and the thresholds they met."""

    at: float  # monotonic seconds
    check: str
    kind: EventKind
    reason: str  # for people: what was seen, against which limit, and what was done
    values: Mapping[str, float | str | None] = field(default_factory=dict)
    thresholds: Mapping[str, float] = field(default_factory=dict)
    latched: bool = False  # the reaction holds until a person resets it

    def as_dict(self) -> dict[str, Any]:
        def clean(v: float | str | None) -> float | str | None:
            return round(v, 4) if isinstance(v, float) and math.isfinite(v) else v

        return {
            "at": self.at, "check": self.check, "kind": self.kind, "reason": self.reason,
            "values": {k: clean(v) for k, v in self.values.items()},
            "thresholds": {k: clean(v) for k, v in self.thresholds.items()},
            "latched": self.latched,
        }


@dataclass(frozen=True, slots=True)
class CheckResult:
    limit: float = 1.0  # cap on demand; <= 0: stop every worker now
    force_demand: float | None = None  # floor on demand (frost, failsafe hold); None: none
    latched: bool = False
    events: tuple[SafetyEvent, ...] = ()
    state: str = "ok"
    distrust: frozenset[str] = frozenset()  # room sensors not to be believed


@dataclass(frozen=True, slots=True)
class SafetyInputs:
    """What the agent knows at a tick. ``target_c`` and ``demand`` are the previous tick's
    (the supervisor runs before the controller): the target the thermostat chose and the
    demand actually applied, after the previous verdict's cap and floor."""

    readings: Sequence[Reading] = ()
    target_c: float | None = None
    demand: float = 0.0
    cpu_critical_c: float | None = None  # from hwmon temp*_crit or a critical trip point
    outdoor_c: float | None = None
    # the room fused from these readings without the supervisor's distrusted sensors, when
    # the caller has it already (saves fusing twice a tick); None: the supervisor fuses
    room: RoomEstimate | None = None


@dataclass(slots=True)
class Context:
    """One tick as the checks see it; built by the supervisor."""

    now: float
    dt: float  # seconds since the previous evaluation; 0 on the first
    inputs: SafetyInputs
    room_readings: dict[str, Reading]  # role room, in configuration order, healthy or not
    distrusted: frozenset[str]
    room: RoomEstimate  # fused from the healthy room sensors that are trusted
    board_c: float | None  # the hottest healthy board (CPU) temperature
    board_configured: bool
    exhaust_c: float | None  # the hottest healthy exhaust/surface temperature
    # what the heat was asked to reach: the thermostat's target, raised to the end of frost
    # protection while that heats (so a sensor outside cannot make frost heat run unbounded)
    target_c: float | None = None

    def trusted_room(self) -> RoomEstimate:
        return fuse_room(r for r in self.room_readings.values() if r.sensor not in self.distrusted)


def build_context(
    now: float, dt: float, inputs: SafetyInputs, distrusted: frozenset[str]
) -> Context:
    room: dict[str, Reading] = {}
    board: list[float] = []
    exhaust: list[float] = []
    board_configured = False
    for r in inputs.readings:
        if r.role is Role.ROOM:
            room[r.sensor] = r
        elif r.role is Role.BOARD:
            board_configured = True
            if r.ok and r.temperature_c is not None:
                board.append(r.temperature_c)
        elif r.role is Role.EXHAUST and r.ok and r.temperature_c is not None:
            exhaust.append(r.temperature_c)
    ctx = Context(
        now, dt, inputs, room, distrusted, inputs.room or _NO_ROOM,
        max(board) if board else None, board_configured, max(exhaust) if exhaust else None,
        inputs.target_c,
    )
    if inputs.room is None:
        ctx.room = ctx.trusted_room()
    return ctx


_NO_ROOM = RoomEstimate(None, 0, 0)


class _Ewma:
    """An exponentially weighted mean over time (``tau_s``), for irregular sample spacing."""

    def __init__(self, tau_s: float, initial: float | None = None) -> None:
        self.tau_s = tau_s
        self.value = initial
        self.samples = 0

    def add(self, x: float, dt: float) -> None:
        if dt <= 0.0:
            return  # the first tick: nothing has been applied yet, there is nothing to learn
        self.samples += 1
        if self.value is None:
            self.value = x
            return
        self.value += (1.0 - math.exp(-max(0.0, dt) / self.tau_s)) * (x - self.value)


_OK = CheckResult()  # the common tick: shared, as results are immutable
_DISABLED = CheckResult(state="disabled")
_NO_SENSOR = CheckResult(state="no-sensor")


def _fmt(v: float | None, unit: str = "°C") -> str:
    return "none" if v is None else f"{v:.2f} {unit}"


# ----------------------------------------------------------------------------------------
class StallCheck:
    """A tick much later than the control period: the loop stalled (a hung bus read, a
    swapping board, a stopped process resumed). What ran meanwhile ran unsupervised, so the
    heat goes to none (workers paused) and comes back after ``recover_ticks`` on-time ticks.
    The stall itself cannot be seen from inside the loop while it lasts: that is the systemd
    watchdog's part (issue 8)."""

    name = "loop_stall"

    def __init__(self, cfg: SafetyConfig, period_s: float) -> None:
        self.cfg = cfg.stall
        self.period_s = period_s
        self._last: float | None = None
        self._owed = 0  # on-time ticks still needed before the heat comes back

    def evaluate(self, now: float, ctx: Context) -> CheckResult:
        last, self._last = self._last, now
        max_gap = self.cfg.factor * self.period_s
        if last is None:
            return _OK
        gap = now - last
        if gap > max_gap:
            already = self._owed > 0
            self._owed = self.cfg.recover_ticks
            event = SafetyEvent(
                now, self.name, "trip",
                f"control tick came {gap:.0f} s after the previous one (period "
                f"{self.period_s:g} s, limit {max_gap:g} s): no heat until "
                f"{self.cfg.recover_ticks} ticks arrive on time",
                {"gap_s": gap}, {"max_gap_s": max_gap, "period_s": self.period_s},
            )
            return CheckResult(NO_HEAT, events=() if already else (event,), state="stalled")
        if self._owed > 0:
            self._owed -= 1
            if self._owed == 0:
                event = SafetyEvent(
                    now, self.name, "reset",
                    f"{self.cfg.recover_ticks} control ticks on time: heat allowed again",
                    {"gap_s": gap}, {"max_gap_s": max_gap},
                )
                return CheckResult(events=(event,), state="ok")
            return CheckResult(NO_HEAT, state="recovering")
        return _OK


# ----------------------------------------------------------------------------------------
class CpuTemperatureCheck:
    """CPU temperature against the hardware's critical limit.

    Above ``critical - reduce_margin_k`` a cap starts at the demand being applied (so the
    first step already bites) and falls at ``reduce_rate_per_s`` until the CPU is back below;
    it rises again at the slower ``recover_rate_per_s`` while the CPU is 2 K below and the cap
    is what holds the demand back (a cap the controller does not reach has proven nothing),
    and is released at 1. This finds the most heat the cooling can carry (a blocked grille, a
    dead fan, a hot summer room) without switching on and off. At ``critical - stop_margin_k``
    all compute stops at once: every worker is paused (frozen: no compute, no heat, and the
    CPU cools within seconds); it resumes, at ``resume_cap``, when the CPU has fallen
    ``resume_hysteresis_k`` below the reduce threshold. ``latch_after_stops`` stops within
    ``latch_window_s`` latch: the cooling is broken, every worker is stopped (cap 0, their
    jobs go back to the fleet) until a person resets it.
    """

    name = "cpu_temperature"
    _HOLD_BAND_K = 2.0  # between threshold - band and threshold the cap holds still

    def __init__(self, cfg: SafetyConfig) -> None:
        self.cfg = cfg.cpu
        self.cap = 1.0
        self.state = "ok"
        self._stops: deque[float] = deque()
        self._lost_since: float | None = None
        self._lost = False

    def thresholds(self, ctx: Context) -> dict[str, float]:
        crit = ctx.inputs.cpu_critical_c
        if crit is None or not 40.0 <= crit <= 150.0:  # absent, or a sensor's nonsense value
            crit = self.cfg.critical_c
        reduce = crit - self.cfg.reduce_margin_k
        return {
            "critical_c": crit, "reduce_c": reduce, "stop_c": crit - self.cfg.stop_margin_k,
            "resume_c": reduce - self.cfg.resume_hysteresis_k,
        }

    def evaluate(self, now: float, ctx: Context) -> CheckResult:
        cfg = self.cfg
        if not ctx.board_configured:
            return _NO_SENSOR
        temp = ctx.board_c
        events: list[SafetyEvent] = []
        if temp is None:
            if self._lost_since is None:
                self._lost_since = now
            if not self._lost and now - self._lost_since >= cfg.sensor_lost_s:
                self._lost = True
                events.append(SafetyEvent(
                    now, self.name, "trip",
                    f"no CPU temperature for {now - self._lost_since:.0f} s: heat capped at "
                    f"{cfg.sensor_lost_cap:.0%} until one is read again",
                    {"cpu_c": None}, {"sensor_lost_s": cfg.sensor_lost_s,
                                      "cap": cfg.sensor_lost_cap},
                ))
            latched = self.state == "latched"
            limit = {"stopped": NO_HEAT, "latched": 0.0}.get(self.state, self.cap)
            if self._lost:
                limit = min(limit, cfg.sensor_lost_cap)
            return CheckResult(limit, latched=latched, events=tuple(events),
                               state="sensor-lost" if self._lost else self.state)
        self._lost_since = None
        if self._lost:
            self._lost = False
            events.append(SafetyEvent(
                now, self.name, "reset", f"CPU temperature readable again ({temp:.1f} °C)",
                {"cpu_c": temp}, {},
            ))
        th = self.thresholds(ctx)
        values: dict[str, float | str | None] = {"cpu_c": temp}
        if self.state == "latched":
            return CheckResult(0.0, latched=True, events=tuple(events), state="latched")
        if temp >= th["stop_c"]:
            if self.state != "stopped":
                self._stops.append(now)
                while self._stops and self._stops[0] < now - cfg.latch_window_s:
                    self._stops.popleft()
                latch = len(self._stops) >= cfg.latch_after_stops
                self.state = "latched" if latch else "stopped"
                why = (f"; {len(self._stops)} stops within {cfg.latch_window_s:g} s: workers "
                       "stopped and latched until a person resets it") if latch else (
                       f" (workers paused); resumes below {th['resume_c']:.1f} °C")
                events.append(SafetyEvent(
                    now, self.name, "trip",
                    f"CPU at {temp:.1f} °C reached the stop threshold {th['stop_c']:.1f} °C "
                    f"(critical {th['critical_c']:.1f} °C): all compute stopped{why}",
                    values, th, latched=latch,
                ))
            latched = self.state == "latched"
            return CheckResult(0.0 if latched else NO_HEAT, latched=latched,
                               events=tuple(events), state=self.state)
        if self.state == "stopped":
            if temp > th["resume_c"]:
                return CheckResult(NO_HEAT, events=tuple(events), state="stopped")
            self.state = "reducing"
            self.cap = cfg.resume_cap
            events.append(SafetyEvent(
                now, self.name, "reset",
                f"CPU cooled to {temp:.1f} °C (resume at {th['resume_c']:.1f} °C): compute "
                f"resumes, capped at {self.cap:.0%} and rising",
                values, th,
            ))
            return CheckResult(self.cap, events=tuple(events), state=self.state)
        dt = min(max(ctx.dt, 0.0), 60.0)  # a long gap must not move the cap in one jump
        if temp > th["reduce_c"]:
            if self.state == "ok":
                self.state = "reducing"
                self.cap = min(1.0, max(ctx.inputs.demand, NO_HEAT))
                events.append(SafetyEvent(
                    now, self.name, "trip",
                    f"CPU at {temp:.1f} °C is above {th['reduce_c']:.1f} °C "
                    f"(critical {th['critical_c']:.1f} °C): heat capped, falling "
                    f"{cfg.reduce_rate_per_s:.1%}/s while it stays above",
                    values, th,
                ))
            self.cap = max(NO_HEAT, self.cap - cfg.reduce_rate_per_s * dt)
        elif (self.state == "reducing" and temp <= th["reduce_c"] - self._HOLD_BAND_K
              and ctx.inputs.demand >= self.cap - 0.02):
            self.cap = min(1.0, self.cap + cfg.recover_rate_per_s * dt)
            if self.cap >= 1.0:
                self.state = "ok"
                events.append(SafetyEvent(
                    now, self.name, "reset",
                    f"CPU at {temp:.1f} °C, cap back to full", values, th,
                ))
        limit = self.cap if self.state == "reducing" else 1.0
        if self._lost:
            limit = min(limit, cfg.sensor_lost_cap)
        return CheckResult(limit, events=tuple(events), state=self.state)

    def reset(self, now: float) -> tuple[SafetyEvent, ...]:
        if self.state != "latched":
            return ()
        self.state = "stopped"  # resumes through the normal hysteresis, never straight to full
        self._stops.clear()
        return (SafetyEvent(now, self.name, "reset",
                            "latched CPU stop reset by a person; compute resumes once the CPU "
                            "is below the resume threshold", {}, {}),)


# ----------------------------------------------------------------------------------------
class OverTemperatureCheck:
    """A temperature at or above a limit: no heat (workers paused) until it is
    ``hysteresis_k`` below. Used for the room (its trusted fused temperature, whatever the
    mode) and for the exhaust/surface sensor where one is fitted.

    A sensor lost while tripped keeps the trip (a room last seen too hot must not get the
    failsafe's held heat) for ``unknown_release_s``; then the trip ends with an event, so
    that the failsafe's frost protection from the board can act in a house gone cold.
    """

    def __init__(self, name: str, source: str, max_c: float, hysteresis_k: float,
                 unknown_release_s: float) -> None:
        self.name = name
        self.source = source  # "room" or "exhaust"
        self.max_c = max_c
        self.hysteresis_k = hysteresis_k
        self.unknown_release_s = unknown_release_s
        self.tripped = False
        self._unknown_since: float | None = None

    def evaluate(self, now: float, ctx: Context) -> CheckResult:
        temp = ctx.room.temperature_c if self.source == "room" else ctx.exhaust_c
        if temp is None:
            if not self.tripped:
                return _NO_SENSOR
            if self._unknown_since is None:
                self._unknown_since = now
            if now - self._unknown_since < self.unknown_release_s:
                return CheckResult(NO_HEAT, state="tripped")
            self.tripped = False
            return CheckResult(events=(SafetyEvent(
                now, self.name, "reset",
                f"{self.source} temperature unknown for {now - self._unknown_since:.0f} s "
                "since the trip: released, the failsafe ladder decides",
                {f"{self.source}_c": None}, {"unknown_release_s": self.unknown_release_s},
            ),), state="no-sensor")
        self._unknown_since = None
        th = {"max_c": self.max_c, "reset_c": self.max_c - self.hysteresis_k}
        if not self.tripped and temp >= self.max_c:
            self.tripped = True
            return CheckResult(NO_HEAT, events=(SafetyEvent(
                now, self.name, "trip",
                f"{self.source} at {temp:.2f} °C reached its limit {self.max_c:g} °C: no heat "
                f"until it is below {th['reset_c']:g} °C", {f"{self.source}_c": temp}, th,
            ),), state="tripped")
        if self.tripped and temp <= th["reset_c"]:
            self.tripped = False
            return CheckResult(events=(SafetyEvent(
                now, self.name, "reset",
                f"{self.source} back to {temp:.2f} °C (reset at {th['reset_c']:g} °C): heat "
                "allowed again", {f"{self.source}_c": temp}, th,
            ),))
        return CheckResult(NO_HEAT, state="tripped") if self.tripped else _OK


# ----------------------------------------------------------------------------------------
class FrostCheck:
    """Keeps the room above ``frost_c`` in every mode, ``off`` included, while a trusted room
    sensor works: below it the demand is at least ``demand`` until the room is
    ``hysteresis_k`` above. Without a room sensor the failsafe ladder protects from the
    board's temperature instead."""

    name = "frost"

    def __init__(self, cfg: SafetyConfig) -> None:
        self.cfg = cfg.frost
        self.active = False

    def evaluate(self, now: float, ctx: Context) -> CheckResult:
        cfg = self.cfg
        temp = ctx.room.temperature_c
        if not cfg.enabled:
            return CheckResult(state="disabled")
        if temp is None:
            self.active = False  # the ladder's board frost protection takes over
            return CheckResult(state="no-sensor")
        th = {"frost_c": cfg.frost_c, "reset_c": cfg.frost_c + cfg.hysteresis_k}
        if not self.active and temp < cfg.frost_c:
            self.active = True
            return CheckResult(force_demand=cfg.demand, events=(SafetyEvent(
                now, self.name, "trip",
                f"room at {temp:.2f} °C is below the frost limit {cfg.frost_c:g} °C: heating "
                f"at {cfg.demand:.0%} until {th['reset_c']:g} °C, whatever the mode",
                {"room_c": temp}, th,
            ),), state="heating")
        if self.active and temp >= th["reset_c"]:
            self.active = False
            return CheckResult(events=(SafetyEvent(
                now, self.name, "reset", f"room back to {temp:.2f} °C: frost protection ends",
                {"room_c": temp}, th,
            ),))
        return CheckResult(force_demand=cfg.demand, state="heating") if self.active else _OK


# ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class _SensorWatch:
    """What the heating check tracks for one room sensor."""

    # heater-not-heating, after Klipper's verify_heater: while heating hard far below the
    # target the reading must keep gaining; once it stops, the deficit adds up to a trip
    armed: bool = False
    relative: bool = False  # goal_c is above the outdoor temperature, not absolute
    goal_c: float = 0.0
    deadline: float = 0.0
    error_kh: float = 0.0
    cold: bool = False  # tripped: does not warm under heat
    # warming the radiator cannot explain: sliding minimum of the reading and maximum of the
    # demand over the window (monotonic queues: a tick costs O(1), not O(window))
    lows: deque[tuple[float, float]] = field(default_factory=deque)  # t, T; T ascending
    highs: deque[tuple[float, float]] = field(default_factory=deque)  # t, demand; descending
    seen_since: float | None = None
    warm: bool = False
    warm_clear_since: float | None = None
    # far from the other sensors' median (three or more room sensors)
    outlier_since: float | None = None
    outlier: bool = False
    # distrusted: left out of the room temperature until it agrees with the others again
    distrusted: bool = False
    agree_since: float | None = None


def gain_time_s(model: RoomModelConfig, gain_k: float) -> float:
    """How long a room may take to gain ``gain_k`` under hard heating before it counts as not
    warming: twice what the room model needs for it after a step of half the demand range
    (the room is not at rest when the check starts, and its walls soak up heat), plus the
    dead time, within 15 minutes and 3 hours."""
    step = 0.5 * model.gain_k
    if step <= gain_k:
        return 3 * 3600.0
    t = model.dead_time_s + 2.0 * model.tau_s * math.log(step / (step - gain_k))
    return min(3 * 3600.0, max(900.0, t))


class HeatingResponseCheck:
    """Heater-not-heating and sensor-misplaced detection for every room sensor.

    Three cues per sensor:

    - *does not warm* (heating hard, reading more than ``band_k`` below the target, no gain
      of ``gain_k`` within the gain time, then ``max_error_kh`` of deficit beyond the band):
      the sensor is outside, detached, or the window is open, or the heater does not heat;
    - *warms unexplained* (over ``window_s`` it rose ``unexplained_rise_k`` more than twice
      the room model's fastest warming at the most demand applied in that window): beside
      another heat source, or in the sun;
    - *outlier* (with three or more room sensors: ``outlier_k`` from the others' median for
      ``outlier_s``).

    Where other healthy room sensors do not show the cue, the sensor is the cause: it is
    distrusted (left out of the room temperature) and trusted again once it has agreed with
    the others within ``agree_k`` for ``agree_s``. Where every room sensor shows *does not
    warm*, the room itself does not warm: the heat is capped at what held the room before
    (the "holding demand", plus ``cap_margin``, within ``min_cap``..``max_cap``), because a
    sensor that cannot see the heat must never make the radiator heat without limit. That cap
    lifts when a sensor reads within ``band_k`` of the target again. *Warms unexplained* on
    every sensor (the sun on the room) is only reported: the sensors are right.
    """

    name = "heating"

    def __init__(self, cfg: SafetyConfig) -> None:
        self.cfg = cfg.heating
        self.model = cfg.room_model
        self.gain_time_s = self.cfg.gain_time_s or gain_time_s(self.model, self.cfg.gain_k)
        self.watches: dict[str, _SensorWatch] = {}
        self.holding = _Ewma(2 * 3600.0)  # demand that held the room at its target
        self.capped = False
        self._frost_only = False

    def set_model(self, model: RoomModelConfig) -> None:
        self.model = model
        self.gain_time_s = self.cfg.gain_time_s or gain_time_s(model, self.cfg.gain_k)

    def cap(self) -> float:
        cfg = self.cfg
        held = self.holding.value
        if self._frost_only:
            return cfg.min_cap
        if held is None:
            return cfg.max_cap
        return min(cfg.max_cap, max(cfg.min_cap, held * (1.0 + cfg.cap_margin) + 0.05))

    def evaluate(self, now: float, ctx: Context) -> CheckResult:
        cfg = self.cfg
        if not cfg.enabled:
            return _DISABLED
        events: list[SafetyEvent] = []
        target = ctx.target_c
        demand = ctx.inputs.demand
        watches = self.watches
        healthy: dict[str, float] = {}
        cues = False
        for name, r in ctx.room_readings.items():
            watch = watches.get(name)
            if watch is None:
                watch = watches[name] = _SensorWatch()
            temp = r.temperature_c
            if not r.ok or temp is None:
                cues = cues or watch.distrusted
                continue
            healthy[name] = temp
            event = self._unexplained(now, name, watch, temp, demand)  # (updates the lows)
            if event is not None:
                events.append(event)
            event = self._not_warming(now, ctx, name, watch, temp, target, demand)
            if event is not None:
                events.append(event)
            cues = cues or watch.cold or watch.warm or watch.distrusted
        if len(healthy) >= 3:
            for name, temp in healthy.items():
                self._outlier(now, watches[name], temp,
                              [t for n, t in healthy.items() if n != name])
                cues = cues or watches[name].outlier
        distrust = ctx.distrusted
        if cues:
            events += self._attribute(now, healthy)
            distrust = frozenset(n for n, w in watches.items() if w.distrusted)

        # the room-level cue: every trusted healthy room sensor does not warm
        trusted = [n for n in healthy if n not in distrust]
        # (no trusted sensor left to clear it: keep what was decided)
        room_cold = all(watches[n].cold for n in trusted) if trusted else self.capped
        room = ctx.trusted_room() if distrust != ctx.distrusted else ctx.room
        room_c = room.temperature_c
        if (not self.capped and room_c is not None and target is not None
                and abs(room_c - target) <= 0.5):
            self.holding.add(demand, ctx.dt)
        if room_cold != self.capped:
            # heat asked only by frost protection: what held the comfort target is too much
            self._frost_only = ctx.inputs.target_c is None
            events.append(self._room_event(now, room_cold, room_c, target))
        if not (self.capped or distrust or events or cues):
            return _OK
        states = []
        if self.capped:
            states.append("capped")
        if distrust:
            states.append("distrusting " + ",".join(sorted(distrust)))
        if any(w.warm for w in watches.values()):
            states.append("unexplained-warming")
        return CheckResult(self.cap() if self.capped else 1.0, events=tuple(events),
                           state="; ".join(states) or "ok", distrust=distrust)

    def _room_event(
        self, now: float, cold: bool, room_c: float | None, target: float | None
    ) -> SafetyEvent:
        cfg = self.cfg
        self.capped = cold
        if cold:
            cap = self.cap()
            return SafetyEvent(
                now, self.name, "trip",
                f"the room does not warm under heat (every room sensor more than {cfg.band_k:g} "
                f"K below the target, no gain of {cfg.gain_k:g} K in {self.gain_time_s:.0f} s): "
                f"window open, sensor outside or detached, or no heat; heat capped at {cap:.0%}"
                " (what held the room) until a sensor sees the heat again",
                {"room_c": room_c, "target_c": target, "cap": cap},
                {"band_k": cfg.band_k, "gain_k": cfg.gain_k, "gain_time_s": self.gain_time_s,
                 "max_error_kh": cfg.max_error_kh},
            )
        return SafetyEvent(
            now, self.name, "reset",
            f"a room sensor sees the heat again (room {_fmt(room_c)}): the heat cap is lifted",
            {"room_c": room_c, "target_c": target}, {"band_k": cfg.band_k},
        )

    def _attribute(self, now: float, healthy: dict[str, float]) -> list[SafetyEvent]:
        """A cue only some sensors show is those sensors' fault: distrust them; trust them
        again once they agree with the others."""
        cfg = self.cfg
        watches = self.watches
        events = []
        for name, watch in watches.items():
            temp = healthy.get(name)
            if temp is None:
                continue
            others = [n for n in healthy if n != name]
            if not watch.distrusted:
                cause = None
                if watch.cold and any(not watches[n].cold for n in others):
                    cause = "does not warm while the other room sensors do"
                elif watch.warm and any(not watches[n].warm for n in others):
                    cause = "warms faster than the radiator can explain while the other room " \
                            "sensors do not"
                elif watch.outlier:
                    cause = f"is more than {cfg.outlier_k:g} K from the other sensors' median"
                if cause is not None:
                    watch.distrusted = True
                    watch.agree_since = None
                    events.append(SafetyEvent(
                        now, self.name, "trip",
                        f"room sensor {name} {cause}: no longer used for the room "
                        f"temperature (misplaced: outside, detached, beside a heat source?)",
                        {"sensor": name, "sensor_c": temp}, {"agree_k": cfg.agree_k},
                    ))
                continue
            trusted_others = [healthy[n] for n in others if not watches[n].distrusted]
            # with nothing to compare with, its own cues decide
            agrees = not trusted_others or abs(temp - median(trusted_others)) <= cfg.agree_k
            if agrees and not (watch.cold or watch.warm or watch.outlier):
                if watch.agree_since is None:
                    watch.agree_since = now
                if now - watch.agree_since >= cfg.agree_s:
                    watch.distrusted = False
                    watch.agree_since = None
                    events.append(SafetyEvent(
                        now, self.name, "reset",
                        f"room sensor {name} agrees with the others again "
                        f"({cfg.agree_s:g} s within {cfg.agree_k:g} K): used again",
                        {"sensor": name, "sensor_c": temp}, {"agree_k": cfg.agree_k},
                    ))
            else:
                watch.agree_since = None
        return events

    def _not_warming(
        self, now: float, ctx: Context, name: str, w: _SensorWatch, temp: float,
        target: float | None, demand: float,
    ) -> SafetyEvent | None:
        cfg = self.cfg
        # it sees the heat again: near the target, or (a window closed, the heat came back)
        # warming twice the gain within the window, faster than weather moves a sensor outside
        near = target is None or temp >= target - cfg.band_k
        warming = w.cold and bool(w.lows) and temp - w.lows[0][1] >= 2.0 * cfg.gain_k
        if near or warming:
            w.armed = False
            w.error_kh = 0.0
            if w.cold:
                w.cold = False
                why = (f"within {cfg.band_k:g} K of the target" if near else
                       f"{temp - w.lows[0][1]:.2f} K warmer than {cfg.window_s:g} s ago")
                # the way back (a sensor brought in from outside) is no unexplained warming
                w.lows.clear()
                w.highs.clear()
                w.seen_since = None
                return SafetyEvent(now, self.name, "reset",
                                   f"room sensor {name} reads {temp:.2f} °C, {why}: it sees "
                                   "the heat again",
                                   {"sensor": name, "sensor_c": temp, "target_c": target},
                                   {"band_k": cfg.band_k})
            return None
        if target is None or demand < cfg.high_demand:
            w.armed = False  # not heating hard (capped, or not asked): nothing to judge
            return None
        # The gain is judged against the outdoor air where it is known: the morning sun warms a
        # sensor outside by most of a kelvin an hour, and that is not the radiator's heat.
        outdoor = ctx.inputs.outdoor_c
        level = temp if outdoor is None else temp - outdoor
        if not w.armed or w.relative != (outdoor is not None):
            w.armed, w.relative = True, outdoor is not None
            w.goal_c, w.deadline = level + cfg.gain_k, now + self.gain_time_s
            return None
        if level >= w.goal_c:
            w.goal_c, w.deadline = level + cfg.gain_k, now + self.gain_time_s
            w.error_kh = 0.0
            return None
        if now < w.deadline:
            return None
        w.error_kh += (target - cfg.band_k - temp) * ctx.dt / 3600.0
        if w.cold or w.error_kh < cfg.max_error_kh:
            return None
        w.cold = True
        return SafetyEvent(
            now, self.name, "notice",
            f"room sensor {name} does not warm: {temp:.2f} °C with target {target:.2f} °C under "
            f"{demand:.0%} demand, no gain of {cfg.gain_k:g} K in {self.gain_time_s:.0f} s",
            {"sensor": name, "sensor_c": temp, "target_c": target, "demand": demand,
             "error_kh": w.error_kh},
            {"band_k": cfg.band_k, "gain_k": cfg.gain_k, "gain_time_s": self.gain_time_s,
             "max_error_kh": cfg.max_error_kh},
        )

    def _unexplained(
        self, now: float, name: str, w: _SensorWatch, temp: float, demand: float
    ) -> SafetyEvent | None:
        cfg = self.cfg
        if w.seen_since is None:
            w.seen_since = now
        cutoff = now - cfg.window_s
        lows, highs = w.lows, w.highs
        while lows and lows[-1][1] >= temp:
            lows.pop()
        lows.append((now, temp))
        while lows[0][0] < cutoff:
            lows.popleft()
        while highs and highs[-1][1] <= demand:
            highs.pop()
        highs.append((now, demand))
        while highs[0][0] < cutoff:
            highs.popleft()
        if now - w.seen_since < 0.9 * cfg.window_s or w.cold:
            # not a full window yet; or a sensor that does not see the heat, whose way back
            # (brought in from outside) is no unexplained warming
            return None
        low = lows[0][1]
        most = highs[0][1]
        m = self.model
        # the most the radiator could add: the model's initial warming rate (its fastest)
        # for the most demand of the window, over the whole window, twice over for a model
        # that is only a default or was fitted around another working point
        explained = 2.0 * m.gain_k / m.tau_s * most * cfg.window_s
        rise = temp - low
        limit = explained + cfg.unexplained_rise_k
        if rise > limit:
            w.warm_clear_since = None
            if not w.warm:
                w.warm = True
                return SafetyEvent(
                    now, self.name, "notice",
                    f"room sensor {name} rose {rise:.2f} K in {cfg.window_s:g} s; the radiator "
                    f"explains at most {explained:.2f} K at {most:.0%} demand: another heat "
                    "source or the sun",
                    {"sensor": name, "sensor_c": temp, "rise_k": rise, "demand": most},
                    {"window_s": cfg.window_s, "explained_k": explained, "limit_k": limit},
                )
            return None
        if w.warm:
            if w.warm_clear_since is None:
                w.warm_clear_since = now
            if now - w.warm_clear_since >= cfg.window_s:
                w.warm = False
                w.warm_clear_since = None
                return SafetyEvent(now, self.name, "reset",
                                   f"room sensor {name} no longer warms unexplained",
                                   {"sensor": name, "sensor_c": temp},
                                   {"window_s": cfg.window_s, "limit_k": limit})
        return None

    def _outlier(self, now: float, w: _SensorWatch, temp: float, others: list[float]) -> None:
        cfg = self.cfg
        off = abs(temp - median(others))
        if off > cfg.outlier_k:
            if w.outlier_since is None:
                w.outlier_since = now
            w.outlier = now - w.outlier_since >= cfg.outlier_s
        else:
            w.outlier_since = None
            w.outlier = False

    def reset(self, now: float) -> tuple[SafetyEvent, ...]:
        return ()


# ----------------------------------------------------------------------------------------
LADDER = ("primary", "others", "hold", "safe")


class FailsafeLadder:
    """What the heat follows as room sensors fail, one step at a time, each with an event:

    0. ``primary``: the primary room sensor is healthy and trusted (with the others, fused);
    1. ``others``: it is not, but another trusted room sensor is: the room temperature comes
       from those;
    2. ``hold``: no trusted room sensor: the demand is held at what the room needed over the
       last ``hold_basis_s`` (at most ``hold_max_demand``) for at most ``hold_s``: a loose
       connector or a burst of bad CRCs is bridged without the room noticing;
    3. ``safe``: ``safe_demand`` (default none), with frost protection judged from the
       board's own temperature: with the CPUs idle the board sits a learned offset above the
       room, so a board below ``frost_c + offset`` heats in bursts of
       ``board_frost_burst_s``, each followed by ``board_settle_s`` idle to measure again.

    Steps down happen at once; a step up needs the better state for ``recover_s``.
    """

    name = "failsafe"

    def __init__(self, cfg: SafetyConfig) -> None:
        self.cfg = cfg.failsafe
        self.frost = cfg.frost
        self.step = 0
        self._better_since: float | None = None
        self._lost_at: float | None = None
        self.basis = _Ewma(self.cfg.hold_basis_s)
        self.offset = _Ewma(6 * 3600.0, self.cfg.board_idle_offset_k)
        self._idle_since: float | None = None
        self.board_phase = "watch"  # watch -> burst -> settle -> watch
        self._phase_until = 0.0
        self.hold_demand = 0.0

    def evaluate(self, now: float, ctx: Context) -> CheckResult:
        cfg = self.cfg
        demand = ctx.inputs.demand
        if demand <= IDLE_DEMAND:
            if self._idle_since is None:
                self._idle_since = now
        else:
            self._idle_since = None
        idle_long = self._idle_since is not None and now - self._idle_since >= cfg.board_settle_s
        names = list(ctx.room_readings)
        primary = cfg.primary if cfg.primary in ctx.room_readings else (names[0] if names else None)
        p = ctx.room_readings.get(primary) if primary is not None else None
        primary_ok = (p is not None and p.ok and p.temperature_c is not None
                      and primary not in ctx.distrusted)
        room_c = ctx.room.temperature_c
        if room_c is not None:
            self._lost_at = None
            self.basis.add(demand, ctx.dt)
            if ctx.board_c is not None and idle_long:
                self.offset.add(ctx.board_c - room_c, ctx.dt)
            wanted = 0 if primary_ok else 1
        else:
            if self._lost_at is None:
                self._lost_at = now
                self.hold_demand = min(cfg.hold_max_demand, self.basis.value or 0.0)
            wanted = 2 if now - self._lost_at < cfg.hold_s else 3

        events: list[SafetyEvent] = []
        values: dict[str, float | str | None] = {"primary": primary, "room_c": room_c,
                                                 "healthy_room_sensors": float(ctx.room.healthy)}
        if wanted > self.step:
            self._better_since = None
            old, self.step = self.step, wanted
            events.append(SafetyEvent(
                now, self.name, "step_down",
                f"room sensors: {LADDER[old]} -> {LADDER[wanted]}: " + self._describe(wanted),
                values, {"hold_s": cfg.hold_s, "hold_demand": self.hold_demand,
                         "safe_demand": cfg.safe_demand},
            ))
        elif wanted < self.step:
            if self._better_since is None:
                self._better_since = now
            if now - self._better_since >= cfg.recover_s:
                old, self.step = self.step, wanted
                self._better_since = None
                events.append(SafetyEvent(
                    now, self.name, "step_up",
                    f"room sensors: {LADDER[old]} -> {LADDER[wanted]}: " + self._describe(wanted),
                    values, {"recover_s": cfg.recover_s},
                ))
        else:
            self._better_since = None

        if room_c is not None:
            self.board_phase = "watch"
            return CheckResult(events=tuple(events), state=LADDER[self.step])
        if wanted == 2:
            return CheckResult(force_demand=self.hold_demand, events=tuple(events),
                               state="hold")
        force, board_events = self._board_frost(now, ctx, idle_long)
        events += board_events
        if cfg.safe_demand > 0:
            force = max(force or 0.0, cfg.safe_demand)
        return CheckResult(force_demand=force, events=tuple(events),
                           state="safe" + ("" if self.board_phase == "watch"
                                           else f" (board frost {self.board_phase})"))

    def _describe(self, step: int) -> str:
        cfg = self.cfg
        if step == 0:
            return "the primary room sensor is used"
        if step == 1:
            return "the room temperature comes from the other room sensors"
        if step == 2:
            return f"holding {self.hold_demand:.0%} demand for at most {cfg.hold_s:g} s"
        return (f"safe demand {cfg.safe_demand:.0%}, frost protection from the board "
                "temperature")

    def _board_frost(
        self, now: float, ctx: Context, idle_long: bool
    ) -> tuple[float | None, list[SafetyEvent]]:
        frost = self.frost
        if not frost.enabled:
            return None, []
        if self.board_phase == "burst":
            if now < self._phase_until:
                return frost.demand, []
            self.board_phase = "settle"
        if self.board_phase == "settle":
            if not idle_long:
                return None, []
            self.board_phase = "watch"
        board = ctx.board_c
        offset = self.offset.value if self.offset.value is not None \
            else self.cfg.board_idle_offset_k
        if board is None or not idle_long or board - offset >= frost.frost_c:
            return None, []
        self.board_phase = "burst"
        self._phase_until = now + self.cfg.board_frost_burst_s
        return frost.demand, [SafetyEvent(
            now, self.name, "notice",
            f"no room sensor; the idle board at {board:.1f} °C puts the room near "
            f"{board - offset:.1f} °C, below the frost limit {frost.frost_c:g} °C: heating "
            f"{self.cfg.board_frost_burst_s:g} s at {frost.demand:.0%}",
            {"board_c": board, "room_estimate_c": board - offset, "offset_k": offset},
            {"frost_c": frost.frost_c, "burst_s": self.cfg.board_frost_burst_s},
        )]

    def reset(self, now: float) -> tuple[SafetyEvent, ...]:
        return ()
