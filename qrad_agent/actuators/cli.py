"""``qrad-agent actuators show|test`` and ``qrad-agent calibrate``: the technician's view of
the levers and the power, on the board or (``--sim``) on an emulated one.

A "bench" is what the three commands work on: the levers, the power sources, and a clock
with a sleep. On the board those are the real ones (the levers from ``open_levers``, the
power from ``open_power``, wall time). With ``--sim`` they are the simulated radiator's:
emulated cpufreq and powercap trees in a temporary directory (the same driver code reads
them), simulated slots and quota, and a virtual clock whose sleep feeds the emulated RAPL
counter with what the board would draw. So ``calibrate --sim`` recovers the power model the
simulated board was given.

``show`` changes nothing (levers are opened without the restore record, which would put
back a running agent's originals; RAPL's lock is found by writing the limit's own value
back). ``test`` and ``calibrate`` change the levers and restore them at the end, on Ctrl-C
and on SIGTERM; stop the agent first, or the two will fight over the levers.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from qrad_agent.actuators import RESTORE_FILE, open_levers
from qrad_agent.actuators.base import Lever, LeverError, LeverInfo
from qrad_agent.cli_args import number
from qrad_agent.config import AgentConfig, SimConfig, load_config
from qrad_agent.core.models import Plan
from qrad_agent.core.power import PowerModel
from qrad_agent.metering import MODEL, PowerChooser, PowerReading, open_power
from qrad_agent.metering.model import (
    CalPoint,
    FittedModel,
    fit_power_model,
    load_fitted,
    save_fitted,
)

_seconds = number(float, "a number of seconds", above=0, at_most=3600, unit=" s")

SIM_STEP_S = 0.5  # virtual time step at which the simulated board's energy is counted
SIM_NOISE_W = 0.3  # spread of the simulated RAPL figures
_RECORD_KEYS = {
    "cpufreq": ["cpufreq"], "intel_pstate": ["intel_pstate"], "rapl": ["rapl"],
    "quota": ["cgroup"], "freeze": ["cgroup"], "slots": ["workers"], "duty_cycle": [],
}


@dataclass
class Bench:
    """Levers, power and time, real or simulated."""

    levers: list[Lever]
    inventory: list[LeverInfo]
    power: PowerChooser
    clock: Callable[[], float]
    sleep: Callable[[float], None]
    max_slots: int
    min_khz: int
    max_khz: int
    table_khz: list[int]
    simulated: bool
    record_path: Path | None = None
    cpu_seconds: Callable[[], float | None] = lambda: None
    closers: list[Callable[[], None]] = field(default_factory=list)

    def lever(self, name: str) -> Lever | None:
        return next((lv for lv in self.levers if lv.name == name), None)

    def apply(self, plan: Plan) -> list[str]:
        """Apply ``plan`` to every lever; the errors, one line each."""
        errors = []
        for lever in self.levers:
            try:
                lever.apply(plan)
            except (LeverError, OSError) as exc:
                errors.append(f"{lever.name}: {exc}")
        self.power.observe(plan)
        return errors

    def restore(self) -> list[str]:
        errors = []
        for lever in self.levers:
            try:
                lever.restore()
            except (LeverError, OSError) as exc:
                errors.append(f"{lever.name}: {exc}")
        return errors

    def close(self) -> None:
        self.power.close()
        for close in reversed(self.closers):
            close()


# -- building benches --------------------------------------------------------------------------


def _model(cfg: AgentConfig, max_khz: int, state_dir: Path | None) -> PowerModel:
    fitted = load_fitted(state_dir, max_khz) if state_dir is not None else None
    if fitted is not None:
        return fitted
    pm = cfg.power_model
    return PowerModel(pm.idle_w, pm.slot_w, pm.freq_exponent, max_khz)


def real_bench(cfg: AgentConfig, *, record: bool) -> Bench:
    """The board's levers and power sources. ``record``: use the state directory's restore
    record (for commands that change levers)."""
    import psutil

    from qrad_agent.actuators.cpufreq import open_frequency_lever
    from qrad_agent.actuators.workers import WorkerSlots
    from qrad_agent.sysfs import Sysfs

    actuators, metering = cfg.actuators, cfg.metering
    root = actuators.cpufreq.sysfs_root
    state_dir = Path(cfg.node.state_dir)
    info = open_frequency_lever(Sysfs(root)).discover() if actuators.cpufreq.enabled else None
    have_freq = info is not None and info.available
    min_khz = int(info.range["min_khz"]) if info is not None and have_freq else 1_000_000
    max_khz = int(info.range["max_khz"]) if info is not None and have_freq else 1_000_000
    table = list(info.range.get("available_khz", [])) if info is not None and have_freq else []
    model = _model(cfg, max_khz, state_dir)
    levers, inventory = open_levers(actuators, root, state_dir if record else None, model=model)
    power = open_power(metering, Sysfs(root), model)
    slots = next((lv for lv in levers if isinstance(lv, WorkerSlots)), None)

    def cpu_seconds() -> float | None:
        if slots is None:
            return None
        total = 0.0
        for pid in slots.pids():
            try:
                proc = psutil.Process(pid)
                for p in [proc, *proc.children(recursive=True)]:
                    t = p.cpu_times()
                    total += t.user + t.system
            except psutil.Error:
                continue
        return total

    return Bench(
        levers, inventory, power, time.monotonic, time.sleep,
        max_slots=slots.max_slots if slots is not None else 0,
        min_khz=min_khz, max_khz=max_khz, table_khz=table, simulated=False,
        record_path=state_dir / RESTORE_FILE, cpu_seconds=cpu_seconds,
    )


def sim_bench(cfg: AgentConfig, workdir: Path | None = None, seed: int = 1) -> Bench:
    """An emulated board as ``cfg.sim`` describes it, drawing what ``cfg.power_model`` says."""
    from qrad_agent.actuators.cpufreq import CpufreqLever
    from qrad_agent.actuators.rapl import RaplLimitLever
    from qrad_agent.metering import SourceInfo
    from qrad_agent.metering.model import ModelPowerSource
    from qrad_agent.metering.rapl import RaplEnergySource
    from qrad_agent.sim.cpufreq import make_cpufreq_tree
    from qrad_agent.sim.levers import SimQuotaLever, SimSlotsLever
    from qrad_agent.sim.rapl import make_rapl_tree

    s: SimConfig = cfg.sim
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="qrad-sim-bench-")) if workdir is None else workdir
    sysroot = root / "sys"
    table = list(range(s.min_freq_khz, s.max_freq_khz + 1, s.freq_step_khz))
    if table[-1] != s.max_freq_khz:
        table.append(s.max_freq_khz)
    cpufreq_tree = make_cpufreq_tree(sysroot, s.cores, s.min_freq_khz, s.max_freq_khz, table)
    pm = cfg.power_model
    truth = PowerModel(pm.idle_w, pm.slot_w, pm.freq_exponent, s.max_freq_khz)
    top_w = truth.max_w(s.cores)
    rapl_tree = make_rapl_tree(sysroot, limit_w=top_w * 1.5, max_power_w=top_w * 2,
                               short_limit_w=top_w * 2)
    slots, quota = SimSlotsLever(s.cores), SimQuotaLever()
    freq = CpufreqLever(cpufreq_tree)
    levers: list[Lever] = [slots, quota, freq]
    actuators = cfg.actuators
    rapl_cfg = actuators.rapl
    if rapl_cfg.enabled:
        levers.append(RaplLimitLever(rapl_tree, truth, rapl_cfg))
    inventory = [lv.discover() for lv in levers]
    if not rapl_cfg.enabled:
        inventory.append(LeverInfo("rapl", False, "disabled in config (actuators.rapl.enabled)"))
    model = ModelPowerSource(truth)
    power = PowerChooser(
        [RaplEnergySource(rapl_tree), model],
        [SourceInfo("meter", False, "simulated board: no meter"), SourceInfo("rapl", True),
         SourceInfo(MODEL, True)],
    )
    noise = random.Random(seed)
    now = [0.0]
    busy = [0.0]  # CPU-seconds the simulated workers have had

    def board_watts() -> float:
        watts = truth.watts_of(slots.running, cpufreq_tree.effective_max_khz(), quota.quota)
        limit_w = rapl_tree.read_int("class/powercap/intel-rapl:0/constraint_0_power_limit_uw")
        return min(watts, limit_w / 1e6) + noise.gauss(0.0, SIM_NOISE_W)

    def sleep(seconds: float) -> None:
        left = seconds
        while left > 1e-9:
            dt = min(SIM_STEP_S, left)
            rapl_tree.add_energy(max(0.0, board_watts()) * dt)
            busy[0] += slots.running * quota.quota * dt
            now[0] += dt
            left -= dt

    def cpu_seconds() -> float:
        return busy[0]

    bench = Bench(
        levers, inventory, power, lambda: now[0], sleep,
        max_slots=s.cores, min_khz=s.min_freq_khz, max_khz=s.max_freq_khz, table_khz=table,
        simulated=True, cpu_seconds=cpu_seconds,
    )
    bench.closers.append(cpufreq_tree.close)
    if own_dir:
        bench.closers.append(lambda: shutil.rmtree(root, ignore_errors=True))
    return bench


# -- show --------------------------------------------------------------------------------------


def collect_show(bench: Bench) -> dict[str, Any]:
    """Every lever (range, current value, the originals a run holds) and the power."""
    originals = _recorded_originals(bench.record_path)
    levers = []
    for info in bench.inventory:
        lever = bench.lever(info.name)
        current: dict[str, Any] | None = None
        error = ""
        if lever is not None and info.available:
            try:
                current = lever.read_back()
            except (LeverError, OSError) as exc:
                error = str(exc)
        held = {k: v for key in _RECORD_KEYS.get(info.name, [info.name])
                for k, v in originals.get(key, {}).items()}
        levers.append({
            "name": info.name, "available": info.available, "why_not": info.why_not,
            "range": info.range, "current": current, "original": held or None,
            **({"error": error} if error else {}),
        })
    reading = bench.power.read(bench.clock())
    if not reading.ok or reading.source == MODEL:
        # RAPL needs two samples; a meter may have missed one: give them a second chance
        bench.sleep(0.5)
        reading = bench.power.read(bench.clock())
    return {
        "simulated": bench.simulated,
        "levers": levers,
        "power": {"reading": reading.as_dict(), **bench.power.describe()},
    }


def _recorded_originals(path: Path | None) -> dict[str, dict[str, str]]:
    """The restore record as it is on disk, read without touching it."""
    if path is None:
        return {}
    try:
        doc = json.loads(path.read_text())
        levers = doc.get("levers", {})
        return {str(k): dict(v) for k, v in levers.items() if isinstance(v, dict)}
    except (OSError, ValueError, AttributeError):
        return {}


def print_show(doc: dict[str, Any], out: TextIO) -> None:
    title = "simulated board" if doc["simulated"] else "this board"
    print(f"levers of {title}:", file=out)
    for lv in doc["levers"]:
        mark = "yes" if lv["available"] else "no "
        print(f"  [{mark}] {lv['name']:<12}", end="", file=out)
        if not lv["available"]:
            print(f" {lv['why_not']}", file=out)
            continue
        shown = _summary(lv["name"], lv["current"])
        if not shown and lv["name"] == "freeze":
            shown = "used by the slots lever to suspend every worker at once (shed = suspend)"
        print(f" {shown or '-'}", file=out)
        if lv["range"]:
            print(f"        range    {_compact(lv['range'])}", file=out)
        if lv.get("error"):
            print(f"        error    {lv['error']}", file=out)
        original = lv["original"]
        print("        original " + (_compact(original) if original else
                                      "unchanged (no run holds changes to put back)"), file=out)
    p = doc["power"]
    r = p["reading"]
    watts = "—" if r["watts"] is None else f"{r['watts']:.1f} W"
    print(f"power: {watts} from {r['source']} ({r['quality']}) {r['detail']}".rstrip(), file=out)
    for s in p["sources"]:
        state = "present" if s["available"] else f"missing: {s['why_not']}"
        print(f"  {s['name']:<6} {state}", file=out)


def _compact(d: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v}" for k, v in d.items())
    return text if len(text) <= 160 else text[:157] + "..."


def _summary(name: str, back: dict[str, Any] | None) -> str:
    """One short phrase of a lever's read-back."""
    if not back:
        return ""
    if "freq_khz" in back:
        return f"freq cap {back['freq_khz'] / 1e6:.2f} GHz"
    if name == "slots":
        extra = f", {back['suspended']} suspended" if back.get("suspended") else ""
        frozen = ", frozen" if back.get("frozen") else ""
        return f"{back.get('slots', back.get('running'))} running{extra}{frozen}"
    if name == "quota":
        if back.get("group", "") is None:
            return "no worker group yet (unlimited)"
        cores = back.get("cores")
        if cores is None and "cores" in back:
            return "quota unlimited"
        if cores is not None:
            return f"quota {cores:.2f} CPUs"
        return f"quota {back.get('quota', 1.0):.0%} per slot"
    if name == "duty_cycle":
        return f"duty {back['quota']:.0%} of {back['period_s']} s"
    if name == "rapl":
        return f"package limit {back['limit_w']:.1f} W"
    return _compact(back)


