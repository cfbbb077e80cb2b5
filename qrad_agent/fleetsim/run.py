"""The fleet simulation: N radiators, the dispatcher and a job trace in lockstep on one
simulated clock, under the agent's policy and under the hysteresis baseline, with the same
rooms, weather and trace. Deterministic: everything random is drawn from the seed.

Each period (``period_s``, 60 s by default) runs, in this order:

1. jobs whose arrival time has come join the fleet queue;
2. every radiator senses its room and decides (agent: thermostat, PID, allocator, then the
   job policy; hysteresis: thresholds); jobs a radiator returns go back to the queue through
   the dispatcher's own rules (``fleet/placement.py``: attempts, radiators to avoid);
3. placement: agent radiators' work requests are answered by ``placement.place`` (the
   reference dispatcher's logic); under the hysteresis policy the central scheduler places
   high-priority work on the coolest radiator that may take it and other work round robin;
   an agent radiator that got jobs runs its job policy again at once (jobs pre-empt filler
   in the same period, as the scheduler does on an assignment);
4. physics: for the period, jobs progress at the rate the levers give them, the board's
   power heats the room (the simulator's exact 2R2C step), the figures are accumulated.

Definitions (docs/benchmarks.md, "Fleet simulation"):

- *heat demand* of a room at a moment: the heater power that would hold the air at its
  setpoint (comfort or eco, from the room's schedule) in steady state at the outdoor
  temperature of the moment, less the free gains (sun, people), and never below zero; the
  room model computes it (``Room2R2C.steady_state_power_w``). Integrated over the scored time.
- *unmet* heat: while the air is below its setpoint, the power that would hold it that much
  warmer (the same steady-state relation: kelvins below times watts per kelvin), at most the
  demand of the moment. *Share of heat demand met* = 1 - unmet / demand.
- *discomfort*: kelvin-hours outside the comfort band, as in ``sim/run.py``: below
  (comfort or eco) - 0.5 K or above comfort + 1 K.
- *paid share*: heat from jobs / heat from jobs and filler (idle power counts for neither),
  overall and over the periods when the fleet queue still held work after placement.
- *wait*: first start - arrival; *slowdown*: (finish - arrival) / pure run time (alone on its
  cores at full speed); over the jobs that finished.
- *worker starts*: job starts (not resumes) plus filler workers started.

The first ``warmup_h`` hours are not scored for heat and comfort (rooms start at eco and the
controllers learn); every job of the trace counts.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from qrad_agent.config import AgentConfig
from qrad_agent.core.jobs import PolicyConfig, Priority
from qrad_agent.core.schedule import WeeklySchedule
from qrad_agent.fleet.placement import (
    Candidate,
    FleetState,
    Lease,
    Placement,
    Request,
    Verdict,
    avoided,
    on_report,
    place,
)
from qrad_agent.fleet.queue import AVOID_S
from qrad_agent.fleetsim.model import (
    OCCUPANCY,
    START,
    JobSpec,
    RoomSpec,
    fleet_weather,
    make_rooms,
    make_trace,
)
from qrad_agent.fleetsim.policies import (
    HYSTERESIS,
    HysteresisRadiator,
    LiveJob,
    SimRadiator,
    Tally,
    may_start,
)
from qrad_agent.fleetsim.shard import (
    AgentShard,
    Ask,
    Assign,
    Back,
    LocalShard,
    RemoteShard,
    Shard,
)
from qrad_agent.sim.weather import Weather

POLICIES = ("agent", "hysteresis")
PRIORITIES = (Priority.HIGH, Priority.LOW, Priority.BACKGROUND)


@dataclass(frozen=True, slots=True)
class FleetConfig:
    radiators: int = 100
    days: float = 7.0
    seed: int = 1
    # The agent's control period for the fleet: 120 s instead of a board's 10 s, so 100
    # radiator-weeks fit in a minute. The PID's gains are in per-second units and it uses the
    # real time step, so they hold at any period; docs/decisions/0013 gives the check (single
    # rooms at 10, 60 and 120 s score within 0.01 K RMS and 0.3 % energy of each other).
    period_s: float = 120.0
    warmup_h: float = 24.0
    # full-speed core-hours of work arriving per radiator on an average weekday: about 40 %
    # of what the rooms' heat lets the fleet compute in this week, but arriving in working
    # hours, when rooms want least heat: the queue fills by day and empties at night
    load_core_h: float = 30.0
    max_job_cores: int = 4  # 1: every job of the trace on one core (same work)
    max_attempts: int = 3  # the reference dispatcher's default
    sensor_noise_k: float = 0.02
    grace_s: float = 1800.0  # the job policy's default: suspended this long -> returned
    # a job wider than the free slots starts on them, throttled by the quota (decision 0017)
    throttled_starts: bool = True
    # urgent work here: the allocator runs fewer slots at a higher frequency (decision 0018)
    speed_hint: bool = True


def default_warmup_h(days: float) -> float:
    """A day, as ``sim/run.py`` scores; a quarter of shorter runs."""
    return min(24.0, days * 24.0 / 4.0)


@dataclass
class PriorityFigures:
    finished: int = 0
    mean_wait_h: float = 0.0
    p95_wait_h: float = 0.0
    mean_slowdown: float = 0.0
    p95_slowdown: float = 0.0


@dataclass
class Figures:
    policy: str
    radiators: int = 0
    days: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of the run's process (the machine may be shared)
    demand_kwh: float = 0.0
    unmet_kwh: float = 0.0
    heat_kwh: float = 0.0  # the boards' heat, idle included
    job_kwh: float = 0.0
    filler_kwh: float = 0.0
    idle_kwh: float = 0.0
    lever_kwh: float = 0.0
    job_kwh_queued: float = 0.0
    filler_kwh_queued: float = 0.0
    discomfort_kh: list[float] = field(default_factory=list)  # per room
    submitted: int = 0
    finished: int = 0
    failed: int = 0
    queued_at_end: int = 0
    on_radiators_at_end: int = 0
    returns: int = 0
    returns_by_reason: dict[str, int] = field(default_factory=dict)
    replaced: int = 0  # placements of a job that had been returned before
    lost_work_core_h: float = 0.0
    job_work_core_h: float = 0.0  # work done for jobs, lost work included
    filler_work_core_h: float = 0.0
    worker_starts: int = 0
    by_priority: dict[str, PriorityFigures] = field(default_factory=dict)
    queue_held_work_h: float = 0.0  # scored hours when the queue held work after placement

    @property
    def demand_met(self) -> float:
        return 1.0 - self.unmet_kwh / self.demand_kwh if self.demand_kwh > 0 else 1.0

    @property
    def paid_share(self) -> float:
        made = self.job_kwh + self.filler_kwh
        return self.job_kwh / made if made > 0 else 0.0

    @property
    def paid_share_queued(self) -> float:
        made = self.job_kwh_queued + self.filler_kwh_queued
        return self.job_kwh_queued / made if made > 0 else 1.0

    @property
    def discomfort_mean_kh(self) -> float:
        return sum(self.discomfort_kh) / len(self.discomfort_kh) if self.discomfort_kh else 0.0

    @property
    def discomfort_max_kh(self) -> float:
        return max(self.discomfort_kh, default=0.0)

    @property
    def slowdown_all(self) -> float:
        n = sum(p.finished for p in self.by_priority.values())
        total = sum(p.mean_slowdown * p.finished for p in self.by_priority.values())
        return total / n if n else 0.0


class _Fleet:
    """The dispatcher's side: the queue in placement order, and what happens to a job a
    radiator returns or finishes."""

    def __init__(self, trace: Sequence[JobSpec], max_attempts: int) -> None:
        self.jobs = {s.job_id: LiveJob(s) for s in trace}
        self.arrivals = list(trace)
        self.next_arrival = 0
        self.queue: list[tuple[int, int, str]] = []  # (rank, seq, job id), sorted
        self.max_attempts = max_attempts
        self.finished: list[LiveJob] = []
        self.failed: list[LiveJob] = []
        self.replaced = 0
        self._candidates: dict[str, Candidate] = {}

    def arrive(self, now: float) -> None:
        arrivals = self.arrivals
        while self.next_arrival < len(arrivals) and arrivals[self.next_arrival].arrival_s <= now:
            s = arrivals[self.next_arrival]
            bisect.insort(self.queue, (s.priority.rank, s.seq, s.job_id))
            self.next_arrival += 1

    def candidate(self, job: LiveJob, now: float) -> Candidate:
        if job.avoid:
            s = job.spec
            return Candidate(s.job_id, s.priority, s.seq, s.cores, avoid=avoided(job.avoid, now))
        c = self._candidates.get(job.spec.job_id)
        if c is None:
            s = job.spec
            c = self._candidates[s.job_id] = Candidate(s.job_id, s.priority, s.seq, s.cores)
        return c

    def placed(self, job: LiveJob, node: str, now: float) -> None:
        if job.returns:
            self.replaced += 1
        job.attempt += 1
        job.done_s = 0.0
        job.history.append(("placed", node, now))

    def take_back(self, job: LiveJob, node: str, reason: str, now: float) -> None:
        """A radiator returned ``job``: the dispatcher's rules say whether it is queued again."""
        lease = Lease(job.spec.job_id, FleetState.LEASED, job.attempt, self.max_attempts,
                      math.inf, node, math.inf, job.avoid)
        t = on_report(lease, node, job.attempt, "returned", reason, now)
        job.returns += 1
        job.history.append(("returned", node, now))
        job.lost_work_s += job.done_s
        job.done_s = 0.0  # the next attempt starts over
        if t.verdict is Verdict.REQUEUE:
            if t.avoid_node is not None:
                job.avoid[t.avoid_node] = now + AVOID_S
            job.avoid = {n: u for n, u in job.avoid.items() if u > now}
            s = job.spec
            bisect.insort(self.queue, (s.priority.rank, s.seq, s.job_id))
        else:
            job.failed = True
            self.failed.append(job)

    def done(self, job: LiveJob, finish: float, first_start: float | None) -> None:
        job.finish, job.first_start, job.done_s = finish, first_start, job.spec.work_s
        self.finished.append(job)

    def remove(self, job_ids: set[str], within: int) -> None:
        """Take placed jobs (all among the first ``within`` entries) out of the queue."""
        q = self.queue
        self.queue = [e for e in q[:within] if e[2] not in job_ids] + q[within:]


