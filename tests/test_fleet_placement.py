"""The reference dispatcher: placement by priority and heat (pure), and its SQLite queue
(leases, requeues, exactly-once accounting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrad_agent.core.jobs import Priority
from qrad_agent.fleet.placement import (
    Candidate,
    FleetState,
    Lease,
    Placement,
    Request,
    Verdict,
    expired,
    on_report,
    place,
)
from qrad_agent.fleet.queue import FleetQueue, QueueError
from qrad_agent.jobs.spec import JobSpec, JobState, JobStatus, parse_spec
from qrad_agent.store.db import Database

H, L, B = Priority.HIGH, Priority.LOW, Priority.BACKGROUND


def req(node: str, slots: int, watts: float, expires: float = 1e9, **kw: Any) -> Request:
    return Request(node, f"{node}:r", slots, watts, expires, **kw)


def cand(job: str, prio: Priority, seq: int, **kw: Any) -> Candidate:
    return Candidate(job, prio, seq, **kw)


# -- placement ----------------------------------------------------------------------------------


def test_high_priority_goes_to_the_radiator_that_wants_the_most_heat() -> None:
    jobs = [cand("bg", B, 1), cand("low", L, 2), cand("high", H, 3)]
    out = place(jobs, [req("mild", 1, 100.0), req("cold", 1, 400.0), req("cool", 1, 250.0)], 0)
    assert out == [Placement("high", "cold", "cold:r"), Placement("low", "cool", "cool:r"),
                   Placement("bg", "mild", "mild:r")]


def test_each_placement_uses_up_the_budget_so_the_coldest_does_not_take_all() -> None:
    # cold: 2 slots at 150 W each; warm: 2 slots at 100 W each
    out = place([cand(f"j{i}", L, i) for i in range(4)],
                [req("cold", 2, 300.0), req("warm", 2, 200.0)], 0)
    assert [p.node for p in out] == ["cold", "warm", "cold", "warm"]


def test_limits_slots_and_expiry_are_respected() -> None:
    jobs = [cand("wide", H, 1, cores=2), cand("fat", H, 2, memory_mb=4096),
            cand("long", H, 3, timeout_s=7200), cand("ok", L, 4)]
    requests = [req("a", 1, 500.0, max_memory_mb=1024, max_timeout_s=3600),
                req("b", 4, 900.0, expires=10.0)]
    out = place(jobs, requests, now=10.0)  # b has expired
    assert out == [Placement("ok", "a", "a:r")]


def test_fifo_within_a_priority_and_returned_jobs_avoid_the_radiator() -> None:
    out = place([cand("second", L, 2), cand("first", L, 1, avoid=frozenset({"a"}))],
                [req("a", 1, 100.0), req("b", 1, 50.0)], 0)
    assert out == [Placement("first", "b", "b:r"), Placement("second", "a", "a:r")]


@given(st.lists(st.tuples(st.sampled_from(list(Priority)), st.integers(1, 3)), max_size=25),
       st.lists(st.tuples(st.integers(1, 4), st.floats(0, 1000)), max_size=5))
def test_placement_never_overfills_a_request_or_places_a_job_twice(
    jobs: list[tuple[Priority, int]], reqs: list[tuple[int, float]]
) -> None:
    candidates = [cand(f"j{i}", p, i, cores=c) for i, (p, c) in enumerate(jobs)]
    requests = [req(f"n{i}", s, w) for i, (s, w) in enumerate(reqs)]
    out = place(candidates, requests, 0)
    assert len({p.job_id for p in out}) == len(out)
    cores = {c.job_id: c.cores for c in candidates}
    for r in requests:
        assert sum(cores[p.job_id] for p in out if p.request_id == r.id) <= r.free_slots
    # nothing placeable is left waiting while a higher-priority one was placed after it
    placed = {p.job_id for p in out}
    free = {r.id: r.free_slots - sum(cores[p.job_id] for p in out if p.request_id == r.id)
            for r in requests}
    for c in candidates:
        if c.job_id not in placed:
            assert all(f < c.cores for f in free.values())


# -- reports and leases (pure) --------------------------------------------------------------------


def lease(state: FleetState = FleetState.LEASED, attempt: int = 1, node: str | None = "a",
          until: float | None = 50.0, max_attempts: int = 3) -> Lease:
    return Lease("j", state, attempt, max_attempts, 30.0, node, until)


def test_running_reports_renew_the_lease_and_stale_ones_are_ignored() -> None:
    t = on_report(lease(), "a", 1, "running", None, now=40.0)
    assert t.verdict is Verdict.RENEW and t.lease_until == 70.0
    assert on_report(lease(attempt=2), "a", 1, "running", None, 40.0).verdict is Verdict.IGNORE
    assert on_report(lease(), "b", 1, "failed", "timeout", 40.0).verdict is Verdict.IGNORE


def test_returned_and_interrupted_requeue_failures_of_the_job_do_not() -> None:
    t = on_report(lease(), "a", 1, "returned", "no_heat", 0)
    assert t.verdict is Verdict.REQUEUE and t.avoid_node == "a"
    assert on_report(lease(), "a", 1, "failed", "interrupted", 0).verdict is Verdict.REQUEUE
    t = on_report(lease(), "a", 1, "failed", "exit_status", 0)
    assert t.verdict is Verdict.DONE and t.state is FleetState.FAILED
    t = on_report(lease(attempt=3), "a", 3, "returned", "no_heat", 0)
    assert t.state is FleetState.FAILED and t.reason == "attempts_exhausted"


def test_the_first_success_counts_from_any_attempt() -> None:
    t = on_report(lease(attempt=2, node="b"), "a", 1, "succeeded", None, 0)
    assert t.verdict is Verdict.DONE and t.state is FleetState.SUCCEEDED
    assert t.cancel == ("b", 2)  # the newer attempt is running for nothing now
    done = lease(state=FleetState.SUCCEEDED, node=None, until=None)
    assert on_report(done, "b", 2, "succeeded", None, 0).verdict is Verdict.IGNORE


def test_expiry() -> None:
    leases = [Lease("x", FleetState.LEASED, 1, 3, 30, "a", 10.0),
              Lease("y", FleetState.LEASED, 1, 3, 30, "b", 99.0),
              Lease("z", FleetState.QUEUED, 0, 3, 30)]
    assert expired(leases, 10.0) == ["x"]


# -- the queue ----------------------------------------------------------------------------------


@pytest.fixture
def queue(tmp_path: Path) -> FleetQueue:
    return FleetQueue(Database(tmp_path / "fleet.db"), clock=lambda: 0.0)


def spec(job: str, prio: str = "low", **kw: Any) -> JobSpec:
    return parse_spec({"job": job, "priority": prio, "argv": ["true"], "lease_s": 30, **kw})


def report(a: JobSpec, node: str, state: JobState, **kw: Any) -> JobStatus:
    return JobStatus(node=node, job=a.job, attempt=a.attempt, state=state, at=1.0, **kw)


def test_submit_lease_complete(queue: FleetQueue) -> None:
    queue.submit(spec("a", "low"))
    queue.submit(spec("b", "high"))
    with pytest.raises(QueueError, match="job id 'a' is taken"):
        queue.submit(spec("a"))
    out = queue.lease([req("n1", 1, 100.0)], now=1.0)
    assert [(a.node, a.spec.job, a.spec.attempt, a.lease_until) for a in out] == [
        ("n1", "b", 1, 31.0)]
    assert queue.get("b").state is FleetState.LEASED  # type: ignore[union-attr]
    assert queue.renew("b", 1, "n1", now=20.0)
    assert not queue.renew("b", 1, "n2", now=20.0)  # not its lease
    t = queue.complete(report(out[0].spec, "n1", JobState.SUCCEEDED, exit_code=0), now=25.0)
    assert t.state is FleetState.SUCCEEDED
    job = queue.get("b")
    assert job is not None and job.result is not None and job.result.exit_code == 0
    assert queue.counts() == {"queued": 1, "succeeded": 1}
    with pytest.raises(QueueError, match="not a final state"):
        queue.complete(report(out[0].spec, "n1", JobState.RUNNING))


def test_lapsed_leases_and_returned_requeue_with_the_next_attempt(
    queue: FleetQueue,
) -> None:
    for name in ("x", "y", "z"):
        queue.submit(spec(name))
    first = {a.spec.job: a for a in queue.lease([req("n1", 2, 200.0), req("n2", 1, 50.0)],
                                                now=0.0)}
    assert {j: a.node for j, a in first.items()} == {"x": "n1", "y": "n1", "z": "n2"}
    # n1 keeps x alive, lets y lapse; n2 is gone (its lease lapses: a lost will requeues
    # nothing by itself, decisions/0014)
    queue.report(report(first["x"].spec, "n1", JobState.RUNNING), now=20.0)
    assert sorted(queue.expire(now=31.0)) == ["y", "z"]
    assert {j.job_id for j in queue.list([FleetState.QUEUED])} == {"y", "z"}
    # x is returned (the room warmed up): queued again, and not straight back to n1
    queue.report(report(first["x"].spec, "n1", JobState.RETURNED, reason="no_heat"), now=40.0)
    again = queue.lease([req("n1", 3, 900.0), req("n3", 3, 10.0)], now=41.0)
    where = {a.spec.job: (a.node, a.spec.attempt) for a in again}
    assert where["x"] == ("n3", 2) and where["y"][1] == 2 and where["z"][1] == 2


def test_a_late_success_of_an_old_attempt_counts_once(queue: FleetQueue) -> None:
    queue.submit(spec("job"))
    (a1,) = queue.lease([req("n1", 1, 100.0)], now=0.0)
    queue.expire(now=31.0)  # n1 was cut off: the job goes elsewhere
    (a2,) = queue.lease([req("n2", 1, 100.0)], now=32.0)
    assert a2.spec.attempt == 2
    t = queue.report(report(a1.spec, "n1", JobState.SUCCEEDED, exit_code=0), now=33.0)
    assert t.state is FleetState.SUCCEEDED and t.cancel == ("n2", 2)
    t = queue.report(report(a2.spec, "n2", JobState.SUCCEEDED, exit_code=0), now=34.0)
    assert t.verdict is Verdict.IGNORE  # counted once
    job = queue.get("job")
    assert job is not None and job.result is not None and job.result.node == "n1"


def test_cancel_queued_at_once_leased_through_the_radiator(queue: FleetQueue) -> None:
    queue.submit(spec("queued"))
    queue.submit(spec("leased", "high"))
    queue.lease([req("n1", 1, 100.0)], now=0.0)
    assert queue.cancel("queued")[0] is FleetState.CANCELLED
    leased = queue.get("leased")
    assert leased is not None and leased.state is FleetState.LEASED
    state, node = queue.cancel("leased")
    assert state is FleetState.CANCELLING and node is not None and node == leased.node
    queue.report(JobStatus(node=node, job="leased", attempt=1, state=JobState.CANCELLED, at=1.0,
                           reason="cancelled"))
    assert queue.get("leased").state is FleetState.CANCELLED  # type: ignore[union-attr]


def test_max_attempts_fail_the_job(queue: FleetQueue) -> None:
    queue.submit(spec("flaky"), max_attempts=2)
    for n in range(2):
        (a,) = queue.lease([req(f"n{n}", 1, 100.0)], now=n * 100.0)
        queue.report(report(a.spec, f"n{n}", JobState.FAILED, reason="interrupted"),
                     now=n * 100.0 + 1)
    job = queue.get("flaky")
    assert job is not None and job.state is FleetState.FAILED
    assert job.reason == "attempts_exhausted" and job.attempt == 2


def test_two_dispatchers_on_one_file_never_lease_a_job_twice(tmp_path: Path) -> None:
    one = FleetQueue(Database(tmp_path / "f.db"), clock=lambda: 0.0)
    two = FleetQueue(Database(tmp_path / "f.db"), clock=lambda: 0.0)
    for i in range(20):
        one.submit(spec(f"j{i}"))
    got = []
    for _ in range(10):
        got += one.lease([req("a", 1, 10.0)], now=1.0)
        got += two.lease([req("b", 1, 10.0)], now=1.0)
    assert sorted(a.spec.job for a in got) == sorted(f"j{i}" for i in range(20))