# -- test --------------------------------------------------------------------------------------


@dataclass
class StepResult:
    label: str
    plan: Plan
    power: PowerReading
    model_w: float
    cpus: float | None
    read_back: dict[str, dict[str, Any]]
    errors: list[str]


def lever_steps(bench: Bench) -> list[tuple[str, Plan]]:
    """Each lever down and up again, from all slots at full speed."""
    n, fmin, fmax = bench.max_slots, bench.min_khz, bench.max_khz
    steps = [("idle", Plan(0, fmax, 1.0))]
    if n <= 0:
        return steps
    steps.append(("all slots", Plan(n, fmax, 1.0)))
    if n > 1:
        steps.append(("half the slots", Plan(max(1, n // 2), fmax, 1.0)))
    if bench.lever("cpufreq") or bench.lever("intel_pstate"):
        steps.append(("lowest frequency", Plan(n, fmin, 1.0)))
    if bench.lever("quota") or bench.lever("duty_cycle"):
        steps.append(("half quota", Plan(n, fmax, 0.5)))
    steps += [("all slots again", Plan(n, fmax, 1.0)), ("idle again", Plan(0, fmax, 1.0))]
    return steps


def run_test(bench: Bench, step_s: float, out: TextIO) -> list[StepResult]:
    """Step every lever, measure each step, restore. Prints as it goes."""
    model = _model_of(bench)
    results = []
    print(f"{'step':<18} {'plan':<28} {'measured':>17} {'model':>8} {'CPUs':>6}  levers",
          file=out)
    try:
        for label, plan in lever_steps(bench):
            errors = bench.apply(plan)
            bench.sleep(min(1.0, step_s / 3))  # let the workers start and the caps settle
            bench.power.read(bench.clock())  # a fresh baseline for the energy counters
            cpu0, t0 = bench.cpu_seconds(), bench.clock()
            bench.sleep(step_s)
            reading = bench.power.read(bench.clock())
            cpu1, t1 = bench.cpu_seconds(), bench.clock()
            cpus = (cpu1 - cpu0) / (t1 - t0) if cpu0 is not None and cpu1 is not None else None
            back = {}
            for lever in bench.levers:
                try:
                    back[lever.name] = lever.read_back()
                except (LeverError, OSError) as exc:
                    errors.append(f"{lever.name}: {exc}")
            r = StepResult(label, plan, reading, model.watts(plan), cpus, back, errors)
            results.append(r)
            _print_step(r, out)
    finally:
        problems = bench.restore()
        print("restored every lever" if not problems else
              "restore problems: " + "; ".join(problems), file=out)
    return results


def _model_of(bench: Bench) -> PowerModel:
    for source in bench.power.sources:
        model = getattr(source, "model", None)
        if isinstance(model, PowerModel):
            return model
    return PowerModel(0.0, 1.0, 1.0, max(1, bench.max_khz))


def _print_step(r: StepResult, out: TextIO) -> None:
    p = r.power
    measured = "—" if p.watts is None else f"{p.watts:7.1f} W ({p.source})"
    cpus = "—" if r.cpus is None else f"{r.cpus:.2f}"
    levers = "; ".join(s for s in (_summary(n, b) for n, b in r.read_back.items()) if s)
    print(f"{r.label:<18} {r.plan.describe():<28} {measured:>17} {r.model_w:6.1f} W {cpus:>6}"
          f"  {levers}", file=out)
    for e in r.errors:
        print(f"{'':<18} error: {e}", file=out)


# -- calibrate ---------------------------------------------------------------------------------


class CalibrationRefused(Exception):
    """No measured power source: a model cannot be fitted to itself."""


def calibration_steps(bench: Bench, freq_points: int) -> list[Plan]:
    n = bench.max_slots
    if n <= 0:
        raise CalibrationRefused("no worker slots to load the board with (workers disabled?)")
    plans = [Plan(k, bench.max_khz, 1.0) for k in range(n + 1)]
    if (bench.lever("cpufreq") or bench.lever("intel_pstate")) and freq_points > 1:
        if bench.table_khz:
            table = sorted(set(bench.table_khz))
            picks = {table[round(i * (len(table) - 1) / (freq_points - 1))]
                     for i in range(freq_points)}
        else:
            span = bench.max_khz - bench.min_khz
            picks = {bench.min_khz + round(span * i / (freq_points - 1))
                     for i in range(freq_points)}
        plans += [Plan(n, f, 1.0) for f in sorted(picks, reverse=True) if f != bench.max_khz]
    return plans


def run_calibration(
    bench: Bench, settle_s: float, measure_s: float, freq_points: int, out: TextIO
) -> tuple[FittedModel, list[CalPoint], str]:
    if not bench.power.measured:
        raise CalibrationRefused(
            "calibrate needs measured power, and this board has neither a Modbus meter "
            "([metering.meter] in the config) nor readable RAPL energy counters: "
            + "; ".join(f"{i.name}: {i.why_not}" for i in bench.power.inventory
                        if not i.available and i.name != MODEL)
        )
    plans = calibration_steps(bench, freq_points)
    freq_lever = bench.lever("cpufreq") or bench.lever("intel_pstate")
    points: list[CalPoint] = []
    sources: set[str] = set()
    print(f"calibrating: {len(plans)} steps of {settle_s + measure_s:g} s", file=out)
    try:
        for plan in plans:
            for e in bench.apply(plan):
                print(f"  error: {e}", file=out)
            bench.sleep(settle_s)
            bench.power.read(bench.clock())
            bench.sleep(measure_s)
            reading = bench.power.read(bench.clock())
            freq = plan.freq_khz
            if freq_lever is not None:
                freq = int(freq_lever.read_back().get("freq_khz", freq))
            if not reading.ok or reading.source == MODEL or reading.watts is None:
                print(f"  {plan.describe():<28} no measurement ({reading.detail}); skipped",
                      file=out)
                continue
            sources.add(reading.source)
            points.append(CalPoint(plan.slots, freq, plan.quota, reading.watts))
            print(f"  {plan.slots} slots @ {freq / 1e6:.2f} GHz {reading.watts:8.1f} W "
                  f"({reading.source})", file=out)
    finally:
        problems = bench.restore()
        if problems:
            print("restore problems: " + "; ".join(problems), file=out)
    fitted = fit_power_model(points, bench.max_khz, _model_of(bench).freq_exponent)
    return fitted, points, "+".join(sorted(sources))


# -- commands ----------------------------------------------------------------------------------


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def _bench(args: argparse.Namespace, *, record: bool) -> Bench:
    cfg = load_config(args.config) if args.config else AgentConfig()
    return sim_bench(cfg) if args.sim else real_bench(cfg, record=record)


def cmd_show(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    bench = _bench(args, record=False)
    try:
        doc = collect_show(bench)
    finally:
        bench.close()
    if args.json:
        print(json.dumps(doc, indent=2, default=str), file=out)
    else:
        print_show(doc, out)
    return 0


def cmd_test(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    bench = _bench(args, record=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        results = run_test(bench, args.step_s, out)
    except (_Terminated, KeyboardInterrupt):
        print("interrupted; levers restored", file=out)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        bench.close()
    return 1 if any(r.errors for r in results) else 0


def cmd_calibrate(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    cfg = load_config(args.config) if args.config else AgentConfig()
    state_dir = Path(args.state_dir) if args.state_dir else (
        None if args.sim else Path(cfg.node.state_dir))
    bench = sim_bench(cfg) if args.sim else real_bench(cfg, record=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        fitted, points, source = run_calibration(
            bench, args.settle_s, args.measure_s, args.freq_points, out)
    except CalibrationRefused as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"calibrate: the measurements do not fit the model: {exc}", file=sys.stderr)
        return 1
    except (_Terminated, KeyboardInterrupt):
        print("interrupted; levers restored, nothing stored", file=out)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        bench.close()
    print(f"fitted from {fitted.points} points ({source}): idle {fitted.idle_w:.1f} W, "
          f"{fitted.slot_w:.1f} W per slot at full speed, frequency exponent "
          f"{fitted.freq_exponent:.2f}{'' if fitted.exponent_fitted else ' (kept: one frequency)'}"
          f"; residual {fitted.rms_w:.2f} W rms", file=out)
    if state_dir is None:
        print("simulation: not stored (give --state-dir to keep it)", file=out)
        return 0
    path = save_fitted(state_dir, fitted, source, points)
    print(f"stored in {path}", file=out)
    return 0


def _points(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 50:
        raise argparse.ArgumentTypeError(f"must be 1 to 50, got {text}")
    return value


def add_parser(subparsers: Any) -> None:
    """Add ``actuators show|test`` and ``calibrate`` to the ``qrad-agent`` command line."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="config file (default: built-in)")
        p.add_argument("--sim", action="store_true",
                       help="work on an emulated board (cpufreq and RAPL trees in a temp dir)")

    act = subparsers.add_parser("actuators", help="show and test the levers that make the heat")
    asub = act.add_subparsers(dest="actuators_cmd", required=True, metavar="ACTION")
    show = asub.add_parser("show", help="levers, ranges, current and original values, power")
    common(show)
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=cmd_show)
    test = asub.add_parser("test", help="step each lever down and up, measure, restore "
                           "(stop the agent first)")
    common(test)
    test.add_argument("--step-s", type=_seconds, default=5.0,
                      help="seconds each step is measured (default 5)")
    test.set_defaults(func=cmd_test)

    cal = subparsers.add_parser(
        "calibrate", help="fit the power model to meter or RAPL measurements (stop the agent "
        "first)")
    common(cal)
    cal.add_argument("--settle-s", type=_seconds, default=5.0,
                     help="seconds after each step before measuring (default 5)")
    cal.add_argument("--measure-s", type=_seconds, default=10.0,
                     help="seconds each step is measured (default 10)")
    cal.add_argument("--freq-points", type=_points, default=5,
                     help="frequencies to measure at, lowest to highest (default 5)")
    cal.add_argument("--state-dir", help="store the model here (default: the config's "
                     "node.state_dir; with --sim nothing is stored unless given)")
    cal.set_defaults(func=cmd_calibrate)
