"""The CPU frequency lever: a cap on the clock, through cpufreq policies or intel_pstate.

The plan's ``freq_khz`` is a cap. It becomes ``scaling_max_freq`` on every cpufreq policy, or
``max_perf_pct`` under intel_pstate in active mode (where the global percentage is the
driver's own knob). The kernel clamps and resolves what is written, so the levers read the
result back and report that, never the value they asked for.

Lowering the max below the current min is done min first, as ``cpupower`` does: kernels
before 5.3 refuse a max below the min, later ones silently lower the effective min. When the
cap rises again the min goes back up, to at most the board's original min, so the lever never
leaves the min above the max and never holds the floor lower than it must.

``apply`` runs every control tick (and tens of thousands of times in a simulated week), so an
unchanged cap costs no IO; the live limits are re-read every ``RECHECK_EVERY`` calls, and a
limit changed behind the agent's back is written again.

Originals are remembered before the first write, in memory and in the ``RestoreRecord`` when
one is given; a lever whose record still holds originals from a run that did not restore
(a crash, SIGKILL, power cut without reboot) puts them back when it is created.
"""

from __future__ import annotations

import errno
import logging
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

from qrad_agent.actuators.base import LeverError as LeverError  # also imported from here
from qrad_agent.actuators.base import LeverInfo
from qrad_agent.actuators.restore import RestoreRecord, put_back, remember_originals
from qrad_agent.core.models import Plan
from qrad_agent.sysfs import Sysfs

log = logging.getLogger(__name__)

CPU_DIR = "devices/system/cpu"
PSTATE_DIR = f"{CPU_DIR}/intel_pstate"
RECHECK_EVERY = 30  # apply() calls between re-reads of the live limits: 5 min at 10 s ticks
PERMISSION_HINT = "permission denied: run as root or install the udev rule"


@dataclass(frozen=True)
class _Policy:
    name: str  # "policy0", or "cpu0" on kernels without policy directories
    dir: str  # relative to the sysfs root
    min_khz: int  # cpuinfo_min_freq
    max_khz: int  # cpuinfo_max_freq
    available: tuple[int, ...]  # ascending; empty when the driver has no frequency table

    def settled_max(self, cap_khz: int) -> int:
        """The scaling_max_freq the kernel ends on when ``cap_khz`` is written."""
        khz = min(max(cap_khz, self.min_khz), self.max_khz)
        if not self.available:
            return khz
        i = bisect_right(self.available, khz)
        return self.available[i - 1] if i else self.available[0]


class _LimitLever:
    """What both levers share: a min/max pair per directory, originals, restore."""

    name: str
    _MIN: str  # file name of the lower limit in a limit directory
    _MAX: str

    def __init__(self, sysfs: Sysfs, record: RestoreRecord | None) -> None:
        self._sysfs = sysfs
        self._record = record
        self._originals: dict[str, str] = {}
        self._ticks = 0
        if record is not None and record.originals(self.name):
            try:
                self._put_back(record.originals(self.name))
                record.forget(self.name)
                log.warning("%s: restored the settings a previous run left changed", self.name)
            except (LeverError, OSError) as exc:
                # The record keeps them (first value wins), so restore() tries again later.
                log.error("%s: could not restore what a previous run left: %s", self.name, exc)

    def restore(self) -> None:
        """Write back the originals (the record's first, if any) and clear the record."""
        put_back(self._record, self.name, self._originals, self._put_back)
        self._originals = {}
        self._reset()

    def _reset(self) -> None:
        self._ticks = 0

    # -- shared steps ----------------------------------------------------------------------
    def _remember(self, rels: list[str]) -> None:
        """Save the live values of ``rels`` as originals before the first write."""
        values = {rel: self._read(rel) for rel in rels if self._sysfs.exists(rel)}
        self._originals = remember_originals(self._record, self.name, values, self._originals)

    def _set_limits(self, d: str, new_max: int, new_min: int, cur_min: int) -> None:
        """Move the pair in ``d`` so that min never ends above max, whichever way it goes."""
        min_rel, max_rel = f"{d}/{self._MIN}", f"{d}/{self._MAX}"
        if new_min < cur_min:
            self._write(min_rel, new_min)
            self._write(max_rel, new_max)
        else:
            self._write(max_rel, new_max)
            if new_min > cur_min:
                self._write(min_rel, new_min)

    def _put_back(self, values: dict[str, str]) -> None:
        groups: dict[str, dict[str, str]] = {}
        for rel, value in values.items():
            d, _, attr = rel.rpartition("/")
            groups.setdefault(d, {})[attr] = value
        errors: list[str] = []
        for d, attrs in groups.items():
            lo, hi = attrs.pop(self._MIN, None), attrs.pop(self._MAX, None)
            try:
                if lo is not None and hi is not None:
                    self._set_limits(d, int(hi), int(lo), self._read_int(f"{d}/{self._MIN}"))
                elif hi is not None:
                    self._write(f"{d}/{self._MAX}", hi)
                elif lo is not None:
                    self._write(f"{d}/{self._MIN}", lo)
            except (LeverError, ValueError) as exc:
                errors.append(str(exc))
            for attr, value in attrs.items():
                rel = f"{d}/{attr}"
                try:
                    if self._read(rel) != value:
                        self._write(rel, value)
                except LeverError as exc:
                    errors.append(str(exc))
        if errors:
            raise LeverError(f"{self.name}: restore incomplete: " + "; ".join(errors))

    def _check_writable(self, rels: list[str]) -> None:
        for rel in rels:
            if not self._sysfs.exists(rel):
                raise LeverError(f"{rel} is missing: the driver offers no such limit here")
            path = self._sysfs.path(rel)
            # os.access says yes to root for any file, but kernfs refuses to open an
            # attribute without a write bit even for root: check the mode as well.
            if not (
                self._sysfs.writable(rel) and path.is_file() and path.stat().st_mode & 0o222
            ):
                raise LeverError(f"{PERMISSION_HINT} ({rel} is not a writable file)")

    def _read(self, rel: str) -> str:
        try:
            return self._sysfs.read(rel)
        except OSError as exc:
            raise LeverError(f"cannot read {rel}: {exc.strerror or exc}") from exc

    def _read_int(self, rel: str) -> int:
        text = self._read(rel)
        try:
            return int(text)
        except ValueError:
            raise LeverError(f"{rel} holds {text!r}, expected a whole number") from None

    def _write(self, rel: str, value: str | int) -> None:
        try:
            self._sysfs.write(rel, value)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno in (errno.EACCES, errno.EPERM):
                why = f"{why} ({PERMISSION_HINT})"
            elif exc.errno == errno.EINVAL:
                why = f"{why}: the kernel refused the value"
            raise LeverError(f"cannot write {value} to {rel}: {why}") from exc


