"""The reference dispatcher's decisions, without IO: where queued jobs go, and what a
radiator's report, a lapsed lease or a lost radiator does to a job.

Placement answers a batch of work requests at once. Jobs are taken by priority (high, low,
background), first submitted first within one; each goes to the request that still wants
the most heat (watts of budget left) among those it fits (free slots, cores, memory and
timeout limits, not a radiator that returned it a moment ago). So high-priority work lands
on the radiators that want heat most, where it will run soonest and longest, and each
placement lowers that request's budget by the job's share (its cores' worth of watts), so
one cold room does not take the whole queue.

Leases: a placed job belongs to one radiator, one attempt, until its lease ends; every
status the radiator sends about that attempt renews it. The job is queued again (the next
attempt) when the lease lapses, when the radiator is ``lost`` (its MQTT will), when it
``returned`` the job, or when it failed for a reason that is the radiator's and not the
job's (``interrupted``). Attempts are bounded: past ``max_attempts`` the job fails.

Exactly-once accounting: a job is done at its first ``succeeded``, whichever attempt sends
it (a late radiator that was only cut off may finish first); every later report of the job
is ignored, and a lease still held elsewhere is to be cancelled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from qrad_agent.core.jobs import Priority

# reasons a radiator gives that say nothing against the job: another radiator may run it
REQUEUE_FAILURES = frozenset({"interrupted", "lease_expired", "agent_stopping"})


class FleetState(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    CANCELLING = "cancelling"  # leased, and the radiator has been told to cancel
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (FleetState.SUCCEEDED, FleetState.FAILED, FleetState.CANCELLED)


@dataclass(frozen=True, slots=True)
class Request:
    """A radiator's work request as the dispatcher holds it (times: dispatcher's clock)."""

    node: str
    id: str
    free_slots: int
    heat_budget_w: float
    expires_at: float
    max_cores: int = 1 << 30
    max_memory_mb: int = 1 << 30
    max_timeout_s: float = float("inf")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A queued job as placement sees it."""

    job_id: str
    priority: Priority
    seq: int  # submission order
    cores: int = 1
    memory_mb: int = 0
    timeout_s: float = 0.0
    avoid: frozenset[str] = frozenset()  # radiators that returned it lately


@dataclass(frozen=True, slots=True)
class Placement:
    job_id: str
    node: str
    request_id: str


def place(jobs: Iterable[Candidate], requests: Sequence[Request], now: float) -> list[Placement]:
    """Which queued job goes to which request (see the module docstring)."""
    live = [r for r in requests if r.expires_at > now and r.free_slots > 0]
    slots = {r.id: r.free_slots for r in live}
    budget = {r.id: max(0.0, r.heat_budget_w) for r in live}
    per_slot = {r.id: budget[r.id] / r.free_slots for r in live}
    out: list[Placement] = []
    for job in sorted(jobs, key=lambda j: (j.priority.rank, j.seq)):
        fits = [r for r in live
                if slots[r.id] >= job.cores and job.cores <= r.max_cores
                and job.memory_mb <= r.max_memory_mb and job.timeout_s <= r.max_timeout_s
                and r.node not in job.avoid]
        if not fits:
            continue
        # most heat wanted; then most free slots; then a stable order
        best = max(fits, key=lambda r: (budget[r.id], slots[r.id], _desc(r.node)))
        out.append(Placement(job.job_id, best.node, best.id))
        slots[best.id] -= job.cores
        budget[best.id] = max(0.0, budget[best.id] - job.cores * per_slot[best.id])
        if not any(v > 0 for v in slots.values()):
            break
    return out


def _desc(node: str) -> tuple[int, ...]:
    # max() picks the largest key; negated code points make the alphabetically first win ties
    return tuple(-ord(c) for c in node)


# ------------------------------------------------------------------ leases and reports


@dataclass(frozen=True, slots=True)
class Lease:
    """The dispatcher's view of one job (``node``/``attempt``: the current lease, if any)."""

    job_id: str
    state: FleetState
    attempt: int  # of the current or last lease; 0 = never placed
    max_attempts: int
    lease_s: float
    node: str | None = None
    lease_until: float | None = None
    avoid: Mapping[str, float] = field(default_factory=dict)  # node -> until


class Verdict(StrEnum):
    IGNORE = "ignore"  # stale or repeated: nothing changes
    RENEW = "renew"  # the lease runs on
    DONE = "done"  # final: succeeded, failed or cancelled
    REQUEUE = "requeue"


@dataclass(frozen=True, slots=True)
class Transition:
    verdict: Verdict
    state: FleetState
    lease_until: float | None = None
    reason: str | None = None
    detail: str | None = None
    cancel: tuple[str, int] | None = None  # (node, attempt) to tell to cancel
    avoid_node: str | None = None  # keep the job off this radiator for a while


def on_report(lease: Lease, node: str, attempt: int, state: str, reason: str | None,
              now: float) -> Transition:
    """What a radiator's status (``state`` of ``attempt``, from ``node``) does to the job."""
    if lease.state.final:
        return Transition(Verdict.IGNORE, lease.state, lease.lease_until)
    current = node == lease.node and attempt == lease.attempt
    if state == "succeeded":
        # the first success counts, from whichever attempt; a lease held elsewhere is void
        other = None if current or lease.node is None else (lease.node, lease.attempt)
        return Transition(Verdict.DONE, FleetState.SUCCEEDED, None, cancel=other)
    if not current:
        return Transition(Verdict.IGNORE, lease.state, lease.lease_until, detail=(
            f"stale report from {node} attempt {attempt}; the job is attempt {lease.attempt} "
            f"on {lease.node}"))
    if state in ("accepted", "running", "suspended"):
        return Transition(Verdict.RENEW, lease.state, now + lease.lease_s)
    if state == "cancelled":
        return Transition(Verdict.DONE, FleetState.CANCELLED, None, reason=reason)
    if lease.state is FleetState.CANCELLING:
        # asked to cancel, it ended otherwise: it is over all the same
        return Transition(Verdict.DONE, FleetState.CANCELLED, None, reason=reason)
    if state == "returned":
        return requeue(lease, reason or "returned", now, avoid_node=node)
    if state == "failed":
        if reason in REQUEUE_FAILURES:
            return requeue(lease, reason or "failed", now)
        return Transition(Verdict.DONE, FleetState.FAILED, None, reason=reason)
    return Transition(Verdict.IGNORE, lease.state, lease.lease_until,
                      detail=f"unknown state {state!r}")


def requeue(lease: Lease, reason: str, now: float, avoid_node: str | None = None) -> Transition:
    """Back to the queue for the next attempt, or failed when the attempts are used up."""
    if lease.attempt >= lease.max_attempts:
        return Transition(Verdict.DONE, FleetState.FAILED, None, reason="attempts_exhausted",
                          detail=f"{lease.attempt} attempts, the last ended: {reason}")
    return Transition(Verdict.REQUEUE, FleetState.QUEUED, None, reason=reason,
                      avoid_node=avoid_node)


def expired(leases: Iterable[Lease], now: float) -> list[str]:
    """Jobs whose lease has lapsed."""
    return [
        lease.job_id for lease in leases
        if lease.state in (FleetState.LEASED, FleetState.CANCELLING)
        and lease.lease_until is not None and lease.lease_until <= now
    ]


def avoided(avoid: Mapping[str, float], now: float) -> frozenset[str]:
    return frozenset(n for n, until in avoid.items() if until > now)
