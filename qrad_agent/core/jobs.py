"""The job scheduling policy: which jobs hold the allocator's slots, and when to ask for work.

Pure (sans-IO): :func:`decide` takes a snapshot of the jobs, the allocator's plan and the
conditions of the moment (mode, season, drain, safety) with ``now``, and returns what to do.
The scheduler in ``jobs/scheduler.py`` carries the actions out with real processes.

The rules, in the order they are applied:

1. *Return*. With the mode ``off`` or a warm season no heat will be wanted for a long time:
   every job goes back to the fleet at once, so it runs where heat is wanted. A job whose
   lease has lapsed (no heartbeat reached the fleet in time) is returned too: the fleet has
   already given it to another radiator. A job that has waited (suspended, or queued without
   a slot) for ``grace_s`` is returned as well; a short pause costs nothing, a long one
   delays the job for no one's benefit.
2. *Shed*. When the plan holds fewer slots than the running jobs occupy (or no heat is
   wanted at all: quota 0, a safety trip), jobs are suspended, lowest priority first and,
   within one priority, the most recently started first, so the jobs nearest to their end
   keep running.
3. *Fill*. Free slots go to waiting jobs by priority, then arrival order; a suspended job
   goes before a queued one of the same priority (its work is already half done). A job
   needs ``cores`` slots; one that does not fit lets a smaller one behind it run.
   *Throttled starts* (only where the plan's quota caps all jobs together, ``throttle_cores``
   > 0, decision 0017): a waiting job that does not fit the free slots starts all the same
   while there are fewer running jobs than slots; the jobs share the quota of the plan's
   slots, so the heat stays what the plan says and a job runs slower instead of waiting.
   Shedding then keeps running jobs while there are no more of them than slots.
4. *Filler*. Slots still free while heat is wanted run filler work (a CPU burner or a
   volunteer-computing client). Filler never holds a slot against a job: it is counted as
   free, so real work pre-empts it in the same decision.
5. *Ask*. With heat wanted and free slots, a work request goes out, at most once per
   ``request_interval_s``; none while draining, none while a trip forbids heat, none with
   the mode ``off`` or a warm season. With throttled starts and nothing waiting here, the
   request offers room for jobs wider than the free slots, up to ``throttle_cores``, but for
   no more jobs than could all start now (a dispatcher places a job only where its cores fit
   the free slots); the heat budget stays that of the free slots.
6. *Hint*. :func:`urgent_cores` tells the allocator when high-priority work is here, so it
   runs fewer slots at a higher frequency for the same heat (decision 0018).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from qrad_agent.core.models import Plan


class Priority(StrEnum):
    """A job's priority as the fleet sets it; ``rank`` 0 comes first."""

    HIGH = "high"
    LOW = "low"
    BACKGROUND = "background"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Priority.HIGH: 0, Priority.LOW: 1, Priority.BACKGROUND: 2}


class Phase(StrEnum):
    """Where a live job stands on this radiator."""

    QUEUED = "queued"  # accepted, never started here yet
    RUNNING = "running"
    SUSPENDED = "suspended"


class ReturnReason(StrEnum):
    MODE_OFF = "mode_off"
    SEASON_WARM = "season_warm"
    NO_HEAT = "no_heat"  # waited past the grace period because no heat was wanted
    NO_SLOT = "no_slot"  # waited past the grace period for a slot other jobs held
    LEASE_EXPIRED = "lease_expired"


@dataclass(frozen=True, slots=True)
class JobView:
    """What the policy needs to know about one live job."""

    job_id: str
    attempt: int
    priority: Priority
    phase: Phase
    cores: int
    since: float  # monotonic time it entered ``phase`` (for queued: when it was accepted)
    order: int  # arrival order on this radiator: first come, first served within a priority
    lease_until: float = math.inf  # monotonic; past it the fleet may have placed it elsewhere

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.attempt)


@dataclass(frozen=True, slots=True)
class Conditions:
    """What, beyond the plan, decides whether jobs may run and whether to ask for more."""

    mode_off: bool = False
    season_warm: bool = False
    draining: bool = False  # the fleet asked for no new work; what is here still runs
    heat_forbidden: bool = False  # a safety trip: nothing may heat


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    grace_s: float = 1800.0
    request_interval_s: float = 30.0
    horizon_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class PolicyInputs:
    now: float
    plan: Plan
    jobs: tuple[JobView, ...] = ()
    filler_available: bool = True
    conditions: Conditions = Conditions()
    slot_w: float = 0.0  # watts one slot makes under the current plan
    next_request_at: float = -math.inf  # no work request before this (interval, retry-after)
    # The radiator's cores when the plan's quota caps the CPU time of all jobs together at
    # plan.slots x quota CPUs whatever their cores (decision 0017): then a job may start on
    # fewer free slots than its cores, throttled. 0: a job starts only on all its cores.
    throttle_cores: int = 0


@dataclass(frozen=True, slots=True)
class Start:
    job_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Resume:
    job_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Suspend:
    job_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Return:
    job_id: str
    attempt: int
    reason: ReturnReason


Action = Start | Resume | Suspend | Return


