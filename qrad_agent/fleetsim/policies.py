"""The radiators of a fleet simulation: one simulated room and board each, under one of two
policies.

- :class:`AgentRadiator`: the agent's own decisions, its real code: the thermostat, PID and
  allocator (``core/controller.py``) decide the compute plan, the job policy
  (``core/jobs.py`` :func:`decide`) decides which jobs hold the slots, whether filler runs
  and when to ask the fleet for work. The room temperature reaches the controller through
  the real TMP102 driver reading a register-level TMP102 emulator. As on a board whose quota
  lever caps the workers' group at full quota too (decision 0017), jobs wider than the free
  slots start throttled; they share the plan's slots equally. The policy's hint for urgent
  work reaches the allocator before each decision (decision 0018).
- :class:`HysteresisRadiator`: the hysteresis policy of Qarnot's scheduler simulation, as
  issue 9 states it (:data:`HYSTERESIS`): fixed temperature thresholds above and below the
  target start and stop filler, low-priority and high-priority work, and the CPU frequency
  moves one step per period towards the target.

Both share :class:`SimRadiator`: the room (the simulator's 2R2C model), the power model, the
job progress and the energy bookkeeping, so the two policies differ only in their decisions.

Simplified against a real board (docs/decisions/0013-fleet-simulation.md): no safety
supervisor, no sensor health monitor or fusion (one healthy sensor), no ledger, no MQTT and
no processes; the levers take the plan exactly (the frequency cap is a table entry already).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import datetime

from qrad_agent.agent import make_allocator, make_controller
from qrad_agent.config import AgentConfig
from qrad_agent.core.controller import Controller
from qrad_agent.core.fusion import RoomEstimate
from qrad_agent.core.jobs import (
    JobView,
    Phase,
    PolicyConfig,
    PolicyInputs,
    Priority,
    Resume,
    Return,
    Start,
    Suspend,
    WorkRequest,
    decide,
    urgent_cores,
)
from qrad_agent.core.models import Plan
from qrad_agent.core.power import PowerModel
from qrad_agent.fleetsim.model import JobSpec, RoomSpec
from qrad_agent.sensors.tmp102 import TMP102
from qrad_agent.sim.chips.bus import EmulatedBus
from qrad_agent.sim.chips.tmp102 import TMP102Chip
from qrad_agent.sim.world import config_for_scenario

TMP102_ADDRESS = 0x48


@dataclass(slots=True)
class LiveJob:
    """A job of the trace as it goes through one simulated run."""

    spec: JobSpec
    attempt: int = 0  # of the current or last placement; 0 = never placed
    done_s: float = 0.0  # work done in the current attempt (core-seconds at full speed)
    first_start: float | None = None
    finish: float | None = None
    failed: bool = False
    returns: int = 0
    lost_work_s: float = 0.0  # work thrown away by returns (a new attempt starts over)
    avoid: dict[str, float] = field(default_factory=dict)  # node -> until (the dispatcher's)
    # (event, node, time): "placed" and "returned", in order
    history: list[tuple[str, str, float]] = field(default_factory=list)


@dataclass(slots=True)
class Held:
    """A job on one radiator: its phase there, since when, and its arrival order there."""

    job: LiveJob
    phase: Phase
    since: float
    order: int
    view: JobView | None = None  # what the job policy sees; rebuilt when the phase changes

    def set(self, phase: Phase, since: float) -> None:
        self.phase, self.since, self.view = phase, since, None

    def policy_view(self) -> JobView:
        v = self.view
        if v is None:
            s = self.job.spec
            v = self.view = JobView(s.job_id, self.job.attempt, s.priority, self.phase, s.cores,
                                    self.since, self.order)
        return v


@dataclass(slots=True)
class Tally:
    """One radiator's figures. Energies in watt-hours; the scored ones only after warm-up."""

    demand_wh: float = 0.0
    unmet_wh: float = 0.0
    discomfort_kh: float = 0.0
    too_cold_kh: float = 0.0  # the part of discomfort below the band
    heat_wh: float = 0.0  # everything the board turned into heat (idle included)
    idle_wh: float = 0.0
    job_wh: float = 0.0
    filler_wh: float = 0.0
    job_wh_queued: float = 0.0  # the same two, counted only while the fleet queue held work
    filler_wh_queued: float = 0.0
    lever_wh: float = 0.0  # the power model's watts for the busy slots, integrated (check)
    job_work_s: float = 0.0  # work done for jobs (core-seconds at full speed), whole run
    filler_work_s: float = 0.0  # the same for filler
    worker_starts: int = 0  # job starts (not resumes) and filler workers started
    returns: int = 0
    returns_by_reason: dict[str, int] = field(default_factory=dict)
    returned_work_s: float = 0.0  # work the returned jobs had done (lost)


