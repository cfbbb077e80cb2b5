"""``qrad-agent tune [--sim] [--scenario FILE] [--apply] [-c FILE]``: fit the controller to the
room it heats.

Runs the relay experiment of ``core/autotune.py`` through the agent's real sensors, safety
supervisor and levers: on the simulated radiator with ``--sim`` (as fast as the machine
allows), or on the board in real time (it takes hours; progress is printed every few
minutes, Ctrl-C aborts and puts the levers back). Then it prints the fitted room model, the
proposed gains (SIMC PI, recommended; SIMC PID; Ziegler-Nichols for comparison) and what to
expect of them, and with ``--apply`` stores the recommended gains and the room model in the
state directory's config overlay.

The config overlay (``<node.state_dir>/config-overlay.json``) is a small JSON file of config
values that win over the TOML file at start::

    {"format": 1, "written_by": "qrad-agent tune", "written_at": "2027-01-04T09:12:00+00:00",
     "config": {"pid": {"kp": 0.93, "ki": 0.00026, "kd": 0.0},
                "safety": {"room_model": {"gain_k": 5.1, "tau_s": 4650, "dead_time_s": 60}}},
     "experiment": {...what was measured, for people...}}

Only ``config`` is read; it has the shape of the TOML config and is validated with it as a
whole (``apply_overlay``). A new ``tune --apply`` merges into the file, keeping other keys.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from qrad_agent.atomic import write_json
from qrad_agent.config import AgentConfig, ConfigError, PidConfig, describe_errors, load_config
from qrad_agent.core.autotune import RelayAutotune, TuneResult, step_response
from qrad_agent.core.controller import Decision
from qrad_agent.safety_settings import AutotuneConfig, RoomModelConfig, SafetyConfig

if TYPE_CHECKING:
    from qrad_agent.agent import Agent
    from qrad_agent.sim.scenario import Scenario

log = logging.getLogger("qrad_agent")

OVERLAY_NAME = "config-overlay.json"
OVERLAY_FORMAT = 1
SETTLE_S = 6 * 3600.0  # --sim: the agent holds the setpoint this long before the relay starts
PROGRESS_EVERY_S = 600.0  # on a board: a progress line every ten minutes
POOR_FIT_K = 0.1  # a fit error above this is more than sensor noise and quantisation


# -- the experiment through an agent -------------------------------------------------------
class TuneSession:
    """One relay experiment driven through an agent: its sensors and health monitors, its
    safety supervisor (any cap or trip aborts the experiment) and its levers."""

    def __init__(
        self, agent: Agent, cfg: AutotuneConfig, setpoint_c: float, now: float,
        bias: float | None = None,
    ) -> None:
        self.agent = agent
        safety = agent.supervisor.cfg
        self.tuner = RelayAutotune(cfg, setpoint_c, now, bias, room_max_c=safety.room.max_c)
        self.setpoint_c = setpoint_c

    def step(self, now: float) -> bool:
        """Poll, protect, relay, act. Returns whether the experiment is still running."""
        agent = self.agent
        agent.poll(now)
        verdict = agent.protect(now)
        # a lost poll is no trip: the tuner bridges gaps up to sensor_gap_s itself
        trips = [e.reason for e in verdict.events if e.kind == "trip"]
        trip = trips[0] if trips else None
        if trip is None and verdict.limit < 1.0:
            trip = f"safety cap {verdict.limit:.0%} by {verdict.limited_by}"
        demand = self.tuner.update(now, verdict.room.temperature_c, trip)
        applied = verdict.apply(demand)
        plan = agent.controller.allocator.allocate(now, applied, verdict.limit)
        agent.apply(plan)
        # the supervisor judges the next tick against what was asked and applied now
        agent.stats.last_decision = Decision(self.setpoint_c, "autotune", False, applied, plan)
        agent.stats.ticks += 1
        return self.tuner.running

    def analyse(self) -> TuneResult:
        c = self.agent.cfg
        return self.tuner.analyse(c.pid.input_filter_s, c.control.period_s)


@dataclass
class SimTune:
    session: TuneSession
    result: TuneResult | None
    settle_s: float
    experiment_s: float


def tune_in_sim(
    cfg: AgentConfig,
    scenario: Scenario,
    tune_cfg: AutotuneConfig | None = None,
    setpoint_c: float | None = None,
    settle_s: float = SETTLE_S,
    progress: Callable[[str], None] | None = None,
) -> SimTune:
    """The experiment on the simulated radiator in ``scenario``'s room, as fast as possible.

    The agent first holds the setpoint for ``settle_s`` (the walls warm up, the integral
    finds the demand that holds the room: the relay starts from that bias), then the relay
    runs. Returns the session and, when it completed, the fitted result.
    """
    from qrad_agent.sim.run import build_sim_agent

    tune_cfg = tune_cfg or AutotuneConfig()
    # as `simulate` does: one poll per control tick decides exactly what more polls would
    control = cfg.control.model_copy(update={"sensor_period_s": cfg.control.period_s})
    agent, world = build_sim_agent(cfg.model_copy(update={"control": control}), scenario)
    setpoint = setpoint_c if setpoint_c is not None else agent.cfg.thermostat.comfort_c
    period = agent.cfg.control.period_s
    try:
        agent.controller.set_override(setpoint, 0.0, settle_s + period)
        held, weight = 0.0, 0.0
        while world.t < settle_s:
            world.step(period)
            decision = agent.service(world.t, world.local)
            if decision is not None and world.t >= settle_s - 3600.0:
                held, weight = held + decision.demand, weight + 1.0
        bias = held / weight if weight else None
        session = TuneSession(agent, tune_cfg, setpoint, world.t, bias)
        started = world.t
        next_report = started
        while session.step(world.t):
            if progress is not None and world.t >= next_report:
                progress(session.tuner.progress(world.t))
                next_report = world.t + 3600.0
            world.step(period)
        result = session.analyse() if session.tuner.phase == "done" else None
        return SimTune(session, result, settle_s, world.t - started)
    finally:
        agent.stop()
        world.close()


def tune_on_board(
    cfg: AgentConfig, tune_cfg: AutotuneConfig, setpoint_c: float, out: TextIO,
) -> TuneSession:
    """The experiment on this board in real time, with a progress line every ten minutes."""
    from qrad_agent.hardware import build_hardware_agent

    agent = build_hardware_agent(cfg)
    period = cfg.control.period_s
    session = TuneSession(agent, tune_cfg, setpoint_c, time.monotonic())
    next_report = 0.0
    try:
        while True:
            now = time.monotonic()
            if not session.step(now):
                break
            if now >= next_report:
                print(f"{datetime.now():%H:%M}  {session.tuner.progress(now)}", file=out,
                      flush=True)
                next_report = now + PROGRESS_EVERY_S
            time.sleep(max(0.0, now + period - time.monotonic()))
    except KeyboardInterrupt:
        session.tuner.abort(time.monotonic(), "interrupted (Ctrl-C)")
    finally:
        agent.stop()
    return session


# -- the config overlay --------------------------------------------------------------------
def overlay_path(cfg: AgentConfig) -> Path:
    return Path(cfg.node.state_dir) / OVERLAY_NAME


def read_overlay(path: Path) -> dict[str, Any]:
    """The overlay file's content (an empty overlay if there is none).

    Raises ``ConfigError`` naming the file and what is wrong with it.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"format": OVERLAY_FORMAT, "config": {}}
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    except ValueError as exc:
        raise ConfigError(str(path), [f"not valid JSON: {exc}"]) from None
    if not isinstance(data, dict) or not isinstance(data.get("config", {}), dict):
        raise ConfigError(str(path), ["must be a JSON object whose 'config' is an object "
                                      "shaped like the TOML config"])
    if data.get("format", OVERLAY_FORMAT) != OVERLAY_FORMAT:
        raise ConfigError(str(path), [f"format {data.get('format')!r} is not understood; "
                                      f"allowed: {OVERLAY_FORMAT}"])
    return data


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overlay(cfg: AgentConfig, overlay: Mapping[str, Any]) -> AgentConfig:
    """``cfg`` with the overlay's ``config`` merged over it, validated as a whole.

    Sections this version's ``AgentConfig`` does not have are left out (an overlay written
    by a newer version must not stop an older one).
    """
    wanted = dict(overlay.get("config", {}))
    known = set(AgentConfig.model_fields)
    # only what was set (in the file or in code): a dump of every default would set keys some
    # sections refuse together (a sensor's device for an I2C kind)
    base = cfg.model_dump(mode="json", exclude_unset=True)
    merged = _merge(base, {k: v for k, v in wanted.items() if k in known})
    try:
        return AgentConfig.model_validate(merged)
    except Exception as exc:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            raise ConfigError("config overlay", describe_errors(exc)) from None
        raise


