"""A slice of the agent's radiators, in this process or in a worker process.

The lockstep loop (``run.py``) talks to every slice the same way, twice a period: *control*
(each radiator senses and decides; out come the jobs it returned and its work request) and,
after placement, *step* (jobs placed there are taken and started, then the period's physics;
out come the finished jobs). A slice keeps its own copy of the jobs it holds and reports by
value, so it can live in another process: the loop sends to every remote slice before it
runs its own, and the figures are the same for any split (a test checks it), because slices
are contiguous runs of radiators and everything they report is merged in radiator order.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any

from qrad_agent.config import AgentConfig
from qrad_agent.core.jobs import PolicyConfig
from qrad_agent.fleetsim.model import JobSpec, RoomSpec
from qrad_agent.fleetsim.policies import AgentRadiator, LiveJob, Tally

# (job id, node, work done in the attempt, first start) of a job a radiator returned
Back = tuple[str, str, float, float | None]
# (job id, finish, first start) of a finished job
Done = tuple[str, float, float | None]
# (node, request number, free slots, heat budget W) of a work request
Ask = tuple[str, int, int, float]


@dataclass(frozen=True, slots=True)
class Assign:
    node: str
    spec: JobSpec
    attempt: int
    first_start: float | None


class AgentShard:
    """Radiators under the agent's policy, driven a period at a time."""

    def __init__(self, rooms: Sequence[RoomSpec], seed: int, noise_k: float, cfg: AgentConfig,
                 policy_cfg: PolicyConfig, throttled_starts: bool = True,
                 speed_hint: bool = True) -> None:
        self.rads = [AgentRadiator(r, seed, noise_k, cfg, policy_cfg, throttled_starts,
                                   speed_hint) for r in rooms]
        self.at = {a.node: a for a in self.rads}
        self._cpu_started = time.process_time()

    def control(self, now: float, local: datetime, outdoor_c: float
                ) -> tuple[list[Back], list[Ask]]:
        back: list[Back] = []
        asks: list[Ask] = []
        for a in self.rads:
            for job in a.control(now, local, outdoor_c):
                back.append((job.spec.job_id, a.node, job.done_s, job.first_start))
            req = a.work_request
            if req is not None:
                asks.append((a.node, a.requests_made, req.free_slots, req.heat_budget_w))
        return back, asks

    def step(self, assigned: Sequence[Assign], now: float, dt: float, outdoor_c: float,
             comfort: dict[str, bool], scored: bool, has_work: bool
             ) -> tuple[list[Back], list[Done]]:
        back: list[Back] = []
        touched: dict[str, AgentRadiator] = {}
        for p in assigned:
            a = self.at[p.node]
            a.take(LiveJob(p.spec, attempt=p.attempt, first_start=p.first_start), now)
            touched[a.node] = a
        # jobs pre-empt filler in the period they arrive, as the scheduler does on an
        # assignment (nothing can be returned here: the same instant was decided just now)
        for a in touched.values():
            for job in a.schedule(now):
                back.append((job.spec.job_id, a.node, job.done_s, job.first_start))
        done: list[Done] = []
        for a in self.rads:
            setpoint = a.comfort_c if comfort[a.occupancy] else a.eco_c
            for job in a.advance(now, dt, outdoor_c, a.gains_w(now), setpoint, scored, has_work):
                assert job.finish is not None
                done.append((job.spec.job_id, job.finish, job.first_start))
        return back, done

    def results(self) -> tuple[list[tuple[str, Tally, list[str]]], float]:
        """Each radiator's figures and the jobs it still holds; this slice's CPU seconds."""
        return ([(a.node, a.tally, list(a.held)) for a in self.rads],
                time.process_time() - self._cpu_started)


class LocalShard:
    """A slice in this process: a call's answer is ready when asked for."""

    def __init__(self, shard: AgentShard) -> None:
        self.shard = shard
        self._answer: Any = None

    def send(self, method: str, *args: Any) -> None:
        self._answer = getattr(self.shard, method)(*args)

    def receive(self) -> Any:
        return self._answer

    def close(self) -> None:
        pass


def _serve(conn: Connection, rooms: Sequence[RoomSpec], seed: int, noise_k: float,
           cfg: AgentConfig, policy_cfg: PolicyConfig, throttled_starts: bool,
           speed_hint: bool) -> None:
    shard = AgentShard(rooms, seed, noise_k, cfg, policy_cfg, throttled_starts, speed_hint)
    while True:
        method, args = conn.recv()
        if method == "stop":
            break
        conn.send(getattr(shard, method)(*args))
    conn.close()


class RemoteShard:
    """A slice in a worker process (forked: it gets the rooms and config as they are)."""

    def __init__(self, rooms: Sequence[RoomSpec], seed: int, noise_k: float, cfg: AgentConfig,
                 policy_cfg: PolicyConfig, throttled_starts: bool = True,
                 speed_hint: bool = True) -> None:
        self.nodes = [r.node for r in rooms]
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, list(rooms), seed, noise_k, cfg,
                                                     policy_cfg, throttled_starts,
                                                     speed_hint), daemon=True)
        self.proc.start()
        child.close()

    def send(self, method: str, *args: Any) -> None:
        self.conn.send((method, args))

    def receive(self) -> Any:
        return self.conn.recv()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(("stop", ()))
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


Shard = LocalShard | RemoteShard