class SimRadiator:
    """A room and a board: the physics and the bookkeeping both policies share."""

    policy = "?"

    def __init__(self, spec: RoomSpec, seed: int, noise_k: float) -> None:
        self.node = spec.node
        self.spec = spec
        sc = spec.scenario
        r = sc.radiator
        self.cores = r.cores
        self.room = sc.make_room()
        self.model = PowerModel(r.idle_w, r.slot_w, r.freq_exponent, r.max_freq_khz)
        self.min_khz, self.max_khz = r.min_freq_khz, r.max_freq_khz
        self.freq_table = list(range(r.min_freq_khz, r.max_freq_khz + 1, r.freq_step_khz))
        self.w_per_k = self.room.steady_state_power_w(1.0, 0.0)  # holding one kelvin more
        self.comfort_c, self.eco_c = sc.comfort_c, sc.eco_c
        self.occupancy = spec.occupancy
        self._gains_of = sc.gains_w
        self._gains: dict[float, float] = {}
        self.held: dict[str, Held] = {}
        self.tally = Tally()
        self._order = 0
        self._noise_k = noise_k
        self._rng = random.Random(f"qrad-fleet-sensor-{seed}-{spec.node}")
        # the room sensor: the real driver on an emulated bus, as on the simulated board
        self.now = 0.0
        self.chip = TMP102Chip(self.room.air_c, clock=lambda: self.now)
        self.chip.powered_at = -1.0  # powered up (first conversion done) before the run
        bus = EmulatedBus()
        bus.attach(TMP102_ADDRESS, self.chip)
        self.sensor = TMP102(bus, TMP102_ADDRESS)
        # levers as the policy last set them
        self.freq_khz = r.min_freq_khz
        self.quota = 1.0
        self.filler = 0  # filler workers running
        self.fills_gaps = False  # a slot a job leaves mid-period goes to filler at once
        # CPUs' worth of slots the quota caps all jobs together at (None: no cap); jobs with
        # more cores running share them, one equal share per job (decision 0017)
        self.job_slots: int | None = None
        self._share: dict[int, float] = {}

    # -- sensing -------------------------------------------------------------------------
    def read_room(self, now: float) -> float:
        self.now = now
        reading = self.sensor.read().temperature_c
        assert reading is not None
        return reading

    # -- jobs ------------------------------------------------------------------------------
    def take(self, job: LiveJob, now: float, phase: Phase = Phase.QUEUED) -> None:
        self._order += 1
        self.held[job.spec.job_id] = Held(job, phase, now, self._order)

    def _returned(self, h: Held, reason: str) -> LiveJob:
        t = self.tally
        t.returns += 1
        t.returns_by_reason[reason] = t.returns_by_reason.get(reason, 0) + 1
        t.returned_work_s += h.job.done_s
        return h.job

    def _set_filler(self, n: int) -> None:
        if n > self.filler:
            self.tally.worker_starts += n - self.filler
        self.filler = n

    def gains_w(self, now: float) -> float:
        """Free heat now; the profile repeats daily, so one day's values serve the week."""
        key = now % 86400.0
        w = self._gains.get(key)
        if w is None:
            w = self._gains[key] = self._gains_of(now)
        return w

    def _slot_share(self, freq_khz: int) -> float:
        share = self._share.get(freq_khz)
        if share is None:
            share = self._share[freq_khz] = self.model.slot_share(freq_khz)
        return share

    def _throttled(self, running: list[Held]) -> dict[str, float]:
        """Cores' worth each running job gets when together they have more cores than the
        quota gives them CPUs: each job's cgroup has the same weight under the workers'
        group, so the kernel shares the CPUs equally between jobs, and a job that cannot use
        its equal share (fewer cores) leaves the rest to the others. Empty: no throttling."""
        cap = self.job_slots
        if cap is None or sum(h.job.spec.cores for h in running) <= cap:
            return {}
        out: dict[str, float] = {}
        left, n = float(cap), len(running)
        for h in sorted(running, key=lambda h: h.job.spec.cores):
            got = min(float(h.job.spec.cores), left / n)
            out[h.job.spec.job_id] = got
            left -= got
            n -= 1
        return out

    # -- one period of physics ---------------------------------------------------------------
    def advance(self, now: float, dt: float, outdoor_c: float, gains_w: float, setpoint_c: float,
                scored: bool, queue_has_work: bool) -> list[LiveJob]:
        """Run the levers as set for ``dt`` seconds: jobs progress, the room warms. Returns
        the jobs that finished (with their exact finish time). The comfort band around
        ``setpoint_c`` is the one ``sim/run.py`` scores: setpoint - 0.5 K to comfort + 1 K."""
        share = self._slot_share(self.freq_khz)
        core_w = self.model.slot_w * share * self.quota  # one busy core's watts
        core_rate = self.freq_khz / self.max_khz * self.quota  # its work per second
        job_core_s = 0.0
        filler_core_s = self.filler * dt
        finished: list[LiveJob] = []
        running = [h for h in self.held.values() if h.phase is Phase.RUNNING]
        width = self._throttled(running)
        for h in running:
            job = h.job
            cores = width.get(job.spec.job_id, job.spec.cores)
            rate = cores * core_rate
            left = job.spec.work_s - job.done_s
            if rate > 0.0 and left <= rate * dt:
                ran = left / rate
                self.tally.job_work_s += left
                job.done_s = job.spec.work_s
                job.finish = now + ran
                job_core_s += cores * ran
                if self.fills_gaps:
                    filler_core_s += cores * (dt - ran)
                finished.append(job)
            else:
                job.done_s += rate * dt
                self.tally.job_work_s += rate * dt
                job_core_s += cores * dt
        for job in finished:
            del self.held[job.spec.job_id]
        self.tally.filler_work_s += filler_core_s * core_rate
        busy = (job_core_s + filler_core_s) / dt  # slots busy on average over the period
        heat_w = self.model.idle_w + busy * core_w
        self.room.step(dt, heat_w, outdoor_c, False, gains_w)
        self.chip.temperature_c = self.room.air_c + self._rng.gauss(0.0, self._noise_k)
        if scored:
            t = self.tally
            hours = dt / 3600.0
            t.heat_wh += heat_w * hours
            t.idle_wh += self.model.idle_w * hours
            job_wh = job_core_s * core_w / 3600.0
            filler_wh = filler_core_s * core_w / 3600.0
            t.job_wh += job_wh
            t.filler_wh += filler_wh
            if queue_has_work:
                t.job_wh_queued += job_wh
                t.filler_wh_queued += filler_wh
            # the power model's own figure for the slots that were busy: the split above must
            # add up to it (tests/test_fleetsim.py)
            one_slot_w = self.model.watts_of(1, self.freq_khz, self.quota) - self.model.idle_w
            t.lever_wh += (self.model.idle_w + busy * one_slot_w) * hours
            need_w = max(0.0, self.room.steady_state_power_w(setpoint_c, outdoor_c) - gains_w)
            short_w = min(need_w, max(0.0, setpoint_c - self.room.air_c) * self.w_per_k)
            t.demand_wh += need_w * hours
            t.unmet_wh += short_w * hours
            air = self.room.air_c
            lo, hi = setpoint_c - 0.5, self.comfort_c + 1.0
            if air < lo:
                t.discomfort_kh += (lo - air) * hours
                t.too_cold_kh += (lo - air) * hours
            elif air > hi:
                t.discomfort_kh += (air - hi) * hours
        return finished