@dataclass(frozen=True, slots=True)
class WorkRequest:
    """"I can take work": slots free for jobs, and the heat they would make over a horizon."""

    free_slots: int
    heat_budget_w: float
    horizon_s: float


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    actions: tuple[Action, ...]  # returns and suspensions come before starts and resumes
    filler: int  # filler workers to run now
    request: WorkRequest | None
    capacity: int  # slots jobs and filler may use now
    free_slots: int  # slots no job holds (filler included)
    why_no_request: str = ""  # for people: why no work is asked for
    urgent_cores: int = 0  # the allocator's hint (see urgent_cores)

    def of(self, kind: type[Action]) -> list[Action]:
        return [a for a in self.actions if isinstance(a, kind)]


def heat_wanted(plan: Plan, conditions: Conditions) -> bool:
    """Whether the plan asks for heat that jobs may make now."""
    return (plan.slots > 0 and plan.quota > 0 and not conditions.heat_forbidden
            and not conditions.mode_off)


def urgent_cores(jobs: Iterable[JobView]) -> int:
    """The allocator's hint (decision 0018): while high-priority work runs or waits here, the
    cores all the jobs here need (they all run on the slots the hint asks for, the urgent
    ones first); 0 when there is none, and the allocator favours efficiency again."""
    total, urgent = 0, False
    for job in jobs:
        total += job.cores
        urgent = urgent or job.priority is Priority.HIGH
    return total if urgent else 0


def decide(inputs: PolicyInputs, cfg: PolicyConfig) -> PolicyDecision:
    now, c = inputs.now, inputs.conditions
    heat = heat_wanted(inputs.plan, c)
    capacity = inputs.plan.slots if heat else 0
    actions: list[Action] = []

    # 1. returns
    kept: list[JobView] = []
    for job in inputs.jobs:
        reason = _return_reason(job, now, capacity, c, cfg)
        if reason is None:
            kept.append(job)
        else:
            actions.append(Return(job.job_id, job.attempt, reason))

    # 2. shed: keep by priority, oldest first within one; the first job that does not keep
    # its place is suspended with everything after it (lowest priority, newest first). A job
    # keeps its place when it fits; with throttled starts, while every job kept still gets
    # at least one slot's worth of the quota (no more jobs than slots).
    throttle = inputs.throttle_cores > 0
    running = [j for j in kept if j.phase is Phase.RUNNING]
    running.sort(key=lambda j: (j.priority.rank, j.since, j.order))
    occupied = n_running = 0
    just_suspended: set[tuple[str, int]] = set()
    for i, job in enumerate(running):
        if occupied + job.cores <= capacity or (throttle and n_running < capacity):
            occupied += job.cores
            n_running += 1
            continue
        for gone in reversed(running[i:]):
            actions.append(Suspend(gone.job_id, gone.attempt))
            just_suspended.add(gone.key)
        break

    # 3. fill: priority, then suspended before queued, then arrival; a job suspended just
    # now is not a candidate, or a slot count that wobbles would flap it
    waiting = [j for j in kept if j.phase is not Phase.RUNNING and j.key not in just_suspended]
    waiting.sort(key=lambda j: (j.priority.rank, j.phase is not Phase.SUSPENDED, j.order))
    free = capacity - occupied
    left: list[JobView] = []
    for job in waiting:
        if job.cores <= free:
            actions.append(_run(job))
            free -= job.cores
            n_running += 1
        else:
            left.append(job)
    if throttle:
        # what waits does not fit the free slots: it starts all the same, throttled, while
        # every running job still gets at least one slot's worth of the quota
        # (a job left here is wider than the free slots: once one starts, none is free)
        still: list[JobView] = []
        for job in left:
            if n_running < capacity and job.cores <= inputs.throttle_cores:
                actions.append(_run(job))
                n_running += 1
                free = 0
            else:
                still.append(job)
        left = still

    # 4. filler in what is left
    filler = free if heat and inputs.filler_available else 0

    # 5. ask for work
    request: WorkRequest | None = None
    why = _why_no_request(heat, free, c, now, inputs.next_request_at)
    if not why:
        offered = free
        if throttle and not left:
            # room for wider jobs than the free slots, but for no more jobs than can start at
            # once with a slot's worth each; the budget is still the free slots' heat
            offered = max(free, min(inputs.throttle_cores, capacity - n_running))
        request = WorkRequest(offered, round(free * max(0.0, inputs.slot_w), 1), cfg.horizon_s)
    return PolicyDecision(tuple(actions), filler, request, capacity, free, why,
                          urgent_cores(inputs.jobs))


def _run(job: JobView) -> Action:
    return Resume(job.job_id, job.attempt) if job.phase is Phase.SUSPENDED \
        else Start(job.job_id, job.attempt)


def _return_reason(
    job: JobView, now: float, capacity: int, c: Conditions, cfg: PolicyConfig
) -> ReturnReason | None:
    if c.mode_off:
        return ReturnReason.MODE_OFF
    if c.season_warm:
        return ReturnReason.SEASON_WARM
    if now >= job.lease_until:
        return ReturnReason.LEASE_EXPIRED
    if job.phase is not Phase.RUNNING and now - job.since >= cfg.grace_s:
        return ReturnReason.NO_HEAT if capacity < job.cores else ReturnReason.NO_SLOT
    return None


def _why_no_request(
    heat: bool, free: int, c: Conditions, now: float, next_request_at: float
) -> str:
    if c.mode_off:
        return "mode is off"
    if c.season_warm:
        return "warm season"
    if c.heat_forbidden:
        return "a safety trip forbids heat"
    if c.draining:
        return "draining"
    if not heat:
        return "no heat wanted"
    if free <= 0:
        return "no free slot"
    if now < next_request_at:
        return "asked recently"
    return ""
