"""``qrad-agent status|top|events|jobs|doctor``: what the running agent is doing, and what is
wrong with the board. Parsing and printing only: the agent answers on its status socket
(``ops/status_server.py``); the checks are in ``ops/doctor.py``.

Exit codes: 0 ok; 1 the agent does not answer or is unhealthy (status), a check failed
(doctor); 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from qrad_agent.cli_args import number, show_config_error
from qrad_agent.config import ConfigError, load_config
from qrad_agent.ops.settings import OpsConfig
from qrad_agent.ops.status_server import StatusUnavailable, fetch_status

_positive = number(float, "a number", above=0)
_count = number(int, "a whole number", at_least=0)


EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


# -- finding the agent --------------------------------------------------------------------------


def socket_for(args: argparse.Namespace) -> Path:
    """--socket, else the config's ops.status_socket, else the default (per --sim)."""
    if getattr(args, "socket", None):
        return Path(args.socket)
    ops = OpsConfig()
    if getattr(args, "config", None):
        found = getattr(load_config(args.config), "ops", None)
        if isinstance(found, OpsConfig):
            ops = found
    return ops.socket_path(bool(getattr(args, "sim", False)))


def _ask(args: argparse.Namespace) -> dict[str, Any]:
    return fetch_status(socket_for(args))


# -- formatting ---------------------------------------------------------------------------------


def _c(x: Any, digits: int = 2) -> str:
    return "—" if not isinstance(x, int | float) else f"{x:.{digits}f} °C"


def _duration(s: Any) -> str:
    if not isinstance(s, int | float):
        return "?"
    s = int(s)
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d}d {h}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m"
    return f"{m}m {sec:02d}s"


def _get(doc: Mapping[str, Any], *path: str) -> Any:
    cur: Any = doc
    for p in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(p)
    return cur


def status_lines(doc: Mapping[str, Any]) -> list[str]:
    """The status document for people: one screen, most important first."""
    agent = _get(doc, "agent") or {}
    loop = _get(doc, "loop") or {}
    state = doc.get("state", "?")
    health = "healthy" if loop.get("healthy") else "UNHEALTHY" if state == "running" else state
    where = "simulated" if agent.get("simulated") else "board"
    age = loop.get("last_tick_age_s")
    tick = f"last tick {age:.1f} s ago" if isinstance(age, int | float) else "no tick yet"
    lines = [
        f"qrad-agent {agent.get('version', '?')} on {agent.get('node', '?')} ({where}, pid "
        f"{agent.get('pid', '?')}): {state}, {health}; up {_duration(agent.get('uptime_s'))}; "
        f"{tick}",
    ]
    sim = doc.get("sim")
    if isinstance(sim, Mapping):
        lines.append(f"  sim time   {sim.get('time')}  outdoor {_c(sim.get('outdoor_c'), 1)}")
    room = _get(doc, "room") or {}
    th = _get(doc, "thermostat") or {}
    target = "off" if th.get("target_c") is None else _c(th.get("target_c"), 1)
    override = th.get("override")
    lines.append(
        f"  room       {_c(room.get('temperature_c'))} ({room.get('healthy', 0)}/"
        f"{room.get('configured', 0)} room sensors ok)   target {target} "
        f"({th.get('reason') or '—'}), mode {th.get('mode') or '—'}"
        + (f", override {_c(override.get('target_c'), 1)}" if isinstance(override, Mapping)
           else "")
    )
    demand = doc.get("demand")
    plan = _get(doc, "plan", "text") or "—"
    power = _get(doc, "power") or {}
    watts = power.get("watts")
    shown_w = f"{watts:.0f} W ({power.get('source')})" if isinstance(watts, int | float) else "—"
    lines.append(f"  heat       demand {demand:.0%}   plan {plan}   power {shown_w}"
                 if isinstance(demand, int | float) else f"  heat       no decision yet   "
                 f"power {shown_w}")
    safety = doc.get("safety")
    if isinstance(safety, Mapping):
        limit = safety.get("limit")
        by = safety.get("limited_by")
        latched = " LATCHED" if safety.get("latched") else ""
        lim = f"limit {limit:.0%}" if isinstance(limit, int | float) else ""
        lines.append(f"  safety     {'limited by ' + str(by) if by else 'ok'} {lim}{latched}"
                     .rstrip())
    else:
        lines.append("  safety     —")
    readings = _get(doc, "readings") or {}
    lines.append("  sensors")
    for name, r in readings.items():
        c = r.get("counters") or {}
        value = _c(r.get("temperature_c"))
        extra = f"  {r['detail']}" if r.get("quality") != "ok" and r.get("detail") else ""
        lines.append(f"    {name:<12} {r.get('role', ''):<8} {r.get('quality') or '—':<16} "
                     f"{value:>10}   reads {c.get('reads', 0)}, errors "
                     f"{c.get('errors_total', 0)}{extra}")
    levers = _get(doc, "levers") or {}
    shown = []
    for name, lv in levers.items():
        shown.append(f"{name} {'ok' if lv.get('available') else 'no'}")
    lines.append("  levers     " + ("  ".join(shown) or "—"))
    link = _get(doc, "link") or {}
    outbox = _get(doc, "outbox") or {}
    depth = outbox.get("depth")
    lines.append(f"  link       {link.get('state', '—')}   outbox "
                 f"{depth if depth is not None else '—'}")
    jobs = doc.get("jobs") or []
    lines.append(f"  jobs       {len(jobs) if jobs else 'none'}")
    counters = _get(doc, "counters") or {}
    lines.append(
        f"  counters   ticks {counters.get('ticks', 0)}  polls {counters.get('polls', 0)}  "
        f"lever errors {counters.get('lever_errors', 0)}  tick failures "
        f"{counters.get('tick_failures', 0)}  reloads {counters.get('reloads', 0)} "
        f"(refused {counters.get('reloads_refused', 0)})"
    )
    if loop.get("last_error"):
        lines.append(f"  last error {loop['last_error']}")
    events = doc.get("events") or []
    if events:
        last = events[-1]
        lines.append(f"  last event {event_line(last)}")
    return lines


