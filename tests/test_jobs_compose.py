"""Wiring jobs into a board's agent: the jobs go below the workers' cgroup, the one the quota
lever throttles and the freezer stops, so every limit on heat reaches them."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace

from qrad_agent.actuators.cgroups import WorkerCgroup
from qrad_agent.actuators.settings import CgroupConfig, WorkersConfig
from qrad_agent.actuators.workers import WorkerSlots
from qrad_agent.config import AgentConfig
from qrad_agent.jobs.compose import attach_jobs
from qrad_agent.jobs.scheduler import JobScheduler
from qrad_agent.link.client import FleetLink
from qrad_agent.link.settings import LinkConfig
from qrad_agent.store.db import open_store


def test_on_a_board_the_jobs_and_the_filler_share_the_workers_cgroup() -> None:
    # pytest's tmp_path is closed to other users; the job user must pass through to its work
    tmp_path = Path(tempfile.mkdtemp(prefix="qrad-compose-", dir="/tmp"))
    os.chmod(tmp_path, 0o711)
    cgroup = WorkerCgroup(CgroupConfig(parent=f"qrad-test-{uuid.uuid4().hex[:8]}"),
                          Path("/sys/fs/cgroup"))
    slots = WorkerSlots(WorkersConfig(), None, cgroup)
    agent = SimpleNamespace(levers=[slots], controller=SimpleNamespace(), inventory=[])
    link = FleetLink(LinkConfig(), "n1", open_store(tmp_path / "state"))
    jobs = attach_jobs(agent, AgentConfig(), link, tmp_path / "state")
    assert jobs is not None
    scheduler = agent.levers[0]
    assert isinstance(scheduler, JobScheduler)  # it took the workers' place in the order
    assert scheduler.sandbox.cgroup is cgroup
    assert scheduler.filler is not None and getattr(scheduler.filler, "_cgroup", None) is cgroup
    scheduler.restore()
    link.outbox.db.close()
    shutil.rmtree(tmp_path, ignore_errors=True)
