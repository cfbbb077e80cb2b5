"""Every fuzz target with a large budget: inbound MQTT messages (agent and dispatcher) and the
config loader, with the counts of cases each really ran, how they ended, and crashes.

The targets are the property tests of ``tests/test_messages_fuzz.py`` (which also holds the
config loader's properties for the long run); they run here in this process under pytest with
``QRAD_FUZZ_EXAMPLES`` set to the budget. A crash is any failing target: an exception that
escaped the entry point, a refusal that does not name the field, or stored state that changed
on a refusal. Hypothesis stops a target at its first failure and shrinks it, so a failing
target counts one crash however many cases would have failed. The suite runs the same targets
with a budget of ``tests/fuzz_strategies.CI_EXAMPLES``.

Run: ``.venv/bin/python -m benchmarks.fuzz [--examples 2000] [-k EXPR]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_FILE = REPO / "tests" / "test_messages_fuzz.py"


@dataclass
class Collector:
    """A pytest plugin: outcome and time of each test."""

    results: dict[str, tuple[str, float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def pytest_runtest_logreport(self, report: Any) -> None:
        name = report.nodeid.split("::")[-1]
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            outcome = report.outcome
            if report.when == "setup" and outcome == "skipped":
                outcome = "skipped"
            elif report.when == "setup":
                outcome = "error"
            self.results[name] = (outcome, report.duration)
            if outcome in ("failed", "error"):
                self.failures[name] = str(report.longrepr)[-1500:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000,
                    help="cases per target (scaled per target as in the suite; default 2000)")
    ap.add_argument("-k", default="", help="only the targets matching this pytest expression")
    args = ap.parse_args(argv)

    os.environ["QRAD_FUZZ_EXAMPLES"] = str(args.examples)
    os.environ["QRAD_FUZZ_LONG"] = "1"
    collector = Collector()
    started = time.monotonic()
    pytest_args = [str(TEST_FILE), "-q", "-p", "no:cacheprovider", "--no-header", "-rN"]
    if args.k:
        pytest_args += ["-k", args.k]
    code = pytest.main(pytest_args, plugins=[collector])
    wall = time.monotonic() - started

    from tests.fuzz_strategies import CASES, OUTCOMES

    print(f"\nfuzz: budget {args.examples} cases per target (scaled per target), "
          f"{wall:.0f} s in all")
    print(f"{'target':44s} {'cases':>7s} {'accepted':>9s} {'refused':>8s} "
          f"{'not applied':>11s}")
    crashes = 0
    tests = dict(collector.results)
    targets = sorted(CASES)
    for target in targets:
        acc = OUTCOMES[(target, "accepted")]
        ref = OUTCOMES[(target, "refused")]
        later = OUTCOMES[(target, "not applied")]
        print(f"{target:44s} {CASES[target]:7d} {acc:9d} {ref:8d} {later:11d}")
    print()
    print(f"{'test':52s} {'outcome':>8s} {'time s':>7s}")
    for name, (outcome, duration) in sorted(tests.items()):
        crash = outcome in ("failed", "error")
        crashes += crash
        print(f"{name:52s} {outcome:>8s} {duration:7.1f}")
    total = sum(CASES.values())
    print(f"\n{total} cases in {len(targets)} targets; crashes: {crashes} (must be 0)")
    if code not in (0, 1, 5):  # 1: tests failed, counted above; else pytest itself failed
        print(f"pytest could not run the targets (exit code {code}): see its output above")
    for name, text in collector.failures.items():
        print(f"\n--- {name}\n{text}")
    return 1 if crashes or code not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
