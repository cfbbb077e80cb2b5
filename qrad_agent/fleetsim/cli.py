"""``qrad-agent fleetsim``: a fleet of simulated radiators under the agent's policy and the
hysteresis baseline, side by side (see ``fleetsim/run.py`` for the loop and definitions)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace

from qrad_agent.cli_args import number

_positive = number(float, "a number", above=0)
_count = number(int, "a whole number", at_least=1, at_most=10000)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "fleetsim",
        help="simulate a fleet of radiators with a job trace: the agent's policy against the "
        "hysteresis baseline",
        description="N radiators (the agent's real decision code on simulated rooms), the "
        "reference dispatcher's placement and a job trace, in lockstep on one simulated clock; "
        "the same rooms and trace under the hysteresis baseline; one table side by side.",
    )
    p.add_argument("--radiators", type=_count, default=100, help="radiators (default 100)")
    p.add_argument("--days", type=_positive, default=7.0, help="simulated days (default 7)")
    p.add_argument("--seed", type=int, default=1, help="seed of rooms, weather, trace (default 1)")
    p.add_argument("--period", type=_positive, default=None,
                   help="control period in seconds (default: FleetConfig's)")
    p.add_argument("--load", type=_positive, default=None,
                   help="core-hours of work arriving per radiator on a weekday")
    p.add_argument("--processes", type=int, choices=(1, 2), default=1,
                   help="2: run the two policies side by side in two processes")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_fleetsim)


def cmd_fleetsim(args: argparse.Namespace) -> int:
    from qrad_agent.fleetsim.run import FleetConfig, default_warmup_h, format_table, run_fleet

    cfg = FleetConfig(radiators=args.radiators, days=args.days, seed=args.seed,
                      warmup_h=default_warmup_h(args.days))
    if args.period is not None:
        cfg = replace(cfg, period_s=args.period)
    if args.load is not None:
        cfg = replace(cfg, load_core_h=args.load)
    result = run_fleet(cfg, args.processes)
    if args.json:
        out = {"config": asdict(cfg), "jobs_in_trace": result.jobs_in_trace,
               "agent": asdict(result.agent), "hysteresis": asdict(result.hysteresis)}
        print(json.dumps(out, indent=2))
    else:
        print(format_table(result))
    return 0
