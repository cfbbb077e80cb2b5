"""The reference dispatcher's job queue, in SQLite (WAL).

``fleet/placement.py`` decides; this module keeps the result. Every change is one
transaction, and each lease moves a job from ``queued`` to ``leased`` with a guarded UPDATE
(``WHERE state = 'queued'``), so two dispatchers sharing the file (an MQTT 5 shared
subscription in front of them) never lease one job twice.

Times are the dispatcher's wall clock (leases outlive a dispatcher restart). Specs are
stored as submitted; each lease hands out a copy with the attempt number it is for.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qrad_agent.core.jobs import Priority
from qrad_agent.fleet.placement import (
    Candidate,
    FleetState,
    Lease,
    Placement,
    Request,
    Transition,
    Verdict,
    avoided,
    expired,
    on_report,
    place,
    requeue,
)
from qrad_agent.jobs.spec import JobSpec, JobStatus
from qrad_agent.store.db import Database

log = logging.getLogger(__name__)

COMPONENT = "fleet_queue"
AVOID_S = 600.0  # a radiator that returned a job does not get it back for this long

# Never edit a released step; append a new one.
MIGRATIONS = [
    """
    CREATE TABLE fleet_jobs (
        job_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        spec TEXT NOT NULL,
        rank INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('queued', 'leased', 'cancelling', 'succeeded',
                                              'failed', 'cancelled')),
        attempt INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
        node TEXT,
        lease_until REAL,
        node_state TEXT,
        avoid TEXT NOT NULL DEFAULT '{}',
        submitted_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        reason TEXT,
        detail TEXT,
        result TEXT,
        CHECK ((state IN ('leased', 'cancelling')) = (node IS NOT NULL AND lease_until IS NOT NULL))
    );
    CREATE INDEX fleet_jobs_queue ON fleet_jobs (state, rank, seq);
    CREATE INDEX fleet_jobs_node ON fleet_jobs (node) WHERE node IS NOT NULL
    """,
]


class QueueError(Exception):
    """A request the queue cannot carry out; the message says why."""


@dataclass(frozen=True, slots=True)
class FleetJob:
    spec: JobSpec  # as submitted (attempt 1)
    state: FleetState
    attempt: int
    max_attempts: int
    node: str | None
    lease_until: float | None
    node_state: str | None  # the last state the radiator reported
    submitted_at: float
    updated_at: float
    reason: str | None
    detail: str | None
    result: JobStatus | None  # the final status, when there is one
    avoid: dict[str, float]

    @property
    def job_id(self) -> str:
        return self.spec.job

    def lease(self) -> Lease:
        return Lease(self.job_id, self.state, self.attempt, self.max_attempts,
                     self.spec.lease_s, self.node, self.lease_until, self.avoid)


@dataclass(frozen=True, slots=True)
class Assignment:
    """A job leased to a radiator: send ``spec`` (with its attempt) on its work/assign."""

    node: str
    request_id: str
    spec: JobSpec
    lease_until: float


_COLUMNS = ("spec, state, attempt, max_attempts, node, lease_until, node_state, submitted_at, "
            "updated_at, reason, detail, result, avoid")


class FleetQueue:
    def __init__(self, db: Database, *, clock: Any = time.time) -> None:
        self.db = db
        self.clock = clock
        db.migrate(COMPONENT, MIGRATIONS)

    @classmethod
    def open(cls, path: Path | str) -> FleetQueue:
        return cls(Database(path))

    # -- submitting --------------------------------------------------------------------------
    def submit(self, spec: JobSpec, max_attempts: int = 3, now: float | None = None) -> FleetJob:
        if max_attempts < 1:
            raise QueueError(f"max_attempts must be at least 1, got {max_attempts}")
        now = self.clock() if now is None else now
        first = spec.model_copy(update={"attempt": 1})
        with self.db.transaction(durable=True) as conn:
            if conn.execute("SELECT 1 FROM fleet_jobs WHERE job_id = ?", (spec.job,)).fetchone():
                raise QueueError(f"job id {spec.job!r} is taken; job ids are unique in a queue")
            seq = int(conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM fleet_jobs")
                      .fetchone()[0])
            conn.execute(
                "INSERT INTO fleet_jobs (job_id, seq, spec, rank, state, max_attempts, "
                "submitted_at, updated_at) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                (spec.job, seq, first.model_dump_json(), spec.priority.rank, max_attempts, now,
                 now))
        job = self.get(spec.job)
        assert job is not None
        return job

    def submit_many(self, specs: Iterable[JobSpec], max_attempts: int = 3,
                    now: float | None = None) -> int:
        n = 0
        with self.db.transaction(durable=True):
            for spec in specs:
                self.submit(spec, max_attempts, now)
                n += 1
        return n

    # -- leasing -----------------------------------------------------------------------------
    def lease(self, requests: Sequence[Request], now: float | None = None) -> list[Assignment]:
        """Answer ``requests``: place queued jobs (``placement.place``) and lease them."""
        now = self.clock() if now is None else now
        want = sum(r.free_slots for r in requests if r.expires_at > now)
        if want <= 0:
            return []
        out: list[Assignment] = []
        by_id = {r.id: r for r in requests}
        with self.db.transaction(durable=True) as conn:
            # enough of the queue's head to fill every slot asked for, whatever fits where
            rows = conn.execute(
                "SELECT spec, avoid, seq FROM fleet_jobs WHERE state = 'queued' "
                "ORDER BY rank, seq LIMIT ?", (max(64, want * 8),)).fetchall()
            candidates = []
            stored: dict[str, str] = {}
            for spec_json, avoid_json, seq in rows:
                # specs were validated when submitted and are stored whole: placement needs
                # only a few fields, and only the placed ones are validated again
                raw = json.loads(spec_json)
                stored[raw["job"]] = spec_json
                candidates.append(Candidate(
                    raw["job"], Priority(raw["priority"]), int(seq), int(raw["cores"]),
                    int(raw["memory_mb"]), float(raw["timeout_s"]),
                    avoided(json.loads(avoid_json), now)))
            placements: list[Placement] = place(candidates, requests, now)
            for p in placements:
                spec = JobSpec.model_validate_json(stored[p.job_id])
                until = now + spec.lease_s
                cur = conn.execute(
                    "UPDATE fleet_jobs SET state = 'leased', attempt = attempt + 1, node = ?, "
                    "lease_until = ?, node_state = NULL, updated_at = ? "
                    "WHERE job_id = ? AND state = 'queued' RETURNING attempt",
                    (p.node, until, now, p.job_id))
                row = cur.fetchone()
                if row is None:
                    continue  # another dispatcher took it meanwhile
                out.append(Assignment(p.node, by_id[p.request_id].id,
                                      spec.model_copy(update={"attempt": int(row[0])}), until))
        return out

    def renew(self, job_id: str, attempt: int, node: str, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        job = self.get(job_id)
        if job is None or job.attempt != attempt or job.node != node or job.state.final:
            return False
        with self.db.transaction() as conn:
            cur = conn.execute(
                "UPDATE fleet_jobs SET lease_until = ?, updated_at = ? WHERE job_id = ? AND "
                "attempt = ? AND node = ? AND state IN ('leased', 'cancelling')",
                (now + job.spec.lease_s, now, job_id, attempt, node))
            return cur.rowcount == 1

    # -- what radiators say ------------------------------------------------------------------
    def report(self, status: JobStatus, now: float | None = None) -> Transition:
        """Apply a radiator's status (``node`` from the status) to the job."""
        now = self.clock() if now is None else now
        with self.db.transaction(durable=True):
            job = self.get(status.job)
            if job is None:
                return Transition(Verdict.IGNORE, FleetState.FAILED,
                                  detail=f"unknown job {status.job!r}")
            t = on_report(job.lease(), status.node, status.attempt, status.state.value,
                          status.reason, now)
            self._apply(job, t, now, status)
        return t

    def report_many(self, statuses: Sequence[JobStatus], now: float | None = None
                    ) -> list[Transition]:
        """:meth:`report` for the statuses that arrived together: one durable commit."""
        now = self.clock() if now is None else now
        with self.db.transaction(durable=True):
            return [self.report(status, now) for status in statuses]

    def complete(self, status: JobStatus, now: float | None = None) -> Transition:
        """A radiator's final status (succeeded, failed, cancelled, returned): :meth:`report`,
        refusing a status that is not final."""
        if not status.state.terminal:
            raise QueueError(f"{status.state.value} is not a final state; use report()")
        return self.report(status, now)

    def extend_leases(self, now: float | None = None) -> None:
        """Every live lease runs at least its whole ``lease_s`` from ``now`` (the dispatcher
        can hear renewals again after being cut off)."""
        now = self.clock() if now is None else now
        with self.db.transaction(durable=True) as conn:
            conn.execute(
                "UPDATE fleet_jobs SET lease_until = MAX(lease_until, ? + "
                "json_extract(spec, '$.lease_s')) WHERE state IN ('leased', 'cancelling')",
                (now,))

    def expire(self, now: float | None = None) -> list[str]:
        """Requeue every job whose lease lapsed; returns their ids."""
        now = self.clock() if now is None else now
        with self.db.transaction(durable=True):
            jobs = {j.job_id: j for j in self.list((FleetState.LEASED, FleetState.CANCELLING))}
            ids = expired((j.lease() for j in jobs.values()), now)
            for job_id in ids:
                self._lapse(jobs[job_id], "lease_expired", now)
        return ids

    def requeue(self, job_id: str, reason: str, now: float | None = None) -> FleetState:
        now = self.clock() if now is None else now
        with self.db.transaction(durable=True):
            job = self.get(job_id)
            if job is None:
                raise QueueError(f"no job {job_id!r} in the queue")
            if job.state.final:
                raise QueueError(f"job {job_id} has {job.state.value}; it cannot be requeued")
            if job.state is FleetState.QUEUED:
                return job.state
            t = requeue(job.lease(), reason, now)
            self._apply(job, t, now)
            return t.state

    def cancel(self, job_id: str, now: float | None = None) -> tuple[FleetState, str | None]:
        """Cancel ``job_id``: at once when queued; when leased, the radiator holding it must
        be told (returned: its node), and the job is ``cancelling`` until it reports."""
        now = self.clock() if now is None else now
        with self.db.transaction(durable=True) as conn:
            job = self.get(job_id)
            if job is None:
                raise QueueError(f"no job {job_id!r} in the queue")
            if job.state.final:
                return job.state, None
            if job.state is FleetState.QUEUED:
                conn.execute("UPDATE fleet_jobs SET state = 'cancelled', reason = 'cancelled', "
                             "updated_at = ? WHERE job_id = ?", (now, job_id))
                return FleetState.CANCELLED, None
            conn.execute("UPDATE fleet_jobs SET state = 'cancelling', updated_at = ? "
                         "WHERE job_id = ?", (now, job_id))
            return FleetState.CANCELLING, job.node

    # -- reading -----------------------------------------------------------------------------
    def get(self, job_id: str) -> FleetJob | None:
        rows = self.db.query(f"SELECT {_COLUMNS} FROM fleet_jobs WHERE job_id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list(self, states: Iterable[FleetState] | None = None,
             limit: int | None = None) -> list[FleetJob]:
        where, params = "1", []
        if states is not None:
            chosen = [s.value for s in states]
            where = f"state IN ({', '.join('?' * len(chosen))})"
            params = chosen
        sql = f"SELECT {_COLUMNS} FROM fleet_jobs WHERE {where} ORDER BY rank, seq"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_job(r) for r in self.db.query(sql, params)]

    def counts(self) -> dict[str, int]:
        rows = self.db.query("SELECT state, COUNT(*) FROM fleet_jobs GROUP BY state")
        return {str(s): int(n) for s, n in rows}

    # -- changes -----------------------------------------------------------------------------
    def _lapse(self, job: FleetJob, reason: str, now: float) -> None:
        if job.state is FleetState.CANCELLING:
            t = Transition(Verdict.DONE, FleetState.CANCELLED, None, reason="cancelled",
                           detail=f"cancelled; the radiator did not confirm ({reason})")
        else:
            t = requeue(job.lease(), reason, now)
        self._apply(job, t, now)
        log.info("fleet: job %s attempt %d on %s: %s -> %s", job.job_id, job.attempt, job.node,
                 reason, t.state.value)

    def _apply(self, job: FleetJob, t: Transition, now: float,
               status: JobStatus | None = None) -> None:
        conn = self.db.conn
        if t.verdict is Verdict.IGNORE:
            return
        if t.verdict is Verdict.RENEW:
            conn.execute(
                "UPDATE fleet_jobs SET lease_until = ?, node_state = ?, updated_at = ? "
                "WHERE job_id = ?",
                (t.lease_until, status.state.value if status else None, now, job.job_id))
            return
        avoid = dict(job.avoid)
        if t.avoid_node is not None:
            avoid[t.avoid_node] = now + AVOID_S
        avoid = {n: u for n, u in avoid.items() if u > now}
        result = status.model_dump_json() if status is not None and t.verdict is Verdict.DONE \
            else None
        conn.execute(
            "UPDATE fleet_jobs SET state = ?, node = NULL, lease_until = NULL, node_state = ?, "
            "avoid = ?, reason = ?, detail = ?, result = COALESCE(?, result), updated_at = ? "
            "WHERE job_id = ?",
            (t.state.value, status.state.value if status else None, json.dumps(avoid),
             t.reason or (status.reason if status else None),
             t.detail or (status.detail if status else None), result, now, job.job_id))


def _job(row: Sequence[Any]) -> FleetJob:
    (spec, state, attempt, max_attempts, node, lease_until, node_state, submitted_at,
     updated_at, reason, detail, result, avoid) = row
    return FleetJob(
        spec=JobSpec.model_validate_json(spec),
        state=FleetState(state),
        attempt=int(attempt),
        max_attempts=int(max_attempts),
        node=node,
        lease_until=lease_until,
        node_state=node_state,
        submitted_at=float(submitted_at),
        updated_at=float(updated_at),
        reason=reason,
        detail=detail,
        result=JobStatus.model_validate_json(result) if result else None,
        avoid={str(k): float(v) for k, v in json.loads(avoid).items()},
    )
