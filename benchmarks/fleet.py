"""Fleet benchmark (issue 9): 100 radiators for 7 days under the agent's policy and under
Qarnot's hysteresis baseline, same rooms, weather and job trace, side by side.

Prints the table of ``qrad-agent fleetsim`` (ratios agent / hysteresis in the same run), then
the targets of issue 9 with a verdict. Run: ``.venv/bin/python -m benchmarks.fleet``
(``--radiators``, ``--days``, ``--seed``, ``--period``; ``--processes 1`` runs the two policies
one after the other; ``--check`` exits 1 on a miss).

Targets:
- 100 radiators x 7 days in <= 60 s of wall time (the two policies in two processes);
- the agent meets >= 98 % of the heat demand;
- >= 90 % of the agent's heat comes from paid jobs while the queue holds work;
- the agent's discomfort (mean per room) and job slowdown (mean over finished jobs) are both
  better than the hysteresis policy's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from qrad_agent.fleetsim.run import FleetConfig, default_warmup_h, format_table, run_fleet

WALL_TARGET_S = 60.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--radiators", type=int, default=100)
    p.add_argument("--days", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=1)
    default_period = FleetConfig().period_s
    p.add_argument("--period", type=float, default=default_period,
                   help=f"control period in seconds (default {default_period:g})")
    p.add_argument("--processes", type=int, choices=(1, 2), default=2)
    p.add_argument("--max-job-cores", type=int, choices=(1, 2, 4), default=4,
                   help="put every job on at most this many cores (same work); a variant")
    p.add_argument("--no-throttled-starts", action="store_true",
                   help="jobs start only on as many free slots as their cores (before 0017)")
    p.add_argument("--no-speed-hint", action="store_true",
                   help="the allocator ignores urgent work: many slots at low frequency (0002)")
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = p.parse_args(argv)

    cfg = FleetConfig(radiators=args.radiators, days=args.days, seed=args.seed,
                      period_s=args.period, warmup_h=default_warmup_h(args.days),
                      max_job_cores=args.max_job_cores,
                      throttled_starts=not args.no_throttled_starts,
                      speed_hint=not args.no_speed_hint)
    started = time.perf_counter()
    result = run_fleet(cfg, args.processes)
    wall = time.perf_counter() - started
    print(format_table(result))
    a, h = result.agent, result.hysteresis
    print(f"returns by reason: agent {dict(sorted(a.returns_by_reason.items()))}; "
          f"hysteresis {dict(sorted(h.returns_by_reason.items()))}")
    print()
    # the wall target is for 100 radiator-weeks; a smaller run is scaled to it
    scale = (100 * 7.0) / (cfg.radiators * cfg.days)
    checks = [
        (f"wall <= {WALL_TARGET_S:g} s for 100 radiator-weeks", wall * scale <= WALL_TARGET_S,
         f"{wall:.1f} s for this run ({wall * scale:.1f} s scaled; agent {a.wall_s:.1f} s wall "
         f"{a.cpu_s:.1f} s CPU, hysteresis {h.wall_s:.1f} s wall {h.cpu_s:.1f} s CPU, "
         f"{args.processes} process(es), load average {os.getloadavg()[0]:.1f})"),
        ("heat demand met >= 98 %", a.demand_met >= 0.98,
         f"{100 * a.demand_met:.2f} % (hysteresis {100 * h.demand_met:.2f} %)"),
        ("paid share >= 90 % while the queue holds work", a.paid_share_queued >= 0.90,
         f"{100 * a.paid_share_queued:.1f} % over {a.queue_held_work_h:.1f} h "
         f"(hysteresis {100 * h.paid_share_queued:.1f} % over {h.queue_held_work_h:.1f} h)"),
        ("discomfort better than hysteresis", a.discomfort_mean_kh < h.discomfort_mean_kh,
         f"{a.discomfort_mean_kh:.2f} vs {h.discomfort_mean_kh:.2f} K·h per room "
         f"({_ratio(a.discomfort_mean_kh, h.discomfort_mean_kh)})"),
        ("job slowdown better than hysteresis", a.slowdown_all < h.slowdown_all,
         f"{a.slowdown_all:.2f} vs {h.slowdown_all:.2f} mean "
         f"({_ratio(a.slowdown_all, h.slowdown_all)})"),
    ]
    failures = 0
    for name, ok, detail in checks:
        failures += not ok
        print(f"{'PASS' if ok else 'MISS'}  {name:<48} {detail}")
    return 1 if args.check and failures else 0


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


if __name__ == "__main__":
    sys.exit(main())
