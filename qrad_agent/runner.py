"""Runs the agent in real time (on the board, or on the simulated radiator at ``speed``x), and
gives it the life of a service.

``run_realtime`` is the loop. ``run_service`` wraps it in what a long-lived daemon needs:

- **systemd** (``ops/notify.py``): ``READY=1`` after the first successful control tick;
  ``WATCHDOG=1`` only while ticks come on time (a stalled or failing loop stops the
  keep-alives and systemd restarts the service; the levers' restore record puts the board
  back at low power on the next start); ``STATUS=`` a one-line summary; ``STOPPING=1``.
- **signals**: SIGTERM/SIGINT end the loop; the levers are restored (``agent.stop()``) within
  ``ops.stop_timeout_s`` or the process exits anyway. SIGHUP reloads the config file: an
  invalid file is refused whole and the running config kept; a valid one is applied where it
  can change at run time (thermostat, PID gains, allocator), and the rest is named as needing
  a restart.
- **status** (``ops/status_server.py``, ``ops/metrics.py``): after its beats the loop
  publishes a snapshot that the socket and metrics threads serve; they never touch the agent.

Signal handlers only set flags and write a byte to a pipe the loop waits on: a handler that
took a lock (as ``threading.Event.set`` does) could deadlock against the main thread it
interrupts, which may be holding that very lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from qrad_agent import __version__
from qrad_agent.agent import Agent
from qrad_agent.config import AgentConfig, ConfigError, load_config
from qrad_agent.core.controller import Decision
from qrad_agent.ops.logging import event
from qrad_agent.ops.notify import Notifier
from qrad_agent.ops.settings import OpsConfig
from qrad_agent.ops.status_server import SNAPSHOT_VERSION, SnapshotBox, StatusServer, agent_view

if TYPE_CHECKING:
    from qrad_agent.ops.metrics import MetricsServer
    from qrad_agent.sim.world import SimWorld

log = logging.getLogger("qrad_agent")

EXIT_OK = 0
EXIT_FAILED = 1  # the loop gave up (no successful tick for ops.give_up_after_s)
EXIT_STOP_OVERRUN = 70  # restoring the levers took longer than ops.stop_timeout_s
PUBLISH_EVERY_S = 0.2  # snapshots at most this often: at 600x a tick comes every few ms
STATUS_EVERY_S = 5.0  # STATUS= lines at most this often unless the state changes
ERROR_REPEAT_S = 60.0  # the same tick failure is logged again after this long
RETRY_AFTER_FAILURE_S = 1.0  # a failed beat is tried again after this long (real time)
EVENTS_SHOWN = 50  # events in each snapshot

# after each beat: (now, local time, the decision if the beat made one)
BeatHook = Callable[[float, datetime, Decision | None], None]


class StopFlag:
    """Set by SIGTERM/SIGINT (or ``request``); counts SIGHUPs. The loop waits on it."""

    def __init__(self) -> None:
        self.event = threading.Event()  # kept for callers that wait on it from other threads
        self.signal_name = ""
        self._requested = False  # written by handlers: plain attributes only
        self._hups = 0
        self._hups_taken = 0
        self._stopping = False
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self, reload: bool = True) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)
        if reload:
            signal.signal(signal.SIGHUP, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._hups += 1
        else:
            if not self.signal_name:
                self.signal_name = signal.Signals(signum).name
            self._requested = True
        self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe already wakes the loop
            os.write(self._wfd, b"\0")

    def wake(self) -> None:
        """End the loop's current wait without stopping it (a command arrived), any thread."""
        self._poke()

    def request(self, why: str = "") -> None:
        """Ask the loop to stop, from any thread."""
        if why and not self.signal_name:
            self.signal_name = why
        self._requested = True
        self.event.set()
        self._poke()

    def is_set(self) -> bool:
        return self._requested or self.event.is_set()

    def wait(self, timeout: float, also: Sequence[int] = ()) -> None:
        """Sleep up to ``timeout`` s; a signal or ``request`` ends the wait at once, and so
        does any of the descriptors ``also`` becoming readable (a job ended)."""
        if not self.is_set():
            with contextlib.suppress(InterruptedError):
                select.select([self._rfd, *also], [], [], max(0.0, timeout))
        with contextlib.suppress(OSError):
            while os.read(self._rfd, 512):
                pass
        if self._requested:
            self.event.set()

    def take_reload(self) -> bool:
        """Whether a SIGHUP came since the last call (several count as one reload)."""
        if self._hups == self._hups_taken:
            return False
        self._hups_taken = self._hups
        return True


