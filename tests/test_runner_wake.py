"""The service loop wakes for a readable descriptor of ``wake_fds`` (a job's end), between
control ticks, and runs the link and job hooks at once."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from datetime import datetime

from qrad_agent.config import AgentConfig
from qrad_agent.core.controller import Decision
from qrad_agent.runner import StopFlag, run_realtime
from qrad_agent.sim.run import build_sim_agent
from qrad_agent.sim.scenario import load_scenario


def test_a_readable_wake_fd_runs_the_hooks_between_ticks() -> None:
    base = AgentConfig()
    # ticks 20 s apart at real speed: no tick happens during the test
    cfg = base.model_copy(update={
        "control": base.control.model_copy(update={"sensor_period_s": 20.0})})
    agent, world = build_sim_agent(cfg, load_scenario("winter-week"))
    r, w = os.pipe()
    calls: list[tuple[float, bool]] = []

    def on_beat(now: float, local: datetime, decision: Decision | None) -> None:
        calls.append((time.monotonic(), decision is None))
        raise RuntimeError("a failing hook must not leave the descriptor to spin the loop")

    wakes: list[float] = []

    def after_wake() -> None:
        wakes.append(time.monotonic())
        os.set_blocking(r, False)
        with contextlib.suppress(BlockingIOError):
            os.read(r, 64)  # takes in what woke the loop, as the spawner's poll does

    stop = StopFlag()
    loop = threading.Thread(target=run_realtime, args=(agent, stop, world, 1.0),
                            kwargs={"on_beat": on_beat, "wake_fds": lambda: [r],
                                    "after_wake": after_wake})
    loop.start()
    try:
        time.sleep(0.3)
        before = len(calls)
        woke_at = time.monotonic()
        os.write(w, b"x")
        deadline = woke_at + 5.0
        while len(calls) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) > before, "the loop did not wake for the descriptor"
        at, between_ticks = calls[before]
        assert between_ticks  # no control decision: only the hooks ran
        assert at - woke_at < 1.5  # not at the next tick (20 s) nor a long timer
        time.sleep(0.3)
        # drained though the hook failed: the loop went back to waiting, no spin
        assert len(calls) - before < 10 and len(wakes) < 20
    finally:
        stop.request("test")
        loop.join(10)
        agent.stop()
        world.close()
        os.close(r)
        os.close(w)