def _scan_policies(sysfs: Sysfs) -> list[_Policy]:
    dirs = [d for d in sysfs.glob(f"{CPU_DIR}/cpufreq/policy[0-9]*") if sysfs.path(d).is_dir()]
    named = [(d.rsplit("/", 1)[-1], d) for d in dirs]
    if not named:
        # Old layout: real cpuN/cpufreq directories, CPUs sharing a policy linked to one.
        seen = set()
        for d in sysfs.glob(f"{CPU_DIR}/cpu[0-9]*/cpufreq"):
            real = sysfs.path(d).resolve()
            if real.is_dir() and real not in seen:
                seen.add(real)
                named.append((d.split("/")[-2], d))
    if not named:
        raise LeverError("no cpufreq driver loaded")
    policies = []
    for name, d in named:
        try:
            lo = sysfs.read_int(f"{d}/cpuinfo_min_freq")
            hi = sysfs.read_int(f"{d}/cpuinfo_max_freq")
            table_rel = f"{d}/scaling_available_frequencies"
            table = (
                tuple(sorted({int(t) for t in sysfs.read(table_rel).split()}))
                if sysfs.exists(table_rel)
                else ()
            )
        except (OSError, ValueError) as exc:
            raise LeverError(f"cannot read the frequency range of {d}: {exc}") from exc
        policies.append(_Policy(name, d, lo, hi, table))
    return policies


def _read_or(sysfs: Sysfs, rel: str, default: str) -> str:
    try:
        return sysfs.read(rel)
    except OSError:
        return default


