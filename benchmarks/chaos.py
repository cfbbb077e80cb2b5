"""Chaos benchmark (issue 9), full size: Mosquitto, the reference dispatcher and three
radiator agents, each a real process on loopback, run 1,000 jobs while the broker is
restarted 20 times, agents are SIGKILLed 10 times and an agent's network is cut 5 times
(``tests/chaos_rig.py`` has the rig and says how each figure is measured;
``tests/test_chaos.py`` runs it small in CI).

Figures: jobs lost (target 0), jobs running twice at once (target 0), results delivered,
work done again, telemetry gaps and samples missing, time to recover per fault kind, total
time. Baseline in the same run: the same jobs with no fault (``--baseline``, on by default),
so the cost of the faults shows as a ratio of total time.

Run: ``.venv/bin/python -m benchmarks.chaos`` (``--jobs``, ``--restarts``, ``--kills``,
``--cuts``, ``--seed``; ``--no-baseline``; ``--check`` exits 1 when a target is missed).
As root the jobs run as ``nobody``; it needs ``mosquitto``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.chaos_rig import ChaosFigures, ChaosPlan, ChaosRun, job_env_dir


def run(plan: ChaosPlan, verbose: bool) -> ChaosFigures:
    work = Path(tempfile.mkdtemp(prefix="qrad-chaos-bench-"))
    try:
        with job_env_dir() as base:
            rig = ChaosRun(plan, work, base,
                           progress=(lambda s: print(f"  {s}", flush=True)) if verbose else None)
            return rig.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--restarts", type=int, default=20, help="broker restarts")
    ap.add_argument("--kills", type=int, default=10, help="agent SIGKILLs")
    ap.add_argument("--cuts", type=int, default=5, help="network cuts")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the run without faults")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)

    plan = ChaosPlan(jobs=args.jobs, broker_restarts=args.restarts, agent_kills=args.kills,
                     net_cuts=args.cuts, seed=args.seed, timeout_s=max(600.0, args.jobs * 1.5))
    baseline: ChaosFigures | None = None
    if args.baseline:
        print(f"baseline: {args.jobs} jobs, no fault", flush=True)
        t = time.monotonic()
        baseline = run(ChaosPlan(jobs=args.jobs, broker_restarts=0, agent_kills=0, net_cuts=0,
                                 seed=args.seed, timeout_s=plan.timeout_s), False)
        print(f"  done in {time.monotonic() - t:.1f} s", flush=True)
    print(f"chaos: seed {args.seed}", flush=True)
    figures = run(plan, not args.quiet)
    print()
    print(figures.report())
    if baseline is not None:
        print()
        print(f"baseline without faults: {len(baseline.lost)} lost, {baseline.running_twice} "
              f"running twice, {baseline.results_delivered} results, work done again "
              f"{baseline.work_done_more_than_once}; jobs from first start to last success "
              f"{baseline.jobs_s:.1f} s")
        print(f"chaos / baseline, time from first start to last success: "
              f"{figures.jobs_s / max(baseline.jobs_s, 1e-9):.2f}x")
    missed = []
    if figures.lost:
        missed.append(f"{len(figures.lost)} jobs lost")
    if figures.running_twice:
        missed.append(f"{figures.running_twice} jobs ran twice at once")
    if figures.unrecovered():
        missed.append(f"{len(figures.unrecovered())} faults without recovery")
    print("targets: " + ("met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
