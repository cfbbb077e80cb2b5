"""What every command-line module shares: argument types with bounds, and the one way a
configuration error is shown to a person."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import TextIO

from qrad_agent.config import ConfigError


def number(
    kind: type[int] | type[float],
    what: str,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    unit: str = "",
) -> Callable[[str], float]:
    """An argparse type for ``kind`` within bounds; its errors say what is allowed."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, float) and math.isnan(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be above {above:g}{unit}, got {text}")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"must be {at_least:g}{unit} or more, got {text}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be at most {at_most:g}{unit}, got {text}")
        return value

    return parse


def show_config_error(exc: ConfigError, out: TextIO | None = None) -> None:
    out = out or sys.stderr
    print(f"{exc.source}: invalid configuration", file=out)
    for line in exc.problems:
        print(f"  {line}", file=out)