def _dispatch_agent(fleet: _Fleet, requests: list[Request], now: float) -> list[Placement]:
    """The reference dispatcher's placement over the queue, a window at a time (placement
    stops when every request is full, so a window the size of the free slots is usually
    all it looks at; the requests carry over what earlier windows used)."""
    out: list[Placement] = []
    reqs = requests
    start = 0
    q = fleet.queue
    while reqs and start < len(q):
        free_total = sum(r.free_slots for r in reqs)
        window = q[start:start + max(32, 4 * free_total)]
        start += len(window)
        placed = place([fleet.candidate(fleet.jobs[e[2]], now) for e in window], reqs, now)
        if not placed:
            continue
        out.extend(placed)
        used: dict[str, int] = {}
        for p in placed:
            used[p.request_id] = used.get(p.request_id, 0) + fleet.jobs[p.job_id].spec.cores
        left: list[Request] = []
        for r in reqs:
            n = used.get(r.id, 0)
            if r.free_slots - n <= 0:
                continue
            per_slot = max(0.0, r.heat_budget_w) / r.free_slots
            left.append(Request(r.node, r.id, r.free_slots - n,
                                max(0.0, r.heat_budget_w - n * per_slot), r.expires_at,
                                r.max_cores, r.max_memory_mb, r.max_timeout_s))
        reqs = left
    if out:
        fleet.remove({p.job_id for p in out}, start)
    return out


