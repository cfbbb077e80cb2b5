"""The job scheduler with real processes: the sandbox, the ledger and the filler together."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest

from qrad_agent.actuators.base import LeverError
from qrad_agent.actuators.cgroups import QuotaLever
from qrad_agent.actuators.settings import WorkersConfig
from qrad_agent.core.jobs import Conditions
from qrad_agent.core.models import Plan
from qrad_agent.core.power import PowerModel
from qrad_agent.jobs.ledger import Ledger
from qrad_agent.jobs.sandbox import Sandbox
from qrad_agent.jobs.scheduler import JobScheduler, make_filler
from qrad_agent.jobs.spec import JobSpec, JobState, JobStatus, parse_spec
from qrad_agent.store.db import Database
from tests.procs import alive, wait_for
from tests.test_jobs_sandbox import (
    JobEnv,
    cgroup_parent_lifetime,
    job_env_lifetime,
    make_cgroup,
    skip,
)

NODE = "n1"
MODEL = PowerModel(idle_w=20.0, slot_w=100.0, freq_exponent=1.5, max_freq_khz=2_000_000)


class Clock:
    """Real time plus an offset a test can jump (grace periods, leases)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def full(slots: int) -> Plan:
    return Plan(slots, 2_000_000, 1.0)


@pytest.fixture
def job_env() -> Iterator[JobEnv]:
    yield from job_env_lifetime()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(job_env: JobEnv, tmp_path: Path, clock: Clock) -> Iterator[Callable[..., JobScheduler]]:
    made: list[JobScheduler] = []

    def build(slots: int = 2, filler: bool = False, **cfg: Any) -> JobScheduler:
        jc = job_env.config(**cfg)
        fill = make_filler(jc, WorkersConfig(stop_grace_s=0.5), max_slots=slots) if filler \
            else None
        sched = JobScheduler(jc, NODE, Ledger(Database(tmp_path / "state.db")),
                             Sandbox(jc, job_env.work), fill, slots=slots, model=MODEL,
                             clock=clock)
        sched.start()
        made.append(sched)
        return sched

    yield build
    for sched in made:
        sched.restore()


def job(env: JobEnv, name: str, code: str = "pass", **kw: Any) -> JobSpec:
    return parse_spec({"job": name, "argv": [env.python, "-c", code], "lease_s": 600, **kw})


