"""Control benchmark: every shipped scenario under the agent, bang-bang and simple-pid.

Prints one table with each KPI and its ratio to bang-bang in the same run, then the targets
of issue 2 with a verdict. Run: ``.venv/bin/python -m benchmarks.control`` (``--days`` to
shorten, ``--jobs 2`` to run scenarios side by side, ``--check`` to exit 1 on a miss).

Targets, on every shipped scenario:
- agent discomfort <= 1/3 of bang-bang's, at energy <= 1.05x bang-bang's;
- agent steady-state RMS error <= 0.1 K;
- agent worker starts <= 1/4 of bang-bang's switches;
- a simulated radiator-week in <= 10 s of wall time.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor

from qrad_agent.config import AgentConfig
from qrad_agent.sim.run import Kpis, simulate
from qrad_agent.sim.scenario import load_scenario, shipped_scenarios

CONTROLLERS = ("agent", "bangbang", "simple-pid")


def run_one(scenario: str, controller: str, days: float | None) -> Kpis:
    return simulate(AgentConfig(), load_scenario(scenario), controller, None, days)


def ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}x" if b else "   - "


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--days", type=float, help="simulate fewer days than each scenario has")
    p.add_argument("--jobs", type=int, default=1, help="parallel simulations (default 1)")
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = p.parse_args(argv)

    scenarios = shipped_scenarios()
    work = [(s, c) for s in scenarios for c in CONTROLLERS]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run_one, *zip(*work, strict=True), [args.days] * len(work)))
    by = {(k.scenario, k.controller): k for k in results}

    print(f"{'scenario':<12} {'controller':<10} {'discomfort K·h':>16} {'energy kWh':>17} "
          f"{'RMS K':>6} {'overshoot K':>11} {'starts':>13} {'switches':>10} {'wall s':>7}")
    for s in scenarios:
        bb = by[(s, "bangbang")]
        for c in CONTROLLERS:
            k = by[(s, c)]
            print(
                f"{s:<12} {c:<10} {k.discomfort_kh:8.2f} {ratio(k.discomfort_kh, bb.discomfort_kh)}"
                f" {k.energy_kwh:9.2f} {ratio(k.energy_kwh, bb.energy_kwh)} {k.rms_error_k:6.3f}"
                f" {k.max_overshoot_k:11.2f} {k.worker_starts:6d}"
                f" {ratio(k.worker_starts, bb.switches)} {k.switches:10d} {k.wall_s:7.2f}"
            )
    print()
    failures = 0
    for s in scenarios:
        a, bb = by[(s, "agent")], by[(s, "bangbang")]
        week_wall = a.wall_s * 7.0 / max(a.sim_days, 1e-9)
        checks = [
            ("discomfort <= 1/3 bang-bang", a.discomfort_kh <= bb.discomfort_kh / 3,
             f"{a.discomfort_kh:.2f} vs {bb.discomfort_kh / 3:.2f}"),
            ("energy <= 1.05x bang-bang", a.energy_kwh <= 1.05 * bb.energy_kwh,
             f"{a.energy_kwh / bb.energy_kwh:.3f}x"),
            ("RMS error <= 0.1 K", a.rms_error_k <= 0.1, f"{a.rms_error_k:.3f} K"),
            ("starts <= 1/4 bang-bang switches", a.worker_starts * 4 <= bb.switches,
             f"{a.worker_starts} vs {bb.switches / 4:.0f}"),
            ("week in <= 10 s wall", week_wall <= 10.0, f"{week_wall:.1f} s per week"),
        ]
        for name, ok, detail in checks:
            failures += not ok
            print(f"{'PASS' if ok else 'MISS'}  {s:<12} {name:<36} {detail}")
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