# ----------------------------------------------------------------------------- the agent


class AgentRadiator(SimRadiator):
    policy = "agent"

    def __init__(self, spec: RoomSpec, seed: int, noise_k: float, cfg: AgentConfig,
                 policy_cfg: PolicyConfig, throttled_starts: bool = True,
                 speed_hint: bool = True) -> None:
        super().__init__(spec, seed, noise_k)
        # the board's quota caps all jobs together at plan.slots x quota CPUs (decision 0017)
        self.throttle_cores = self.cores if throttled_starts else 0
        self.speed_hint = speed_hint  # urgent work: fewer slots at a higher frequency (0018)
        cfg = config_for_scenario(cfg, spec.scenario)
        self.allocator = make_allocator(cfg, self.cores, self.min_khz, self.max_khz,
                                        self.freq_table)
        self.controller: Controller = make_controller("agent", cfg, self.allocator)
        self.policy_cfg = policy_cfg
        self.plan = Plan(0, self.min_khz, 1.0)
        self.next_request_at = -math.inf
        self.work_request: WorkRequest | None = None
        self.requests_made = 0  # numbers the work requests (their ids)
        self.fills_gaps = True

    def control(self, now: float, local: datetime, outdoor_c: float) -> list[LiveJob]:
        """One control tick: sense, decide the plan, then the jobs. Returns jobs returned."""
        room_c = self.read_room(now)
        if self.speed_hint:
            self.allocator.urgent_cores = urgent_cores(h.policy_view() for h in self.held.values())
        decision = self.controller.decide(now, local, RoomEstimate(room_c, 1, 1), outdoor_c)
        self.plan = decision.plan
        self.freq_khz = self.plan.freq_khz
        self.quota = self.plan.quota
        self.job_slots = self.plan.slots if self.throttle_cores else None
        return self.schedule(now)

    def schedule(self, now: float) -> list[LiveJob]:
        """The job policy on the current plan, carried out at once (no processes to wait for)."""
        plan = self.plan
        slot_w = 0.0
        if plan.slots > 0:
            slot_w = self.model.slot_w * self._slot_share(plan.freq_khz) * max(0.0, plan.quota)
        views = tuple(h.policy_view() for h in self.held.values())
        d = decide(PolicyInputs(now=now, plan=plan, jobs=views, slot_w=slot_w,
                                next_request_at=self.next_request_at,
                                throttle_cores=self.throttle_cores), self.policy_cfg)
        returned: list[LiveJob] = []
        for action in d.actions:
            h = self.held[action.job_id]
            if isinstance(action, Return):
                del self.held[action.job_id]
                was = "suspended" if h.phase is Phase.SUSPENDED else "queued"
                returned.append(self._returned(h, f"{action.reason.value} ({was})"))
            elif isinstance(action, Suspend):
                h.set(Phase.SUSPENDED, now)
            elif isinstance(action, Resume):
                h.set(Phase.RUNNING, now)
            elif isinstance(action, Start):
                h.set(Phase.RUNNING, now)
                self.tally.worker_starts += 1
                if h.job.first_start is None:
                    h.job.first_start = now
        self._set_filler(d.filler)
        self.work_request = d.request
        if d.request is not None:
            self.next_request_at = now + self.policy_cfg.request_interval_s
            self.requests_made += 1
        return returned


