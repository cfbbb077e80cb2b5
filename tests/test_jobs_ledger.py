"""The job ledger: recorded before acknowledged, one live attempt per job id, at most one run
unless idempotent, crash recovery (an agent SIGKILLed mid-job, for real), delivery."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from qrad_agent.actuators.cgroups import WorkerCgroup
from qrad_agent.actuators.settings import CgroupConfig
from qrad_agent.core.models import Plan
from qrad_agent.jobs.ledger import Ledger, LedgerConflict
from qrad_agent.jobs.sandbox import Sandbox
from qrad_agent.jobs.scheduler import JobScheduler
from qrad_agent.jobs.spec import JobSpec, JobState, JobStatus, parse_spec
from qrad_agent.store.db import Database, StoreError
from tests.procs import alive, wait_for
from tests.test_jobs_sandbox import (
    CGROUP_ROOT,
    JobEnv,
    cgroup_parent_lifetime,
    job_env_lifetime,
    make_cgroup,
)

NODE = "n1"


@pytest.fixture
def job_env() -> Iterator[JobEnv]:
    yield from job_env_lifetime()


@pytest.fixture
def cgroup_parent() -> Iterator[str]:
    yield from cgroup_parent_lifetime()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    db = Database(tmp_path / "state.db")
    yield Ledger(db)
    db.close()


def spec(job: str = "j", attempt: int = 1, **kw: Any) -> JobSpec:
    return parse_spec({"job": job, "attempt": attempt, "argv": ["true"], **kw})


def status(s: JobSpec, state: JobState, at: float = 1.0, **kw: Any) -> JobStatus:
    return JobStatus(node=NODE, job=s.job, attempt=s.attempt, state=state, at=at, **kw)


def accept(ledger: Ledger, s: JobSpec) -> JobStatus:
    return ledger.accept(s, status(s, JobState.ACCEPTED)).entry.report


def claim(ledger: Ledger, s: JobSpec, token: str = "t") -> JobStatus | None:
    return ledger.claim(status(s, JobState.RUNNING), token)


# -- taking a job once --------------------------------------------------------------------------


def test_accept_is_recorded_durably_before_the_ack(ledger: Ledger, tmp_path: Path) -> None:
    s = spec()
    ack = accept(ledger, s)
    assert ack.state is JobState.ACCEPTED and ack.seq == 1
    # another connection (another process) sees it at once: it was committed
    other = Ledger(Database(tmp_path / "state.db"))
    entry = other.get("j", 1)
    assert entry is not None and entry.spec == s and entry.state is JobState.ACCEPTED


def test_a_repeated_assignment_changes_nothing(ledger: Ledger) -> None:
    s = spec()
    accept(ledger, s)
    claim(ledger, s)
    again = ledger.accept(s, status(s, JobState.ACCEPTED, at=9.0))
    assert not again.new and again.entry.state is JobState.RUNNING
    assert ledger.runs("j", 1) == 1


def test_one_live_attempt_per_job_id(ledger: Ledger) -> None:
    accept(ledger, spec("j", 1))
    with pytest.raises(LedgerConflict, match="attempt 1 is accepted here") as exc:
        accept(ledger, spec("j", 2))
    assert exc.value.reason == "busy"
    # the schema itself refuses, whatever the code above it does
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        ledger.db.conn.execute(
            "INSERT INTO job_ledger (job_id, attempt, spec, state, idempotent, accepted_at, "
            "updated_at, report, report_seq) VALUES ('j', 3, '{}', 'accepted', 0, 0, 0, '{}', 1)")
    ledger.record(status(spec("j", 1), JobState.RETURNED, reason="no_heat"))
    assert accept(ledger, spec("j", 2)).state is JobState.ACCEPTED  # once the first is over
    assert accept(ledger, spec("j", 1)).state is JobState.RETURNED  # known: its record stands
    accept(ledger, spec("k", 3))
    ledger.record(status(spec("k", 3), JobState.RETURNED, reason="no_heat"))
    with pytest.raises(LedgerConflict, match="attempt 2 is older than attempt 3"):
        accept(ledger, spec("k", 2))


def test_a_start_is_claimed_once(ledger: Ledger) -> None:
    s = spec()
    accept(ledger, s)
    first = claim(ledger, s, "tok")
    assert first is not None and first.state is JobState.RUNNING and first.seq == 2
    assert claim(ledger, s) is None  # already running: a second start is refused
    entry = ledger.get("j")
    assert entry is not None and entry.runs == 1 and entry.token == "tok"


def test_the_schema_refuses_a_second_run_of_a_job_that_is_not_idempotent(
    ledger: Ledger,
) -> None:
    s = spec()
    accept(ledger, s)
    claim(ledger, s)
    conn = ledger.db.conn
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        conn.execute("UPDATE job_ledger SET state = 'accepted', runs = 2")
    other = spec("other")
    accept(ledger, other)
    with pytest.raises(sqlite3.IntegrityError, match="a start must count the run"):
        conn.execute("UPDATE job_ledger SET state = 'running' WHERE job_id = 'other'")
    ledger.record(status(s, JobState.FAILED, reason="timeout"))
    with pytest.raises(sqlite3.IntegrityError, match="a finished job cannot change state"):
        conn.execute("UPDATE job_ledger SET state = 'accepted' WHERE job_id = 'j'")
    with pytest.raises(LedgerConflict, match="has already failed"):
        ledger.record(status(s, JobState.SUCCEEDED))
    assert ledger.runs("j", 1) == 1


def test_a_resume_is_the_only_way_back_to_running(ledger: Ledger) -> None:
    s = spec()
    accept(ledger, s)
    with pytest.raises(ValueError, match="a start goes through claim"):
        ledger.record(status(s, JobState.RUNNING))
    claim(ledger, s)
    assert ledger.record(status(s, JobState.SUSPENDED)).seq == 3
    assert ledger.record(status(s, JobState.RUNNING)).seq == 4
    assert ledger.runs("j", 1) == 1


# -- delivery -----------------------------------------------------------------------------------


def test_results_are_kept_until_delivered(ledger: Ledger) -> None:
    a, b = spec("a"), spec("b")
    accept(ledger, a)
    accept(ledger, b)
    claim(ledger, a)
    done = ledger.record(status(a, JobState.SUCCEEDED, at=5.0, exit_code=0))
    assert {(r.job, r.state, r.seq) for r in ledger.undelivered()} == {
        ("a", JobState.SUCCEEDED, 3), ("b", JobState.ACCEPTED, 1)}
    ledger.mark_delivered("a", 1, 2)  # an older report: the result is still owed
    assert [r.job for r in ledger.undelivered()] == ["a", "b"]
    ledger.mark_delivered("a", 1, done.seq)
    ledger.mark_delivered("b", 1, 99)  # a seq it never had: ignored
    assert [r.job for r in ledger.undelivered()] == ["b"]
    assert ledger.prune(before_wall=10.0) == 1  # finished and delivered: may go
    assert ledger.get("a") is None and ledger.get("b") is not None


def test_undelivered_results_survive_a_restart(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    first = Ledger(db)
    s = spec()
    accept(first, s)
    claim(first, s)
    first.record(status(s, JobState.SUCCEEDED, exit_code=0))
    db.close()
    again = Ledger(Database(tmp_path / "s.db"))
    assert [(r.job, r.state) for r in again.undelivered()] == [("j", JobState.SUCCEEDED)]
    assert again.recover(NODE, 2.0) == []  # nothing was running


def test_store_errors_surface_instead_of_an_ack(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    ledger = Ledger(db)
    db.conn.execute("PRAGMA query_only = ON")  # stands for a disk that refuses writes
    with pytest.raises(StoreError):
        accept(ledger, spec())


# -- crash recovery, in-process ------------------------------------------------------------------


def test_recovery_fails_a_run_the_crash_ended_and_requeues_an_idempotent_one(
    ledger: Ledger,
) -> None:
    plain, idem, waiting = spec("plain"), spec("idem", idempotent=True), spec("waiting")
    for s in (plain, idem, waiting):
        accept(ledger, s)
    claim(ledger, plain, "t1")
    ledger.set_process("plain", 1, 4242, 123.5)
    claim(ledger, idem, "t2")
    ledger.record(status(idem, JobState.SUSPENDED))
    got = {r.entry.spec.job: r for r in ledger.recover(NODE, 50.0)}
    assert set(got) == {"plain", "idem"}
    assert got["plain"].entry.state is JobState.FAILED
    assert got["plain"].entry.report.reason == "interrupted"
    assert (got["plain"].token, got["plain"].pid, got["plain"].pid_start) == ("t1", 4242, 123.5)
    assert got["idem"].entry.state is JobState.ACCEPTED
    assert got["idem"].entry.report.reason == "rerun"
    assert claim(ledger, plain) is None  # never again
    assert claim(ledger, idem) is not None and ledger.runs("idem", 1) == 2
    assert ledger.get("waiting").state is JobState.ACCEPTED  # type: ignore[union-attr]


# -- crash recovery, for real: an agent SIGKILLed mid-job -----------------------------------------

AGENT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from qrad_agent.actuators.cgroups import WorkerCgroup
    from qrad_agent.actuators.settings import CgroupConfig
    from qrad_agent.core.models import Plan
    from qrad_agent.jobs.ledger import Ledger
    from qrad_agent.jobs.sandbox import Sandbox
    from qrad_agent.jobs.scheduler import JobScheduler
    from qrad_agent.jobs.settings import JobsConfig
    from qrad_agent.jobs.spec import parse_spec
    from qrad_agent.store.db import Database

    a = json.loads(sys.argv[1])
    cfg = JobsConfig.model_validate(a["cfg"])
    cg = WorkerCgroup(CgroupConfig(parent=a["cgroup"]), Path("/sys/fs/cgroup")) \\
        if a["cgroup"] else None
    sched = JobScheduler(cfg, "n1", Ledger(Database(a["db"])), Sandbox(cfg, Path(a["work"]), cg),
                         slots=1)
    sched.start()
    sched.apply(Plan(1, 1_000_000, 1.0))
    print(sched.offer(parse_spec(a["spec"])).state.value, flush=True)
    while True:
        sched.step()
        time.sleep(0.02)
""")