def _dispatch_hysteresis(fleet: _Fleet, rads: list[HysteresisRadiator], now: float,
                         cursor: list[int]) -> list[tuple[LiveJob, HysteresisRadiator]]:
    """Qarnot's baseline scheduler: high priority to the coolest radiator that may take it,
    low and background round robin over the radiators that may take them."""
    high_ok = sorted((r for r in rads if r.free > 0 and may_start(HYSTERESIS, Priority.HIGH,
                                                                   r.delta_k)),
                     key=lambda r: (r.delta_k, r.node))
    low_ok = [r for r in rads if r.free > 0 and may_start(HYSTERESIS, Priority.LOW, r.delta_k)]
    out: list[tuple[LiveJob, HysteresisRadiator]] = []
    seen = 0
    for _, _, job_id in fleet.queue:
        if not high_ok and not low_ok:
            break
        seen += 1
        job = fleet.jobs[job_id]
        cores = job.spec.cores
        blocked = avoided(job.avoid, now) if job.avoid else frozenset()
        chosen: HysteresisRadiator | None = None
        if job.spec.priority is Priority.HIGH:
            for r in high_ok:
                if r.free >= cores and r.node not in blocked:
                    chosen = r
                    break
        else:
            if not low_ok:
                break  # the rest of the queue is low and background work
            n = len(low_ok)
            for k in range(n):
                r = low_ok[(cursor[0] + k) % n]
                if r.free >= cores and r.node not in blocked:
                    chosen = r
                    cursor[0] = (cursor[0] + k + 1) % n
                    break
        if chosen is None:
            continue
        chosen.start(job, now)
        out.append((job, chosen))
        if chosen.free <= 0:
            if chosen in high_ok:
                high_ok.remove(chosen)
            if chosen in low_ok:
                low_ok.remove(chosen)
    if out:
        fleet.remove({j.spec.job_id for j, _ in out}, seen)
    return out


