"""Shared pieces of the fuzz tests: the budget, case counters and hostile JSON values.

The budget: every fuzz target runs ``QRAD_FUZZ_EXAMPLES`` generated cases (default
:data:`CI_EXAMPLES`, sized for the test suite); ``python -m benchmarks.fuzz --examples N``
sets it for a long run. The counters record how many cases each target really executed and
how each ended, so the benchmark prints counts that come from the runs, not from settings.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

CI_EXAMPLES = 60
LONG = "QRAD_FUZZ_LONG"  # set (to anything) by the benchmark: targets that only it runs

F = TypeVar("F", bound=Callable[..., Any])


def budget() -> int:
    text = os.environ.get("QRAD_FUZZ_EXAMPLES", "")
    return int(text) if text.strip() else CI_EXAMPLES


def long_run() -> bool:
    return bool(os.environ.get(LONG))


def fuzz_settings(share: float = 1.0) -> Callable[[F], F]:
    """The settings of one fuzz target: ``share`` of the budget (at least 10 cases)."""
    return settings(
        max_examples=max(10, int(budget() * share)),
        deadline=None,
        database=None,  # a CI run must not replay a developer's saved failures, nor save any
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )


# cases executed per target, and how each ended: (target, "accepted" | "refused" | ...)
CASES: Counter[str] = Counter()
OUTCOMES: Counter[tuple[str, str]] = Counter()


def count(target: str, outcome: str) -> None:
    CASES[target] += 1
    OUTCOMES[(target, outcome)] += 1


# ------------------------------------------------------------------ hostile values

INT_EDGES = [0, -1, 1, 2**31 - 1, 2**31, 2**53 - 1, 2**53, 2**53 + 1, -(2**53) - 1,
             2**63, -(2**63), 10**30]
FLOAT_EDGES = [0.0, -0.0, 5e-324, -5e-324, 1e-300, 1.7976931348623157e308, -1e308,
               math.nan, math.inf, -math.inf, 4102444800.0, 4102444800.5, 1e21, 1e22]
TEXT_EDGES = ["", " ", "\x00", "\ud800", "\udfff", "\U0001f525", "é" * 70, "x" * 5000,
              "../../etc/passwd", "-rf", "a/b", "null", "NaN", "1e999", "🔥\u202e", "\r\n",
              "\u2028"]

numbers = st.one_of(
    st.sampled_from(INT_EDGES), st.integers(-(10**20), 10**20),
    st.sampled_from(FLOAT_EDGES), st.floats(allow_nan=True, allow_infinity=True),
    # plausible magnitudes too (temperatures, durations, counts), so that many cases pass the
    # range checks and reach the code behind them
    st.floats(-100, 1000), st.integers(-10, 10_000),
)
texts = st.one_of(st.sampled_from(TEXT_EDGES), st.text(max_size=40),
                  st.text(alphabet=st.characters(codec="utf-8"), max_size=20))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(texts, inner, max_size=4)),
    max_leaves=10,
)


def dumps(value: Any, compact: bool = False) -> bytes:
    """``value`` as a sender might write it: NaN/Infinity as the bare tokens Python writes
    (which the node must refuse), lone surrogates as \\u escapes."""
    if compact:
        return json.dumps(value, separators=(",", ":")).encode()
    return json.dumps(value).encode()


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any],
            keep: frozenset[str] = frozenset()) -> tuple[dict[str, Any], str, Any]:
    """A copy of the JSON object ``valid`` with one field, at any depth, given a hostile value
    of its own type or of any type, removed, or joined by an unknown one. Returns (object,
    the field's name, its new value: None when removed).
    ``keep``: top-level keys never touched."""
    obj: Any = json.loads(json.dumps(valid))
    holder: dict[str, Any] = obj
    while True:
        keys = sorted(k for k in holder if not (holder is obj and k in keep))
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        inner = holder[key]
        if isinstance(inner, list) and inner and isinstance(inner[0], dict) \
                and draw(st.booleans()):
            holder = inner[0]
            continue
        if isinstance(inner, dict) and inner and draw(st.booleans()):
            holder = inner
            continue
        break
    how = draw(st.sampled_from(["alike", "alike", "retype", "remove", "add"]))
    keys = sorted(k for k in holder if not (holder is obj and k in keep))
    if how == "add" or not keys:
        name = draw(st.text(min_size=3, max_size=12).filter(lambda k: k not in holder))
        value = holder[name] = draw(junk)
        return obj, name, value
    name = draw(st.sampled_from(keys))
    if how == "remove":
        del holder[name]
        return obj, name, None
    value = holder[name] = draw(alike(holder[name]) if how == "alike" else junk)
    return obj, name, value


def alike(value: Any) -> st.SearchStrategy[Any]:
    """A hostile value of the same JSON type as ``value``: edge numbers for a number, odd
    text for a string (so that many cases pass the type check and reach the range checks and
    the code behind them)."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int | float):
        return numbers
    if isinstance(value, str):
        return texts
    return junk