def drive(sched: JobScheduler, until: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            pytest.fail(f"scheduler did not get there: {sched.read_back()}")
        sched.step()
        time.sleep(0.005)


def dead(pid: int) -> bool:
    return not alive(pid)


# -- exactly once --------------------------------------------------------------------------------


def test_thirty_jobs_of_mixed_priority_each_run_exactly_once(
    make: Callable[..., JobScheduler], job_env: JobEnv
) -> None:
    sched = make(slots=2)
    sched.apply(Plan(2, 2_000_000, 0.0))  # no heat yet: the jobs queue up, then go by priority
    marks = job_env.shared / "runs"
    code = ("import os, sys; f = open(sys.argv[1], 'a'); "
            "f.write(os.environ['QRAD_JOB_ID'] + '\\n'); f.close()")
    prios = ["high", "low", "background"]
    specs = [parse_spec({"job": f"job-{i:02d}", "priority": prios[i % 3], "lease_s": 600,
                         "argv": [job_env.python, "-c", code, str(marks)]}) for i in range(30)]
    acks = [sched.offer(s) for s in specs]
    assert all(a.state is JobState.ACCEPTED for a in acks)
    # the fleet repeats some assignments (QoS 1 redelivery): nothing runs twice for it
    repeats = [sched.offer(s) for s in specs[::7]]
    assert all(r.state is JobState.ACCEPTED and r.seq == 1 for r in repeats)
    sched.apply(full(2))
    drive(sched, lambda: not sched.jobs())
    runs = Counter(marks.read_text().split())
    assert runs == Counter({s.job: 1 for s in specs}), "some job ran other than once"
    entries = {e.spec.job: e for e in sched.ledger.entries()}
    assert all(e.state is JobState.SUCCEEDED and e.runs == 1 for e in entries.values())
    reports = sched.take_reports()
    finals = [r for r in reports if r.state.terminal]
    assert sorted(r.job for r in finals) == sorted(s.job for s in specs)
    assert all(r.exit_code == 0 and r.cpu_s is not None for r in finals)
    # high priority first: every high job started before any background one
    started = [r.job for r in reports if r.state is JobState.RUNNING]
    prio = {s.job: s.priority.value for s in specs}
    last_high = max(i for i, j in enumerate(started) if prio[j] == "high")
    first_bg = min(i for i, j in enumerate(started) if prio[j] == "background")
    assert last_high < first_bg, started
    assert len(sched.ledger.undelivered()) == 30  # results are owed until the link delivers
    for r in finals:
        sched.delivered(r.job, r.attempt, r.seq)
    assert sched.ledger.undelivered() == []


# -- heat-driven ----------------------------------------------------------------------------------


def test_filler_heats_until_real_work_preempts_it_at_once(
    make: Callable[..., JobScheduler], job_env: JobEnv
) -> None:
    sched = make(slots=1, filler=True)
    sched.apply(full(1))
    assert sched.filler is not None
    burners = sched.filler.read_back()["pids"]
    assert len(burners) == 1 and alive(burners[0])
    t0 = time.monotonic()
    ack = sched.offer(job(job_env, "real", "import time; time.sleep(30)"))
    assert ack.state is JobState.ACCEPTED
    run = sched.run_of("real")
    assert run is not None and alive(run.pid)
    # the burner was told to go before the job started, and is gone moments later
    wait_for(lambda: not alive(burners[0]), timeout=2, what="the burner to stop")
    assert time.monotonic() - t0 < 2
    assert sched.read_back()["filler"] == 0
    sched.cancel("real")
    sched.step()
    assert sched.read_back()["filler"] == 1  # the slot heats with filler again


def test_no_heat_suspends_then_returns_after_the_grace_period(
    make: Callable[..., JobScheduler], job_env: JobEnv, clock: Clock
) -> None:
    sched = make(slots=2, grace_s=60)
    sched.apply(full(2))
    for name, prio in (("h", "high"), ("b", "background")):
        sched.offer(job(job_env, name, "while True: pass", priority=prio))
    runs = {n: sched.run_of(n) for n in ("h", "b")}
    assert all(r is not None for r in runs.values())
    sched.apply(full(1))  # less heat: the background job pauses, the high one runs on
    assert sched.jobs() == {("h", 1): "running", ("b", 1): "suspended"}
    b = runs["b"]
    assert b is not None and b.suspended_at is not None
    cpu = b.cpu_seconds()
    time.sleep(0.3)
    assert b.cpu_seconds() - cpu < 0.05
    sched.apply(Plan(1, 2_000_000, 0.0))  # no heat at all
    assert sched.jobs() == {("h", 1): "suspended", ("b", 1): "suspended"}
    clock.offset += 61  # a minute without heat: given back to the fleet
    sched.step()
    assert sched.jobs() == {}
    reports = {r.job: r for r in sched.take_reports() if r.state.terminal}
    assert {r.state for r in reports.values()} == {JobState.RETURNED}
    assert {r.reason for r in reports.values()} == {"no_heat"}
    for r in runs.values():
        assert r is not None and not alive(r.pid)


def test_mode_off_returns_everything_and_draining_stops_requests(
    make: Callable[..., JobScheduler], job_env: JobEnv
) -> None:
    sched = make(slots=2, request_interval_s=0.1)
    sched.apply(full(2))
    req = sched.take_request()
    assert req is not None and req.free_slots == 2 and req.heat_budget_w == 200.0
    sched.offer(job(job_env, "a", "import time; time.sleep(30)"))
    sched.set_conditions(Conditions(draining=True))
    time.sleep(0.15)
    sched.step()
    assert sched.take_request() is None
    refused = sched.offer(job(job_env, "late"))
    assert refused.state is JobState.RETURNED and refused.reason == "draining"
    assert sched.jobs() == {("a", 1): "running"}  # draining lets running work finish
    sched.set_conditions(Conditions(mode_off=True))
    sched.step()
    assert sched.jobs() == {}
    (final,) = [r for r in sched.take_reports() if r.state.terminal]
    assert final.state is JobState.RETURNED and final.reason == "mode_off"


def test_asks_again_at_once_while_answers_bring_work_and_waits_when_they_do_not(
    make: Callable[..., JobScheduler], job_env: JobEnv
) -> None:
    sched = make(slots=1, request_interval_s=600)
    sched.apply(full(1))
    assert sched.take_request() is not None
    # an answer with a job it took: when the job is done the next request goes out at once,
    # though the interval (10 minutes) has not passed
    sched.offer(job(job_env, "quick"))
    sched.answered(None, took_work=True)
    drive(sched, lambda: sched.jobs() == {})
    sched.step()
    again = sched.take_request()
    assert again is not None and again.free_slots == 1
    # an empty answer: the interval (and its retry-after) hold
    sched.answered(5.0)
    sched.step()
    assert sched.take_request() is None
    assert sched.read_back()["request"] == "asked recently"


def test_cancel_kills_the_whole_tree(make: Callable[..., JobScheduler], job_env: JobEnv) -> None:
    sched = make(slots=1)
    sched.apply(full(1))
    sched.offer(job(job_env, "tree", """
import os, time
for _ in range(2):
    if os.fork() == 0:
        os.setsid()
        time.sleep(60)
time.sleep(60)
"""))
    run = sched.run_of("tree")
    assert run is not None
    wait_for(lambda: len(psutil.Process(run.pid).children()) == 2, what="the children")
    kids = [c.pid for c in psutil.Process(run.pid).children()]
    status = sched.cancel("tree")
    assert status is not None and status.state is JobState.CANCELLED
    assert status.reason == "cancelled"
    for pid in [run.pid, *kids]:
        wait_for(partial(dead, pid), timeout=3, what=f"{pid} to die")
    again = sched.cancel("tree")  # repeated: the recorded result, nothing else
    assert again is not None and again.state is JobState.CANCELLED and again.seq == status.seq
    assert sched.cancel("unknown") is None


def test_refusals_say_why_and_record_nothing(
    make: Callable[..., JobScheduler], job_env: JobEnv
) -> None:
    sched = make(slots=2, max_memory_mb=600)
    sched.apply(full(2))
    cases = {
        "shell": (parse_spec({"job": "shell", "argv": ["/bin/sh", "-c", "true"]}),
                  "not_allowed"),
        "huge": (job(job_env, "huge", memory_mb=1024), "too_big"),
        "wide": (job(job_env, "wide", cores=3), "too_big"),
    }
    for name, (spec, reason) in cases.items():
        st = sched.offer(spec)
        assert st.state is JobState.RETURNED and st.reason == reason, (name, st)
        assert st.detail
    assert sched.ledger.entries() == []


def test_a_failing_job_and_a_timeout_are_reported_with_their_figures(
    make: Callable[..., JobScheduler], job_env: JobEnv
) -> None:
    sched = make(slots=2)
    sched.apply(full(2))
    sched.offer(job(job_env, "bad", "import sys; print('oops'); sys.exit(3)"))
    sched.offer(job(job_env, "slow", "while True: pass", timeout_s=0.5))
    drive(sched, lambda: not sched.jobs())
    finals = {r.job: r for r in sched.take_reports() if r.state.terminal}
    bad, slow = finals["bad"], finals["slow"]
    assert (bad.state, bad.reason, bad.exit_code) == (JobState.FAILED, "exit_status", 3)
    assert bad.output is not None and bad.output.tail == "oops\n"
    assert (slow.state, slow.reason, slow.signal) == (JobState.FAILED, "timeout", 9)
    # measured, and no more than it ran (at nice 19 on a busy machine it may get little CPU)
    assert slow.cpu_s is not None and slow.wall_s is not None
    assert 0.0 < slow.cpu_s <= slow.wall_s + 0.05


def test_energy_is_shared_by_cores_and_heartbeats_renew_leases(
    make: Callable[..., JobScheduler], job_env: JobEnv, clock: Clock
) -> None:
    sched = make(slots=3, heartbeat_s=1.0)
    sched.apply(full(3))
    sched.offer(job(job_env, "one", "import time; time.sleep(30)", lease_s=30))
    sched.offer(job(job_env, "two", "import time; time.sleep(30)", cores=2, lease_s=30))
    sched.take_reports()
    t = clock()
    sched.account(t, 300.0)
    sched.account(t + 36.0, 300.0)  # 300 W for 36 s = 3 Wh, split 1:2 by cores
    clock.offset += 1.1
    sched.step()
    beats = {r.job: r for r in sched.take_reports()}
    assert set(beats) == {"one", "two"} and {r.state for r in beats.values()} == {
        JobState.RUNNING}
    assert beats["one"].energy_wh == pytest.approx(1.0)
    assert beats["two"].energy_wh == pytest.approx(2.0)
    # the fleet confirmed "two" only: "one"'s lease lapses, it is returned and killed
    sched.delivered("two", 1, beats["two"].seq, sent_at=clock())
    clock.offset += 29.5
    sched.step()
    assert sched.jobs() == {("two", 1): "running"}
    lapsed = [r for r in sched.take_reports() if r.job == "one" and r.state.terminal]
    assert lapsed and lapsed[0].state is JobState.RETURNED
    assert lapsed[0].reason == "lease_expired"


def test_restart_keeps_accepted_jobs_and_restore_returns_live_ones(
    make: Callable[..., JobScheduler], job_env: JobEnv
) -> None:
    sched = make(slots=1)
    sched.apply(Plan(1, 2_000_000, 0.0))  # no heat: accepted jobs wait
    sched.offer(job(job_env, "waits"))
    assert sched.jobs() == {("waits", 1): "queued"}
    again = make(slots=1)  # a restart on the same ledger: the job is still ours
    assert again.jobs() == {("waits", 1): "queued"}
    again.apply(full(1))
    drive(again, lambda: not again.jobs())
    assert again.ledger.get("waits").state is JobState.SUCCEEDED  # type: ignore[union-attr]
    again.offer(job(job_env, "long", "import time; time.sleep(30)"))
    pid = again.run_of("long").pid  # type: ignore[union-attr]
    again.restore()
    assert not alive(pid)
    entry = again.ledger.get("long")
    assert entry is not None and entry.state is JobState.RETURNED
    assert entry.report.reason == "agent_stopping"


def test_status_seq_grows_with_each_change(
    make: Callable[..., JobScheduler], job_env: JobEnv
) -> None:
    sched = make(slots=1)
    sched.apply(full(1))
    sched.offer(job(job_env, "s", "import time; time.sleep(30)"))
    sched.apply(Plan(1, 2_000_000, 0.0))
    sched.apply(full(1))
    sched.cancel("s")
    seqs = [(r.state, r.seq) for r in sched.take_reports() if r.job == "s"]
    assert seqs == [(JobState.RUNNING, 2), (JobState.SUSPENDED, 3), (JobState.RUNNING, 4),
                    (JobState.CANCELLED, 5)]
    assert isinstance(sched.ledger.get("s").report, JobStatus)  # type: ignore[union-attr]
    assert (job_env.work / "run").is_dir() and not list((job_env.work / "run").glob("s.*"))


def test_a_wide_job_starts_throttled_only_where_the_quota_caps_the_jobs(
    job_env: JobEnv, tmp_path: Path
) -> None:
    """A 2-core job on a 1-slot plan (decision 0017): below the workers' cgroup, whose quota
    the plan sets, it starts at once (the quota keeps the heat the plan's, and the lever
    writes one CPU's worth, full quota or not); without that cgroup it waits."""
    parents = cgroup_parent_lifetime()
    parent = next(parents)
    cg = make_cgroup(parent)
    if cg.quota_use is None:
        skip(f"no cgroup quota here: {cg.quota_why}")
    boxes = {"capped": Sandbox(job_env.config(), job_env.work, cg),
             "uncapped": Sandbox(job_env.config(), job_env.work / "u")}
    try:
        for name, box in boxes.items():
            sched = JobScheduler(job_env.config(), NODE,
                                 Ledger(Database(tmp_path / f"{name}.db")), box, slots=2)
            sched.start()
            sched.apply(Plan(1, 2_000_000, 1.0))
            sched.offer(job(job_env, f"wide-{name}", "import time; time.sleep(30)", cores=2))
            want = "running" if name == "capped" else "queued"
            assert sched.jobs() == {(f"wide-{name}", 1): want}, name
            sched.restore()
        lever = QuotaLever(cg, cpus=4)
        lever.apply(Plan(1, 2_000_000, 1.0))
        assert cg.quota()[0] == cg.cfg.period_us  # one CPU for the group, at full quota
        lever.restore()
    finally:
        for box in boxes.values():
            box.close()
        with contextlib.suppress(LeverError):
            cg.release()
        next(parents, None)
