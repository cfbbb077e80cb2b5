"""The job scheduler: carries out ``core/jobs.py``'s decisions with the sandbox and the ledger.

It stands where the worker slots stand (the "slots" lever): the allocator's plan says how
many slots make heat; the scheduler fills them with the fleet's jobs, by priority, and with
filler work (``WorkerSlots`` running the built-in burner or a configured command) while heat
is wanted and no job is there. Filler is stopped the moment a job needs its slot.

Only the control loop calls it (DESIGN.md: one thread mutates agent state). The link, when
it exists, hands it what arrived and takes what it produced:

    scheduler.start()                      once, before the loop: crash recovery
    scheduler.offer(spec) -> JobStatus     a spec from work/assign; record, then the ack to send
    scheduler.cancel(job_id)               the fleet's cancel: the whole process tree dies
    scheduler.set_conditions(Conditions)   each tick: mode off, warm season, draining, trip
    scheduler.apply(plan)                  each tick (the lever shape): step with the new plan
    scheduler.account(now, power_w)        each tick: energy shares
    scheduler.step()                       whenever woken (next_due()): timeouts, ends, starts
    scheduler.take_reports()               statuses to publish on jobs/{job}/status
    scheduler.take_request()               a work request to publish, if one is due
    scheduler.answered(retry_after_s)      the dispatcher's "nothing now, ask again later"
    scheduler.delivered(job, attempt, seq) the broker took a status: ledger and lease renewed

After a (re)connect the link also publishes ``ledger.undelivered()``: statuses of changes the
fleet has not confirmed, results above all, are kept in the ledger until it has.

Leases: each job's lease runs from when the fleet last confirmed hearing of it (the first
from the acceptance). Heartbeats (a status repeating the current state) go out every
``heartbeat_s`` (at most a third of the lease) for every live job, suspended and queued ones
included, so the fleet does not place elsewhere a job this radiator still holds. A job whose
lease lapses here is returned and killed: the fleet may already run it on another radiator.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from qrad_agent.actuators.base import LeverError, LeverInfo
from qrad_agent.actuators.cgroups import WorkerCgroup
from qrad_agent.actuators.restore import RestoreRecord
from qrad_agent.actuators.settings import WorkersConfig
from qrad_agent.actuators.workers import WorkerSlots
from qrad_agent.core.jobs import (
    Conditions,
    JobView,
    Phase,
    PolicyDecision,
    PolicyInputs,
    Resume,
    Return,
    ReturnReason,
    Start,
    Suspend,
    decide,
)
from qrad_agent.core.models import Plan
from qrad_agent.core.power import PowerModel
from qrad_agent.jobs.ledger import Ledger, LedgerConflict
from qrad_agent.jobs.sandbox import JobRun, Outcome, Refusal, Sandbox, SandboxError, new_token
from qrad_agent.jobs.settings import JobsConfig
from qrad_agent.jobs.spec import JobSpec, JobState, JobStatus, Reason, WorkRequestMessage

log = logging.getLogger(__name__)

MAX_ACCOUNT_GAP_S = 120.0  # a longer gap between power samples is not attributed to jobs
_RETURN_DETAIL = {
    ReturnReason.MODE_OFF: "the radiator was switched off: no heat wanted",
    ReturnReason.SEASON_WARM: "warm season: no heat wanted for a long time",
    ReturnReason.NO_HEAT: "no heat wanted here for longer than the grace period",
    ReturnReason.NO_SLOT: "no free slot here for longer than the grace period",
    ReturnReason.LEASE_EXPIRED: "the lease lapsed: the fleet has not heard of the job in time",
}


class Filler(Protocol):
    """Filler work in the slots jobs leave free (``WorkerSlots`` is one)."""

    def apply(self, plan: Plan) -> None: ...

    def read_back(self) -> dict[str, Any]: ...

    def restore(self) -> None: ...


def make_filler(
    cfg: JobsConfig,
    workers: WorkersConfig,
    record: RestoreRecord | None = None,
    cgroup: WorkerCgroup | None = None,
    max_slots: int | None = None,
) -> WorkerSlots | None:
    """The filler the config asks for: worker slots running the burner or the command.

    Stopped, never suspended, when a job needs the slot: suspending a whole workers' cgroup
    freezes it, and the jobs' cgroups are inside it.
    """
    if cfg.filler == "none":
        return None
    command = list(cfg.filler_command) if cfg.filler == "command" else []
    wcfg = workers.model_copy(update={"command": command, "shed": "stop"})
    return WorkerSlots(wcfg, record, cgroup, max_slots=max_slots)


@dataclass
class _Job:
    spec: JobSpec
    phase: Phase
    since: float  # monotonic: entered phase
    order: int
    lease_until: float
    seq: int  # the ledger's report seq of the current state
    run: JobRun | None = None
    energy_wh: float = 0.0
    next_heartbeat: float = 0.0

    @property
    def key(self) -> tuple[str, int]:
        return self.spec.key

    def view(self) -> JobView:
        return JobView(self.spec.job, self.spec.attempt, self.spec.priority, self.phase,
                       self.spec.cores, self.since, self.order, self.lease_until)


@dataclass
class SchedulerStats:
    accepted: int = 0
    refused: int = 0
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    returned: int = 0
    cancelled: int = 0
    requests: int = 0
    start_errors: int = 0
    last: PolicyDecision | None = None
    refusals: dict[str, int] = field(default_factory=dict)


class JobScheduler:
    name = "jobs"

    def __init__(
        self,
        cfg: JobsConfig,
        node: str,
        ledger: Ledger,
        sandbox: Sandbox,
        filler: Filler | None = None,
        *,
        slots: int,
        model: PowerModel | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.ledger = ledger
        self.sandbox = sandbox
        self.filler = filler
        self.slots = slots
        self.model = model
        self.clock = clock
        self.wall = wall
        self.policy = cfg.policy()
        self.plan = Plan(0, 0, 0.0)
        self.conditions = Conditions()
        self.stats = SchedulerStats()
        self._jobs: dict[tuple[str, int], _Job] = {}
        self._order = 0
        self._reports: list[JobStatus] = []
        self._request: WorkRequestMessage | None = None
        self._next_request_at = -math.inf
        self._filler_n = 0
        self._filler_ok = filler is not None
        self._accounted_at: float | None = None
        self._started = False
        self._pending: list[JobStatus] | None = None  # reports of the open batch

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> list[JobStatus]:
        """Recover from whatever the last run left (see ``ledger.py``); kill its leftovers;
        queue what is still ours. Returns the statuses that tell the fleet. Once only."""
        if self._started:
            return []
        now, wall = self.clock(), self.wall()
        recovered = self.ledger.recover(self.node, wall)
        self.sandbox.sweep([(r.token, r.pid, r.pid_start) for r in recovered])
        for entry in self.ledger.live():
            spec = entry.spec
            # the lease ran on while the agent was down: what is left of it, by the wall clock
            left = spec.lease_s - max(0.0, wall - entry.updated_at)
            job = _Job(spec, Phase.QUEUED, now, self._next_order(), now + left,
                       entry.report.seq)
            self._jobs[spec.key] = job
        self.ledger.prune(wall - self.cfg.retention_s)
        self._started = True
        out = [r.entry.report for r in recovered]
        self._reports.extend(out)
        return out

    def restore(self) -> None:
        """The agent stops: every live job is killed and returned (the fleet places it again
        at once), then the filler stops."""
        now = self.clock()
        for job in list(self._jobs.values()):
            self._end(job, JobState.RETURNED, Reason.AGENT_STOPPING,
                      "the radiator's agent is stopping", now)
        if self.filler is not None:
            self._filler_n = 0
            self.filler.restore()
        self.sandbox.close()  # no job is left for the spawner to report on

    # -- the lever shape ---------------------------------------------------------------------
    def discover(self) -> LeverInfo:
        if not self.cfg.enabled:
            return LeverInfo(self.name, False, "disabled in config (jobs.enabled = false)")
        return LeverInfo(self.name, True, range={**self.sandbox.describe(), "slots": self.slots,
                                                 "filler": self.cfg.filler})

    def apply(self, plan: Plan) -> None:
        self.plan = plan
        self.step()

    def _ensure_started(self) -> None:
        # recovery must come before any start: a crashed run's processes may still be alive
        if not self._started:
            self.start()

    def read_back(self) -> dict[str, Any]:
        by = {p: [j.spec.job for j in self._jobs.values() if j.phase is p] for p in Phase}
        last = self.stats.last
        return {
            "slots": sum(j.spec.cores for j in self._jobs.values() if j.phase is Phase.RUNNING)
            + self._filler_n,
            "running": by[Phase.RUNNING], "suspended": by[Phase.SUSPENDED],
            "queued": by[Phase.QUEUED], "filler": self._filler_n,
            "request": last.why_no_request or "due" if last else None,
        }

    # -- what the fleet sends ----------------------------------------------------------------
    def set_conditions(self, conditions: Conditions) -> None:
        self.conditions = conditions

    def offer(self, spec: JobSpec) -> JobStatus:
        """Take ``spec`` (from ``work/assign``): checked, recorded durably, queued, and started
        at once if a slot is free. Returns the status to acknowledge with: ``accepted`` (or the
        recorded state of an attempt that was here already), or ``returned``/``failed`` with
        the reason it was refused. A failure to record raises ``StoreError``: then nothing
        must be acknowledged."""
        return self.offer_many([spec])[0]

    def offer_many(self, specs: Iterable[JobSpec]) -> list[JobStatus]:
        """:meth:`offer` for the specs of one assignment, in order: all recorded in one
        durable transaction (one sync), then one step starts what has a slot. A failure to
        record raises ``StoreError`` and none of them is taken (nothing may be
        acknowledged)."""
        self._ensure_started()
        now, wall = self.clock(), self.wall()
        acks: list[JobStatus] = []
        taken: list[_Job] = []
        with self.ledger.db.transaction(durable=True):
            for spec in specs:
                ack, job = self._take(spec, now, wall)
                acks.append(ack)
                if job is not None:
                    taken.append(job)
        # committed: the jobs are ours now (before the commit, a failure would undo them)
        for job in taken:
            self.stats.accepted += 1
            self._jobs[job.key] = job
        if taken:
            self.step(now)
        return acks

    def _take(self, spec: JobSpec, now: float, wall: float) -> tuple[JobStatus, _Job | None]:
        known = self.ledger.get(spec.job, spec.attempt)
        if known is not None:
            return known.report, None  # the assignment came again: what is recorded stands
        why = self._refuse_now(spec)
        if why is not None:
            return self._refusal(spec, *why), None
        try:
            self.sandbox.admit(spec, self.slots)
        except Refusal as exc:
            return self._refusal(spec, exc.reason, str(exc)), None
        status = JobStatus(node=self.node, job=spec.job, attempt=spec.attempt,
                           state=JobState.ACCEPTED, at=wall)
        try:
            taken = self.ledger.accept(spec, status)
        except LedgerConflict as exc:
            return self._refusal(spec, Reason(exc.reason), str(exc)), None
        if not taken.new:
            return taken.entry.report, None  # twice in one assignment: what is recorded stands
        job = _Job(spec, Phase.QUEUED, now, self._next_order(), now + spec.lease_s,
                   taken.entry.report.seq, next_heartbeat=now + self._heartbeat_s(spec))
        return taken.entry.report, job

    def cancel(self, job_id: str) -> JobStatus | None:
        """The fleet cancels ``job_id``: its process tree is killed; the cancelled status (or,
        for a job no longer live here, the last one recorded; None if unknown)."""
        now = self.clock()
        for job in list(self._jobs.values()):
            if job.spec.job == job_id:
                status = self._end(job, JobState.CANCELLED, Reason.CANCELLED,
                                   "cancelled by the fleet", now)
                self.step(now)
                return status
        entry = self.ledger.get(job_id)
        return entry.report if entry is not None else None

    def answered(self, retry_after_s: float | None, *, took_work: bool = False) -> None:
        """The dispatcher answered the request; with ``retry_after_s``, ask again no sooner.
        ``took_work``: the answer brought jobs this radiator took. While work flows like
        this, the next request goes out as soon as a slot is free: ``request_interval_s``
        spaces the asking only while the fleet has nothing (or does not answer), so short
        jobs do not leave slots idle for an interval each (decision 0016)."""
        if took_work:
            self._next_request_at = -math.inf
        if retry_after_s is not None:
            self._next_request_at = max(self._next_request_at, self.clock() + retry_after_s)

    def delivered(self, job_id: str, attempt: int, seq: int, sent_at: float | None = None) -> None:
        """The broker has the status ``seq`` of this attempt, published at ``sent_at``
        (monotonic; now if not given): the ledger forgets it as undelivered, the lease runs
        from then."""
        self.ledger.mark_delivered(job_id, attempt, seq)
        job = self._jobs.get((job_id, attempt))
        if job is not None:
            at = self.clock() if sent_at is None else sent_at
            job.lease_until = max(job.lease_until, at + job.spec.lease_s)

    # -- what goes to the fleet --------------------------------------------------------------
    def take_reports(self) -> list[JobStatus]:
        out, self._reports = self._reports, []
        return out

    def take_request(self) -> WorkRequestMessage | None:
        """The work request to publish, if one became due (expired ones are dropped)."""
        req, self._request = self._request, None
        if req is not None and req.expires_at <= self.wall():
            return None
        return req

    def account(self, now: float, power_w: float | None) -> None:
        """Give each running job its share of the power since the last call, by cores, with
        filler workers counted as one core each."""
        last, self._accounted_at = self._accounted_at, now
        if last is None or power_w is None or not math.isfinite(power_w) or power_w <= 0:
            return
        dt = now - last
        if dt <= 0 or dt > MAX_ACCOUNT_GAP_S:
            return
        running = [j for j in self._jobs.values() if j.phase is Phase.RUNNING]
        shares = sum(j.spec.cores for j in running) + self._filler_n
        if shares <= 0:
            return
        for job in running:
            job.energy_wh += power_w * dt / 3600.0 * job.spec.cores / shares

    def next_due(self) -> float:
        """When :meth:`step` must run next at the latest (timeouts, heartbeats, leases)."""
        due = math.inf
        for job in self._jobs.values():
            due = min(due, job.next_heartbeat, job.lease_until)
            if job.run is not None and job.phase is Phase.RUNNING:
                due = min(due, job.run.started + job.run.suspended_total + job.spec.timeout_s)
            if job.phase is not Phase.RUNNING:
                due = min(due, job.since + self.policy.grace_s)
        return due

    # -- one step ----------------------------------------------------------------------------
    def step(self, now: float | None = None) -> PolicyDecision:
        self._ensure_started()
        now = self.clock() if now is None else now
        self._reap(now)
        decision = self._decide(now)
        failed_start = self._carry_out(decision, now)
        if failed_start:
            # a slot a job could not take goes to the next job or to filler at once
            self._reap(now)
            decision = self._decide(now)
            self._carry_out(decision, now)
        if decision.request is not None and self.cfg.enabled:
            self._make_request(decision, now)
        self._heartbeats(now)
        self.stats.last = decision
        return decision

    def _decide(self, now: float) -> PolicyDecision:
        slot_w = 0.0
        if self.model is not None and self.plan.slots > 0:
            slot_w = self.model.slot_w * self.model.slot_share(self.plan.freq_khz) \
                * max(0.0, self.plan.quota)
        return decide(PolicyInputs(
            now=now, plan=self.plan, jobs=tuple(j.view() for j in self._jobs.values()),
            filler_available=self._filler_ok, conditions=self.conditions, slot_w=slot_w,
            next_request_at=self._next_request_at, throttle_cores=self._throttle_cores(),
        ), self.policy)

    def _throttle_cores(self) -> int:
        """The radiator's slots when the quota lever caps all jobs together (they live below
        the workers' cgroup it throttles): then a job wider than the free slots may start,
        throttled (decision 0017). 0 otherwise: a job would heat above the plan."""
        cgroup = self.sandbox.cgroup
        return self.slots if cgroup is not None and cgroup.quota_use is not None else 0

    def urgent_cores(self) -> int:
        """The allocator's hint while high-priority work is here (decision 0018)."""
        last = self.stats.last  # the last step's decision computed it from the same views
        return last.urgent_cores if last is not None else 0

    def _carry_out(self, decision: PolicyDecision, now: float) -> bool:
        failed = False
        starts: list[tuple[_Job, JobStatus, str]] = []
        with self._batch():
            # stops first, then the claims of the starts: all in one sync, committed before
            # any process starts (a claim must be on disk before its process exists)
            for action in decision.actions:
                job = self._jobs.get((action.job_id, action.attempt))
                if job is None:
                    continue
                if isinstance(action, Return):
                    self._end(job, JobState.RETURNED, Reason(action.reason.value),
                              _RETURN_DETAIL[action.reason], now)
                elif isinstance(action, Suspend):
                    self._suspend(job, now)
            for action in decision.actions:
                job = self._jobs.get((action.job_id, action.attempt))
                if job is not None and isinstance(action, Start):
                    token = new_token()
                    claimed = self._claim(job, token)
                    if claimed is None:
                        failed = True
                    else:
                        starts.append((job, claimed, token))
        if decision.filler < self._filler_n:
            self._set_filler(decision.filler)  # pre-empted before the jobs start: no overlap
        for action in decision.actions:
            job = self._jobs.get((action.job_id, action.attempt))
            if job is not None and isinstance(action, Resume):
                self._resume(job, now)
        started: list[_Job] = []
        runs = self.sandbox.start_many([(job.spec, token) for job, _, token in starts]) \
            if starts else []
        for (job, claimed, _), run in zip(starts, runs, strict=True):
            if self._took_start(job, claimed, run, now):
                started.append(job)
            else:
                failed = True
        if started:
            # the leaders' pids (not synced: the token finds the run anyway)
            with self.ledger.db.transaction():
                for job in started:
                    assert job.run is not None
                    self.ledger.set_process(job.spec.job, job.spec.attempt, job.run.pid,
                                            job.run.pid_start)
        if decision.filler > self._filler_n and not failed:
            self._set_filler(decision.filler)
        return failed

    def _claim(self, job: _Job, token: str) -> JobStatus | None:
        spec = job.spec
        claimed = self.ledger.claim(self._status(job, JobState.RUNNING), token)
        if claimed is None:
            # not startable per the ledger (it ran once and is not idempotent): never again
            entry = self.ledger.get(spec.job, spec.attempt)
            log.error("jobs: %s#%d is %s in the ledger; not started", spec.job, spec.attempt,
                      entry.state.value if entry else "missing")
            self._jobs.pop(job.key, None)
            return None
        job.seq = claimed.seq
        return claimed

    def _took_start(self, job: _Job, claimed: JobStatus, run: JobRun | Refusal | SandboxError,
                   now: float) -> bool:
        spec = job.spec
        if isinstance(run, Exception):
            exc = run
            self.stats.start_errors += 1
            log.warning("jobs: %s#%d could not start: %s", spec.job, spec.attempt, exc)
            # a radiator-side failure: the fleet may place it on one that can run it
            state = JobState.RETURNED if exc.reason in (
                Reason.NOT_ALLOWED, Reason.TOO_BIG, Reason.SANDBOX_ERROR) else JobState.FAILED
            self._finish(job, state, exc.reason, str(exc), now)
            return False
        job.run = run
        job.phase, job.since = Phase.RUNNING, now
        job.next_heartbeat = now + self._heartbeat_s(spec)
        self.stats.started += 1
        self._report(claimed)
        return True

    def _suspend(self, job: _Job, now: float) -> None:
        if job.run is None:
            return
        job.run.suspend(now)
        job.phase, job.since = Phase.SUSPENDED, now
        self._record(job, JobState.SUSPENDED)

    def _resume(self, job: _Job, now: float) -> None:
        if job.run is None:
            return
        job.run.resume(now)
        job.phase, job.since = Phase.RUNNING, now
        self._record(job, JobState.RUNNING)

    def _end(self, job: _Job, state: JobState, reason: Reason, detail: str,
             now: float) -> JobStatus:
        """Stop ``job`` for good (its processes die) and record why."""
        if job.run is not None:
            outcome = job.run.kill(state, reason, detail, now)
            return self._finish_run(job, outcome)
        return self._finish(job, state, reason, detail, now)

    def wake_fds(self) -> list[int]:
        """Descriptors that become readable when this scheduler has something to do (a job
        ended): the service loop waits on them as well as on its timers."""
        fd = self.sandbox.spawner.fileno()
        return [fd] if fd is not None else []

    def _reap(self, now: float) -> None:
        ended: list[tuple[_Job, Outcome]] = []
        for job in list(self._jobs.values()):
            if job.run is None:
                continue
            outcome = job.run.poll(now)  # enforces the timeout too
            if outcome is not None:
                ended.append((job, outcome))
        if ended:
            with self._batch():  # the results of one step: one sync
                for job, outcome in ended:
                    self._finish_run(job, outcome)

    @contextmanager
    def _batch(self) -> Iterator[None]:
        """The ledger writes inside are one durable transaction (one sync); the reports they
        produce are published only once it committed. Nested use joins the outer batch."""
        if self._pending is not None:
            yield
            return
        self._pending = []
        try:
            with self.ledger.db.transaction(durable=True):
                yield
            self._reports.extend(self._pending)
        finally:
            self._pending = None

    def _report(self, status: JobStatus) -> None:
        if self._pending is not None:
            self._pending.append(status)
        else:
            self._reports.append(status)

    def _finish_run(self, job: _Job, o: Outcome) -> JobStatus:
        status = self._status(job, o.state, exit_code=o.exit_code, signal=o.signal,
                              cpu_s=o.cpu_s, wall_s=o.wall_s, output=o.output,
                              outputs=o.outputs, reason=o.reason.value if o.reason else None,
                              detail=o.detail)
        return self._finish_status(job, status)

    def _finish(self, job: _Job, state: JobState, reason: Reason, detail: str,
                now: float) -> JobStatus:
        return self._finish_status(job, self._status(job, state, reason=reason.value,
                                                     detail=detail))

    def _finish_status(self, job: _Job, status: JobStatus) -> JobStatus:
        self._jobs.pop(job.key, None)
        try:
            recorded = self.ledger.record(status)
        except LedgerConflict as exc:
            # the ledger already holds an end for it (another agent on the same state?): that
            # record stands, and nothing is reported twice
            log.error("jobs: %s#%d: %s", status.job, status.attempt, exc)
            entry = self.ledger.get(status.job, status.attempt)
            return entry.report if entry is not None else status
        counter = {JobState.SUCCEEDED: "succeeded", JobState.FAILED: "failed",
                   JobState.RETURNED: "returned", JobState.CANCELLED: "cancelled"}
        name = counter[status.state]
        setattr(self.stats, name, getattr(self.stats, name) + 1)
        self._report(recorded)
        log.info("jobs: %s#%d %s%s", status.job, status.attempt, status.state.value,
                 f" ({status.reason}: {status.detail})" if status.reason else "")
        return recorded

    def _record(self, job: _Job, state: JobState) -> None:
        recorded = self.ledger.record(self._status(job, state))
        job.seq = recorded.seq
        self._report(recorded)

    def _status(self, job: _Job, state: JobState, **extra: Any) -> JobStatus:
        run = job.run
        base: dict[str, Any] = {
            "node": self.node, "job": job.spec.job, "attempt": job.spec.attempt,
            "state": state, "seq": job.seq, "at": self.wall(),
            "energy_wh": round(job.energy_wh, 4) if run is not None else None,
        }
        if run is not None and "cpu_s" not in extra and run.outcome is None:
            base["cpu_s"] = round(run.cpu_seconds(), 3)
            base["wall_s"] = round(run.running_s(self.clock()), 3)
        return JobStatus(**{**base, **extra})

    def _heartbeats(self, now: float) -> None:
        for job in self._jobs.values():
            if now >= job.next_heartbeat:
                state = {Phase.QUEUED: JobState.ACCEPTED, Phase.RUNNING: JobState.RUNNING,
                         Phase.SUSPENDED: JobState.SUSPENDED}[job.phase]
                self._reports.append(self._status(job, state))
                job.next_heartbeat = now + self._heartbeat_s(job.spec)

    def _heartbeat_s(self, spec: JobSpec) -> float:
        return min(self.cfg.heartbeat_s, spec.lease_s / 3.0)

    def _set_filler(self, n: int) -> None:
        if self.filler is None:
            return
        try:
            self.filler.apply(Plan(n, self.plan.freq_khz, self.plan.quota))
            self._filler_n = n
        except LeverError as exc:
            log.error("jobs: filler unavailable, slots without a job make no heat: %s", exc)
            self._filler_ok = False
            self._filler_n = 0

    def _make_request(self, decision: PolicyDecision, now: float) -> None:
        req = decision.request
        assert req is not None
        wall = self.wall()
        self.stats.requests += 1
        max_cores = min(self.cfg.max_cores or self.slots, self.slots, req.free_slots)
        self._request = WorkRequestMessage(
            node=self.node, id=f"{self.node}:{self.stats.requests}:{int(wall)}", at=wall,
            expires_at=wall + self.cfg.request_ttl_s, free_slots=req.free_slots,
            heat_budget_w=req.heat_budget_w, horizon_s=req.horizon_s, max_cores=max(1, max_cores),
            max_memory_mb=self.cfg.max_memory_mb, max_timeout_s=self.cfg.max_timeout_s,
        )
        self._next_request_at = now + self.cfg.request_interval_s

    def _refuse_now(self, spec: JobSpec) -> tuple[Reason, str] | None:
        c = self.conditions
        if not self.cfg.enabled:
            return Reason.DISABLED, "jobs are disabled on this radiator (jobs.enabled = false)"
        if c.draining:
            return Reason.DRAINING, "this radiator is draining: it takes no new work"
        if c.mode_off:
            return Reason.MODE_OFF, "this radiator is switched off: no heat wanted"
        if c.season_warm:
            return Reason.SEASON_WARM, "warm season: this radiator wants no heat"
        return None

    def _refusal(self, spec: JobSpec, reason: Reason, detail: str) -> JobStatus:
        """A job this radiator does not take: ``returned`` when another radiator might run it,
        ``failed`` when none would (the spec itself is wrong)."""
        self.stats.refused += 1
        self.stats.refusals[reason.value] = self.stats.refusals.get(reason.value, 0) + 1
        state = JobState.FAILED if reason is Reason.INVALID_SPEC else JobState.RETURNED
        log.info("jobs: refused %s#%d: %s", spec.job, spec.attempt, detail)
        return JobStatus(node=self.node, job=spec.job, attempt=spec.attempt, state=state,
                         at=self.wall(), reason=reason.value, detail=detail[:500])

    def _next_order(self) -> int:
        self._order += 1
        return self._order

    # -- for people and tests ----------------------------------------------------------------
    def jobs(self) -> dict[tuple[str, int], str]:
        return {k: j.phase.value for k, j in self._jobs.items()}

    def run_of(self, job_id: str, attempt: int = 1) -> JobRun | None:
        job = self._jobs.get((job_id, attempt))
        return job.run if job is not None else None