JOB = textwrap.dedent("""
    import os, sys, time
    marks = sys.argv[1]
    with open(marks, "a") as f:
        f.write(f"{os.getpid()}\\n")
    if len(open(marks).read().split()) == 1:
        time.sleep(60)  # the first run is still going when the agent is killed
""")


def start_agent(env: JobEnv, db: Path, cgroup: str | None, job: dict[str, Any],
                tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    args = {"cfg": env.config().model_dump(mode="json"), "db": str(db), "work": str(env.work),
            "cgroup": cgroup, "spec": job}
    return subprocess.Popen([sys.executable, str(script), json.dumps(args)],
                            stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("containment", ["cgroup", "fallback"])
@pytest.mark.parametrize("idempotent", [False, True])
def test_an_agent_killed_mid_job_reports_interrupted_and_never_runs_it_twice(
    containment: str, idempotent: bool, job_env: JobEnv, cgroup_parent: str, tmp_path: Path,
) -> None:
    parent = None
    if containment == "cgroup":
        make_cgroup(cgroup_parent)  # skips where cgroups cannot be made
        parent = cgroup_parent
    marks = job_env.shared / "marks"
    db_path = tmp_path / "state.db"
    job = {"job": "long", "argv": [job_env.python, "-c", JOB, str(marks)],
           "idempotent": idempotent, "lease_s": 600}
    agent = start_agent(job_env, db_path, parent, job, tmp_path)
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "accepted"
        wait_for(lambda: marks.exists() and marks.read_text().strip() != "", timeout=10,
                 what="the job to start")
        first = int(marks.read_text().split()[0])
        # meanwhile nobody else can start it: the ledger says it is running
        peek = Ledger(Database(db_path))
        assert peek.claim(JobStatus(node=NODE, job="long", attempt=1, state=JobState.RUNNING,
                                    at=1.0), "other") is None
        # the agent and its job spawner die at once (as in an OOM kill of both): nothing
        # ends the job, so the next start must find it and kill it. (When only the agent
        # dies, the spawner kills its jobs itself: tests/test_jobs_spawner.py.)
        for child in psutil.Process(agent.pid).children():
            child.kill()
        agent.send_signal(signal.SIGKILL)
        agent.wait(5)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert alive(first), "the job should have outlived its agent (nothing stopped it)"

    # the agent starts again
    cg = WorkerCgroup(CgroupConfig(parent=parent), CGROUP_ROOT) if parent else None
    cfg = job_env.config()
    sched = JobScheduler(cfg, NODE, Ledger(Database(db_path)), Sandbox(cfg, job_env.work, cg),
                         slots=1)
    reports = sched.start()
    wait_for(lambda: not alive(first), timeout=3, what="the orphaned run to be killed")
    assert [(r.job, r.state, r.reason) for r in reports] == [
        ("long", JobState.ACCEPTED, "rerun") if idempotent
        else ("long", JobState.FAILED, "interrupted")]
    sched.apply(Plan(1, 1_000_000, 1.0))
    deadline = time.monotonic() + (8.0 if idempotent else 0.6)
    while time.monotonic() < deadline and sched.jobs():
        sched.step()
        time.sleep(0.02)
    entry = sched.ledger.get("long", 1)
    assert entry is not None
    runs = marks.read_text().split()
    if idempotent:
        assert entry.state is JobState.SUCCEEDED and entry.runs == 2 and len(runs) == 2
    else:
        assert entry.state is JobState.FAILED and entry.report.reason == "interrupted"
        assert entry.runs == 1 and runs == [str(first)], "a job that is not idempotent ran again"
    sched.restore()
    if cg is not None:
        cg.release()
    os.unlink(marks)