REQUEST_TTL_S = 30.0  # a work request's life at the dispatcher (answered in its period here)


def run_policy(policy: str, cfg: FleetConfig, rooms: Sequence[RoomSpec] | None = None,
               trace: Sequence[JobSpec] | None = None, agent_cfg: AgentConfig | None = None,
               shards: int = 1) -> tuple[Figures, list[SimRadiator], _Fleet]:
    """One policy over the whole fleet and trace. Returns the figures, the radiators run in
    this process (with ``shards=2`` the agent's second half runs in a worker process and is
    not among them) and the dispatcher's side."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; allowed: {', '.join(POLICIES)}")
    started = time.perf_counter()
    cpu_started = time.process_time()
    rooms = list(rooms) if rooms is not None else make_rooms(cfg.radiators, cfg.seed, cfg.days)
    if trace is None:
        trace = make_trace(cfg.seed, cfg.days, cfg.load_core_h * len(rooms), cfg.max_job_cores)
    fleet = _Fleet(trace, cfg.max_attempts)
    if policy == "agent":
        rads, tallies, queued_s, worker_cpu_s = _run_agent(cfg, rooms, fleet, agent_cfg, shards)
    else:
        hysts = [HysteresisRadiator(r, cfg.seed, cfg.sensor_noise_k, cfg.grace_s)
                 for r in rooms]
        queued_s = _run_hysteresis(cfg, hysts, fleet)
        rads = list(hysts)
        tallies = [(h.node, h.tally, list(h.held)) for h in hysts]
        worker_cpu_s = 0.0
    fleet.arrive(_ticks(cfg) * cfg.period_s)  # jobs of the last period: submitted, not placed
    figures = _figures(policy, cfg, tallies, fleet)
    figures.queue_held_work_h = queued_s / 3600.0
    figures.wall_s = time.perf_counter() - started
    figures.cpu_s = time.process_time() - cpu_started + worker_cpu_s
    return figures, rads, fleet


def _ticks(cfg: FleetConfig) -> int:
    return round(cfg.days * 86400.0 / cfg.period_s)


class _Clock:
    """The simulated clock and what every radiator sees of the world at each period."""

    def __init__(self, cfg: FleetConfig) -> None:
        self.weather = Weather(fleet_weather(cfg.seed), START, cfg.seed)
        self.schedules = {name: WeeklySchedule(p) for name, (p, _) in OCCUPANCY.items()}

    def at(self, now: float) -> tuple[datetime, float, dict[str, bool]]:
        local = START + timedelta(seconds=now)
        comfort = {name: s.is_comfort(local) for name, s in self.schedules.items()}
        return local, self.weather.outdoor_c(now), comfort


def _run_agent(cfg: FleetConfig, rooms: list[RoomSpec], fleet: _Fleet,
               agent_cfg: AgentConfig | None, shards: int
               ) -> tuple[list[SimRadiator], list[tuple[str, Tally, list[str]]], float, float]:
    base = agent_cfg or AgentConfig()
    base = base.model_copy(update={"control": base.control.model_copy(
        update={"period_s": cfg.period_s, "sensor_period_s": min(cfg.period_s, 60.0)})})
    pcfg = PolicyConfig(grace_s=cfg.grace_s)
    args = (cfg.seed, cfg.sensor_noise_k, base, pcfg, cfg.throttled_starts, cfg.speed_hint)
    cut = len(rooms) - len(rooms) // 2 if shards > 1 else len(rooms)
    local = AgentShard(rooms[:cut], *args)
    # the worker's slice goes first in each round, so it computes while this process does
    # its own; its radiators come after this process's, so merged reports keep radiator order
    remote = [RemoteShard(rooms[cut:], *args)] if cut < len(rooms) else []
    order: list[Shard] = [*remote, LocalShard(local)]
    merge: list[Shard] = [order[-1], *remote]
    cores = {r.node: r.scenario.radiator.cores for r in rooms}
    clock = _Clock(cfg)
    dt = cfg.period_s
    warmup_s = cfg.warmup_h * 3600.0
    queued_s = 0.0
    try:
        for k in range(_ticks(cfg)):
            now = k * dt
            local_time, outdoor, comfort = clock.at(now)
            fleet.arrive(now)
            for s in order:
                s.send("control", now, local_time, outdoor)
            asks: list[Ask] = []
            for s in merge:
                back, shard_asks = s.receive()
                _take_back(fleet, back, "no_heat", now)
                asks.extend(shard_asks)
            assigned: dict[str, list[Assign]] = {}
            if fleet.queue and asks:
                requests = [Request(node, f"{node}-{n}", free, budget, now + REQUEST_TTL_S,
                                    max_cores=cores[node]) for node, n, free, budget in asks]
                for p in _dispatch_agent(fleet, requests, now):
                    job = fleet.jobs[p.job_id]
                    fleet.placed(job, p.node, now)
                    assigned.setdefault(p.node, []).append(
                        Assign(p.node, job.spec, job.attempt, job.first_start))
            scored = now >= warmup_s
            has_work = bool(fleet.queue)
            if scored and has_work:
                queued_s += dt
            for s in order:
                mine = [a for node in _nodes_of(s, local) for a in assigned.get(node, [])] \
                    if assigned else []
                s.send("step", mine, now, dt, outdoor, comfort, scored, has_work)
            for s in merge:
                back, done = s.receive()
                _take_back(fleet, back, "no_slot", now)
                for job_id, finish, first_start in done:
                    fleet.done(fleet.jobs[job_id], finish, first_start)
        tallies: list[tuple[str, Tally, list[str]]] = []
        worker_cpu_s = 0.0
        for s in merge:
            s.send("results")
            part, cpu_s = s.receive()
            tallies.extend(part)
            if isinstance(s, RemoteShard):
                worker_cpu_s += cpu_s
    finally:
        for s in order:
            s.close()
    return list(local.rads), tallies, queued_s, worker_cpu_s


def _nodes_of(s: Shard, local: AgentShard) -> list[str]:
    if isinstance(s, LocalShard):
        return [a.node for a in local.rads]
    return s.nodes


def _take_back(fleet: _Fleet, back: list[Back], reason: str, now: float) -> None:
    for job_id, node, done_s, first_start in back:
        job = fleet.jobs[job_id]
        job.done_s, job.first_start = done_s, first_start
        fleet.take_back(job, node, reason, now)


def _run_hysteresis(cfg: FleetConfig, hysts: list[HysteresisRadiator], fleet: _Fleet) -> float:
    clock = _Clock(cfg)
    dt = cfg.period_s
    warmup_s = cfg.warmup_h * 3600.0
    cursor = [0]
    queued_s = 0.0
    for k in range(_ticks(cfg)):
        now = k * dt
        _, outdoor, comfort = clock.at(now)
        fleet.arrive(now)
        for h in hysts:
            setpoint = h.comfort_c if comfort[h.occupancy] else h.eco_c
            for job in h.control(now, setpoint):
                fleet.take_back(job, h.node, "no_heat", now)
        if fleet.queue:
            for job, rad in _dispatch_hysteresis(fleet, hysts, now, cursor):
                fleet.placed(job, rad.node, now)
        scored = now >= warmup_s
        has_work = bool(fleet.queue)
        if scored and has_work:
            queued_s += dt
        for h in hysts:
            setpoint = h.comfort_c if comfort[h.occupancy] else h.eco_c
            for job in h.advance(now, dt, outdoor, h.gains_w(now), setpoint, scored, has_work):
                assert job.finish is not None
                fleet.done(job, job.finish, job.first_start)
    return queued_s


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _figures(policy: str, cfg: FleetConfig, tallies: list[tuple[str, Tally, list[str]]],
             fleet: _Fleet) -> Figures:
    f = Figures(policy, len(tallies), cfg.days)
    for _, t, held in tallies:
        f.demand_kwh += t.demand_wh / 1000.0
        f.unmet_kwh += t.unmet_wh / 1000.0
        f.heat_kwh += t.heat_wh / 1000.0
        f.job_kwh += t.job_wh / 1000.0
        f.filler_kwh += t.filler_wh / 1000.0
        f.idle_kwh += t.idle_wh / 1000.0
        f.lever_kwh += t.lever_wh / 1000.0
        f.job_kwh_queued += t.job_wh_queued / 1000.0
        f.filler_kwh_queued += t.filler_wh_queued / 1000.0
        f.discomfort_kh.append(t.discomfort_kh)
        f.worker_starts += t.worker_starts
        f.job_work_core_h += t.job_work_s / 3600.0
        f.filler_work_core_h += t.filler_work_s / 3600.0
        f.returns += t.returns
        for reason, n in t.returns_by_reason.items():
            f.returns_by_reason[reason] = f.returns_by_reason.get(reason, 0) + n
        f.on_radiators_at_end += len(held)
    f.submitted = fleet.next_arrival
    f.finished = len(fleet.finished)
    f.failed = len(fleet.failed)
    f.queued_at_end = len(fleet.queue)
    f.replaced = fleet.replaced
    f.lost_work_core_h = sum(j.lost_work_s for j in fleet.jobs.values()) / 3600.0
    for prio in PRIORITIES:
        done = [j for j in fleet.finished if j.spec.priority is prio]
        waits = [((j.first_start or 0.0) - j.spec.arrival_s) / 3600.0 for j in done]
        slow = [((j.finish or 0.0) - j.spec.arrival_s) / j.spec.pure_run_s for j in done]
        f.by_priority[prio.value] = PriorityFigures(
            len(done), sum(waits) / len(waits) if waits else 0.0, _pct(waits, 0.95),
            sum(slow) / len(slow) if slow else 0.0, _pct(slow, 0.95))
    return f


@dataclass
class FleetResult:
    config: FleetConfig
    agent: Figures
    hysteresis: Figures
    jobs_in_trace: int


def _figures_of(policy: str, cfg: FleetConfig) -> Figures:
    # in a worker process: the rooms and the trace are drawn again from the seed, identically
    return run_policy(policy, cfg)[0]


def run_fleet(cfg: FleetConfig, processes: int = 1) -> FleetResult:
    """Both policies on the same rooms, weather and trace. With ``processes=2`` the
    hysteresis run goes to a worker process and the agent's radiators are split over this
    process and another one; every part is deterministic and merged in a fixed order, so
    the figures are the same either way (tested)."""
    rooms = make_rooms(cfg.radiators, cfg.seed, cfg.days)
    trace = make_trace(cfg.seed, cfg.days, cfg.load_core_h * len(rooms), cfg.max_job_cores)
    if processes > 1:
        with ProcessPoolExecutor(max_workers=1) as pool:
            hyst_run = pool.submit(_figures_of, "hysteresis", cfg)
            agent = run_policy("agent", cfg, rooms, trace, shards=2)[0]
            hyst = hyst_run.result()
    else:
        agent = run_policy("agent", cfg, rooms, trace)[0]
        hyst = run_policy("hysteresis", cfg, rooms, trace)[0]
    return FleetResult(cfg, agent, hyst, len(trace))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:6.2f}x" if b else "     -"


def format_table(result: FleetResult) -> str:
    a, h = result.agent, result.hysteresis
    c = result.config
    rows: list[tuple[str, str, str, str]] = []

    def row(name: str, av: float, hv: float, fmt: str = "{:.2f}") -> None:
        rows.append((name, fmt.format(av), fmt.format(hv), _ratio(av, hv)))

    row("heat demand met %", 100 * a.demand_met, 100 * h.demand_met, "{:.2f}")
    row("heat demand kWh", a.demand_kwh, h.demand_kwh, "{:.0f}")
    row("heat delivered kWh", a.heat_kwh, h.heat_kwh, "{:.0f}")
    row("paid share of heat %", 100 * a.paid_share, 100 * h.paid_share, "{:.1f}")
    row("paid share, queue holding work %", 100 * a.paid_share_queued,
        100 * h.paid_share_queued, "{:.1f}")
    row("discomfort K·h per room, mean", a.discomfort_mean_kh, h.discomfort_mean_kh)
    row("discomfort K·h per room, worst", a.discomfort_max_kh, h.discomfort_max_kh)
    for prio in PRIORITIES:
        pa, ph = a.by_priority[prio.value], h.by_priority[prio.value]
        row(f"{prio.value}: finished", pa.finished, ph.finished, "{:.0f}")
        row(f"{prio.value}: wait h, mean", pa.mean_wait_h, ph.mean_wait_h)
        row(f"{prio.value}: wait h, p95", pa.p95_wait_h, ph.p95_wait_h)
        row(f"{prio.value}: slowdown, mean", pa.mean_slowdown, ph.mean_slowdown)
        row(f"{prio.value}: slowdown, p95", pa.p95_slowdown, ph.p95_slowdown)
    row("slowdown, all finished, mean", a.slowdown_all, h.slowdown_all)
    row("jobs failed (attempts used up)", a.failed, h.failed, "{:.0f}")
    row("jobs queued at end", a.queued_at_end, h.queued_at_end, "{:.0f}")
    row("jobs on radiators at end", a.on_radiators_at_end, h.on_radiators_at_end, "{:.0f}")
    row("jobs returned", a.returns, h.returns, "{:.0f}")
    row("returned jobs re-placed", a.replaced, h.replaced, "{:.0f}")
    row("work lost to returns core-h", a.lost_work_core_h, h.lost_work_core_h, "{:.1f}")
    row("work done for jobs core-h", a.job_work_core_h, h.job_work_core_h, "{:.0f}")
    row("work done by filler core-h", a.filler_work_core_h, h.filler_work_core_h, "{:.0f}")
    row("worker starts", a.worker_starts, h.worker_starts, "{:.0f}")
    row("hours the queue held work", a.queue_held_work_h, h.queue_held_work_h, "{:.1f}")
    row("wall s", a.wall_s, h.wall_s, "{:.1f}")
    row("CPU s", a.cpu_s, h.cpu_s, "{:.1f}")
    head = (f"{c.radiators} radiators x {c.days:g} days, seed {c.seed}, period {c.period_s:g} s, "
            f"{result.jobs_in_trace} jobs ({c.load_core_h:g} core-h per radiator-weekday); "
            f"heat and comfort scored after {c.warmup_h:g} h"
            + (f"; jobs on at most {c.max_job_cores} core(s)" if c.max_job_cores < 4 else "")
            + ("" if c.throttled_starts else "; no throttled starts")
            + ("" if c.speed_hint else "; no speed hint"))
    width = max(len(r[0]) for r in rows)
    lines = [head, f"{'':<{width}} {'agent':>10} {'hysteresis':>10} {'ratio':>7}"]
    lines += [f"{n:<{width}} {x:>10} {y:>10} {z:>7}" for n, x, y, z in rows]
    return "\n".join(lines)
