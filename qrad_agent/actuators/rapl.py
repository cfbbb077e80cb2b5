"""The RAPL power-limit lever: the package's long-term power limit, where the firmware lets it.

RAPL (Intel, and AMD through the same powercap interface) keeps each CPU package's average
power under ``constraint_N_power_limit_uw`` of the constraint named ``long_term``. The lever
sets it to the power model's watts for the plan times a headroom, split over the packages,
so it acts as a guard when the board draws more than the plan should; frequency, quota and
slots remain the levers that make the heat.

It only ever lowers the limit: the cap is clamped to the limit the board had (and to the
constraint's ``max_power_uw``), since the board's cooling was sized for that.

Many boards' firmware locks the limit (the lock bit of MSR_PKG_POWER_LIMIT); the kernel then
refuses writes with ENODATA (EACCES on some versions). Such a lock is reported, in
``discover`` and once from ``apply``, and then left alone: it is the firmware's decision.
``discover`` finds the lock by writing the limit's current value back, which changes
nothing on the chip.

The kernel stores the limit in whole power units (1/8 W on most parts), so the lever reads
back what took effect. Originals go to the ``RestoreRecord`` before the first write, and a
record left by a run that did not restore is put back when the lever is created.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Any

from qrad_agent.actuators.base import LeverError, LeverInfo
from qrad_agent.actuators.restore import RestoreRecord, put_back, remember_originals
from qrad_agent.actuators.settings import RaplLimitConfig
from qrad_agent.core.models import Plan
from qrad_agent.core.power import PowerModel
from qrad_agent.sysfs import Sysfs

log = logging.getLogger(__name__)

POWERCAP = "class/powercap"
RECHECK_EVERY = 30  # apply() calls between re-reads of the live limit
_LOCK_ERRNOS = (errno.ENODATA, errno.EACCES, errno.EPERM)


@dataclass(frozen=True)
class RaplZone:
    """One powercap zone: ``intel-rapl:0`` (package-0), ``intel-rapl:0:2`` (dram), …"""

    id: str  # directory name under class/powercap
    dir: str  # relative to the sysfs root
    label: str  # the zone's ``name``: package-0, core, uncore, dram, psys
    long_term: int | None  # index of the constraint named long_term, if the zone has one

    @property
    def top_level(self) -> bool:
        return self.id.count(":") == 1

    def limit_rel(self) -> str:
        return f"{self.dir}/constraint_{self.long_term}_power_limit_uw"


def find_zones(sysfs: Sysfs) -> list[RaplZone]:
    """Every intel-rapl zone the kernel offers, packages first; [] when there is none."""
    zones = []
    for d in sysfs.glob(f"{POWERCAP}/intel-rapl:*"):
        zid = d.rsplit("/", 1)[-1]
        try:
            label = sysfs.read(f"{d}/name")
        except OSError:
            continue
        long_term = None
        for c in sysfs.glob(f"{d}/constraint_*_name"):
            try:
                if sysfs.read(c) == "long_term":
                    long_term = int(c.rsplit("/", 1)[-1].split("_")[1])
                    break
            except (OSError, ValueError):
                continue
        zones.append(RaplZone(zid, d, label, long_term))
    return zones


def package_zones(sysfs: Sysfs) -> list[RaplZone]:
    """The top-level package zones: the ones whose limit the lever sets."""
    return [z for z in find_zones(sysfs) if z.top_level and z.label.startswith("package")]


def why_no_rapl(sysfs: Sysfs) -> str:
    if sysfs.exists(POWERCAP):
        return "no intel-rapl powercap zones (the intel_rapl driver is not loaded, or no RAPL)"
    return f"no {POWERCAP} in sysfs (kernel without powercap)"


class RaplLimitLever:
    name = "rapl"

    def __init__(
        self,
        sysfs: Sysfs,
        model: PowerModel,
        cfg: RaplLimitConfig | None = None,
        record: RestoreRecord | None = None,
    ) -> None:
        self._sysfs = sysfs
        self._model = model
        self._cfg = cfg or RaplLimitConfig(enabled=True)
        self._record = record
        self._originals: dict[str, str] = {}
        self._zones: list[RaplZone] | None = None
        self._locked: dict[str, str] = {}  # limit file -> why it cannot be changed
        self._asked_uw: int | None = None
        self._shown: dict[str, int] = {}  # limit file -> what it read after our last write
        self._ticks = 0
        self._reported = False
        if record is not None and record.originals(self.name):
            try:
                self._put_back(record.originals(self.name))
                record.forget(self.name)
                log.warning("rapl: restored the power limits a previous run left changed")
            except (LeverError, OSError) as exc:
                log.error("rapl: could not restore what a previous run left: %s", exc)

    # -- the Lever shape -------------------------------------------------------------------
    def discover(self) -> LeverInfo:
        zones = package_zones(self._sysfs)
        if not zones:
            return LeverInfo(self.name, False, why_no_rapl(self._sysfs))
        missing = [z.id for z in zones if z.long_term is None]
        if missing:
            return LeverInfo(self.name, False, f"no long_term constraint in {', '.join(missing)}")
        info: dict[str, Any] = {"zones": [z.id for z in zones]}
        try:
            limits = {z.id: self._read_int(z.limit_rel()) for z in zones}
        except LeverError as exc:
            return LeverInfo(self.name, False, str(exc), info)
        info["limit_w"] = {k: v / 1e6 for k, v in limits.items()}
        info["max_w"] = {z.id: self._ceiling_uw(z) / 1e6 for z in zones}
        info["min_w"] = self._cfg.min_w
        for z in zones:
            why = self._probe(z)
            if why:
                return LeverInfo(self.name, False, why, info)
        return LeverInfo(self.name, True, range=info)

    def apply(self, plan: Plan) -> None:
        zones = self._ready()
        self._ticks += 1
        if len(self._locked) == len(zones):
            if not self._reported:
                self._reported = True
                raise LeverError("; ".join(self._locked.values()) + ": reported, not fought")
            return  # locked everywhere: reported once, not fought
        share = self._model.watts(plan) * self._cfg.headroom / len(zones)
        target = round(max(self._cfg.min_w, share) * 1e6)
        moved = self._asked_uw is None or abs(target - self._asked_uw) >= (
            self._cfg.min_change_w * 1e6
        )
        if not moved and self._ticks < RECHECK_EVERY:
            return  # small moves are not worth a write to the MSR every tick
        self._ticks = 0
        if not self._originals:
            self._remember([z.limit_rel() for z in zones])
        locked_now = []
        for z in zones:
            rel = z.limit_rel()
            if rel in self._locked:
                continue
            if not moved and self._read_int(rel) == self._shown.get(rel):
                continue  # a recheck: nobody changed it behind our back
            try:
                self._write(rel, min(target, self._ceiling_uw(z)))
            except _Locked as exc:
                self._locked[rel] = str(exc)
                locked_now.append(str(exc))
                continue
            self._shown[rel] = self._read_int(rel)
        if moved:
            self._asked_uw = target
        if locked_now and not self._reported:
            self._reported = True
            raise LeverError("; ".join(locked_now) + ": reported, not fought")

    def read_back(self) -> dict[str, Any]:
        zones = self._zones or package_zones(self._sysfs)
        per = {z.id: self._read_int(z.limit_rel()) / 1e6 for z in zones if z.long_term is not None}
        out: dict[str, Any] = {"limit_w": round(sum(per.values()), 3), "per_zone_w": per}
        if self._locked:
            out["locked"] = sorted(self._locked)
        return out

    def restore(self) -> None:
        put_back(self._record, self.name, self._originals, self._put_back)
        self._originals = {}
        self._asked_uw = None
        self._shown.clear()
        self._ticks = 0

    # -- steps -----------------------------------------------------------------------------
    def _ready(self) -> list[RaplZone]:
        if self._zones is None:
            zones = package_zones(self._sysfs)
            if not zones:
                raise LeverError(f"rapl: {why_no_rapl(self._sysfs)}")
            missing = [z.id for z in zones if z.long_term is None]
            if missing:
                raise LeverError(f"rapl: no long_term constraint in {', '.join(missing)}")
            self._zones = zones
        return self._zones

    def _ceiling_uw(self, z: RaplZone) -> int:
        """The highest limit the lever may set: the board's own, and the constraint's max."""
        rel = z.limit_rel()
        own = self._originals.get(rel)
        if own is None and self._record is not None:
            own = self._record.originals(self.name).get(rel)
        ceiling = int(own) if own is not None else self._read_int(rel)
        max_rel = f"{z.dir}/constraint_{z.long_term}_max_power_uw"
        if self._sysfs.exists(max_rel):
            try:
                top = self._sysfs.read_int(max_rel)
                if top > 0:
                    ceiling = min(ceiling, top)
            except (OSError, ValueError):
                pass  # some parts show no maximum; the board's own limit still bounds it
        return ceiling

    def _probe(self, z: RaplZone) -> str:
        """Why the zone's limit cannot be changed ("" if it can), by writing it back as is."""
        rel = z.limit_rel()
        if rel in self._locked:
            return self._locked[rel]
        path = self._sysfs.path(rel)
        if not (path.is_file() and path.stat().st_mode & 0o222 and self._sysfs.writable(rel)):
            return f"permission denied: {rel} is not writable (run as root)"
        try:
            self._write(rel, self._read_int(rel))
        except _Locked as exc:
            self._locked[rel] = str(exc)
            return str(exc)
        except LeverError as exc:
            return str(exc)
        return ""

    def _remember(self, rels: list[str]) -> None:
        values = {rel: str(self._read_int(rel)) for rel in rels}
        self._originals = remember_originals(
            self._record, self.name, values, self._originals, "power limits"
        )

    def _put_back(self, values: dict[str, str]) -> None:
        errors = []
        for rel, value in values.items():
            try:
                if self._read_int(rel) != int(value):
                    self._write(rel, value)
            except _Locked as exc:
                # locked since (a firmware update, a reboot into other settings): nothing of
                # ours can be left in it that we could change
                log.warning("rapl: %s; the original could not be written back", exc)
            except (LeverError, ValueError) as exc:
                errors.append(str(exc))
        if errors:
            raise LeverError("rapl: restore incomplete: " + "; ".join(errors))

    def _read_int(self, rel: str) -> int:
        try:
            text = self._sysfs.read(rel)
        except OSError as exc:
            raise LeverError(f"cannot read {rel}: {exc.strerror or exc}") from exc
        try:
            return int(text)
        except ValueError:
            raise LeverError(f"{rel} holds {text!r}, expected a whole number") from None

    def _write(self, rel: str, value: str | int) -> None:
        try:
            self._sysfs.write(rel, value)
        except OSError as exc:
            why = exc.strerror or str(exc)
            mode_ok = self._sysfs.path(rel).exists() and (
                self._sysfs.path(rel).stat().st_mode & 0o222
            )
            if exc.errno == errno.ENODATA or (
                exc.errno in _LOCK_ERRNOS and mode_ok and os.geteuid() == 0
            ):
                raise _Locked(
                    f"the firmware locked the power limit {rel} (write failed: {why})"
                ) from exc
            if exc.errno in (errno.EACCES, errno.EPERM):
                why = f"{why} (run as root)"
            elif exc.errno == errno.EINVAL:
                why = f"{why}: the kernel refused the value"
            raise LeverError(f"cannot write {value} to {rel}: {why}") from exc


class _Locked(LeverError):
    """The firmware holds the limit: the kernel refuses to change it."""
