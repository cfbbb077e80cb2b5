"""``qrad-agent``: the technician's and the developer's command line. Parsing and printing
only; the work is done by the modules it calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from qrad_agent import __version__
from qrad_agent.cli_args import number, show_config_error
from qrad_agent.config import AgentConfig, ConfigError, json_schema, load_config

_positive = number(float, "a number", above=0)
_port = number(int, "a port number", at_least=1, at_most=65535)


if TYPE_CHECKING:
    from qrad_agent.agent import Agent
    from qrad_agent.core.controller import Decision
    from qrad_agent.sim.world import SimWorld


def _load(path: str | None) -> AgentConfig:
    return load_config(path) if path else AgentConfig()


def cmd_config(args: argparse.Namespace) -> int:
    if args.config_cmd == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    try:
        load_config(args.file)
    except ConfigError as exc:
        show_config_error(exc)
        return 1
    print(f"{args.file}: ok")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from qrad_agent.connect import connect_fleet
    from qrad_agent.runner import StopFlag, run_service

    cfg = _load(args.config)
    stop = StopFlag()
    stop.install()
    if not args.sim:
        from qrad_agent.hardware import build_hardware_agent, with_overlay

        agent = build_hardware_agent(cfg)
        fleet = connect_fleet(agent, agent.cfg, stop.wake)
        # a reload reads the file again and lays `tune --apply`'s overlay over it, as at start
        return run_service(agent, stop, config_path=args.config, adapt=with_overlay,
                           status_socket=args.status_socket, metrics_port=args.metrics_port,
                           on_beat=fleet.beat if fleet else None,
                           after_stop=fleet.after_stop() if fleet else (),
                           wake_fds=fleet.wake_fds if fleet else None,
                           after_wake=fleet.after_wake if fleet else None)

    from qrad_agent.sim.run import build_sim_agent
    from qrad_agent.sim.scenario import load_scenario
    from qrad_agent.sim.world import config_for_scenario

    scenario = load_scenario(args.scenario or cfg.sim.scenario)
    agent, world = build_sim_agent(cfg, scenario)
    fleet = connect_fleet(agent, agent.cfg, stop.wake, world)
    live = LiveReadout(agent, world, sys.stdout)
    print(
        f"qrad-agent {__version__}: simulated radiator in '{scenario.name}' at {args.speed:g}x "
        f"({scenario.radiator.max_power_w:.0f} W, {scenario.radiator.cores} slots). Ctrl-C stops."
    )
    try:
        return run_service(
            agent, stop, world, args.speed, live.show, args.duration, config_path=args.config,
            adapt=lambda c: config_for_scenario(c, scenario), status_socket=args.status_socket,
            metrics_port=args.metrics_port, on_beat=fleet.beat if fleet else None,
            after_stop=fleet.after_stop() if fleet else (),
            wake_fds=fleet.wake_fds if fleet else None,
            after_wake=fleet.after_wake if fleet else None,
        )
    finally:
        live.summary(stop.signal_name)
        world.close()


class LiveReadout:
    """One line per control tick: what the room is, what the agent wants, what it runs."""

    def __init__(self, agent: Agent, world: SimWorld, out: TextIO) -> None:
        self.agent, self.world = agent, world
        self.out = out
        self.tty = self.out.isatty()
        self.energy_start = world.energy_wh

    def show(self, decision: Decision) -> None:
        room = self.agent.stats.last_room.temperature_c
        target = "off" if decision.target_c is None else f"{decision.target_c:4.1f}"
        shown = "  —  " if room is None else f"{room:5.2f}"
        line = (
            f"{self.world.local_time():%a %H:%M}  room {shown} °C"
            f"  target {target} °C ({decision.reason})  demand {decision.demand:4.0%}"
            f"  plan {decision.plan.describe()}  {self.world.lever_power_w():4.0f} W"
            f"  outdoor {self.world.outdoor_c:5.1f} °C"
        )
        if self.tty:
            self.out.write("\r" + line + "\x1b[K")
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def summary(self, signal_name: str) -> None:
        w = self.world
        why = f" ({signal_name})" if signal_name else ""
        print(
            f"\nstopped{why} after {w.t / 3600:.1f} simulated hours: room {w.room.air_c:.2f} °C,"
            f" energy {(w.energy_wh - self.energy_start) / 1000:.2f} kWh,"
            f" {w.slots.starts} worker starts, {self.agent.stats.ticks} control ticks;"
            " levers restored."
        )


def cmd_simulate(args: argparse.Namespace) -> int:
    from qrad_agent.sim.run import Trace, simulate
    from qrad_agent.sim.scenario import load_scenario

    cfg = _load(args.config)
    scenario = load_scenario(args.scenario)
    trace = Trace() if args.plot else None
    kpis = simulate(cfg, scenario, args.controller, trace, args.days)
    if args.plot and trace is not None:
        from qrad_agent.sim.plot import plot_trace

        plot_trace(trace, kpis, Path(args.plot))
    if args.json:
        print(json.dumps(kpis.as_dict()))
    else:
        print(f"scenario {kpis.scenario}, controller {kpis.controller}, {kpis.sim_days:.1f} days")
        print(f"  discomfort        {kpis.discomfort_kh:8.3f} K·h")
        print(f"  energy            {kpis.energy_kwh:8.2f} kWh  (mean {kpis.mean_power_w:.0f} W)")
        print(f"  rms error         {kpis.rms_error_k:8.3f} K")
        print(f"  max overshoot     {kpis.max_overshoot_k:8.2f} K")
        print(f"  worker starts     {kpis.worker_starts:8d}   switches {kpis.switches}")
        print(f"  compute           {kpis.compute_core_hours:8.1f} core-hours")
        print(f"  wall time         {kpis.wall_s:8.2f} s")
        if args.plot:
            print(f"  plot              {args.plot}")
    return 0


# Commands defined in this module. For them the other command groups are not registered:
# their modules (sensor scan, actuator tests, doctor with ssl and ctypes, tuning) would stay
# resident in the agent's memory for nothing (about 3 MB of `run`'s peak RSS).
_OWN_COMMANDS = frozenset({"run", "simulate", "config"})


def _command(argv: Sequence[str]) -> str | None:
    """The command word of ``argv``: the first argument that is not an option (the options
    before the command, -v, --version and -h, take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command`` one of this module's own commands, only
    what that command needs (``--help`` without a command lists every group)."""
    p = argparse.ArgumentParser(
        prog="qrad-agent",
        description="The agent for compute radiators: keeps a room warm by deciding how much "
        "to compute.",
    )
    p.add_argument("--version", action="version", version=f"qrad-agent {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent (on the board, or --sim)")
    run.add_argument("-c", "--config", help="config file (default: built-in simulated radiator)")
    run.add_argument("--sim", action="store_true", help="run on a simulated radiator")
    run.add_argument("--speed", type=_positive, default=60.0,
                     help="simulated seconds per real second with --sim (default 60)")
    run.add_argument("--scenario", help="scenario name or file for --sim (default: config's)")
    run.add_argument("--duration", type=_positive, help="stop after this many real seconds")
    run.add_argument("--status-socket", metavar="PATH",
                     help="serve status on this Unix socket (default: ops.status_socket, else "
                          "/run/qrad-agent/status.sock, or a per-user temp path with --sim)")
    run.add_argument("--metrics-port", type=_port, metavar="PORT",
                     help="serve Prometheus metrics on 127.0.0.1:PORT (default: ops.metrics)")
    run.set_defaults(func=cmd_run)

    sim = sub.add_parser("simulate", help="run a scenario as fast as possible and score it")
    sim.add_argument("--scenario", required=True, help="scenario name (winter-week, …) or file")
    sim.add_argument("-c", "--config", help="agent config file (default: built-in)")
    sim.add_argument("--controller", choices=("agent", "bangbang", "simple-pid"), default="agent")
    sim.add_argument("--days", type=_positive, help="simulate this many days (default: scenario's)")
    sim.add_argument("--json", action="store_true", help="print the KPIs as one JSON object")
    sim.add_argument("--plot", metavar="FILE.png", help="draw temperatures, power and slots")
    sim.set_defaults(func=cmd_simulate)

    if command not in _OWN_COMMANDS:
        from qrad_agent.actuators.cli import add_parser as add_actuators_parser
        from qrad_agent.fleetsim.cli import add_parser as add_fleetsim_parser
        from qrad_agent.link import cli as link_cli
        from qrad_agent.ops.cli import add_parser as add_ops_parser
        from qrad_agent.sensors.cli import add_parser as add_sensors_parser
        from qrad_agent.tune_cli import add_parser as add_tune_parser

        add_sensors_parser(sub)
        add_actuators_parser(sub)
        add_ops_parser(sub)
        add_tune_parser(sub)
        link_cli.add_parser(sub)
        add_fleetsim_parser(sub)

    conf = sub.add_parser("config", help="validate a config file or print its JSON Schema")
    csub = conf.add_subparsers(dest="config_cmd", required=True, metavar="ACTION")
    val = csub.add_parser("validate", help="check a config file; exit 0 if valid, 1 if not")
    val.add_argument("file")
    csub.add_parser("schema", help="print the JSON Schema of the config")
    conf.set_defaults(func=cmd_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from qrad_agent.ops.logging import configure

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command(argv)).parse_args(argv)
    configure(verbose=args.verbose)
    try:
        return int(args.func(args))
    except ConfigError as exc:  # also an unusable scenario file
        show_config_error(exc)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `qrad-agent sensors scan | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