def room_model_from_overlay(overlay: Mapping[str, Any]) -> RoomModelConfig | None:
    """The fitted room model stored by ``tune --apply``, for the safety supervisor."""
    model = overlay.get("config", {}).get("safety", {}).get("room_model")
    return RoomModelConfig.model_validate(model) if model is not None else None


def write_overlay(path: Path, result: TuneResult, setpoint_c: float,
                  now: datetime | None = None) -> dict[str, Any]:
    """Merge the recommended gains and the room model into the overlay at ``path``
    (atomically: a crash leaves the old file or the new one, never half of one)."""
    gains = result.recommended
    m = result.model
    update = {
        "pid": {"kp": round(gains.kp, 4), "ki": round(gains.ki, 7), "kd": round(gains.kd, 2)},
        "safety": {"room_model": {"gain_k": round(m.gain_k, 3), "tau_s": round(m.tau_s, 1),
                                  "dead_time_s": round(m.dead_time_s, 1)}},
        # optimal start's first guess until it has seen a warm-up of its own: half the
        # fitted initial slope, because a long rise slows as the walls have to follow
        "thermostat": {"optimal_start": {
            "initial_rate_k_per_h": round(min(20.0, max(0.1, m.slope_k_per_h / 2)), 2)}},
    }
    # refuse values the config would refuse, before anything is written
    PidConfig.model_validate(update["pid"])
    SafetyConfig.model_validate(update["safety"])
    data = read_overlay(path)
    data["format"] = OVERLAY_FORMAT
    data["written_by"] = "qrad-agent tune"
    data["written_at"] = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    data["config"] = _merge(data.get("config", {}), update)
    data["experiment"] = _experiment_summary(result, setpoint_c)
    write_json(path, data, indent=2)  # a half-written overlay would stop the agent's start
    return data