class CpufreqLever(_LimitLever):
    name = "cpufreq"
    _MIN = "scaling_min_freq"
    _MAX = "scaling_max_freq"

    def __init__(self, sysfs: Sysfs, record: RestoreRecord | None = None) -> None:
        self._policies: list[_Policy] | None = None
        self._cap: int | None = None
        self._asked: dict[str, int] = {}  # policy dir -> settled max last written
        self._max: dict[str, int] = {}  # policy dir -> scaling_max_freq last read
        self._min: dict[str, int] = {}
        super().__init__(sysfs, record)

    def discover(self) -> LeverInfo:
        try:
            policies = _scan_policies(self._sysfs)
        except LeverError as exc:
            return LeverInfo(self.name, False, str(exc))
        first = policies[0].dir
        info: dict[str, Any] = {
            "min_khz": min(p.min_khz for p in policies),
            "max_khz": max(p.max_khz for p in policies),
            "available_khz": sorted({f for p in policies for f in p.available}),
            "policies": [p.name for p in policies],
            "driver": _read_or(self._sysfs, f"{first}/scaling_driver", ""),
            "governor": _read_or(self._sysfs, f"{first}/scaling_governor", ""),
        }
        try:
            self._check_writable([f"{p.dir}/{a}" for p in policies for a in (self._MAX, self._MIN)])
        except LeverError as exc:
            return LeverInfo(self.name, False, str(exc), info)
        return LeverInfo(self.name, True, range=info)

    def apply(self, plan: Plan) -> None:
        cap = plan.freq_khz
        self._ticks += 1
        if cap == self._cap and self._ticks < RECHECK_EVERY:
            return
        policies = self._ready()
        if self._ticks >= RECHECK_EVERY:
            self._recheck(policies)
        wanted = {p.dir: p.settled_max(cap) for p in policies}
        todo = [p for p in policies if self._asked.get(p.dir) != wanted[p.dir]]
        if todo:
            if not self._originals:
                self._remember(
                    [f"{p.dir}/{a}" for p in policies
                     for a in (self._MAX, self._MIN, "scaling_governor")]
                )
            for p in todo:
                self._set_policy(p, cap, wanted[p.dir])
            self._ticks = 0  # just read back: the next check can wait a full period
        self._cap = cap

    def read_back(self) -> dict[str, Any]:
        policies = self._policies or _scan_policies(self._sysfs)
        per: dict[str, dict[str, int]] = {}
        for p in policies:
            hi = self._read_int(f"{p.dir}/{self._MAX}")
            lo = self._read_int(f"{p.dir}/{self._MIN}")
            self._max[p.dir], self._min[p.dir] = hi, lo
            per[p.name] = {"max_khz": hi, "min_khz": lo}
            cur = f"{p.dir}/scaling_cur_freq"
            if self._sysfs.exists(cur):
                per[p.name]["cur_khz"] = self._read_int(cur)
        return {"freq_khz": min(v["max_khz"] for v in per.values()), "per_policy": per}

    def _reset(self) -> None:
        super()._reset()
        self._cap = None
        self._asked.clear()
        self._max.clear()
        self._min.clear()

    def _ready(self) -> list[_Policy]:
        if self._policies is None:
            policies = _scan_policies(self._sysfs)
            self._check_writable([f"{p.dir}/{a}" for p in policies for a in (self._MAX, self._MIN)])
            self._policies = policies
        return self._policies

    def _recheck(self, policies: list[_Policy]) -> None:
        self._ticks = 0
        for p in policies:
            hi = self._read_int(f"{p.dir}/{self._MAX}")
            lo = self._read_int(f"{p.dir}/{self._MIN}")
            if p.dir in self._max and hi != self._max[p.dir]:
                log.info("%s/%s went from %d to %d outside the agent; writing the cap again",
                         p.dir, self._MAX, self._max[p.dir], hi)
                self._asked.pop(p.dir, None)
            self._max[p.dir], self._min[p.dir] = hi, lo

    def _set_policy(self, p: _Policy, cap: int, settled: int) -> None:
        target = min(max(cap, p.min_khz), p.max_khz)
        original_min = self._originals.get(f"{p.dir}/{self._MIN}")
        floor = int(original_min) if original_min is not None else p.min_khz
        cur_min = self._min.get(p.dir)
        if cur_min is None:
            cur_min = self._read_int(f"{p.dir}/{self._MIN}")
        # settled is a real table frequency, so a min written as it resolves to itself
        self._set_limits(p.dir, target, min(floor, settled), cur_min)
        self._asked[p.dir] = settled
        self._max[p.dir] = self._read_int(f"{p.dir}/{self._MAX}")
        self._min[p.dir] = self._read_int(f"{p.dir}/{self._MIN}")
        if self._max[p.dir] != settled:
            # another limit (thermal, firmware) holds it lower; not ours to fight every tick
            log.debug("%s: asked %d kHz, the kernel holds %d", p.dir, settled, self._max[p.dir])


