"""Wire the fleet's jobs into a built agent in one call: ledger, sandbox, filler, scheduler
and the bridge to the link.

On a board the scheduler *replaces* the worker slots lever: the slots the allocator plans are
filled with jobs, and with filler (the same ``WorkerSlots`` machinery, now driven by the
scheduler) only where no job holds them. It keeps the workers' place in the lever order,
before the quota lever that makes the workers' cgroup.

In the simulator the slots lever is the simulated heat source (the room warms by the plan's
slots), so it stays; the scheduler runs next to it with real job processes and no filler:
real jobs, simulated room.

The caller's loop then does, each turn, after ``agent.service`` and ``LinkBridge.service``:
``jobs.service()``; and at the end: ``agent.stop()`` (the scheduler, as a lever, returns every
live job), ``jobs.stop()``, then the link's stop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qrad_agent.actuators.cgroups import WorkerCgroup
from qrad_agent.actuators.workers import WorkerSlots
from qrad_agent.config import AgentConfig
from qrad_agent.jobs.bridge import JobsBridge
from qrad_agent.jobs.ledger import Ledger
from qrad_agent.jobs.sandbox import Sandbox
from qrad_agent.jobs.scheduler import JobScheduler, make_filler
from qrad_agent.link.client import FleetLink

log = logging.getLogger(__name__)


def attach_jobs(
    agent: Any,
    cfg: AgentConfig,
    link: FleetLink,
    state_dir: Path,
    worker_cgroup: WorkerCgroup | None = None,
    *,
    link_bridge: Any = None,
    slots: int | None = None,
    clock: Callable[[], float] | None = None,
) -> JobsBridge | None:
    """Build the job machinery and put the scheduler among ``agent.levers``; None when
    ``jobs.enabled`` is false (the agent then runs as before). Call before the link starts.

    ``slots``: how many the allocator plans (default: the controller's allocator's).
    ``clock``: the scheduler's monotonic clock (default real time: job processes, their
    timeouts and leases live in real time even when the room is simulated)."""
    jc = cfg.jobs
    if not jc.enabled:
        return None
    allocator = getattr(agent.controller, "allocator", None)
    n = slots if slots is not None else int(getattr(allocator, "n_max", 0) or 0)
    if n <= 0:
        n = cfg.allocator.slots or 1
    model = getattr(allocator, "model", None)

    levers: list[Any] = agent.levers
    workers_at = next((i for i, lv in enumerate(levers) if isinstance(lv, WorkerSlots)), None)
    filler = None
    cgroup = worker_cgroup
    if workers_at is not None:
        old = levers[workers_at]
        if cgroup is None:
            # the workers' cgroup, which the quota lever throttles and the freezer stops: jobs
            # go below it, so every limit on heat reaches them as it reaches filler
            cgroup = getattr(old, "_cgroup", None)
        filler = make_filler(jc, cfg.actuators.workers, getattr(old, "_record", None), cgroup,
                             max_slots=n)
    db = link.outbox.db  # one state database: ledger, outbox and sequence numbers together
    sandbox = Sandbox(jc, jc.work_root(state_dir), cgroup)
    extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
    scheduler = JobScheduler(jc, link.node_id, Ledger(db), sandbox, filler, slots=n,
                             model=model, **extra)
    if workers_at is not None:
        levers[workers_at] = scheduler
        _replace_info(agent, "slots", scheduler)
    else:
        # simulator (or a board without worker slots): next to the slots lever
        at = next((i + 1 for i, lv in enumerate(levers) if getattr(lv, "name", "") == "slots"),
                  len(levers))
        levers.insert(at, scheduler)
        inventory = getattr(agent, "inventory", None)
        if isinstance(inventory, list):
            inventory.append(scheduler.discover())
    bridge = JobsBridge(agent, link, scheduler, link_bridge=link_bridge)
    bridge.start()
    return bridge


def _replace_info(agent: Any, name: str, scheduler: JobScheduler) -> None:
    inventory = getattr(agent, "inventory", None)
    if not isinstance(inventory, list):
        return
    info = scheduler.discover()
    for i, existing in enumerate(inventory):
        if getattr(existing, "name", None) == name:
            inventory[i] = info
            return
    inventory.append(info)
