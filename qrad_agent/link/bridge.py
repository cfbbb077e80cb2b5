"""Between the fleet link and the agent: applies validated commands, reports state,
telemetry and events. Runs in the control loop, like everything that touches the agent.

Call :meth:`LinkBridge.start` once, then :meth:`LinkBridge.service` every loop turn (with the
decision ``agent.service`` returned, if any), and :meth:`LinkBridge.stop` at the end.

Command semantics
-----------------
- ``setpoint {target_c, duration_s?}``: the temperature wanted now. With ``duration_s``, an
  override for that long. Without: in ``auto``, an override until the schedule next changes
  (the next comfort start or end), like a programmable thermostat's "hold until next
  program"; in a fixed mode (``comfort``, ``eco``, ``frost``, ``boost``) that mode's
  setpoint changes for good (through the config overlay, revisioned and persisted), and an
  override in force is cleared so the new value is felt. In ``off``: refused.
- ``mode {mode}``: ``controller.set_mode`` (which clears an override); persisted, so a
  restart keeps the occupant's mode (``boost`` is not persisted: it is temporary, and a
  restart returns to the mode it would have returned to).
- ``schedule {periods}``: replaces ``thermostat.schedule`` through the config overlay.
- ``override {target_c, duration_s}`` or ``{cancel: true}``.
- ``config {patch, base_revision?}``: a JSON merge patch on the overlay, whitelisted keys
  only (:data:`PATCHABLE`); base config + new overlay are validated as a whole with
  ``parse_config``; persisted (durably) before being applied; revision + 1.
- ``drain`` / ``resume``: a persisted flag; the job scheduler takes no new work while set.
- ``identify {duration_s}``: calls the ``on_identify`` hook (LED, display) and shows
  ``identify_until`` in the state.

A command that fails changes nothing: each one is validated completely before its first
write, and the one multi-step change (config) rolls back on failure. After a command that
changes what the controller aims for, the agent decides again at once, so the ``state`` in
the ``ok`` result shows its effect.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from qrad_agent.agent import Agent
from qrad_agent.config import AgentConfig, ConfigError, parse_config
from qrad_agent.core.controller import Decision
from qrad_agent.core.models import Mode, Quality, Role
from qrad_agent.core.schedule import WeeklySchedule
from qrad_agent.core.thermostat import Thermostat
from qrad_agent.link.client import Command, FleetLink, python_version
from qrad_agent.link.messages import (
    CommandName,
    CommandResult,
    ConfigBody,
    DrainBody,
    EventKind,
    IdentifyBody,
    LeverMeta,
    Meta,
    ModeBody,
    OverrideBody,
    OverrideState,
    PlanSample,
    PowerSource,
    ResultStatus,
    ResumeBody,
    SafetyState,
    ScheduleBody,
    SensorInfo,
    SensorSample,
    SetpointBody,
    Setpoints,
    Severity,
    State,
    TelemetrySample,
)
from qrad_agent.store.db import StoreError

log = logging.getLogger("qrad_agent.link")

# What the fleet may change at run time. A patch touching anything else is refused whole.
PATCHABLE: tuple[str, ...] = (
    "thermostat.comfort_c",
    "thermostat.eco_c",
    "thermostat.frost_c",
    "thermostat.boost_c",
    "thermostat.boost_s",
    "thermostat.schedule",
    "thermostat.window",
    "thermostat.optimal_start",
    "pid.kp",
    "pid.ki",
    "pid.kd",
    "pid.d_filter_s",
    "pid.input_filter_s",
    "pid.feedforward_w_per_k",
    "allocator.min_on_s",
    "allocator.min_off_s",
    "allocator.stop_after_s",
)

KV_MODE = "mode"
KV_DRAINING = "draining"
SENSOR_EVENT_AFTER = 3  # consecutive polls in a new health state before it is an event
_FIXED_MODE_KEY = {Mode.COMFORT: "comfort_c", Mode.ECO: "eco_c", Mode.FROST: "frost_c",
                   Mode.BOOST: "boost_c"}


_SAFETY_KINDS = {
    "trip": (EventKind.SAFETY_TRIP, Severity.WARNING),
    "reset": (EventKind.SAFETY_CLEARED, Severity.INFO),
    "step_down": (EventKind.SAFETY_STEP, Severity.WARNING),
    "step_up": (EventKind.SAFETY_STEP, Severity.INFO),
    "notice": (EventKind.SAFETY_NOTICE, Severity.INFO),
}


class CommandFailed(Exception):
    """The command cannot be applied; ``str()`` says why and what would work. Raised before
    anything changed."""


class _ModeSetter(Protocol):
    def set_mode(self, mode: Mode, now: float) -> None: ...


# ------------------------------------------------------------------ config patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge recursively, ``null`` removes a member,
    anything else (lists included) replaces. Neither argument is modified."""
    if not isinstance(patch, Mapping):
        return patch
    out: dict[str, Any] = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def unpatchable(patch: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The key paths in ``patch`` that :data:`PATCHABLE` does not cover."""
    bad: list[str] = []
    for key, value in patch.items():
        path = f"{prefix}{key}"
        if path in PATCHABLE or any(path.startswith(p + ".") for p in PATCHABLE):
            continue
        if isinstance(value, Mapping) and value:
            bad.extend(unpatchable(value, path + "."))  # name the leaves, e.g. node.id
        else:
            bad.append(path)
    return bad


def config_with_overlay(base: AgentConfig, overlay: Mapping[str, Any]) -> AgentConfig:
    """``base`` with the fleet's overlay applied, validated as a whole (raises ConfigError).

    Only what the file set explicitly is taken from ``base``, so the result is what the
    file plus the overlay would give if they were one file."""
    data = merge_patch(base.model_dump(mode="json", exclude_unset=True), overlay)
    return parse_config(data, "config overlay")


# ------------------------------------------------------------------ the bridge


class LinkBridge:
    def __init__(
        self,
        agent: Agent,
        link: FleetLink,
        *,
        base_cfg: AgentConfig | None = None,
        on_identify: Callable[[float], None] | None = None,
    ) -> None:
        self.agent = agent
        self.link = link
        self.kv = link.kv
        self.base_cfg = base_cfg or agent.cfg
        self.on_identify = on_identify
        self.revision, self.overlay = self.kv.config_overlay()
        self.draining = bool(self.kv.get(KV_DRAINING, False))
        self.identify_until: float | None = None
        self.energy_wh = 0.0
        self._last_power: tuple[float, float] | None = None  # (now, watts)
        self._override_key: tuple[float, float] | None = None
        self._override_until = 0.0
        self._health: dict[str, tuple[bool, int]] = {}  # sensor -> (reported ok, streak)
        self._window = False
        self._mode: Mode | None = None
        self._safety_seen: object | None = None
        self._started = False

    # ============================================================ lifecycle

    def start(self, now: float, local: datetime) -> None:
        """Restore what the fleet set (overlay, mode, drain), publish meta and state, and
        start the link's network thread."""
        if self.overlay:
            try:
                self._apply_cfg(config_with_overlay(self.base_cfg, self.overlay))
            except ConfigError as exc:
                log.error("the fleet's config overlay (revision %d) no longer fits the config "
                          "file and is not applied: %s", self.revision, "; ".join(exc.problems))
                self.link.event(
                    EventKind.CONFIG_OVERLAY_INVALID,
                    f"config overlay revision {self.revision} not applied: "
                    + "; ".join(exc.problems),
                    Severity.WARNING, {"revision": self.revision},
                )
        stored_mode = self.kv.get(KV_MODE)
        setter = self._mode_setter()
        if stored_mode in {m.value for m in Mode} and setter is not None:
            setter.set_mode(Mode(stored_mode), now)
        self._mode = self._current_mode()
        self.link.set_meta(self.meta())
        self.link.set_state(self.state(now))
        self.link.event(EventKind.AGENT_STARTED, f"agent {self.link.version} started",
                        data={"boot": self.link.boot, "config_revision": self.revision})
        self.link.start()
        self._started = True

    def stop(self, timeout: float = 5.0) -> None:
        self.link.stop(timeout)

    def service(self, now: float, local: datetime, decision: Decision | None = None) -> None:
        """One loop turn: apply commands, report the decision (if one was made), publish
        what changed. Never raises: the loop's other work must go on."""
        try:
            for cmd in self.link.poll():
                self.link.reply(cmd, self.apply(cmd, now, local))
            if decision is not None:
                self._report(now, decision)
            self._observe()
            self.link.set_state(self.state(now))
            self.link.flush()
        except Exception:
            log.exception("fleet link service failed (control continues)")

    # ============================================================ commands

    def apply(self, cmd: Command, now: float, local: datetime) -> CommandResult:
        handlers: dict[str, Callable[[Any, float, datetime], bool]] = {
            CommandName.SETPOINT: self._setpoint,
            CommandName.MODE: self._set_mode,
            CommandName.SCHEDULE: self._schedule,
            CommandName.OVERRIDE: self._override,
            CommandName.CONFIG: self._config,
            CommandName.DRAIN: self._drain,
            CommandName.RESUME: self._resume,
            CommandName.IDENTIFY: self._identify,
        }
        try:
            redecide = handlers[cmd.name](cmd.body, now, local)
        except CommandFailed as exc:
            log.warning("command %s (%s) failed: %s", cmd.id, cmd.name, exc)
            return self.link.result(cmd, ResultStatus.ERROR, str(exc)[:500])
        except Exception as exc:
            log.exception("command %s (%s) failed unexpectedly", cmd.id, cmd.name)
            return self.link.result(cmd, ResultStatus.ERROR,
                                    f"internal error on the node: {exc}"[:500])
        log.info("command %s (%s) from %s applied", cmd.id, cmd.name, cmd.key)
        if redecide:
            try:
                decision = self.agent.tick(now, local)
                self._report(now, decision)
            except Exception:  # the command stands; the next regular tick decides
                log.exception("re-deciding after command %s failed", cmd.id)
        self._observe()
        state = self.state(now)
        self.link.set_state(state)
        return self.link.result(cmd, ResultStatus.OK, state=state)

    def _thermostat(self) -> Thermostat:
        th = getattr(self.agent.controller, "thermostat", None)
        if not isinstance(th, Thermostat):
            raise CommandFailed(
                f"controller {self.agent.controller.name!r} has no thermostat to command; "
                "run the agent's own controller"
            )
        return th

    def _mode_setter(self) -> _ModeSetter | None:
        ctl = self.agent.controller
        return ctl if callable(getattr(ctl, "set_mode", None)) else None  # type: ignore[return-value]

    def _current_mode(self) -> Mode:
        th = getattr(self.agent.controller, "thermostat", None)
        return th.mode if isinstance(th, Thermostat) else self.agent.cfg.thermostat.mode

    def _setpoint(self, body: SetpointBody, now: float, local: datetime) -> bool:
        th = self._thermostat()
        target = body.target_c
        if body.duration_s is not None:
            self._set_override(th, target, now, body.duration_s)
            return True
        mode = th.mode
        if mode is Mode.OFF:
            raise CommandFailed(
                "the radiator is off (mode off): a setpoint would have no effect; send a mode "
                "command first (or a setpoint with duration_s for a timed override)"
            )
        if mode is Mode.AUTO:
            change = WeeklySchedule(self.agent.cfg.thermostat.schedule).next_change(local)
            if change is not None:
                self._set_override(th, target, now, (change - local).total_seconds())
                return True
            # comfort around the clock, or never: the setpoint in force is the one to change
            key = "comfort_c" if self.agent.cfg.thermostat.schedule else "eco_c"
        else:
            key = _FIXED_MODE_KEY[mode]
        self._patch({"thermostat": {key: target}}, None, f"setpoint {key}")
        th.clear_override()
        return True

    def _set_override(self, th: Thermostat, target: float, now: float, duration: float) -> None:
        try:
            th.set_override(target, now, duration)
        except ValueError as exc:
            raise CommandFailed(str(exc)) from None
        self.link.event(EventKind.OVERRIDE_SET,
                        f"override {target:.1f} °C for {duration / 60:.0f} min",
                        data={"target_c": target, "duration_s": round(duration, 1)})

    def _set_mode(self, body: ModeBody, now: float, local: datetime) -> bool:
        setter = self._mode_setter()
        if setter is None:
            raise CommandFailed(
                f"controller {self.agent.controller.name!r} has no modes; run the agent's own "
                "controller"
            )
        if body.mode is not Mode.BOOST:
            try:
                self.kv.set(KV_MODE, body.mode.value)
            except StoreError as exc:
                raise CommandFailed(f"cannot persist the mode on this node: {exc}") from None
        setter.set_mode(body.mode, now)
        return True

    def _schedule(self, body: ScheduleBody, now: float, local: datetime) -> bool:
        periods = [p.model_dump(mode="json") for p in body.periods]
        self._patch({"thermostat": {"schedule": periods}}, None, "schedule")
        return True

    def _override(self, body: OverrideBody, now: float, local: datetime) -> bool:
        th = self._thermostat()
        if body.cancel:
            if th.override is not None:
                th.clear_override()
                self.link.event(EventKind.OVERRIDE_CLEARED, "override cancelled")
            return True
        assert body.target_c is not None and body.duration_s is not None  # the model says so
        self._set_override(th, body.target_c, now, body.duration_s)
        return True

    def _config(self, body: ConfigBody, now: float, local: datetime) -> bool:
        self._patch(body.patch, body.base_revision, "config")
        return True

    def _drain(self, body: DrainBody, now: float, local: datetime) -> bool:
        try:
            self.kv.set(KV_DRAINING, True)
        except StoreError as exc:
            raise CommandFailed(f"cannot persist the drain flag on this node: {exc}") from None
        if not self.draining:
            self.draining = True
            self.link.event(EventKind.DRAIN, "draining: no new jobs" + (
                f" ({body.reason})" if body.reason else ""), data={"reason": body.reason})
        return False

    def _resume(self, body: ResumeBody, now: float, local: datetime) -> bool:
        try:
            self.kv.set(KV_DRAINING, False)
        except StoreError as exc:
            raise CommandFailed(f"cannot persist the drain flag on this node: {exc}") from None
        if self.draining:
            self.draining = False
            self.link.event(EventKind.RESUME, "taking jobs again")
        return False

    def _identify(self, body: IdentifyBody, now: float, local: datetime) -> bool:
        if self.on_identify is not None:
            try:
                self.on_identify(body.duration_s)
            except Exception as exc:
                raise CommandFailed(f"this radiator could not identify itself: {exc}") from None
        self.identify_until = round(self.link.clock.wall() + body.duration_s, 1)
        self.link.event(EventKind.IDENTIFY, f"identify for {body.duration_s:.0f} s",
                        data={"duration_s": body.duration_s})
        return False

    # ============================================================ config overlay

    def _patch(self, patch: Mapping[str, Any], base_revision: int | None, what: str) -> None:
        bad = unpatchable(patch)
        if bad:
            raise CommandFailed(
                f"not changeable by the fleet: {', '.join(bad)}; allowed: "
                f"{', '.join(PATCHABLE)}"
            )
        if base_revision is not None and base_revision != self.revision:
            raise CommandFailed(
                f"the config changed since revision {base_revision}: it is at revision "
                f"{self.revision} now; read the state and patch again"
            )
        overlay = merge_patch(self.overlay, patch)
        try:
            new_cfg = config_with_overlay(self.base_cfg, overlay)
        except ConfigError as exc:
            raise CommandFailed("invalid config: " + "; ".join(exc.problems)) from None
        revision = self.revision + 1
        try:
            self.kv.set_config_overlay(revision, overlay)
        except StoreError as exc:
            raise CommandFailed(f"cannot persist the config on this node: {exc}") from None
        old = self.agent.cfg
        try:
            self._apply_cfg(new_cfg)
        except Exception as exc:
            self._apply_cfg(old)
            try:
                self.kv.set_config_overlay(self.revision, self.overlay)
            except StoreError:
                log.error("could not restore config overlay revision %d", self.revision)
            raise CommandFailed(f"the new config could not be applied: {exc}") from None
        self.revision, self.overlay = revision, overlay
        self.link.event(
            EventKind.SCHEDULE_CHANGED if what == "schedule" else
            EventKind.SETPOINT_CHANGED if what.startswith("setpoint") else
            EventKind.CONFIG_CHANGED,
            f"{what}: config revision {revision}",
            data={"revision": revision, "keys": ",".join(sorted(_leaves(patch)))[:400]},
        )

    def _apply_cfg(self, new: AgentConfig) -> None:
        """Put ``new`` into the running controller, section by section, only where changed."""
        old = self.agent.cfg
        ctl = self.agent.controller
        th = getattr(ctl, "thermostat", None)
        if isinstance(th, Thermostat) and new.thermostat != old.thermostat:
            th.reconfigure(new.thermostat)
        pid = getattr(ctl, "pid", None)
        set_gains = getattr(pid, "set_gains", None)
        if callable(set_gains) and new.pid != old.pid:
            set_gains(new.pid.kp, new.pid.ki, new.pid.kd, new.pid.d_filter_s)
        if hasattr(ctl, "cfg"):
            ctl.cfg = new
        ctl.allocator.cfg = new.allocator
        self.agent.cfg = new

    # ============================================================ what the fleet sees

    def meta(self) -> Meta:
        agent = self.agent
        alloc = agent.controller.allocator
        return Meta(
            node=self.link.node_id,
            boot=self.link.boot,
            at=self.link.clock.wall(),
            version=self.link.version,
            python=python_version(),
            sensors=[SensorInfo(name=s.name, kind=s.kind, role=s.role) for s in agent.cfg.sensors],
            levers=[
                LeverMeta(name=i.name, available=i.available, why_not=i.why_not,
                          range=json.loads(json.dumps(i.range, default=str)))
                for i in agent.inventory
            ],
            slots=alloc.n_max,
            max_power_w=round(alloc.model.max_w(alloc.n_max), 1),
            commands=list(CommandName),
            telemetry_period_s=self.link.cfg.telemetry.period_s,
            signed_commands=self.link.verifier.require_signed,
            home_assistant=self.link.cfg.home_assistant.enabled,
        )

    def state(self, now: float) -> State:
        cfg = self.agent.cfg.thermostat
        d = self.agent.stats.last_decision
        th = getattr(self.agent.controller, "thermostat", None)
        override = None
        if isinstance(th, Thermostat) and th.override is not None and th.override[1] > now:
            ov = th.override
            if ov != self._override_key:
                # the override runs on the monotonic clock; its wall-clock end is computed
                # once so the state does not change every tick by clock jitter
                self._override_key = ov
                self._override_until = round(self.link.clock.wall() + (ov[1] - now))
            override = OverrideState(target_c=ov[0], until=self._override_until)
        wall = self.link.clock.wall()
        if self.identify_until is not None and self.identify_until <= wall:
            self.identify_until = None
        return State(
            node=self.link.node_id,
            boot=self.link.boot,
            at=wall,
            mode=self._current_mode(),
            target_c=_temp(d.target_c) if d else None,
            reason=d.reason if d else None,
            setpoints=Setpoints(comfort_c=cfg.comfort_c, eco_c=cfg.eco_c, frost_c=cfg.frost_c,
                                boost_c=cfg.boost_c),
            override=override,
            schedule=list(cfg.schedule),
            config_revision=self.revision,
            draining=self.draining,
            identify_until=self.identify_until,
            safety=self._safety(),
        )

    def _safety(self) -> SafetyState:
        verdict = getattr(self.agent.stats, "last_verdict", None)
        if verdict is None:
            return SafetyState()
        limit = float(getattr(verdict, "limit", 1.0))
        states = getattr(verdict, "states", {}) or {}
        reasons = [f"{check}: {st}" for check, st in sorted(states.items()) if st != "ok"]
        if limit <= 0:
            state = "stopped"
        elif getattr(verdict, "latched", False):
            state = "latched"
        elif limit < 1.0:
            state = "limited"
        elif getattr(verdict, "force_demand", None):
            state = "forced"
        else:
            state = "normal"
        return SafetyState(state=state, reasons=[r[:500] for r in reasons[:20]])

    def sample(self, now: float, decision: Decision) -> TelemetrySample:
        agent = self.agent
        room = agent.stats.last_room
        sensors: dict[str, SensorSample] = {}
        board: list[float] = []
        for name, r in agent.readings.items():
            t = _temp(r.temperature_c)
            sensors[name] = SensorSample(
                quality=r.quality, temperature_c=t,
                humidity_pct=_within(r.humidity_pct, 0, 100),
                co2_ppm=_within(r.co2_ppm, 0, 100000),
            )
            if r.role is Role.BOARD and r.quality is Quality.OK and t is not None:
                board.append(t)
        plan = decision.plan
        status = agent.status()
        measured = status.get("power_w")
        if isinstance(measured, int | float) and math.isfinite(measured) and measured >= 0:
            power = float(measured)
            try:
                source = PowerSource(status.get("power_source", "meter"))
            except ValueError:
                source = PowerSource.METER
        else:
            power = agent.controller.allocator.model.watts(plan)
            source = PowerSource.MODEL
        if self._last_power is not None:
            t0, w0 = self._last_power
            self.energy_wh += w0 * max(0.0, now - t0) / 3600.0
        self._last_power = (now, power)
        try:
            outdoor = _temp(agent.outdoor())
        except Exception:
            outdoor = None
        return TelemetrySample(
            at=round(self.link.clock.wall(), 3),
            room_c=_temp(room.temperature_c),
            room_sensors_ok=room.healthy,
            humidity_pct=_within(room.humidity_pct, 0, 100),
            co2_ppm=_within(room.co2_ppm, 0, 100000),
            board_c=max(board) if board else None,
            outdoor_c=outdoor,
            target_c=_temp(decision.target_c),
            mode=self._current_mode(),
            reason=decision.reason,
            demand=round(min(1.0, max(0.0, decision.demand)), 4),
            plan=PlanSample(slots=max(0, plan.slots), freq_khz=max(0, plan.freq_khz),
                            quota=round(min(1.0, max(0.0, plan.quota)), 4)),
            power_w=round(power, 2),
            power_source=source,
            energy_wh=round(self.energy_wh, 3),
            safety=self._safety().state,
            sensors=sensors or None,
        )

    def _report(self, now: float, decision: Decision) -> None:
        try:
            sample = self.sample(now, decision)
        except Exception:
            log.exception("telemetry sample not built (control continues)")
            return
        self.link.add_sample(sample)

    def _observe(self) -> None:
        """Turn changes the agent made on its own into events: mode (a boost ending), window,
        sensor health, safety."""
        mode = self._current_mode()
        if self._mode is not None and mode is not self._mode:
            self.link.event(EventKind.MODE_CHANGED, f"mode {self._mode.value} -> {mode.value}",
                            data={"from": self._mode.value, "to": mode.value})
        self._mode = mode
        d = self.agent.stats.last_decision
        window = d is not None and d.reason == "window"
        if window != self._window:
            self._window = window
            if window:
                self.link.event(EventKind.WINDOW_OPEN, "window open: heating paused")
            else:
                self.link.event(EventKind.WINDOW_CLOSED, "window closed: heating resumes")
        for name, r in self.agent.readings.items():
            ok = r.quality is Quality.OK
            reported, streak = self._health.get(name, (True, 0))
            streak = streak + 1 if ok != reported else 0
            if streak >= SENSOR_EVENT_AFTER:
                reported, streak = ok, 0
                if ok:
                    self.link.event(EventKind.SENSOR_RECOVERED, f"sensor {name} is healthy again",
                                    data={"sensor": name})
                else:
                    self.link.event(EventKind.SENSOR_FAULT,
                                    f"sensor {name}: {r.quality.value} {r.detail}".strip(),
                                    Severity.WARNING,
                                    data={"sensor": name, "quality": r.quality.value})
            self._health[name] = (reported, streak)
        self._forward_safety_events()

    def _forward_safety_events(self) -> None:
        events = getattr(self.agent, "events", None)
        if not events:
            return
        items = list(events)
        start = 0
        if self._safety_seen is not None:
            for i in range(len(items) - 1, -1, -1):
                if items[i] is self._safety_seen:
                    start = i + 1
                    break
        for ev in items[start:]:
            kind = getattr(ev, "kind", "notice")
            check = str(getattr(ev, "check", "safety"))
            latched = bool(getattr(ev, "latched", False))
            data: dict[str, str | int | float | bool | None] = {"check": check,
                                                                "latched": latched}
            for k, v in dict(getattr(ev, "values", {}) or {}).items():
                if isinstance(v, str | int | float) and not (isinstance(v, float)
                                                             and not math.isfinite(v)):
                    data[f"value.{k}"] = v
            event_kind, severity = _SAFETY_KINDS.get(kind, (EventKind.SAFETY_NOTICE,
                                                            Severity.INFO))
            if latched:
                severity = Severity.CRITICAL
            self.link.event(event_kind, f"{check} {kind}: {getattr(ev, 'reason', '')}",
                            severity, data)
        if items:
            self._safety_seen = items[-1]


def _temp(x: float | None) -> float | None:
    return _within(x, -60.0, 150.0)


def _within(x: float | None, lo: float, hi: float) -> float | None:
    if x is None or not isinstance(x, int | float) or not math.isfinite(x) or not lo <= x <= hi:
        return None
    return round(float(x), 3)


def _leaves(patch: Mapping[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for k, v in patch.items():
        if isinstance(v, Mapping) and v:
            out.extend(_leaves(v, f"{prefix}{k}."))
        else:
            out.append(f"{prefix}{k}")
    return out
