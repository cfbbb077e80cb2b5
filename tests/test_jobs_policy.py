"""The pure job policy (``core/jobs.py``): who holds the slots, what is suspended or returned,
when work is asked for."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from qrad_agent.core.jobs import (
    Action,
    Conditions,
    JobView,
    Phase,
    PolicyConfig,
    PolicyInputs,
    Priority,
    Resume,
    Return,
    ReturnReason,
    Start,
    Suspend,
    decide,
    urgent_cores,
)
from qrad_agent.core.models import Plan

CFG = PolicyConfig(grace_s=600.0, request_interval_s=30.0, horizon_s=3600.0)
H, L, B = Priority.HIGH, Priority.LOW, Priority.BACKGROUND


def plan(slots: int, quota: float = 1.0) -> Plan:
    return Plan(slots, 2_000_000, quota)


def job(name: str, prio: Priority = L, phase: Phase = Phase.QUEUED, cores: int = 1,
        since: float = 0.0, order: int = 0, lease_until: float = math.inf) -> JobView:
    return JobView(name, 1, prio, phase, cores, since, order, lease_until)


NO_CONDITIONS = Conditions()


def run(slots: int, *jobs: JobView, now: float = 100.0, quota: float = 1.0,
        conditions: Conditions = NO_CONDITIONS, filler: bool = True,
        next_request_at: float = -math.inf, slot_w: float = 80.0):
    return decide(PolicyInputs(now, plan(slots, quota), tuple(jobs), filler, conditions, slot_w,
                               next_request_at), CFG)


def names(actions: list[Action]) -> list[str]:
    return [a.job_id for a in actions]


# -- filling by priority -------------------------------------------------------------------------


def test_slots_are_filled_by_priority_then_arrival() -> None:
    d = run(2, job("bg", B, order=1), job("low1", L, order=2), job("high", H, order=3),
            job("low0", L, order=0))
    assert names(d.of(Start)) == ["high", "low0"]
    assert d.filler == 0 and d.free_slots == 0


def test_a_suspended_job_resumes_before_a_queued_one_of_its_priority() -> None:
    d = run(1, job("queued", L, order=0), job("paused", L, Phase.SUSPENDED, order=5))
    assert d.of(Resume) == [Resume("paused", 1)] and not d.of(Start)


def test_a_job_that_does_not_fit_lets_a_smaller_one_run() -> None:
    d = run(2, job("big", H, cores=3, order=0), job("small", L, order=1))
    assert names(d.of(Start)) == ["small"]
    assert d.filler == 1  # the last slot makes heat with filler meanwhile


def test_running_jobs_keep_their_slots_against_higher_priority() -> None:
    # no churn: a waiting high job gets the next free slot, it does not evict running work
    d = run(1, job("bg", B, Phase.RUNNING), job("high", H, order=1))
    assert not d.actions


# -- filler ---------------------------------------------------------------------------------------


def test_filler_heats_free_slots_and_is_preempted_by_real_work_at_once() -> None:
    assert run(3).filler == 3
    d = run(3, job("a"), job("b", order=1))
    assert names(d.of(Start)) == ["a", "b"] and d.filler == 1


def test_no_filler_without_heat_demand_or_when_unavailable() -> None:
    assert run(3, quota=0.0).filler == 0
    assert run(0).filler == 0
    assert run(3, filler=False).filler == 0
    assert run(3, conditions=Conditions(heat_forbidden=True)).filler == 0


# -- suspending ----------------------------------------------------------------------------------


def test_lowest_priority_is_suspended_first_newest_first_within_it() -> None:
    jobs = [job("high", H, Phase.RUNNING, since=1), job("low-old", L, Phase.RUNNING, since=2),
            job("low-new", L, Phase.RUNNING, since=3), job("bg", B, Phase.RUNNING, since=0)]
    assert names(run(3, *jobs).of(Suspend)) == ["bg"]
    assert names(run(2, *jobs).of(Suspend)) == ["bg", "low-new"]
    assert names(run(1, *jobs).of(Suspend)) == ["bg", "low-new", "low-old"]


def test_no_heat_wanted_suspends_everything_and_resumes_nothing() -> None:
    jobs = [job("a", H, Phase.RUNNING), job("b", L, Phase.SUSPENDED, since=90)]
    d = run(2, *jobs, quota=0.0)
    assert names(d.of(Suspend)) == ["a"] and not d.of(Resume) and d.filler == 0
    d = run(2, *jobs, conditions=Conditions(heat_forbidden=True))
    assert names(d.of(Suspend)) == ["a"]


def test_a_job_just_suspended_does_not_come_back_in_the_same_decision() -> None:
    # two cores running on a plan of one slot: the big job pauses, a small waiting job runs
    d = run(1, job("big", L, Phase.RUNNING, cores=2), job("small", B, order=1))
    assert d.of(Suspend) == [Suspend("big", 1)]
    assert d.of(Start) == [Start("small", 1)] and not d.of(Resume)


# -- returning -----------------------------------------------------------------------------------


def test_jobs_waiting_past_the_grace_period_are_returned() -> None:
    paused = job("paused", L, Phase.SUSPENDED, since=0.0)
    d = run(0, paused, now=599.0)
    assert not d.of(Return)
    d = run(0, paused, now=600.0)
    assert d.of(Return) == [Return("paused", 1, ReturnReason.NO_HEAT)]
    # queued without a slot (others hold them) for as long: returned too, so it runs elsewhere
    d = run(1, job("busy", H, Phase.RUNNING), job("waiting", L, since=0.0), now=600.0)
    assert d.of(Return) == [Return("waiting", 1, ReturnReason.NO_SLOT)]


def test_mode_off_or_warm_season_returns_every_job_at_once() -> None:
    jobs = [job("r", H, Phase.RUNNING), job("s", L, Phase.SUSPENDED, since=99),
            job("q", B, since=99)]
    for cond, reason in ((Conditions(mode_off=True), ReturnReason.MODE_OFF),
                         (Conditions(season_warm=True), ReturnReason.SEASON_WARM)):
        d = run(2, *jobs, conditions=cond)
        assert {a.job_id for a in d.of(Return)} == {"r", "s", "q"}
        assert all(isinstance(a, Return) and a.reason is reason for a in d.of(Return))
        assert d.request is None
    # switched off: no heat at all; a warm season's odd cold hour is filler's to heat
    assert run(2, conditions=Conditions(mode_off=True)).filler == 0
    assert run(2, conditions=Conditions(season_warm=True)).filler == 2


def test_a_lapsed_lease_returns_the_job_even_while_running() -> None:
    d = run(2, job("late", L, Phase.RUNNING, lease_until=100.0), now=100.0)
    assert d.of(Return) == [Return("late", 1, ReturnReason.LEASE_EXPIRED)]
    assert d.filler == 2  # its slot is free again


# -- asking for work ------------------------------------------------------------------------------


def test_work_is_requested_with_free_slots_and_their_heat() -> None:
    d = run(4, job("a", L, Phase.RUNNING))
    assert d.request is not None
    assert d.request.free_slots == 3 and d.request.heat_budget_w == 240.0
    assert d.request.horizon_s == 3600.0


def test_no_request_faster_than_the_interval() -> None:
    assert run(2, now=100.0, next_request_at=100.5).request is None
    assert run(2, now=100.5, next_request_at=100.5).request is not None


def test_no_request_while_draining_tripped_off_warm_or_full() -> None:
    for cond in (Conditions(draining=True), Conditions(heat_forbidden=True),
                 Conditions(mode_off=True), Conditions(season_warm=True)):
        d = run(2, conditions=cond)
        assert d.request is None and d.why_no_request, cond
    assert run(1, job("a", L, Phase.RUNNING)).request is None  # no free slot
    assert run(2, quota=0.0).request is None  # no heat wanted
    # draining stops asking, not working: queued jobs still start, filler still heats
    d = run(2, job("q"), conditions=Conditions(draining=True))
    assert d.of(Start) == [Start("q", 1)] and d.filler == 1


# -- invariants ----------------------------------------------------------------------------------

phases = st.sampled_from(list(Phase))
prios = st.sampled_from(list(Priority))


@given(st.integers(0, 6), st.floats(0.0, 1.0),
       st.lists(st.tuples(prios, phases, st.integers(1, 3), st.floats(0, 1000)), max_size=10),
       st.booleans(), st.booleans())
def test_never_more_than_the_plan_runs(
    slots: int, quota: float, spec: list[tuple[Priority, Phase, int, float]], draining: bool,
    tripped: bool,
) -> None:
    jobs = [job(f"j{i}", p, ph, c, since=s, order=i) for i, (p, ph, c, s) in enumerate(spec)]
    cond = Conditions(draining=draining, heat_forbidden=tripped)
    d = run(slots, *jobs, quota=quota, conditions=cond, now=500.0)
    gone = {a.job_id for a in d.actions if isinstance(a, Return | Suspend)}
    started = {a.job_id for a in d.actions if isinstance(a, Start | Resume)}
    running = [j for j in jobs if j.phase is Phase.RUNNING and j.job_id not in gone]
    running += [j for j in jobs if j.job_id in started]
    used = sum(j.cores for j in running) + d.filler
    allowed = slots if quota > 0 and not tripped else 0
    assert used <= allowed
    assert not started & gone  # nothing both stopped and started
    if d.request is not None:
        assert not draining and not tripped and d.request.free_slots == d.free_slots > 0


# -- throttled starts (decision 0017) ------------------------------------------------------------


def run_throttled(slots: int, *jobs: JobView, cores: int = 8, quota: float = 1.0,
                  slot_w: float = 80.0):
    return decide(PolicyInputs(100.0, plan(slots, quota), tuple(jobs), True, NO_CONDITIONS,
                               slot_w, throttle_cores=cores), CFG)


def test_without_throttling_a_wide_job_waits_for_all_its_cores() -> None:
    d = run(2, job("wide", L, cores=4))
    assert not d.of(Start) and d.filler == 2


def test_a_wide_job_starts_throttled_on_the_free_slots_instead_of_filler() -> None:
    d = run_throttled(2, job("wide", L, cores=4))
    assert names(d.of(Start)) == ["wide"]
    assert d.filler == 0 and d.free_slots == 0 and d.request is None


def test_narrower_jobs_that_fit_go_first_then_the_wide_one_takes_what_is_left() -> None:
    d = run_throttled(3, job("wide", H, cores=4, order=0), job("small", B, cores=2, order=1))
    assert names(d.of(Start)) == ["small", "wide"]
    assert d.filler == 0


def test_no_more_running_jobs_than_slots_when_throttled() -> None:
    # each running job must get at least one slot's worth of the quota
    d = run_throttled(2, job("a", L, Phase.RUNNING, cores=4, order=0),
                      job("b", L, cores=4, order=1), job("c", L, cores=4, order=2))
    assert names(d.of(Start)) == ["b"]


def test_shedding_keeps_throttled_jobs_while_each_has_a_slot() -> None:
    jobs = (job("high", H, Phase.RUNNING, cores=4, since=1.0, order=0),
            job("low", L, Phase.RUNNING, cores=2, since=2.0, order=1),
            job("bg", B, Phase.RUNNING, cores=1, since=3.0, order=2))
    assert not run_throttled(3, *jobs).actions  # 7 cores on 3 slots: slower, all running
    d = run_throttled(2, *jobs)  # two slots: the background job goes
    assert d.actions == (Suspend("bg", 1),)
    d = run(2, *jobs)  # without throttling, the high one does not fit: everything goes
    assert set(names(d.of(Suspend))) == {"high", "low", "bg"}


def test_the_request_offers_room_for_a_wide_job_but_not_for_more_jobs_than_slots() -> None:
    d = run_throttled(6, job("r", L, Phase.RUNNING, cores=4, order=0),
                      job("s", L, Phase.RUNNING, cores=1, order=1), cores=12)
    assert d.request is not None and d.free_slots == 1
    # 4 more jobs could each still get a slot; the heat budget stays the one free slot's
    assert d.request.free_slots == 4 and d.request.heat_budget_w == 80.0
    d = run_throttled(2, job("s", L, Phase.RUNNING, cores=1, order=1))
    assert d.request is not None and d.request.free_slots == 1


def test_no_wide_offer_while_a_job_waits_here() -> None:
    d = run_throttled(2, job("r", L, Phase.RUNNING, order=0), cores=8)
    assert d.request is not None and d.request.free_slots == 1
    d = run_throttled(3, job("r", L, Phase.RUNNING, cores=2, order=0),
                      job("w", L, Phase.SUSPENDED, cores=9, order=1), cores=8)
    assert not d.of(Resume)  # wider than the radiator's cores: never
    assert d.request is not None and d.request.free_slots == 1


@given(st.integers(0, 6), st.floats(0.0, 1.0),
       st.lists(st.tuples(prios, phases, st.integers(1, 4), st.floats(0, 1000)), max_size=10),
       st.booleans())
def test_throttled_jobs_never_make_more_heat_than_the_plan(
    slots: int, quota: float, spec: list[tuple[Priority, Phase, int, float]], tripped: bool,
) -> None:
    jobs = [job(f"j{i}", p, ph, c, since=s, order=i) for i, (p, ph, c, s) in enumerate(spec)]
    cond = Conditions(heat_forbidden=tripped)
    d = decide(PolicyInputs(500.0, plan(slots, quota), tuple(jobs), True, cond, 80.0,
                            throttle_cores=4), CFG)
    gone = {a.job_id for a in d.actions if isinstance(a, Return | Suspend)}
    started = {a.job_id for a in d.actions if isinstance(a, Start | Resume)}
    running = [j for j in jobs if j.phase is Phase.RUNNING and j.job_id not in gone]
    running += [j for j in jobs if j.job_id in started]
    allowed = slots if quota > 0 and not tripped else 0
    # the quota caps the jobs together at the plan's slots: what can exceed them is only
    # the jobs' cores (throttled), never their number, and then no filler runs beside them
    assert len(running) + d.filler <= allowed
    if sum(j.cores for j in running) + d.filler > allowed:
        assert d.filler == 0
    assert not started & gone


def test_urgent_cores_is_every_jobs_cores_while_high_work_is_here() -> None:
    assert urgent_cores([job("a", L, cores=2), job("b", B, Phase.RUNNING, cores=1)]) == 0
    assert urgent_cores([job("a", L, cores=2), job("h", H, Phase.SUSPENDED, cores=1)]) == 3
    assert urgent_cores([]) == 0
