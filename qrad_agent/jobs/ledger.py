"""The job ledger: what this radiator accepted, ran and reported, in the state database.

One row per (job id, attempt), in the agent's SQLite database (WAL, ``store/db.py``). The
rules that make a job run at most once are in the schema, not only in the code above it:

- a partial unique index allows one *live* row (accepted, running, suspended) per job id,
  so two attempts of one job never run here at the same time;
- ``runs`` counts the processes started for a row, and a CHECK keeps it at most 1 unless the
  spec says the job is idempotent; a start is the one transition that moves ``accepted`` to
  ``running``, and it increments ``runs`` in the same statement;
- triggers refuse to move a finished row back to life, or to start one without counting.

Durability: accepting a job and claiming its start are synced to disk before the fleet is
told (the acknowledgement) and before the process exists (a power cut cannot make a started
job look never started). Results are synced too. Suspend/resume are not: after a power cut a
running job and a suspended one are recovered alike.

Crash recovery (:meth:`Ledger.recover`, once at start): a row still running or suspended
belongs to a run the crash ended. It is reported ``failed`` with reason ``interrupted``, or
queued again (``accepted``, reason ``rerun``) when the spec says it is idempotent. The
process ids and the run's token stored with the row let the sandbox stop whatever of that
run is still alive before anything else happens.

Delivery: every change of state stores the new status and bumps the row's ``report_seq``.
A status is undelivered while ``delivered_seq`` is below it; the link publishes
:meth:`Ledger.undelivered` (after each connect) and calls :meth:`Ledger.mark_delivered` when
the broker acknowledged one. Finished rows stay until delivered, then for ``retention_s`` so
a duplicate assignment of a finished attempt is answered with its result, not run again.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qrad_agent.jobs.spec import TERMINAL, JobSpec, JobState, JobStatus
from qrad_agent.store.db import Database, StoreError

log = logging.getLogger(__name__)

COMPONENT = "jobs"
LIVE = (JobState.ACCEPTED, JobState.RUNNING, JobState.SUSPENDED)
_LIVE_SQL = "('accepted', 'running', 'suspended')"
_FINAL_SQL = "('succeeded', 'failed', 'cancelled', 'returned')"

# Never edit a released step (the text is what older databases ran); append a new one.
MIGRATIONS = [
    """
    CREATE TABLE job_ledger (
        job_id TEXT NOT NULL,
        attempt INTEGER NOT NULL CHECK (attempt >= 1),
        spec TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('accepted', 'running', 'suspended', 'succeeded',
                                              'failed', 'cancelled', 'returned')),
        idempotent INTEGER NOT NULL CHECK (idempotent IN (0, 1)),
        runs INTEGER NOT NULL DEFAULT 0 CHECK (runs >= 0 AND (runs <= 1 OR idempotent = 1)),
        accepted_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        token TEXT,
        pid INTEGER,
        pid_start REAL,
        report TEXT NOT NULL,
        report_seq INTEGER NOT NULL CHECK (report_seq >= 1),
        delivered_seq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, attempt)
    );
    CREATE UNIQUE INDEX job_ledger_one_live ON job_ledger (job_id)
        WHERE state IN ('accepted', 'running', 'suspended');
    CREATE INDEX job_ledger_undelivered ON job_ledger (updated_at)
        WHERE report_seq > delivered_seq
    """,
]

# Trigger bodies hold ';', which Database.migrate's statement splitter cannot carry; they are
# created (if missing) one statement each, after the tables.
TRIGGERS = [
    f"""
    CREATE TRIGGER IF NOT EXISTS job_ledger_final BEFORE UPDATE OF state ON job_ledger
    WHEN OLD.state IN {_FINAL_SQL} AND NEW.state <> OLD.state
    BEGIN SELECT RAISE(ABORT, 'a finished job cannot change state'); END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS job_ledger_count_runs BEFORE UPDATE OF state ON job_ledger
    WHEN NEW.state = 'running' AND OLD.state = 'accepted' AND NEW.runs <> OLD.runs + 1
    BEGIN SELECT RAISE(ABORT, 'a start must count the run'); END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS job_ledger_insert_accepted BEFORE INSERT ON job_ledger
    WHEN NEW.state <> 'accepted' OR NEW.runs <> 0
    BEGIN SELECT RAISE(ABORT, 'a job enters the ledger accepted and not yet run'); END
    """,
]


class LedgerConflict(Exception):
    """The ledger will not take this job; ``reason`` is a ``Reason`` value, ``str()`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Entry:
    spec: JobSpec
    state: JobState
    runs: int
    accepted_at: float  # wall clock
    updated_at: float
    token: str | None
    pid: int | None
    pid_start: float | None
    report: JobStatus  # the latest status
    delivered_seq: int

    @property
    def key(self) -> tuple[str, int]:
        return self.spec.key

    @property
    def delivered(self) -> bool:
        return self.delivered_seq >= self.report.seq


@dataclass(frozen=True, slots=True)
class Accepted:
    entry: Entry
    new: bool  # False: this attempt was here already (a repeated assignment)


@dataclass(frozen=True, slots=True)
class Recovered:
    """A run a crash ended: what is left of it to stop, and what became of the job."""

    entry: Entry  # after recovery: failed (interrupted) or accepted again (rerun)
    token: str | None
    pid: int | None
    pid_start: float | None


_COLUMNS = ("spec, state, runs, accepted_at, updated_at, token, pid, pid_start, report, "
            "delivered_seq")


class Ledger:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate(COMPONENT, MIGRATIONS)
        with db.transaction(durable=True) as conn:
            for trigger in TRIGGERS:
                conn.execute(trigger)

    # -- taking a job ------------------------------------------------------------------------
    def accept(self, spec: JobSpec, status: JobStatus) -> Accepted:
        """Record ``spec`` as accepted (``status``, state accepted, gets seq 1), durably.

        The same attempt again returns what is recorded (``new`` False) and changes nothing;
        another attempt while one is live, or an older attempt than one seen, raises
        :class:`LedgerConflict`.
        """
        if status.state is not JobState.ACCEPTED or status.key != spec.key:
            raise ValueError(f"accept needs an accepted status of {spec.key}, got "
                             f"{status.state.value} of {status.key}")
        job, attempt = spec.key
        with self.db.transaction(durable=True) as conn:
            same = self._entry(job, attempt)
            if same is not None:
                return Accepted(same, new=False)
            rows = conn.execute(
                f"SELECT attempt, state FROM job_ledger WHERE job_id = ? "
                f"AND (state IN {_LIVE_SQL} OR attempt > ?) ORDER BY attempt DESC LIMIT 1",
                (job, attempt),
            ).fetchall()
            if rows:
                other, state = int(rows[0][0]), JobState(rows[0][1])
                if state in LIVE:
                    raise LedgerConflict(
                        "busy", f"job {job}: attempt {other} is {state.value} here; attempt "
                        f"{attempt} can only be taken once it has finished")
                raise LedgerConflict(
                    "invalid_spec", f"job {job}: attempt {attempt} is older than attempt "
                    f"{other}, which this radiator has already had")
            report = status.model_copy(update={"seq": 1})
            conn.execute(
                "INSERT INTO job_ledger (job_id, attempt, spec, state, idempotent, accepted_at, "
                "updated_at, report, report_seq) VALUES (?, ?, ?, 'accepted', ?, ?, ?, ?, 1)",
                (job, attempt, spec.model_dump_json(), int(spec.idempotent), status.at,
                 status.at, report.model_dump_json()),
            )
            entry = self._entry(job, attempt)
        assert entry is not None
        return Accepted(entry, new=True)

    # -- running it --------------------------------------------------------------------------
    def claim(self, status: JobStatus, token: str) -> JobStatus | None:
        """Move an accepted attempt to running and count the run, durably, *before* its process
        starts. None when the attempt is not waiting to start (already running, finished, or
        a non-idempotent job that ran once): then it must not start."""
        if status.state is not JobState.RUNNING:
            raise ValueError(f"claim needs a running status, got {status.state.value}")
        job, attempt = status.key
        try:
            with self.db.transaction(durable=True) as conn:
                row = conn.execute(
                    "SELECT report_seq FROM job_ledger WHERE job_id = ? AND attempt = ? "
                    "AND state = 'accepted'", (job, attempt)).fetchone()
                if row is None:
                    return None
                report = status.model_copy(update={"seq": int(row[0]) + 1})
                cur = conn.execute(
                    "UPDATE job_ledger SET state = 'running', runs = runs + 1, token = ?, "
                    "pid = NULL, pid_start = NULL, updated_at = ?, report = ?, report_seq = ? "
                    "WHERE job_id = ? AND attempt = ? AND state = 'accepted'",
                    (token, status.at, report.model_dump_json(), report.seq, job, attempt),
                )
                if cur.rowcount != 1:
                    return None
                return report
        except (StoreError, sqlite3.IntegrityError) as exc:
            # StoreError alone; sqlite3's own error inside a caller's transaction, which the
            # failed statement (aborted alone) leaves open
            if "CHECK constraint" in str(exc):  # a second run of a job that is not idempotent
                log.error("ledger: refused to start %s#%d again: %s", job, attempt, exc)
                return None
            raise

    def set_process(self, job: str, attempt: int, pid: int, pid_start: float) -> None:
        """The started run's leader process (not synced: the token finds the run anyway)."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE job_ledger SET pid = ?, pid_start = ? WHERE job_id = ? AND attempt = ?",
                (pid, pid_start, job, attempt))

    def record(self, status: JobStatus, durable: bool | None = None) -> JobStatus:
        """Store a new state of a recorded attempt; returns it with its ``seq``.

        Finished states are synced (``durable`` None means: when the state is final). Moving
        to ``running`` goes through :meth:`claim` only, except from ``suspended`` (a resume).
        """
        job, attempt = status.key
        final = status.state.terminal
        with self.db.transaction(durable=final if durable is None else durable) as conn:
            row = conn.execute(
                "SELECT state, report_seq FROM job_ledger WHERE job_id = ? AND attempt = ?",
                (job, attempt)).fetchone()
            if row is None:
                raise LedgerConflict("invalid_spec", f"job {job}#{attempt} is not in the ledger")
            state = JobState(row[0])
            if state.terminal:
                raise LedgerConflict(
                    "invalid_spec", f"job {job}#{attempt} has already {state.value}; it cannot "
                    f"become {status.state.value}")
            if status.state is JobState.RUNNING and state is not JobState.SUSPENDED:
                raise ValueError(f"job {job}#{attempt} is {state.value}: only a suspended job "
                                 "resumes; a start goes through claim()")
            if status.state is JobState.ACCEPTED and state is JobState.ACCEPTED:
                raise ValueError(f"job {job}#{attempt} is accepted already")
            report = status.model_copy(update={"seq": int(row[1]) + 1})
            clear = ", pid = NULL, pid_start = NULL" if final else ""
            conn.execute(
                f"UPDATE job_ledger SET state = ?, updated_at = ?, report = ?, report_seq = ?"
                f"{clear} WHERE job_id = ? AND attempt = ?",
                (status.state.value, status.at, report.model_dump_json(), report.seq, job,
                 attempt),
            )
        return report

    # -- after a crash -----------------------------------------------------------------------
    def recover(self, node: str, now_wall: float) -> list[Recovered]:
        """Settle the runs a crash ended (see the module's docstring); durable."""
        out: list[Recovered] = []
        with self.db.transaction(durable=True) as conn:
            rows = conn.execute(
                "SELECT job_id, attempt FROM job_ledger WHERE state IN ('running', 'suspended') "
                "ORDER BY accepted_at").fetchall()
            for job, attempt in rows:
                before = self._entry(str(job), int(attempt))
                assert before is not None
                spec = before.spec
                if spec.idempotent:
                    status = JobStatus(node=node, job=spec.job, attempt=spec.attempt,
                                       state=JobState.ACCEPTED, at=now_wall, reason="rerun",
                                       detail="the radiator stopped while the job ran; it is "
                                              "idempotent and runs again from the start")
                else:
                    status = JobStatus(node=node, job=spec.job, attempt=spec.attempt,
                                       state=JobState.FAILED, at=now_wall,
                                       reason="interrupted",
                                       detail="the radiator stopped (crash or power cut) while "
                                              "the job ran; it was not run again")
                report = status.model_copy(update={"seq": before.report.seq + 1})
                conn.execute(
                    "UPDATE job_ledger SET state = ?, updated_at = ?, report = ?, report_seq = ?, "
                    "pid = NULL, pid_start = NULL WHERE job_id = ? AND attempt = ?",
                    (status.state.value, now_wall, report.model_dump_json(), report.seq, job,
                     attempt))
                after = self._entry(str(job), int(attempt))
                assert after is not None
                out.append(Recovered(after, before.token, before.pid, before.pid_start))
                log.warning("ledger: job %s#%d was %s when the agent stopped; now %s (%s)",
                            job, attempt, before.state.value, after.state.value,
                            after.report.reason)
        return out

    # -- reading -----------------------------------------------------------------------------
    def get(self, job: str, attempt: int | None = None) -> Entry | None:
        """One attempt, or the latest attempt of ``job``."""
        if attempt is None:
            rows = self.db.query(
                "SELECT attempt FROM job_ledger WHERE job_id = ? ORDER BY attempt DESC LIMIT 1",
                (job,))
            if not rows:
                return None
            attempt = int(rows[0][0])
        return self._entry(job, attempt)

    def live(self) -> list[Entry]:
        """Accepted, running and suspended attempts, oldest first."""
        return list(self._entries(f"state IN {_LIVE_SQL}"))

    def entries(self) -> list[Entry]:
        return list(self._entries("1"))

    def undelivered(self) -> list[JobStatus]:
        """The latest status of each attempt whose last change the fleet has not confirmed."""
        return [e.report for e in self._entries("report_seq > delivered_seq")]

    def mark_delivered(self, job: str, attempt: int, seq: int) -> None:
        """The broker has the status ``seq`` of this attempt (and so every earlier one)."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE job_ledger SET delivered_seq = MAX(delivered_seq, ?) "
                "WHERE job_id = ? AND attempt = ? AND ? <= report_seq",
                (seq, job, attempt, seq))

    def prune(self, before_wall: float) -> int:
        """Forget finished, delivered attempts last changed before ``before_wall``."""
        with self.db.transaction() as conn:
            cur = conn.execute(
                f"DELETE FROM job_ledger WHERE state IN {_FINAL_SQL} "
                f"AND delivered_seq >= report_seq AND updated_at < ?", (before_wall,))
            return int(cur.rowcount)

    def runs(self, job: str, attempt: int) -> int:
        rows = self.db.query("SELECT runs FROM job_ledger WHERE job_id = ? AND attempt = ?",
                             (job, attempt))
        return int(rows[0][0]) if rows else 0

    def _entries(self, where: str) -> Iterator[Entry]:
        rows = self.db.query(
            f"SELECT {_COLUMNS} FROM job_ledger WHERE {where} ORDER BY accepted_at, job_id, "
            f"attempt")
        for row in rows:
            yield _entry(row)

    def _entry(self, job: str, attempt: int) -> Entry | None:
        rows = self.db.query(
            f"SELECT {_COLUMNS} FROM job_ledger WHERE job_id = ? AND attempt = ?", (job, attempt))
        return _entry(rows[0]) if rows else None


def _entry(row: tuple[Any, ...]) -> Entry:
    spec_json, state, runs, accepted_at, updated_at, token, pid, pid_start, report, dseq = row
    return Entry(
        spec=JobSpec.model_validate_json(spec_json),
        state=JobState(state),
        runs=int(runs),
        accepted_at=float(accepted_at),
        updated_at=float(updated_at),
        token=token,
        pid=pid,
        pid_start=pid_start,
        report=JobStatus.model_validate_json(report),
        delivered_seq=int(dseq),
    )


__all__ = ["LIVE", "TERMINAL", "Accepted", "Entry", "Ledger", "LedgerConflict", "Recovered"]
