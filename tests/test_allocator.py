"""Allocator: monotonic in demand, exact power through fine levers, hysteresis, minimum times."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrad_agent.config import AllocatorConfig
from qrad_agent.core.allocator import Allocator
from qrad_agent.core.power import PowerModel

MODEL = PowerModel(idle_w=20.0, slot_w=120.0, freq_exponent=1.5, max_freq_khz=3_000_000)
TABLE = list(range(800_000, 3_000_001, 100_000))


def make(**cfg: float) -> Allocator:
    return Allocator(AllocatorConfig(**cfg), 4, MODEL, 800_000, TABLE)  # type: ignore[arg-type]


def test_power_is_exactly_the_demand_when_slots_are_settled() -> None:
    a = make(min_on_s=0, min_off_s=0)
    for u in (0.05, 0.1, 0.25, 0.5, 0.73, 1.0):
        plan = a.allocate(0.0, u)
        assert MODEL.watts(plan) == pytest.approx(20 + 480 * u, rel=1e-3), (u, plan)


def test_prefers_many_slots_at_low_frequency() -> None:
    a = make(min_on_s=0, min_off_s=0)
    plan = a.allocate(0.0, 0.5)
    assert plan.slots == 4 and plan.freq_khz < 3_000_000  # not 2 slots flat out


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30), st.floats(0.0, 1.0),
       st.floats(0.0, 1.0))
def test_monotonic_in_demand_from_any_state(history: list[float], u1: float, u2: float) -> None:
    lo, hi = sorted((u1, u2))
    a1, a2 = make(), make()
    for i, u in enumerate(history):  # same past for both
        a1.allocate(i * 10.0, u)
        a2.allocate(i * 10.0, u)
    now = len(history) * 10.0
    assert MODEL.watts(a1.allocate(now, lo)) <= MODEL.watts(a2.allocate(now, hi)) + 1e-6


def test_minimum_off_time_delays_restart() -> None:
    a = make(min_on_s=0, min_off_s=600, stop_after_s=0)
    assert a.allocate(0.0, 0.5).slots == 4
    assert a.allocate(10.0, 0.0).slots == 0
    assert a.allocate(20.0, 0.5).slots == 0  # off for only 10 s
    assert a.allocate(609.0, 0.5).slots == 0
    assert a.allocate(610.0, 0.5).slots == 4
    assert a.starts == 8 and a.switches == 3  # on, off, on


def test_no_heat_wanted_pauses_slots_then_stops_them() -> None:
    a = make(min_on_s=0, min_off_s=0, stop_after_s=1800)
    a.allocate(0.0, 0.5)
    plan = a.allocate(10.0, 0.0)
    assert (plan.slots, plan.quota) == (4, 0.0)  # frozen: no dynamic power, work kept
    assert MODEL.watts(plan) == pytest.approx(20.0)
    assert a.allocate(1800.0, 0.0).quota == 0.0
    assert a.allocate(1810.0, 0.0).slots == 0  # 30 min without demand: stopped


def test_resuming_a_pause_is_not_a_start() -> None:
    a = make(min_on_s=0, min_off_s=0, stop_after_s=1800)
    a.allocate(0.0, 0.5)
    a.allocate(10.0, 0.0)  # a window airing: paused …
    assert a.allocate(20.0, 0.02).quota == 0.0  # … below start_demand it stays paused
    plan = a.allocate(600.0, 0.5)  # … and after it the same slots go on
    assert plan.slots == 4 and plan.quota > 0
    assert a.starts == 4 and a.switches == 1


def test_minimum_on_time_delays_stop_but_pause_still_cuts_power() -> None:
    a = make(min_on_s=3600, min_off_s=0, stop_after_s=0)
    a.allocate(0.0, 0.5)
    plan = a.allocate(10.0, 0.0)
    assert plan.slots == 4 and MODEL.watts(plan) == pytest.approx(20.0)  # paused, not stopped
    assert a.allocate(3600.0, 0.0).slots == 0


def test_hysteresis_keeps_slot_count_steady_under_small_wobbles() -> None:
    a = make(min_on_s=0, min_off_s=0, slot_hysteresis=0.3)
    # around 1.5 efficient slots' worth: 4 * 0.138 * 1.5 / 4
    share = MODEL.slot_share(800_000)
    base = 1.5 * share / 4
    counts = {a.allocate(i * 10.0, base * (1 + 0.1 * (-1) ** i)).slots for i in range(1, 40)}
    assert len(counts) == 1


def test_first_slot_has_start_and_stop_thresholds() -> None:
    a = make(min_on_s=0, min_off_s=0, start_demand=0.04, stop_demand=0.01, stop_after_s=0)
    assert a.allocate(0.0, 0.03).slots == 0
    assert a.allocate(10.0, 0.05).slots >= 1
    assert a.allocate(20.0, 0.02).quota > 0  # between the thresholds: keep running
    assert a.allocate(30.0, 0.005).slots == 0


def test_emergency_limit_stops_everything_despite_minimum_on_time() -> None:
    a = make(min_on_s=3600, min_off_s=0)
    a.allocate(0.0, 1.0)
    assert a.allocate(10.0, 1.0, limit=0.0).slots == 0


def test_limit_caps_power() -> None:
    a = make(min_on_s=0, min_off_s=0)
    assert MODEL.watts(a.allocate(0.0, 1.0, limit=0.5)) == pytest.approx(260.0, rel=1e-3)


def test_frequency_is_a_table_entry() -> None:
    a = make(min_on_s=0, min_off_s=0)
    for u in (0.2, 0.37, 0.61, 0.88):
        assert a.allocate(0.0, u).freq_khz in TABLE


def test_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Allocator(AllocatorConfig(), 0, MODEL, 800_000)


# -- urgent work: fewer slots at a higher frequency (decision 0018) --------------------------


def test_urgent_work_gets_fewer_slots_at_a_higher_frequency_for_the_same_heat() -> None:
    calm, urgent = make(min_on_s=0, min_off_s=0), make(min_on_s=0, min_off_s=0)
    urgent.urgent_cores = 1
    p_calm, p_urgent = calm.allocate(0.0, 0.4), urgent.allocate(0.0, 0.4)
    assert p_urgent.slots == 2 < p_calm.slots  # 1.6 slots' worth of heat needs two slots
    assert p_urgent.freq_khz > p_calm.freq_khz
    assert MODEL.watts(p_urgent) == pytest.approx(MODEL.watts(p_calm), rel=1e-3)


def test_urgent_hint_stops_only_slots_no_job_needs_and_lets_them_back_after_min_off() -> None:
    a = make(min_on_s=0, min_off_s=600)
    assert a.allocate(0.0, 0.3).slots == 4
    a.urgent_cores = 3  # three cores of jobs here, one of them urgent
    assert a.allocate(10.0, 0.3).slots == 3  # the filler slot stops at once
    # demand falls below what the jobs' cores make at the lowest frequency: their slots stay
    assert a.allocate(20.0, 0.1).slots == 3
    a.urgent_cores = 0  # the urgent job is done: efficiency again, after the off time
    assert a.allocate(30.0, 0.3).slots == 3
    assert a.allocate(620.0, 0.3).slots == 4


def test_urgent_hint_never_runs_fewer_slots_than_the_heat_needs() -> None:
    a = make(min_on_s=0, min_off_s=0)
    a.urgent_cores = 1
    plan = a.allocate(0.0, 0.9)
    assert plan.slots == 4  # 3.6 slots' worth at full speed needs four
    assert MODEL.watts(plan) == pytest.approx(20 + 480 * 0.9, rel=1e-3)


@given(st.floats(0.05, 1.0), st.integers(0, 6))
def test_power_is_exact_with_an_urgent_hint(u: float, cores: int) -> None:
    a = make(min_on_s=0, min_off_s=0)
    a.urgent_cores = cores
    plan = a.allocate(0.0, u)
    assert plan.slots <= 4
    assert MODEL.watts(plan) == pytest.approx(20 + 480 * u, rel=1e-3)
