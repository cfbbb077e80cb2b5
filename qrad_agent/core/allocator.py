"""Heat demand to a compute plan: how many worker slots run, at what frequency cap and quota.

Demand ``u`` in [0, 1] asks for ``u`` of the radiator's dynamic power, i.e. ``u * N`` slots'
worth at full speed. Two kinds of lever share the work:

- Coarse: the number of running slots (worker processes, i.e. jobs). Starting and stopping
  them has a cost (a job is paused or returned), so the count has hysteresis and minimum on
  and off times.
- Fine: the frequency cap and the CPU quota move every tick and make the power exactly what
  was asked for, whatever the slot count is at the moment. That keeps the plan's power
  continuous and monotonic in demand while the slot count lags behind.

For a given heat, many slots at a low frequency compute more than few slots at a high one
(dynamic power grows faster than frequency), so the allocator runs as many slots as can each
be kept at or above the lowest frequency, and throttles with the quota only below that.

Urgent work (``urgent_cores``, a hint the job policy gives: decision 0018) turns that
round: while high-priority work runs or waits here, the allocator runs only as many slots as
the jobs here have cores (never fewer than the heat needs at full speed), so the same heat
comes from fewer slots at a higher frequency and the jobs finish sooner. The slots it drops
are filler's (every job still has its cores), so the step down pauses no job.

When no heat is wanted the slots are first paused (quota 0: frozen, SIGSTOPped), and stopped
only after ``stop_after_s`` of continued zero demand: a window airing or an hour of sun must
not kill and restart the work that makes the heat.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from qrad_agent.config import AllocatorConfig
from qrad_agent.core.models import Plan
from qrad_agent.core.power import PowerModel


class Allocator:
    def __init__(
        self,
        cfg: AllocatorConfig,
        slots: int,
        model: PowerModel,
        min_freq_khz: int,
        freq_table_khz: Sequence[int] = (),
    ) -> None:
        if slots < 1:
            raise ValueError(f"a radiator needs at least one worker slot, got {slots}")
        self.cfg = cfg
        self.n_max = slots
        self.model = model
        self.min_freq_khz = min_freq_khz
        self.max_freq_khz = model.max_freq_khz
        self.table = sorted(f for f in freq_table_khz if min_freq_khz <= f <= self.max_freq_khz)
        self.min_share = model.slot_share(min_freq_khz)
        self.running = 0
        self.starts = 0  # slot starts since creation, for KPIs and telemetry
        self.switches = 0  # on/off switches: no slots -> some slots and back
        self._last_start: float = -math.inf
        self._last_stop: float = -math.inf
        self.paused_since: float | None = None  # slots frozen since then (no heat wanted)
        # cores of the jobs here while urgent work is among them (0: none), from the job policy
        # (core/jobs.py urgent_cores); the caller sets it before ``allocate``
        self.urgent_cores = 0

    def allocate(self, now: float, demand: float, limit: float = 1.0) -> Plan:
        """The plan for ``demand``, never above ``limit`` (a safety cap on demand).

        ``limit <= 0`` is an emergency: every slot stops at once, minimum on-times or not.
        """
        if limit <= 0:
            self.paused_since = None
            self._set_running(0, now)
            return self._plan(0.0)
        u = min(max(demand, 0.0), limit, 1.0)
        if self._paused(now, u):
            return Plan(self.running, self.min_freq_khz, 0.0)
        self._set_running(self._next_count(now, u), now)
        return self._plan(u * self.n_max)

    def _paused(self, now: float, u: float) -> bool:
        """Pause running slots while no heat is wanted; stop them once the pause is long."""
        cfg = self.cfg
        if self.running == 0:
            self.paused_since = None
            return False
        if self.paused_since is None:
            if u >= cfg.stop_demand:
                return False
            self.paused_since = now
        if u >= cfg.start_demand:
            self.paused_since = None  # resume: not a start, the slots never stopped
            return False
        if now - self.paused_since >= cfg.stop_after_s and now - self._last_start >= cfg.min_on_s:
            self.paused_since = None
            self._set_running(0, now)
            return False
        return True

    # -- coarse lever -----------------------------------------------------------------------
    def _next_count(self, now: float, u: float) -> int:
        n, cfg = self.running, self.cfg
        wanted = u * self.n_max  # slots' worth of full-speed power
        may_start = now - self._last_stop >= cfg.min_off_s
        if n == 0:
            if u >= cfg.start_demand and may_start:
                n = max(1, self._efficient(wanted * (1 - cfg.slot_hysteresis)))
                if self.urgent_cores > 0:
                    n = max(1, math.ceil(wanted - 1e-9), min(self.urgent_cores, n))
                return min(self.n_max, n)
            return 0
        needed = math.ceil(wanted - 1e-9)  # below this the running slots cannot make the heat
        efficient = self._efficient(wanted * (1 - cfg.slot_hysteresis))
        if self.urgent_cores > 0:
            # speed over efficiency: as many slots as the jobs have cores, at a higher frequency
            fast = min(self.n_max, max(needed, min(self.urgent_cores, efficient)))
            if fast > n and may_start:
                return fast
            # down: only slots no job needs stop (filler's), so no job is paused by it
            return min(n, max(fast, self.urgent_cores))
        up = max(needed, efficient)
        if up > n and may_start:
            return up
        # No step down while heat is wanted: n slots throttled by the quota at the lowest
        # frequency compute exactly as much per watt as fewer slots would, and every stop is a
        # job paused or returned. Slots go only through a pause (no heat wanted) to a stop.
        return n

    def _efficient(self, wanted: float) -> int:
        """How many slots can share ``wanted`` while each stays at or above the lowest frequency."""
        return min(self.n_max, max(0, math.floor(wanted / self.min_share + 1e-9)))

    def _set_running(self, n: int, now: float) -> None:
        if n > self.running:
            self.switches += self.running == 0
            self.starts += n - self.running
            self._last_start = now
        elif n < self.running:
            self.switches += n == 0
            self._last_stop = now
        self.running = n

    # -- fine levers ------------------------------------------------------------------------
    def _plan(self, wanted: float) -> Plan:
        n = self.running
        if n == 0:
            return Plan(0, self.min_freq_khz, self.cfg.min_quota)
        share = min(1.0, wanted / n)  # each slot's share of its full-speed power
        if share <= self.min_share:
            quota = max(self.cfg.min_quota, share / self.min_share)
            return Plan(n, self.min_freq_khz, round(quota, 4))
        freq = self.max_freq_khz * share ** (1.0 / self.model.freq_exponent)
        if self.table:
            # the kernel resolves a cap down to a table entry: ask for the entry at or above the
            # need and trim the rest with the quota, so the power is still exactly what we want
            i = bisect.bisect_left(self.table, math.ceil(freq - 1e-6))
            freq = self.table[min(i, len(self.table) - 1)]
        freq_khz = min(self.max_freq_khz, math.ceil(freq))
        quota = min(1.0, share / self.model.slot_share(freq_khz))
        return Plan(n, freq_khz, round(max(self.cfg.min_quota, quota), 4))

    def export_state(self) -> dict[str, float]:
        return {"running": float(self.running)}
