"""Fleet simulation (issue 9): the agent's real decisions on many simulated rooms with the
dispatcher's placement and a job trace, against the hysteresis baseline. CI-sized fleets."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

import pytest

from qrad_agent.cli import main
from qrad_agent.core.jobs import Phase, Priority
from qrad_agent.fleet.queue import AVOID_S
from qrad_agent.fleetsim.model import JobSpec, RoomSpec, make_rooms, make_trace
from qrad_agent.fleetsim.policies import (
    HYSTERESIS,
    HysteresisRadiator,
    LiveJob,
    filler_next,
    freq_step,
    may_start,
    must_stop,
)
from qrad_agent.fleetsim.run import Figures, FleetConfig, run_fleet, run_policy
from qrad_agent.sim.scenario import GainPoint

SMALL = FleetConfig(radiators=6, days=1.0, seed=3, period_s=120.0, warmup_h=6.0,
                    load_core_h=20.0)


def _comparable(f: Figures) -> dict[str, Any]:
    d = asdict(f)
    d.pop("wall_s")
    d.pop("cpu_s")
    return d


def test_same_seed_same_figures_and_another_seed_differs() -> None:
    a = run_fleet(SMALL)
    b = run_fleet(SMALL)
    assert _comparable(a.agent) == _comparable(b.agent)
    assert _comparable(a.hysteresis) == _comparable(b.hysteresis)
    c = run_fleet(replace(SMALL, seed=4))
    assert _comparable(c.agent) != _comparable(a.agent)


def test_two_processes_give_the_same_figures() -> None:
    one = run_fleet(SMALL)
    two = run_fleet(SMALL, processes=2)
    assert _comparable(one.agent) == _comparable(two.agent)
    assert _comparable(one.hysteresis) == _comparable(two.hysteresis)


@pytest.mark.parametrize("policy", ["agent", "hysteresis"])
def test_every_job_is_accounted_for_exactly_once(policy: str) -> None:
    cfg = replace(SMALL, load_core_h=60.0)  # more work than the rooms want: queues and returns
    figures, rads, fleet = run_policy(policy, cfg)
    arrived = {s.job_id for s in make_trace(cfg.seed, cfg.days, cfg.load_core_h * cfg.radiators)
               if s.arrival_s <= cfg.days * 86400.0}
    finished = [j.spec.job_id for j in fleet.finished]
    failed = [j.spec.job_id for j in fleet.failed]
    queued = [e[2] for e in fleet.queue]
    held = [job_id for r in rads for job_id in r.held]
    places = finished + failed + queued + held
    assert len(places) == len(set(places)), "a job is in two places at once"
    assert set(places) == arrived
    assert figures.submitted == len(arrived)
    assert figures.finished + figures.failed + figures.queued_at_end \
        + figures.on_radiators_at_end == figures.submitted
    assert queued, "the load was meant to leave work queued"
    for j in fleet.finished:
        assert j.done_s == pytest.approx(j.spec.work_s)
        assert j.finish is not None and j.first_start is not None
        # never faster than alone at full speed
        assert j.finish - j.spec.arrival_s >= j.spec.pure_run_s - 1e-6


@pytest.mark.parametrize("policy", ["agent", "hysteresis"])
def test_heat_from_jobs_and_filler_is_what_the_levers_delivered(policy: str) -> None:
    _, rads, _ = run_policy(policy, SMALL)
    assert any(r.tally.job_wh > 0 for r in rads) and any(r.tally.filler_wh > 0 for r in rads)
    for r in rads:
        t = r.tally
        assert t.job_wh + t.filler_wh + t.idle_wh == pytest.approx(t.lever_wh, rel=1e-9)
        assert t.lever_wh == pytest.approx(t.heat_wh, rel=1e-9)


def test_hysteresis_thresholds_are_the_published_ones() -> None:
    # filler: on at 1 K below the target, off at 1 K above, unchanged in between
    assert filler_next(HYSTERESIS, False, -1.0) is True
    assert filler_next(HYSTERESIS, False, -0.9) is False
    assert filler_next(HYSTERESIS, True, 0.9) is True
    assert filler_next(HYSTERESIS, True, 1.0) is False
    # low priority (and background): start at most 1 K above, stop at 3 K above
    for prio in (Priority.LOW, Priority.BACKGROUND):
        assert may_start(HYSTERESIS, prio, 1.0) and not may_start(HYSTERESIS, prio, 1.01)
        assert must_stop(HYSTERESIS, prio, 3.0) and not must_stop(HYSTERESIS, prio, 2.99)
    # high priority: start at most 4 K above, stop at 10 K above
    assert may_start(HYSTERESIS, Priority.HIGH, 4.0)
    assert not may_start(HYSTERESIS, Priority.HIGH, 4.01)
    assert must_stop(HYSTERESIS, Priority.HIGH, 10.0)
    assert not must_stop(HYSTERESIS, Priority.HIGH, 9.99)
    # frequency: one step per period, towards the target, within the table
    assert freq_step(3, 10, -0.1) == 4 and freq_step(3, 10, 0.1) == 2
    assert freq_step(10, 10, -5.0) == 10 and freq_step(0, 10, 5.0) == 0
    assert freq_step(3, 10, 0.0) == 3


def _hysteresis_radiator() -> HysteresisRadiator:
    room = make_rooms(1, 1, 1.0)[0]
    return HysteresisRadiator(room, 1, 0.0, grace_s=1800.0)


def _job(job_id: str, prio: Priority) -> LiveJob:
    return LiveJob(JobSpec(job_id, 0, 0.0, prio, 1, 3600.0))


def _phase(r: HysteresisRadiator, job_id: str) -> Phase:
    return r.held[job_id].phase


def test_hysteresis_radiator_suspends_low_work_at_3k_and_high_at_10k() -> None:
    r = _hysteresis_radiator()
    low, high = _job("low", Priority.LOW), _job("high", Priority.HIGH)
    r.start(low, 0.0)
    r.start(high, 0.0)
    target = r.comfort_c
    r.chip.temperature_c = target + 2.9
    r.control(60.0, target)
    assert _phase(r, "low") is Phase.RUNNING and not r.filler_on
    r.chip.temperature_c = target + 3.2
    r.control(120.0, target)
    assert _phase(r, "low") is Phase.SUSPENDED
    assert _phase(r, "high") is Phase.RUNNING
    r.chip.temperature_c = target + 10.1
    r.control(180.0, target)
    assert _phase(r, "high") is Phase.SUSPENDED
    # cooled to 1 K above: both may run again
    r.chip.temperature_c = target + 0.9
    r.control(240.0, target)
    assert _phase(r, "low") is Phase.RUNNING and _phase(r, "high") is Phase.RUNNING
    # suspended past the grace period: returned
    r.chip.temperature_c = target + 3.5
    r.control(300.0, target)
    assert r.control(300.0 + 1800.0, target) == [low]
    assert "low" not in r.held and "high" in r.held


def test_agent_meets_the_heat_demand_of_a_small_fleet() -> None:
    f = run_policy("agent", replace(SMALL, days=2.0, warmup_h=24.0))[0]
    assert f.demand_kwh > 0
    assert f.demand_met >= 0.98
    assert f.finished > 0


def test_a_cold_fleet_with_no_work_runs_filler() -> None:
    cfg = replace(SMALL, load_core_h=0.0)
    for policy in ("agent", "hysteresis"):
        f = run_policy(policy, cfg, trace=[])[0]
        assert f.submitted == 0 and f.job_kwh == 0.0
        assert f.filler_kwh > 0.5 * f.demand_kwh, policy
    agent = run_policy("agent", cfg, trace=[])[0]
    assert agent.demand_met >= 0.98


def _sunny(room: RoomSpec) -> RoomSpec:
    # a conservatory: from late morning the sun alone overheats it for hours
    gains = [GainPoint(at="00:00", w=0.0), GainPoint(at="09:00", w=0.0),
             GainPoint(at="10:00", w=3000.0), GainPoint(at="15:00", w=3000.0),
             GainPoint(at="16:00", w=0.0)]
    return replace(room, scenario=room.scenario.model_copy(update={"gains": gains}))


@pytest.mark.parametrize("policy", ["agent", "hysteresis"])
def test_warm_rooms_return_jobs_that_are_placed_again_elsewhere(policy: str) -> None:
    cfg = replace(SMALL, days=1.5, warmup_h=0.0)
    rooms = make_rooms(cfg.radiators, cfg.seed, cfg.days)
    rooms = [_sunny(r) if i % 2 == 0 else r for i, r in enumerate(rooms)]
    sunny = {r.node for i, r in enumerate(rooms) if i % 2 == 0}
    # long jobs from 08:00, when every room still wants heat; there are more than the slots
    trace = [JobSpec(f"long{i:03d}", i, 8 * 3600.0 + i, Priority.LOW, 1, 2 * 3600.0)
             for i in range(60)]
    f, _, fleet = run_policy(policy, cfg, rooms, trace)
    assert f.returns > 0 and f.replaced > 0
    moved = [j for j in fleet.jobs.values() if j.returns]
    assert moved
    assert any(ev == "returned" and node in sunny for j in moved for ev, node, _ in j.history)
    for j in moved:
        placed = [(node, t) for ev, node, t in j.history if ev == "placed"]
        returned = [(node, t) for ev, node, t in j.history if ev == "returned"]
        assert len(returned) == j.returns
        # each return was of the attempt placed before it; a later attempt never goes back to
        # the radiator that returned it within the dispatcher's avoid time
        for (node, t_back), (next_node, t_next) in zip(returned, placed[1:], strict=False):
            assert t_next >= t_back
            assert next_node != node or t_next >= t_back + AVOID_S
    again = [j for j in moved if len(j.history) > 2]
    assert again, "no returned job was placed again"
    assert any(j.finish is not None for j in again)


def test_cli_prints_both_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleetsim", "--radiators", "3", "--days", "0.5", "--period", "120",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["agent"]["policy"] == "agent" and out["hysteresis"]["policy"] == "hysteresis"
    assert out["agent"]["radiators"] == 3


def test_hysteresis_scheduler_puts_high_priority_on_the_coolest_radiator() -> None:
    from qrad_agent.fleetsim.run import _dispatch_hysteresis, _Fleet

    rooms = make_rooms(3, 1, 1.0)
    rads = [HysteresisRadiator(r, 1, 0.0, grace_s=1800.0) for r in rooms]
    for r, delta in zip(rads, (0.5, -2.0, 3.5), strict=True):
        r.chip.temperature_c = r.comfort_c + delta
        r.control(0.0, r.comfort_c)
    trace = [JobSpec("high", 0, 0.0, Priority.HIGH, 1, 600.0),
             JobSpec("low", 1, 0.0, Priority.LOW, 1, 600.0)]
    fleet = _Fleet(trace, 3)
    fleet.arrive(0.0)
    placed = {job.spec.job_id: rad.node for job, rad in _dispatch_hysteresis(fleet, rads, 0.0,
                                                                              [0])}
    assert placed["high"] == rads[1].node  # 2 K below its target: the coolest
    # low work only where the room is at most 1 K above its target
    assert placed["low"] in {rads[0].node, rads[1].node}
    assert not fleet.queue


# -- throttled starts (decision 0017) and the speed hint (decision 0018) ---------------------


def test_jobs_wider_than_the_quota_share_it_equally_and_make_only_the_plans_heat() -> None:
    from qrad_agent.fleetsim.policies import SimRadiator

    room = make_rooms(1, 1, 1.0)[0]
    r = SimRadiator(room, 1, 0.0)
    r.freq_khz, r.quota, r.job_slots = r.max_khz, 1.0, 2
    wide = LiveJob(JobSpec("wide", 0, 0.0, Priority.LOW, 4, 3600.0))
    narrow = LiveJob(JobSpec("narrow", 1, 0.0, Priority.LOW, 1, 3600.0))
    r.take(wide, 0.0, Phase.RUNNING)
    r.take(narrow, 0.0, Phase.RUNNING)
    r.advance(0.0, 100.0, 0.0, 0.0, r.comfort_c, True, False)
    # two CPUs' worth between two jobs: one each, whatever their cores
    assert wide.done_s == pytest.approx(100.0) and narrow.done_s == pytest.approx(100.0)
    assert r.tally.lever_wh == pytest.approx(
        r.model.watts_of(2, r.max_khz, 1.0) * 100.0 / 3600.0)
    r.job_slots = None  # no cap: the wide job runs on its four cores
    r.advance(100.0, 100.0, 0.0, 0.0, r.comfort_c, True, False)
    assert wide.done_s == pytest.approx(500.0)


def _wide_and_urgent_trace() -> list[JobSpec]:
    # from 08:00, when rooms want little heat: 4-core work the free slots seldom fit, and
    # high-priority work
    return [JobSpec(f"j{i:03d}", i, 8 * 3600.0 + 60.0 * i,
                    Priority.HIGH if i % 3 == 0 else Priority.LOW, 4 if i % 3 else 1, 1800.0)
            for i in range(90)]


def test_throttled_starts_put_wide_jobs_where_filler_would_run() -> None:
    trace = _wide_and_urgent_trace()
    on = run_policy("agent", SMALL, trace=trace)[0]
    off = run_policy("agent", replace(SMALL, throttled_starts=False), trace=trace)[0]
    assert off.queue_held_work_h > 0
    assert on.paid_share_queued > off.paid_share_queued
    assert on.demand_met >= 0.98


def test_the_speed_hint_runs_high_priority_work_faster() -> None:
    trace = _wide_and_urgent_trace()
    on = run_policy("agent", SMALL, trace=trace)[0]
    off = run_policy("agent", replace(SMALL, speed_hint=False), trace=trace)[0]
    assert on.by_priority["high"].finished > 0
    assert on.by_priority["high"].mean_slowdown < off.by_priority["high"].mean_slowdown
    assert on.demand_met >= 0.98
