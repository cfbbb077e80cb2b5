"""Connects a built agent to its fleet: the MQTT link, the command bridge and the jobs.

Part of the composition root: ``cli.py`` builds the agent (board or simulator), then calls
``connect_fleet`` when ``[link] enabled = true``, and hands the result's ``beat`` and
``after_stop`` to the service loop. Without a link the agent heats on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from qrad_agent.agent import Agent
from qrad_agent.config import AgentConfig
from qrad_agent.core.controller import Decision

if TYPE_CHECKING:
    from qrad_agent.jobs.bridge import JobsBridge
    from qrad_agent.link.bridge import LinkBridge
    from qrad_agent.link.client import FleetLink
    from qrad_agent.sim.world import SimWorld


@dataclass
class FleetConnection:
    link: FleetLink
    bridge: LinkBridge
    jobs: JobsBridge | None

    def beat(self, now: float, local: datetime, decision: Decision | None) -> None:
        """After every loop beat: commands in, state and telemetry out, jobs moved on."""
        self.bridge.service(now, local, decision)
        if self.jobs is not None:
            self.jobs.service()

    def wake_fds(self) -> list[int]:
        """What the service loop waits on besides its timers: a job's end."""
        return self.jobs.scheduler.wake_fds() if self.jobs is not None else []

    def after_wake(self) -> None:
        """Take in what a ``wake_fds`` descriptor brought (the spawner's job ends)."""
        if self.jobs is not None:
            self.jobs.scheduler.sandbox.spawner.poll()

    def after_stop(self) -> list[Callable[[], None]]:
        """In order, once the levers are restored: the jobs' final reports into the outbox,
        then the link's flush and its ``offline``."""
        steps: list[Callable[[], None]] = []
        if self.jobs is not None:
            steps.append(self.jobs.stop)
        steps.append(lambda: self.bridge.stop(5.0))
        return steps


def connect_fleet(
    agent: Agent, cfg: AgentConfig, wake: Callable[[], None], world: SimWorld | None = None
) -> FleetConnection | None:
    """The fleet connection for ``agent``, started; None when the link is disabled."""
    if not cfg.link.enabled:
        return None
    # imported here: a radiator without a fleet should not carry paho, the crypto library and
    # the job machinery in its memory
    from qrad_agent.jobs.compose import attach_jobs
    from qrad_agent.link.bridge import LinkBridge
    from qrad_agent.link.client import Clock, FleetLink
    from qrad_agent.store.db import open_store

    if world is not None:
        # a simulated radiator keeps its fleet state beside its simulated sysfs: a demo must
        # not write into a board's state directory
        state_dir = world.root / "state"
        # jobs run as an unprivileged user who must be able to pass through to their work dir
        world.root.chmod(0o711)
        clock = Clock(wall=time.time, mono=lambda: world.t)
        now, local = world.t, world.local
    else:
        state_dir = Path(cfg.node.state_dir)
        clock = Clock()
        now, local = time.monotonic(), datetime.now()
    state_dir.mkdir(parents=True, exist_ok=True)
    link = FleetLink(cfg.link, cfg.node.id, open_store(state_dir), simulated=world is not None,
                     clock=clock, wake=wake)
    bridge = LinkBridge(agent, link, base_cfg=cfg)
    jobs = attach_jobs(agent, cfg, link, state_dir, link_bridge=bridge)  # before the link starts
    # the status snapshot shows any of these that has a status()
    agent.link_bridge = bridge
    agent.jobs_bridge = jobs
    bridge.start(now, local)
    return FleetConnection(link, bridge, jobs)
