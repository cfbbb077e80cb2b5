"""``qrad-agent asyncapi``: print or write the AsyncAPI document of the MQTT contract.

The lead wires it into ``qrad_agent/cli.py`` with ``link.cli.add_parser(sub)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def cmd_asyncapi(args: argparse.Namespace) -> int:
    from qrad_agent.link.asyncapi import render

    text = render()
    if args.check:
        path = Path(args.check)
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"{path} is out of date; regenerate it with `qrad-agent asyncapi -o {path}`",
                  file=sys.stderr)
            return 1
        print(f"{path}: up to date")
        return 0
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
        return 0
    sys.stdout.write(text)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``asyncapi`` to the ``qrad-agent`` sub-commands (``subparsers`` is what
    ``ArgumentParser.add_subparsers()`` returned)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "asyncapi",
        help="print the AsyncAPI 3.0 document of the MQTT contract (docs/asyncapi.yaml)",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", metavar="FILE", help="write it to FILE")
    out.add_argument("--check", metavar="FILE",
                     help="exit 1 if FILE differs from what would be generated")
    p.set_defaults(func=cmd_asyncapi)
    return p