def event_line(e: Mapping[str, Any]) -> str:
    return f"{e.get('at', '?')} [{e.get('source', '?')}] {e.get('kind', '?')}: " \
           f"{e.get('message', '')}"


# -- commands -----------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    doc = _ask(args)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(status_lines(doc)))
    healthy = doc.get("state") == "running" and _get(doc, "loop", "healthy")
    return EXIT_OK if healthy else EXIT_PROBLEM


def cmd_top(args: argparse.Namespace) -> int:
    if args.once:
        print("\n".join(status_lines(_ask(args))))
        return EXIT_OK
    try:
        import rich  # noqa: F401  (only to know whether it is there)
    except ImportError:
        return _top_plain(args, sys.stdout)
    if not sys.stdout.isatty():
        return _top_plain(args, sys.stdout)
    return _top_rich(args)


def _frame(args: argparse.Namespace) -> list[str]:
    try:
        return status_lines(_ask(args))
    except StatusUnavailable as exc:
        return [f"qrad-agent: {exc}", "", "(retrying; Ctrl-C quits)"]


def _top_plain(args: argparse.Namespace, out: TextIO) -> int:
    """Without rich: clear and redraw with ANSI escapes (on a terminal), else a frame a time."""
    tty = out.isatty()
    try:
        while True:
            frame = "\n".join(_frame(args))
            out.write(("\x1b[H\x1b[2J" if tty else "") + frame + "\n" + ("" if tty else "\n"))
            out.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _top_rich(args: argparse.Namespace) -> int:
    from rich.console import Group
    from rich.live import Live
    from rich.panel import Panel
    from rich.text import Text

    def render() -> Panel:
        lines = _frame(args)
        body = Group(*(Text(line) for line in lines[1:]))
        # Text, not str: a str title would be read as rich markup ("[agent]" and the like)
        return Panel(body, title=Text(lines[0] if lines else "qrad-agent"),
                     subtitle=Text(f"every {args.interval:g} s · Ctrl-C quits"))

    try:
        with Live(render(), screen=True, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(render(), refresh=True)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    def show(events: list[Mapping[str, Any]]) -> None:
        for e in events:
            print(json.dumps(e) if args.json else event_line(e), flush=True)

    doc = _ask(args)
    events = list(doc.get("events") or [])
    show(events[-args.lines:] if args.lines else events)
    if not args.follow:
        return EXIT_OK
    last = max((int(e.get("seq", 0)) for e in events), default=0)
    pid = _get(doc, "agent", "pid")
    try:
        while True:
            time.sleep(args.interval)
            try:
                doc = _ask(args)
            except StatusUnavailable as exc:
                print(f"qrad-agent: {exc} (still following)", file=sys.stderr, flush=True)
                continue
            if _get(doc, "agent", "pid") != pid:  # a new agent counts from 1 again
                pid, last = _get(doc, "agent", "pid"), 0
            fresh = [e for e in doc.get("events") or [] if int(e.get("seq", 0)) > last]
            show(fresh)
            if fresh:
                last = max(int(e.get("seq", 0)) for e in fresh)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = _ask(args).get("jobs") or []
    if args.json:
        print(json.dumps(jobs, indent=2))
        return EXIT_OK
    if not jobs:
        print("no jobs on this node")
        return EXIT_OK
    for j in jobs:
        if isinstance(j, Mapping):
            head = f"{j.get('id', '?')}  {j.get('state', '?')}"
            rest = "  ".join(f"{k}={v}" for k, v in j.items() if k not in ("id", "state"))
            print(f"{head}  {rest}".rstrip())
        else:
            print(j)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from qrad_agent.ops.doctor import Board, exit_code, run_checks, sim_board

    problems = set(args.inject or [])
    if problems and not args.sim:
        print("doctor: --inject works on the simulated board only (add --sim)", file=sys.stderr)
        return EXIT_USAGE
    socket_path = Path(args.socket) if args.socket else None
    if args.sim:
        from qrad_agent.config import AgentConfig

        try:
            cfg = load_config(args.config) if args.config else AgentConfig()
        except ConfigError as exc:
            show_config_error(exc)
            return EXIT_USAGE
        with sim_board(cfg, problems, socket_path) as (board, sim_cfg):
            findings = run_checks(args.config, board, cfg=sim_cfg)
    else:
        findings = run_checks(args.config, Board(status_socket=socket_path))
    if args.json:
        print(json.dumps({
            "simulated": bool(args.sim), "injected": sorted(problems),
            "ok": exit_code(findings) == 0,
            "checks": [f.as_dict() for f in findings],
        }, indent=2))
    else:
        print_findings(findings, sys.stdout)
    return exit_code(findings)


def print_findings(findings: Sequence[Any], out: TextIO) -> None:
    marks = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
    width = max((len(f.check) for f in findings), default=10)
    for f in findings:
        print(f"{marks[f.status.value]}  {f.check:<{width}}  {f.summary}", file=out)
        if f.fix and f.status.value in ("warn", "fail"):
            print(f"      {'':<{width}}  fix: {f.fix}", file=out)
    counts = {s: sum(1 for f in findings if f.status.value == s) for s in marks}
    print(f"\n{counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed, "
          f"{counts['skip']} skipped", file=out)


def _run(args: argparse.Namespace) -> int:
    """Turn the known failures into messages and exit codes."""
    try:
        return int(args.ops_func(args))
    except StatusUnavailable as exc:
        print(f"qrad-agent: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except ConfigError as exc:
        show_config_error(exc)
        return EXIT_USAGE


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status``, ``top``, ``events``, ``jobs`` and ``doctor`` to the main CLI."""

    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument("--socket", metavar="PATH",
                       help="the agent's status socket (default: ops.status_socket of -c, "
                            "else /run/qrad-agent/status.sock)")
        p.add_argument("-c", "--config", help="config file naming the socket (ops.status_socket)")
        p.add_argument("--sim", action="store_true",
                       help="ask the agent started with `run --sim` (its per-user socket)")

    status = subparsers.add_parser(
        "status", help="what the running agent is doing (exit 1 if it is unhealthy)")
    where(status)
    status.add_argument("--json", action="store_true", help="print the whole status document")
    status.set_defaults(func=_run, ops_func=cmd_status)

    top = subparsers.add_parser("top", help="a live full-screen view of the running agent")
    where(top)
    top.add_argument("--interval", type=_positive, default=1.0, metavar="SECONDS",
                     help="refresh period (default 1)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(func=_run, ops_func=cmd_top)

    events = subparsers.add_parser(
        "events", help="recent events: start, ready, reloads, safety trips, failures")
    where(events)
    events.add_argument("-f", "--follow", action="store_true",
                        help="keep printing new events until Ctrl-C")
    events.add_argument("-n", "--lines", type=_count, default=0, metavar="N",
                        help="only the last N events (default: all kept)")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument("--interval", type=_positive, default=1.0, help=argparse.SUPPRESS)
    events.set_defaults(func=_run, ops_func=cmd_events)

    jobs = subparsers.add_parser("jobs", help="the jobs on this node")
    where(jobs)
    jobs.add_argument("--json", action="store_true", help="print them as JSON")
    jobs.set_defaults(func=_run, ops_func=cmd_jobs)

    from qrad_agent.ops.doctor import PROBLEMS

    doctor = subparsers.add_parser(
        "doctor", help="check the board and the service; the fix for each problem",
        description="Checks the config, I2C buses, sensors, levers, worker cgroup, meter, "
        "broker, clock, disk and the running service. Exit 1 if a check fails.",
        epilog="problems --inject can put on the simulated board: "
        + "; ".join(f"{k}: {v}" for k, v in PROBLEMS.items()),
    )
    doctor.add_argument("-c", "--config",
                        help="config file (default /etc/qrad-agent/qrad-agent.toml; the built-in "
                             "config with --sim)")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor.add_argument("--sim", action="store_true",
                        help="check a simulated board (and the agent of `run --sim`)")
    doctor.add_argument("--socket", metavar="PATH", help="the agent's status socket")
    doctor.add_argument("--inject", action="append", choices=sorted(PROBLEMS), metavar="PROBLEM",
                        help="with --sim: give the simulated board this problem (repeatable)")
    doctor.set_defaults(func=_run, ops_func=cmd_doctor)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qrad_agent.ops.cli status|top|events|jobs|doctor ...`` on its own."""
    from qrad_agent.ops.logging import configure

    configure(verbose=False)
    parser = argparse.ArgumentParser(prog="qrad-agent")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