# ------------------------------------------------------------------------ the hysteresis


@dataclass(frozen=True, slots=True)
class HysteresisRules:
    """Thresholds in kelvin relative to the target (room - target)."""

    filler_start_k: float = -1.0  # filler starts at or below this …
    filler_stop_k: float = 1.0  # … and stops at or above this
    low_start_k: float = 1.0  # low and background work starts at or below this …
    low_stop_k: float = 3.0  # … and stops (is suspended) at or above this
    high_start_k: float = 4.0
    high_stop_k: float = 10.0


HYSTERESIS = HysteresisRules()


def may_start(rules: HysteresisRules, priority: Priority, delta_k: float) -> bool:
    """May a job of ``priority`` start (or resume) in a room ``delta_k`` above its target?"""
    limit = rules.high_start_k if priority is Priority.HIGH else rules.low_start_k
    return delta_k <= limit


def must_stop(rules: HysteresisRules, priority: Priority, delta_k: float) -> bool:
    limit = rules.high_stop_k if priority is Priority.HIGH else rules.low_stop_k
    return delta_k >= limit


def filler_next(rules: HysteresisRules, on: bool, delta_k: float) -> bool:
    if delta_k <= rules.filler_start_k:
        return True
    if delta_k >= rules.filler_stop_k:
        return False
    return on


def freq_step(index: int, top: int, delta_k: float) -> int:
    """One step towards the target per period: up when the room is below it, down above."""
    if delta_k < 0.0:
        return min(top, index + 1)
    if delta_k > 0.0:
        return max(0, index - 1)
    return index


class HysteresisRadiator(SimRadiator):
    policy = "hysteresis"

    def __init__(self, spec: RoomSpec, seed: int, noise_k: float, grace_s: float,
                 rules: HysteresisRules = HYSTERESIS) -> None:
        super().__init__(spec, seed, noise_k)
        self.rules = rules
        self.grace_s = grace_s
        self.filler_on = False
        self.freq_index = 0
        self.delta_k = 0.0
        self.free = self.cores

    def control(self, now: float, setpoint_c: float) -> list[LiveJob]:
        room_c = self.read_room(now)
        delta = self.delta_k = room_c - setpoint_c
        r = self.rules
        self.freq_index = freq_step(self.freq_index, len(self.freq_table) - 1, delta)
        self.freq_khz = self.freq_table[self.freq_index]
        self.filler_on = filler_next(r, self.filler_on, delta)
        self.fills_gaps = self.filler_on
        returned: list[LiveJob] = []
        held = 0
        for job_id, h in list(self.held.items()):
            prio = h.job.spec.priority
            if h.phase is Phase.RUNNING and must_stop(r, prio, delta):
                h.set(Phase.SUSPENDED, now)
            elif h.phase is Phase.SUSPENDED:
                if may_start(r, prio, delta):
                    h.set(Phase.RUNNING, now)
                elif now - h.since >= self.grace_s:
                    # the same grace as the agent's: a suspended job goes back to the fleet
                    del self.held[job_id]
                    returned.append(self._returned(h, "too warm (suspended)"))
                    continue
            held += h.job.spec.cores
        self.free = self.cores - held
        self._set_filler(self.free if self.filler_on else 0)
        return returned

    def start(self, job: LiveJob, now: float) -> None:
        """A placed job starts at once (the scheduler only places where it may run)."""
        self.take(job, now, Phase.RUNNING)
        if job.first_start is None:
            job.first_start = now
        self.tally.worker_starts += 1
        self.free -= job.spec.cores
        # the filler gives the job its slots
        self.filler = min(self.filler, max(0, self.free))
