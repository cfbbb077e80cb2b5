"""Runs the agent in real time: on the board, or on the simulated radiator at ``speed``x."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from types import FrameType

from qrad_agent.agent import Agent
from qrad_agent.core.controller import Decision
from qrad_agent.sim.world import SimWorld


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between beats and leaves cleanly."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()


def run_realtime(
    agent: Agent,
    stop: StopFlag,
    world: SimWorld | None = None,
    speed: float = 1.0,
    on_decision: Callable[[Decision], None] | None = None,
    max_seconds: float | None = None,
) -> None:
    """Serve the agent until ``stop`` is set (or ``max_seconds`` of real time pass).

    With a ``world``, simulated time runs at ``speed`` times real time and the world is
    stepped in sensor periods; without one, the board's monotonic clock and local time rule.
    """
    started = time.monotonic()
    step = agent.cfg.control.sensor_period_s
    while not stop.event.is_set():
        elapsed = time.monotonic() - started
        if max_seconds is not None and elapsed >= max_seconds:
            return
        if world is not None:
            target_t = elapsed * speed
            while world.t + step <= target_t and not stop.event.is_set():
                world.step(step)
                for target, duration in world.due_overrides():  # the occupant's hand
                    agent.controller.set_override(target, world.t, duration)
                decision = agent.service(world.t, world.local_time())
                if decision is not None and on_decision is not None:
                    on_decision(decision)
            wait = max(0.0, (world.t + step - elapsed * speed) / speed)
        else:
            now = time.monotonic()
            decision = agent.service(now, datetime.now())
            if decision is not None and on_decision is not None:
                on_decision(decision)
            wait = max(0.0, agent.next_due() - time.monotonic())
        stop.event.wait(min(wait, 0.5))
