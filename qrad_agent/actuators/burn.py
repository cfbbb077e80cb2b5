"""The built-in heat maker, and the launcher every worker starts through.

    python -m qrad_agent.actuators.burn [--nice N] [--parent PID] [--cgroup FILE]... [-- ARGV...]

In order: joins each cgroup by writing its own pid to the given ``cgroup.procs`` files, so
that nothing it runs or forks is ever outside the group (a pid moved in after the start
could already have forked); lowers its priority to ``--nice``; then either ``exec``s ARGV
(the configured worker command, no shell) or spins on the CPU.

The burner spins in pure Python: one core of heat per process, no memory, no I/O. Every
quarter second it checks that its parent is still ``--parent``: a burner whose agent died
without stopping it (SIGKILL, a crash) ends itself instead of heating a room nobody
regulates. SIGTERM ends it (the default action), SIGSTOP/SIGCONT pause it.

Exit status: 0 when the parent went away, 3 when a cgroup could not be joined, 4 when the
priority could not be set, 127 when ARGV could not be executed.

Standard library only, so the agent runs it as a script (``python -I -S burn.py``) with no
import of the package: the launch costs a bare interpreter's start and nothing more.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

CHECK_PARENT_S = 0.25


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qrad-burn", description="heat maker and worker launcher")
    p.add_argument("--nice", type=int, default=0, help="niceness to run at (0-19)")
    p.add_argument("--parent", type=int, default=0, help="end when this pid stops being the parent")
    p.add_argument("--cgroup", action="append", default=[], metavar="FILE",
                   help="a cgroup.procs file to join first (repeatable)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- ARGV to exec instead of burning")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not 0 <= args.nice <= 19:
        print(f"qrad-burn: --nice must be 0 to 19, got {args.nice}", file=sys.stderr)
        return 4
    for procs in args.cgroup:
        try:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        except OSError as exc:
            print(f"qrad-burn: cannot join the cgroup {procs}: {exc.strerror}", file=sys.stderr)
            return 3
    step = args.nice - os.nice(0)
    if step > 0:
        try:
            os.nice(step)
        except OSError as exc:
            print(f"qrad-burn: cannot lower the priority: {exc.strerror}", file=sys.stderr)
            return 4
    if command:
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            print(f"qrad-burn: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
            return 127
    return burn(args.parent)


def burn(parent: int) -> int:
    x = 1
    next_check = time.monotonic() + CHECK_PARENT_S
    while True:
        for _ in range(10_000):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        if time.monotonic() >= next_check:
            if parent and os.getppid() != parent:
                return 0
            next_check = time.monotonic() + CHECK_PARENT_S


if __name__ == "__main__":
    sys.exit(main())
