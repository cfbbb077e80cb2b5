"""``qrad-fleet``: the operator's side (dispatcher, submit, jobs, nodes, cmd, keygen)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from qrad_agent import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qrad-fleet",
        description="Operate a fleet of compute radiators over MQTT. The dispatcher and the "
        "operator commands arrive with the fleet-link and jobs work; this release has none yet.",
    )
    p.add_argument("--version", action="version", version=f"qrad-fleet {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().print_help() if not argv else build_parser().parse_args(argv)
    return 0