def _experiment_summary(result: TuneResult, setpoint_c: float) -> dict[str, Any]:
    return {
        "setpoint_c": setpoint_c,
        "cycles": len(result.cycles),
        "ultimate_gain": round(result.ultimate_gain, 4),
        "ultimate_period_s": round(result.ultimate_period_s, 1),
        "bias": round(result.bias, 4),
        "fit_rms_k": round(result.fit_rms_k, 4),
        "rule": result.recommended.rule,
        "tau_c_s": round(result.tau_c_s, 1),
    }


# -- printing ------------------------------------------------------------------------------
def report(result: TuneResult, current: tuple[float, float, float], out: TextIO) -> None:
    m = result.model
    print("room model (first order plus dead time, around the setpoint):", file=out)
    print(f"  gain        {m.gain_k:8.2f} K per unit of demand", file=out)
    print(f"  time const  {m.tau_s / 60:8.1f} min", file=out)
    print(f"  dead time   {m.dead_time_s / 60:8.1f} min (+{result.extra_lag_s:.0f} s of the "
          "controller's input filter and sampling)", file=out)
    print(f"  warms at    {m.slope_k_per_h:8.2f} K/h at first after a full demand step", file=out)
    print(f"  fit error   {result.fit_rms_k:8.3f} K RMS", file=out)
    if result.fit_rms_k > POOR_FIT_K:
        print(f"  warning: the model fits the room poorly (more than {POOR_FIT_K:g} K RMS): "
              "something else moved the room during the experiment; the gains are less "
              "certain, repeat the tuning at a quieter time", file=out)
    print(f"relay: ultimate gain {result.ultimate_gain:.2f} per K, period "
          f"{result.ultimate_period_s / 60:.1f} min, bias {result.bias:.2f} "
          f"± {result.amplitude:.2f}"
          f", {len(result.cycles)} cycles", file=out)
    print("gains (kp per K, ki per K·s, kd per K/s):", file=out)
    rows = [(result.simc_pi, "recommended"), (result.simc_pid, ""), (result.zn_pi, "comparison"),
            (result.zn_pid, "comparison")]
    for g, note in rows:
        resp = step_response(m, g, result.extra_lag_s)
        print(f"  {g.rule:<20} kp {g.kp:7.3f}  ki {g.ki:.6f}  kd {g.kd:8.1f}   "
              f"1 K step: 90 % in {_minutes(resp.rise_s)}, settled in {_minutes(resp.settle_s)},"
              f" overshoot {resp.overshoot_k:.2f} K  {note}", file=out)
    kp, ki, kd = current
    if kp > 0:
        from qrad_agent.core.autotune import PidGains

        resp = step_response(m, PidGains("configured", kp, ki, kd), result.extra_lag_s)
        print(f"  {'configured now':<20} kp {kp:7.3f}  ki {ki:.6f}  kd {kd:8.1f}   "
              f"1 K step: 90 % in {_minutes(resp.rise_s)}, settled in {_minutes(resp.settle_s)},"
              f" overshoot {resp.overshoot_k:.2f} K", file=out)
    print(f"expected with the recommended gains: the room follows a setpoint change with a "
          f"time constant of about {(result.tau_c_s + m.dead_time_s + result.extra_lag_s) / 60:.0f}"
          f" min, and a lasting disturbance (a colder night, an open door) is worked off "
          f"within about {result.recommended.ti_s / 60:.0f} min", file=out)