# -- config reload ------------------------------------------------------------------------------

# Sections the running controller takes without a restart, and how.
RUNTIME_SECTIONS = ("thermostat", "pid", "allocator")


@dataclass
class ReloadResult:
    ok: bool
    applied: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "applied": self.applied, "restart_needed": self.restart_needed,
                "problems": self.problems}


class Reloader:
    """Reads the config file again. ``adapt`` makes it what the running agent was built from
    (``run --sim`` lays the scenario's room and setpoints over the file)."""

    def __init__(
        self, path: Path | str | None,
        adapt: Callable[[AgentConfig], AgentConfig] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.adapt = adapt

    def load(self) -> AgentConfig:
        if self.path is None:
            raise ConfigError("(no file)", [
                "the agent was started without a config file (-c): there is nothing to "
                "reload; restart it with -c FILE"])
        cfg = load_config(self.path)
        return self.adapt(cfg) if self.adapt is not None else cfg


def apply_config(agent: Agent, new: AgentConfig) -> tuple[list[str], list[str]]:
    """Put the run-time changeable sections of ``new`` into the running agent.

    Returns (sections applied, sections changed that need a restart). Sections that need a
    restart keep their running values, so ``agent.cfg`` always describes what runs.
    """
    from qrad_agent.core.thermostat import Thermostat

    old = agent.cfg
    ctl = agent.controller
    applied: list[str] = []
    restart: list[str] = []
    updates: dict[str, Any] = {}
    for name in type(old).model_fields:
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        thermostat = getattr(ctl, "thermostat", None)
        set_gains = getattr(getattr(ctl, "pid", None), "set_gains", None)
        if name == "thermostat" and isinstance(thermostat, Thermostat):
            thermostat.reconfigure(after)
        elif name == "pid" and callable(set_gains):
            set_gains(after.kp, after.ki, after.kd, after.d_filter_s)
        elif name == "allocator" and after.slots == before.slots:
            # the slot count sizes the allocator and the levers: that part needs a restart
            ctl.allocator.cfg = after
        else:
            restart.append(name)
            continue
        applied.append(name)
        updates[name] = after
    merged = old.model_copy(update=updates)
    if hasattr(ctl, "cfg"):
        ctl.cfg = merged  # input filter and feed-forward are read from here at each tick
    agent.cfg = merged
    return applied, restart


# -- the service around the loop ---------------------------------------------------------------


class LoopGaveUp(Exception):
    """No control tick succeeded for ``ops.give_up_after_s``: exit, to be restarted."""


class EventLog:
    """Recent events for ``qrad-agent events``: the agent's life and its safety events."""

    def __init__(self, kept: int) -> None:
        self.items: deque[dict[str, Any]] = deque(maxlen=kept)
        self.seq = 0

    def add(self, kind: str, message: str, source: str = "agent", **data: Any) -> None:
        self.seq += 1
        self.items.append({
            "seq": self.seq,
            "at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "source": source, "kind": kind, "message": message,
            **({"data": data} if data else {}),
        })

    def recent(self, n: int) -> list[dict[str, Any]]:
        return list(self.items)[-n:]


class Lifecycle:
    """What turns the loop into a service; the loop calls it, in the loop's thread."""

    def __init__(
        self,
        agent: Agent,
        ops: OpsConfig,
        notifier: Notifier | None = None,
        reloader: Reloader | None = None,
        *,
        world: SimWorld | None = None,
        speed: float = 1.0,
        simulated: bool = False,
        on_overrun: Callable[[], None] | None = None,
        after_stop: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.agent = agent
        self.ops = ops
        self.notifier = notifier or Notifier()
        self.reloader = reloader or Reloader(None)
        self.world = world
        self.speed = speed if world is not None else 1.0
        self.simulated = simulated
        self.on_overrun = on_overrun or (lambda: os._exit(EXIT_STOP_OVERRUN))
        self.after_stop = list(after_stop)
        self.box = SnapshotBox()
        self.events = EventLog(ops.events_kept)
        self.state = "starting"
        self.started_mono = time.monotonic()
        self.started_wall = datetime.now().astimezone()
        self.ready = False
        self.healthy = False
        self.last_ok_tick: float | None = None  # real monotonic time of the last good tick
        self.tick_failures = 0
        self.failing_since: float | None = None
        self.last_error = ""
        self.reloads = 0
        self.reloads_refused = 0
        self.last_reload: dict[str, Any] | None = None
        self.loaded_at = self.started_wall.isoformat(timespec="seconds")
        self.watchdog_sent = 0
        self.final_levers: dict[str, Any] = {}
        self._ticks_seen = agent.stats.ticks
        self._polls_seen = agent.stats.polls
        self._last_publish = -1e9
        self._last_status = -1e9
        self._last_ping = -1e9
        self._last_logged: tuple[str, float] = ("", -1e9)
        self._last_safety: object | None = None
        self.events.add("started", f"qrad-agent {__version__} started", pid=os.getpid(),
                        simulated=simulated)

    # -- health ----------------------------------------------------------------------------
    @property
    def period_real_s(self) -> float:
        return self.agent.cfg.control.period_s / self.speed

    @property
    def late_after_s(self) -> float:
        """How long after the last good tick the loop counts as stalled (real seconds)."""
        return self.ops.stall_periods * self.period_real_s + self.ops.stall_grace_s

    def _healthy(self, now: float) -> bool:
        return self.last_ok_tick is not None and now - self.last_ok_tick <= self.late_after_s

    # -- called by the loop ------------------------------------------------------------------
    def service_failed(self, exc: Exception, now: float) -> None:
        """A beat raised. The loop goes on; health decides whether systemd steps in."""
        self.tick_failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.failing_since is None:
            self.failing_since = now
        text, at = self._last_logged
        if text != self.last_error or now - at >= ERROR_REPEAT_S:
            self._last_logged = (self.last_error, now)
            log.error("control beat failed (%d so far): %s", self.tick_failures,
                      "".join(traceback.format_exception(exc)).rstrip())
            self.events.add("tick_failed", self.last_error, failures=self.tick_failures)

    def after_turn(self, now: float, force: bool = False) -> None:
        stats = self.agent.stats
        ticked = stats.ticks != self._ticks_seen
        polled = stats.polls != self._polls_seen
        self._ticks_seen, self._polls_seen = stats.ticks, stats.polls
        if ticked:
            self.last_ok_tick = now
            self.failing_since = None
        was = self.healthy
        self.healthy = self._healthy(now)
        self._harvest_safety_events()
        changed = force
        if ticked and not self.ready:
            self.ready = True
            self.state = "running"
            self.events.add("ready", "first control tick done: the radiator is under control")
            event(log, logging.INFO, "ready", ticks=stats.ticks)
            self.notifier.ready(self.summary())
            self._last_status = now
            changed = True
        elif self.ready and was != self.healthy:
            changed = True
            if self.healthy:
                self.events.add("loop_recovered", "control ticks are on time again")
                log.warning("control loop recovered: ticks are on time again")
            else:
                self.events.add("loop_unhealthy", self.unhealthy_reason(now))
                log.error("control loop unhealthy: %s; watchdog keep-alives stop",
                          self.unhealthy_reason(now))
        interval = self.notifier.watchdog_s if self.ops.watchdog else None
        if self.healthy and interval and now - self._last_ping >= interval / 4:
            if self.notifier.watchdog():
                self.watchdog_sent += 1
            self._last_ping = now
        if changed or (now - self._last_status >= STATUS_EVERY_S and self.ready):
            self.notifier.status(self.summary())
            self._last_status = now
        if changed or ((ticked or polled) and now - self._last_publish >= PUBLISH_EVERY_S):
            self.publish(now)
        give_up = self.ops.give_up_after_s
        since = self.failing_since if self.ready else self.started_mono
        if give_up and since is not None and not self.healthy and now - since > give_up:
            raise LoopGaveUp(f"no successful control tick for {now - since:.0f} s "
                             f"(ops.give_up_after_s = {give_up:g}); last error: "
                             f"{self.last_error or 'none'}")

    def unhealthy_reason(self, now: float) -> str:
        if self.last_ok_tick is None:
            return "no control tick yet"
        why = f"no control tick for {now - self.last_ok_tick:.0f} s " \
              f"(allowed {self.late_after_s:.0f} s)"
        return f"{why}; last error: {self.last_error}" if self.last_error else why

    def _harvest_safety_events(self) -> None:
        events = getattr(self.agent, "events", None)
        if not events:
            return
        new = []
        for e in reversed(events):
            if e is self._last_safety:
                break
            new.append(e)
        if not new:
            return
        self._last_safety = events[-1]
        for e in reversed(new):
            as_dict = getattr(e, "as_dict", None)
            d = as_dict() if callable(as_dict) else {}
            kind = str(d.get("kind", "event"))
            self.events.add(kind, str(d.get("reason", e)), source="safety",
                            check=d.get("check"), latched=d.get("latched"))

    # -- reload ------------------------------------------------------------------------------
    def reload(self, now: float) -> ReloadResult:
        self.notifier.reloading()
        self.state = "reloading"
        source = str(self.reloader.path) if self.reloader.path else "(no file)"
        try:
            new = self.reloader.load()
        except ConfigError as exc:
            result = ReloadResult(False, problems=exc.problems)
        else:
            old = self.agent.cfg
            try:
                applied, restart = apply_config(self.agent, new)
                result = ReloadResult(True, applied, restart)
            except Exception as exc:  # a bug must not leave half a config in force
                log.exception("applying the reloaded config failed; putting the old one back")
                with contextlib.suppress(Exception):
                    apply_config(self.agent, old)
                result = ReloadResult(False, problems=[f"{type(exc).__name__}: {exc}"])
        self.state = "running" if self.ready else "starting"
        self.last_reload = {"at": datetime.now().astimezone().isoformat(timespec="seconds"),
                            "source": source, **result.as_dict()}
        if result.ok:
            self.reloads += 1
            self.loaded_at = self.last_reload["at"]
            what = ", ".join(result.applied) or "nothing changed"
            msg = f"config reloaded from {source}: applied {what}"
            if result.restart_needed:
                msg += (f"; changes to {', '.join(result.restart_needed)} need a restart "
                        "(systemctl restart qrad-agent) and keep their running values")
            event(log, logging.WARNING if result.restart_needed else logging.INFO, msg,
                  reload="applied", path=source)
            self.events.add("reload_applied", msg, applied=result.applied,
                            restart_needed=result.restart_needed)
        else:
            self.reloads_refused += 1
            msg = f"config reload refused, the running config is kept: {source}: " \
                  + "; ".join(result.problems)
            event(log, logging.ERROR, msg, reload="refused", path=source)
            self.events.add("reload_refused", msg, problems=result.problems)
        # READY=1 ends the reload for systemd, whatever the outcome: the agent runs on
        self.notifier.ready(self.summary())
        self._last_status = now
        self.publish(now)
        return result

    # -- shutdown ----------------------------------------------------------------------------
    def shutdown(self, why: str) -> None:
        """STOPPING=1, then restore the levers within ``ops.stop_timeout_s``."""
        self.state = "stopping"
        reason = why or "end of run"
        self.notifier.stopping(f"stopping ({reason}): restoring levers")
        self.events.add("stopping", f"stopping ({reason})")
        event(log, logging.INFO, "stopping", reason=reason)
        self.publish(time.monotonic())
        timer = threading.Timer(self.ops.stop_timeout_s, self._overrun)
        timer.daemon = True
        timer.start()
        try:
            self.agent.stop()
            self.final_levers = self._read_back()
            for step in self.after_stop:
                try:
                    step()
                except Exception:  # the next step (the link's offline) must still run
                    log.exception("a shutdown step failed (the others still run)")
        finally:
            timer.cancel()
        self.state = "stopped"
        shown = " ".join(f"{k}={v}" for k, v in _compact(self.final_levers).items())
        self.notifier.status(f"stopped ({reason}): levers restored {shown}".rstrip())
        self.events.add("stopped", f"levers restored ({reason})", levers=self.final_levers)
        event(log, logging.INFO, "levers restored", reason=reason, **_compact(self.final_levers))
        self.publish(time.monotonic())

    def _overrun(self) -> None:
        log.critical("levers not restored within ops.stop_timeout_s = %g s; exiting anyway: "
                     "the restore record puts them back at the next start",
                     self.ops.stop_timeout_s)
        self.notifier.status("stop overran: exiting without a full restore")
        self.on_overrun()

    def _read_back(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for lever in self.agent.levers:
            try:
                out[lever.name] = lever.read_back()
            except Exception as exc:
                out[lever.name] = {"error": f"{type(exc).__name__}: {exc}"}
        return out

    # -- what people see ---------------------------------------------------------------------
    def summary(self) -> str:
        """The one line of ``systemctl status``."""
        now = time.monotonic()
        if self.ready and not self._healthy(now):
            return f"UNHEALTHY: {self.unhealthy_reason(now)}"
        d = self.agent.stats.last_decision
        if d is None:
            return "starting: no control tick yet"
        room = self.agent.stats.last_room.temperature_c
        room_text = "no room temperature" if room is None else f"room {room:.1f} °C"
        target = "off" if d.target_c is None else f"{d.target_c:.1f} °C"
        parts = [f"{room_text}, target {target} ({d.reason})", f"demand {d.demand:.0%}",
                 d.plan.describe()]
        verdict = self.agent.stats.last_verdict
        limited_by = getattr(verdict, "limited_by", None)
        if limited_by:
            parts.append(f"safety: {limited_by}")
        return ", ".join(parts)

    def snapshot(self, now: float) -> dict[str, Any]:
        agent = self.agent
        view = agent_view(agent, self.world)
        counters = dict(view.pop("counters"))
        counters.update({
            "tick_failures": self.tick_failures, "reloads": self.reloads,
            "reloads_refused": self.reloads_refused, "watchdog_sent": self.watchdog_sent,
            "notify_sent": self.notifier.sent, "notify_failed": self.notifier.failed,
        })
        safety_events = view.pop("safety_events")
        doc: dict[str, Any] = {
            "version": SNAPSHOT_VERSION,
            "state": self.state,
            "summary": self.summary(),
            "agent": {
                "version": __version__, "pid": os.getpid(), "node": agent.cfg.node.id,
                "simulated": self.simulated,
                "started_at": self.started_wall.isoformat(timespec="seconds"),
                "uptime_s": round(now - self.started_mono, 1),
            },
            "loop": {
                "healthy": self._healthy(now),
                "last_tick_monotonic": self.last_ok_tick,
                "late_after_s": round(self.late_after_s, 3),
                "period_s": agent.cfg.control.period_s,
                "speed": self.speed,
                "ticks": agent.stats.ticks,
                "tick_failures": self.tick_failures,
                "last_error": self.last_error or None,
                "watchdog_s": self.notifier.watchdog_s,
            },
            **view,
            "safety_events": safety_events,
            "counters": counters,
            "events": self.events.recent(EVENTS_SHOWN),
            "config": {
                "path": str(self.reloader.path) if self.reloader.path else None,
                "loaded_at": self.loaded_at,
                "last_reload": self.last_reload,
            },
        }
        if self.world is not None:
            doc["sim"] = {"time": self.world.local_time().isoformat(timespec="seconds"),
                          "t_s": round(self.world.t, 1),
                          "outdoor_c": round(self.world.outdoor_c, 2)}
        if self.final_levers:
            doc["levers_at_stop"] = self.final_levers
        return doc

    def publish(self, now: float) -> None:
        try:
            self.box.publish(self.snapshot(now))
        except Exception:  # status is for people: a bug here must not stop the heating
            log.exception("cannot build the status snapshot")
        self._last_publish = now


def _compact(levers: Mapping[str, Any]) -> dict[str, Any]:
    """Lever read-backs as flat ``lever.key`` pairs for a log line."""
    out: dict[str, Any] = {}
    for name, values in levers.items():
        if isinstance(values, Mapping):
            for k, v in values.items():
                if isinstance(v, str | int | float | bool) or v is None:
                    out[f"{name}.{k}"] = v
        else:
            out[name] = values
    return out


# -- the loop -----------------------------------------------------------------------------------


def run_realtime(
    agent: Agent,
    stop: StopFlag,
    world: SimWorld | None = None,
    speed: float = 1.0,
    on_decision: Callable[[Decision], None] | None = None,
    max_seconds: float | None = None,
    *,
    lifecycle: Lifecycle | None = None,
    on_beat: BeatHook | None = None,
    wake_fds: Callable[[], Sequence[int]] | None = None,
    after_wake: Callable[[], None] | None = None,
) -> None:
    """Serve the agent until ``stop`` is set (or ``max_seconds`` of real time pass).

    With a ``world``, simulated time runs at ``speed`` times real time and the world is
    stepped in sensor periods; without one, the board's monotonic clock and local time rule.
    With a ``lifecycle``, a beat that raises is reported to it and the loop goes on (its
    health then decides); SIGHUP reloads go to it. Without one, exceptions propagate.
    ``on_beat(now, local, decision)`` runs after every beat in the loop's thread (the fleet
    link's and the jobs' ``service``); what it raises is logged, never fatal. The loop's
    waits also end when a descriptor of ``wake_fds()`` becomes readable (a job ended: its
    slot is given again at once, not at the next timer); ``after_wake()`` then takes in what
    is there, whatever the beat does next, so a readable descriptor never spins the loop.
    """
    started = time.monotonic()
    step = agent.cfg.control.sensor_period_s
    retry_at = 0.0

    def beat(now: float, local: datetime) -> bool:
        try:
            decision = agent.service(now, local)
        except Exception as exc:
            if lifecycle is None:
                raise
            lifecycle.service_failed(exc, time.monotonic())
            return False
        if decision is not None and on_decision is not None:
            on_decision(decision)
        hook(now, local, decision)
        return True

    def hook(now: float, local: datetime, decision: Decision | None) -> None:
        if on_beat is not None:
            try:
                on_beat(now, local, decision)
            except Exception:  # the link or the jobs must not stop the heating
                log.exception("a loop hook failed (control continues)")

    while not stop.is_set():
        elapsed = time.monotonic() - started
        if max_seconds is not None and elapsed >= max_seconds:
            return
        if lifecycle is not None and stop.take_reload():
            lifecycle.reload(time.monotonic())
        if world is not None:
            target_t = elapsed * speed
            stepped = False
            while world.t + step <= target_t and not stop.is_set():
                world.step(step)
                for target, duration in world.due_overrides():  # the occupant's hand
                    agent.controller.set_override(target, world.t, duration)
                beat(world.t, world.local_time())
                stepped = True
            if not stepped:
                # woken between ticks (a command, a job's end): the link and the jobs answer
                # now; the room and the controller move on at the next tick
                hook(world.t, world.local_time(), None)
            wait = max(0.0, (world.t + step - elapsed * speed) / speed)
        else:
            if time.monotonic() >= retry_at and not beat(time.monotonic(), datetime.now()):
                # a poll that raised leaves its beat due: try again after a pause, not in
                # a spin that would log and burn a core until the watchdog steps in
                retry_at = time.monotonic() + RETRY_AFTER_FAILURE_S
            now = time.monotonic()
            wait = max(0.0, agent.next_due() - now, retry_at - now)
        if lifecycle is not None:
            lifecycle.after_turn(time.monotonic())
        stop.wait(min(wait, 0.5), wake_fds() if wake_fds is not None else ())
        if after_wake is not None:
            try:
                after_wake()
            except Exception:
                log.exception("taking in what woke the loop failed (control continues)")


def ops_config(cfg: AgentConfig) -> OpsConfig:
    """The ``[ops]`` section, or its defaults while the config has none."""
    ops = getattr(cfg, "ops", None)
    return ops if isinstance(ops, OpsConfig) else OpsConfig()


def run_service(
    agent: Agent,
    stop: StopFlag,
    world: SimWorld | None = None,
    speed: float = 1.0,
    on_decision: Callable[[Decision], None] | None = None,
    max_seconds: float | None = None,
    *,
    config_path: Path | str | None = None,
    adapt: Callable[[AgentConfig], AgentConfig] | None = None,
    status_socket: Path | str | None = None,
    metrics_port: int | None = None,
    ops: OpsConfig | None = None,
    notifier: Notifier | None = None,
    on_beat: BeatHook | None = None,
    after_stop: Sequence[Callable[[], None]] = (),
    wake_fds: Callable[[], Sequence[int]] | None = None,
    after_wake: Callable[[], None] | None = None,
) -> int:
    """Run the agent as a service until stopped; restore its levers; return the exit code.

    ``status_socket`` and ``metrics_port`` override the config's ``[ops]`` (the command
    line's ``--status-socket``, ``--metrics-port``). The caller must not call ``agent.stop()``
    again: this function restores the levers, within ``ops.stop_timeout_s``.

    ``on_beat`` runs after every beat (see ``run_realtime``); ``after_stop`` runs, in order,
    once the levers are restored and within the same bound: the jobs' final reports, then
    the link's flush and its ``offline`` (each failure is logged, and the next still runs).
    """
    ops = ops or ops_config(agent.cfg)
    simulated = world is not None
    life = Lifecycle(agent, ops, notifier, Reloader(config_path, adapt), world=world,
                     speed=speed, simulated=simulated, after_stop=after_stop)
    socket_path = Path(status_socket) if status_socket else ops.socket_path(simulated)
    server: StatusServer | None = StatusServer(socket_path, life.box, ops.status_socket_mode)
    try:
        assert server is not None
        server.start()
        event(log, logging.INFO, "status socket ready", path=socket_path)
    except OSError as exc:
        # status is for people: a radiator without it still heats
        log.error("no status socket: %s", exc.strerror or exc)
        life.events.add("status_socket_failed", str(exc.strerror or exc))
        server = None
    metrics: MetricsServer | None = None
    if metrics_port is not None or ops.metrics.enabled:
        from qrad_agent.ops.metrics import MetricsServer

        port = metrics_port if metrics_port is not None else ops.metrics.port
        metrics = MetricsServer(life.box, ops.metrics.host, port)
        try:
            metrics.start()
            event(log, logging.INFO, "metrics endpoint ready",
                  url=f"http://{ops.metrics.host}:{metrics.port}/metrics")
        except OSError as exc:
            log.error("no metrics endpoint on %s:%d: %s", ops.metrics.host, port,
                      exc.strerror or exc)
            metrics = None
    life.publish(time.monotonic())
    code = EXIT_OK
    try:
        run_realtime(agent, stop, world, speed, on_decision, max_seconds, lifecycle=life,
                     on_beat=on_beat, wake_fds=wake_fds, after_wake=after_wake)
    except LoopGaveUp as exc:
        log.critical("giving up: %s; exiting for the service manager to restart the agent", exc)
        life.events.add("gave_up", str(exc))
        stop.signal_name = stop.signal_name or "loop failing"
        code = EXIT_FAILED
    finally:
        try:
            life.shutdown(stop.signal_name)
        finally:
            if server is not None:
                server.close()
            if metrics is not None:
                metrics.close()
            life.notifier.close()
    return code