class IntelPstateLever(_LimitLever):
    """intel_pstate in active mode: the cap as ``max_perf_pct`` of ``cpuinfo_max_freq``.

    ``no_turbo``: None leaves turbo as the board has it; True or False sets it (and restore
    puts the original back).
    """

    name = "intel_pstate"
    _MIN = "min_perf_pct"
    _MAX = "max_perf_pct"

    def __init__(
        self, sysfs: Sysfs, record: RestoreRecord | None = None, *, no_turbo: bool | None = None
    ) -> None:
        self._no_turbo = no_turbo
        self._max_khz: int | None = None
        self._cap: int | None = None
        self._asked: int | None = None  # max_perf_pct last written
        self._live_max: int | None = None
        self._live_min: int | None = None
        super().__init__(sysfs, record)

    def discover(self) -> LeverInfo:
        status_rel = f"{PSTATE_DIR}/status"
        if not self._sysfs.exists(status_rel):
            return LeverInfo(self.name, False, "intel_pstate is not loaded")
        status = _read_or(self._sysfs, status_rel, "unreadable")
        if status != "active":
            return LeverInfo(
                self.name, False,
                f"intel_pstate is in {status} mode, not active: use the cpufreq lever",
            )
        try:
            policies = _scan_policies(self._sysfs)
        except LeverError as exc:
            return LeverInfo(self.name, False, f"cannot read cpuinfo_max_freq: {exc}")
        info: dict[str, Any] = {
            "min_khz": min(p.min_khz for p in policies),
            "max_khz": max(p.max_khz for p in policies),
            "available_khz": [],
            "policies": [p.name for p in policies],
            "driver": "intel_pstate",
            "governor": _read_or(self._sysfs, f"{policies[0].dir}/scaling_governor", ""),
        }
        try:
            self._check_writable(self._files())
        except LeverError as exc:
            return LeverInfo(self.name, False, str(exc), info)
        return LeverInfo(self.name, True, range=info)

    def apply(self, plan: Plan) -> None:
        cap = plan.freq_khz
        self._ticks += 1
        if cap == self._cap and self._ticks < RECHECK_EVERY:
            return
        max_khz = self._ready()
        if self._ticks >= RECHECK_EVERY:
            self._recheck()
        pct = min(100, max(1, -(-cap * 100 // max_khz)))  # rounded up
        if pct != self._asked:
            first = not self._originals
            if first:
                self._remember(self._files())
            original_min = self._originals.get(f"{PSTATE_DIR}/{self._MIN}")
            floor = int(original_min) if original_min is not None else 0
            cur_min = self._live_min
            if cur_min is None:
                cur_min = self._read_int(f"{PSTATE_DIR}/{self._MIN}")
            self._set_limits(PSTATE_DIR, pct, min(floor, pct), cur_min)
            if first and self._no_turbo is not None:
                want = "1" if self._no_turbo else "0"
                if self._read(f"{PSTATE_DIR}/no_turbo") != want:
                    self._write(f"{PSTATE_DIR}/no_turbo", want)
            self._asked = pct
            self._live_max = self._read_int(f"{PSTATE_DIR}/{self._MAX}")
            self._live_min = self._read_int(f"{PSTATE_DIR}/{self._MIN}")
            self._ticks = 0
        self._cap = cap

    def read_back(self) -> dict[str, Any]:
        max_khz = self._max_khz or max(p.max_khz for p in _scan_policies(self._sysfs))
        hi = self._read_int(f"{PSTATE_DIR}/{self._MAX}")
        lo = self._read_int(f"{PSTATE_DIR}/{self._MIN}")
        self._live_max, self._live_min = hi, lo
        return {
            "freq_khz": -(-max_khz * hi // 100),
            "max_perf_pct": hi,
            "min_perf_pct": lo,
            "no_turbo": self._read_int(f"{PSTATE_DIR}/no_turbo"),
        }

    def _files(self) -> list[str]:
        names = [self._MAX, self._MIN] + (["no_turbo"] if self._no_turbo is not None else [])
        return [f"{PSTATE_DIR}/{n}" for n in names]

    def _reset(self) -> None:
        super()._reset()
        self._cap = None
        self._asked = None
        self._live_max = self._live_min = None

    def _ready(self) -> int:
        if self._max_khz is None:
            info = self.discover()
            if not info.available:
                raise LeverError(info.why_not)
            self._max_khz = int(info.range["max_khz"])
        return self._max_khz

    def _recheck(self) -> None:
        self._ticks = 0
        hi = self._read_int(f"{PSTATE_DIR}/{self._MAX}")
        lo = self._read_int(f"{PSTATE_DIR}/{self._MIN}")
        if self._live_max is not None and hi != self._live_max:
            log.info("%s/%s went from %d to %d outside the agent; writing the cap again",
                     PSTATE_DIR, self._MAX, self._live_max, hi)
            self._asked = None
        self._live_max, self._live_min = hi, lo


def open_frequency_lever(
    sysfs: Sysfs, record: RestoreRecord | None = None
) -> CpufreqLever | IntelPstateLever:
    """The frequency lever this board's driver calls for: intel_pstate when it is active."""
    active = _read_or(sysfs, f"{PSTATE_DIR}/status", "") == "active"
    if record is not None:
        # Originals left by the other kind (the driver mode changed since a crash in this
        # boot) are put back by creating that lever once.
        other = CpufreqLever.name if active else IntelPstateLever.name
        if record.originals(other):
            (CpufreqLever if active else IntelPstateLever)(sysfs, record)
    return IntelPstateLever(sysfs, record) if active else CpufreqLever(sysfs, record)