def _minutes(seconds: float) -> str:
    return "never" if not math.isfinite(seconds) else f"{seconds / 60:.0f} min"


# -- the command ---------------------------------------------------------------------------
def cmd_tune(args: argparse.Namespace) -> int:
    cfg = load_config(args.config) if args.config else AgentConfig()
    tune_cfg = AutotuneConfig()
    configured = getattr(cfg, "autotune", None)
    if isinstance(configured, AutotuneConfig):
        tune_cfg = configured
    setpoint = args.setpoint if args.setpoint is not None else cfg.thermostat.comfort_c
    out = sys.stdout
    started = time.perf_counter()
    if args.sim:
        from qrad_agent.sim.scenario import load_scenario

        scenario = load_scenario(args.scenario or cfg.sim.scenario)
        setpoint = args.setpoint if args.setpoint is not None else scenario.comfort_c
        print(f"tuning on the simulated radiator in '{scenario.name}' at {setpoint:g} °C "
              f"(the agent holds it {SETTLE_S / 3600:g} h first)", file=out)
        sim = tune_in_sim(cfg, scenario, tune_cfg, setpoint,
                          progress=lambda line: print(f"  {line}", file=out, flush=True))
        session = sim.session
        print(f"relay experiment: {session.tuner.phase} after {sim.experiment_s / 3600:.1f} "
              f"simulated hours ({time.perf_counter() - started:.1f} s): "
              f"{session.tuner.reason}", file=out)
        result = sim.result
    else:
        if args.scenario:
            print("--scenario applies only with --sim", file=sys.stderr)
            return 2
        print(f"tuning this radiator at {setpoint:g} °C: the relay experiment takes hours; "
              "Ctrl-C aborts and puts the levers back", file=out, flush=True)
        session = tune_on_board(cfg, tune_cfg, setpoint, out)
        print(f"relay experiment: {session.tuner.phase}: {session.tuner.reason}", file=out)
        result = session.analyse() if session.tuner.phase == "done" else None
    if result is None:
        print("no gains proposed: the experiment did not complete", file=sys.stderr)
        return 1
    report(result, (cfg.pid.kp, cfg.pid.ki, cfg.pid.kd), out)
    if args.apply:
        path = overlay_path(cfg)
        write_overlay(path, result, setpoint)
        print(f"applied: {result.recommended.rule} gains and the room model stored in {path}; "
              "the agent uses them from its next start", file=out)
    else:
        print("(not applied; --apply stores the recommended gains)", file=out)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``tune`` to the CLI's subcommands (``subparsers`` from ``add_subparsers``)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "tune", help="fit the controller to the room: relay experiment, model, gains",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("-c", "--config", help="config file (default: built-in)")
    p.add_argument("--sim", action="store_true", help="tune on the simulated radiator")
    p.add_argument("--scenario", help="scenario name or file for --sim (default: config's)")
    p.add_argument("--setpoint", type=float,
                   help="temperature to tune at (default: the comfort setpoint)")
    p.add_argument("--apply", action="store_true",
                   help=f"store the recommended gains in <state_dir>/{OVERLAY_NAME}")
    p.set_defaults(func=cmd_tune)
    return p
