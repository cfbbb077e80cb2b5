"""The workers' cgroup: CPU bandwidth (the quota lever) and the freezer.

Layouts. cgroup v2 has one hierarchy (``cgroup.controllers`` at its root): at the cgroup
root itself on a unified system, or at ``<root>/unified`` on a hybrid one. cgroup v1 mounts
one hierarchy per controller: ``<root>/cpu`` (often ``cpu,cpuacct``) and ``<root>/freezer``.
On a hybrid board a controller lives in one of them only: a ``cpu`` bound to v1 is missing
from v2's ``cgroup.controllers``. With ``version = "auto"`` the quota uses v2 where v2 has
the cpu controller and v1 otherwise, and the freezer uses v2 (``cgroup.freeze``, kernel 5.2
and later) where v2 is mounted and the v1 freezer otherwise; a worker joins the group in
every hierarchy used. The group is ``<hierarchy>/<parent>/<name>``.

Quota over the whole group, not per slot: ``cpu.max`` (v2) or ``cpu.cfs_quota_us`` (v1) of
the group is ``Plan.quota * slots`` CPUs. One group needs no cgroup per slot to be made,
filled and emptied as slots come and go, and the scheduler may give a slot's unused share
to another (a job waiting on I/O): the heat follows the total, which is what the room
feels. The price is that the share between slots is not enforced; it is not needed.

v2 hands a controller to a child only through the parent's ``cgroup.subtree_control``, and
only if the parent holds no processes. The group enables ``cpu`` on the way down from the
hierarchy's root where it is not yet; under systemd (``Delegate=yes``, parent = the
service's cgroup) the agent first moves itself into ``agent_leaf``, a sibling of the group.

Restoring: directories the agent made are removed (deepest first) and controllers it enabled
are disabled again; files of a group that existed before are written back. Each change is
in the ``RestoreRecord`` before it is made, so the next start after a crash thaws the group,
kills what a crashed run left in it, and puts the rest back. The agent leaf is kept: the
agent itself is in it, and systemd removes it with the service.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qrad_agent.actuators.base import LeverError, LeverInfo
from qrad_agent.actuators.restore import RestoreRecord
from qrad_agent.actuators.settings import CgroupConfig
from qrad_agent.core.models import Plan

log = logging.getLogger(__name__)

RECORD_NAME = "cgroup"
RECHECK_EVERY = 30
MIN_QUOTA_US = 1000  # the kernel's floor for a CFS quota and period
_V1_CPU_NAMES = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


@dataclass(frozen=True)
class Mounts:
    """Where the hierarchies the agent can use are mounted under the cgroup root."""

    root: Path
    v2: Path | None
    v2_controllers: frozenset[str]
    v1_cpu: Path | None
    v1_freezer: Path | None


def find_mounts(root: Path) -> Mounts:
    root = Path(root)
    v2: Path | None = None
    for candidate in (root, root / "unified"):
        if (candidate / "cgroup.controllers").is_file():
            v2 = candidate
            break
    controllers: frozenset[str] = frozenset()
    if v2 is not None:
        with contextlib.suppress(OSError):
            controllers = frozenset((v2 / "cgroup.controllers").read_text().split())
    v1_cpu = next(
        (root / n for n in _V1_CPU_NAMES if (root / n / "cpu.cfs_quota_us").is_file()), None
    )
    freezer = root / "freezer"
    v1_freezer = (
        freezer
        if (freezer / "cgroup.procs").is_file() and not (freezer / "cgroup.controllers").exists()
        else None
    )
    return Mounts(root, v2, controllers, v1_cpu, v1_freezer)


def _kernel_at_least(major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (major, minor)


@dataclass(frozen=True)
class _Use:
    """One hierarchy the group uses for one purpose."""

    version: int  # 1 or 2
    mount: Path
    group: Path  # mount / parent / name


class WorkerCgroup:
    """The cgroup the workers run in, in every hierarchy the agent uses."""

    def __init__(
        self, cfg: CgroupConfig, root: Path, record: RestoreRecord | None = None
    ) -> None:
        self.cfg = cfg
        self.mounts = find_mounts(root)
        self._record = record
        self.quota_use, self.quota_why = self._choose_quota()
        self.freeze_use, self.freeze_why = self._choose_freeze()
        self._ready = False
        self._memory: dict[str, str] = {}  # what ensure() changed, for a run without a record
        if record is not None and record.originals(RECORD_NAME):
            try:
                self._restore_recorded(record.originals(RECORD_NAME), kill=True)
                record.forget(RECORD_NAME)
                log.warning("cgroup: cleaned up the worker cgroup a previous run left")
            except (LeverError, OSError) as exc:
                log.error("cgroup: could not clean up what a previous run left: %s", exc)

    # -- what the board offers --------------------------------------------------------------
    def _choose_quota(self) -> tuple[_Use | None, str]:
        m, want = self.mounts, self.cfg.version
        if not self.cfg.enabled:
            return None, "disabled in config (actuators.cgroups.enabled = false)"
        reasons = []
        if want in ("auto", "v2"):
            if m.v2 is None:
                reasons.append(f"cgroup v2 is not mounted under {m.root}")
            elif "cpu" not in m.v2_controllers:
                bound = " (it is bound to the v1 hierarchy)" if m.v1_cpu else ""
                reasons.append(f"cgroup v2 at {m.v2} has no cpu controller{bound}")
            else:
                return _Use(2, m.v2, m.v2 / self.cfg.parent / self.cfg.name), ""
        if want in ("auto", "v1"):
            if m.v1_cpu is None:
                reasons.append(f"the cgroup v1 cpu controller is not mounted under {m.root}")
            else:
                return _Use(1, m.v1_cpu, m.v1_cpu / self.cfg.parent / self.cfg.name), ""
        if not m.root.is_dir():
            reasons = [f"no cgroup filesystem at {m.root} (not mounted)"]
        return None, "; ".join(reasons)

    def _choose_freeze(self) -> tuple[_Use | None, str]:
        m, want = self.mounts, self.cfg.version
        if not self.cfg.enabled:
            return None, "disabled in config (actuators.cgroups.enabled = false)"
        if not self.cfg.freeze:
            return None, "disabled in config (actuators.cgroups.freeze = false)"
        reasons = []
        if want in ("auto", "v2"):
            if m.v2 is None:
                reasons.append(f"cgroup v2 is not mounted under {m.root}")
            elif not _kernel_at_least(5, 2):
                reasons.append("cgroup.freeze needs Linux 5.2 or later")
            else:
                return _Use(2, m.v2, m.v2 / self.cfg.parent / self.cfg.name), ""
        if want in ("auto", "v1"):
            if m.v1_freezer is None:
                reasons.append(f"the cgroup v1 freezer is not mounted under {m.root}")
            else:
                return _Use(1, m.v1_freezer, m.v1_freezer / self.cfg.parent / self.cfg.name), ""
        if not m.root.is_dir():
            reasons = [f"no cgroup filesystem at {m.root} (not mounted)"]
        return None, "; ".join(reasons)

    def uses(self) -> list[_Use]:
        """The hierarchies a worker joins (each group once)."""
        out: list[_Use] = []
        for use in (self.quota_use, self.freeze_use):
            if use is not None and all(u.group != use.group for u in out):
                out.append(use)
        return out

    def why_unusable(self, use: _Use | None, why: str) -> str:
        """Why the group cannot be made or changed in ``use``'s hierarchy ("" if it can)."""
        if use is None:
            return why
        probe = use.group
        while not probe.exists() and probe != use.mount:
            probe = probe.parent
        try:
            st = os.statvfs(probe)
        except OSError as exc:
            return f"cannot look at {probe}: {exc.strerror}"
        if st.f_flag & os.ST_RDONLY:
            return f"{use.mount} is mounted read-only (a container without cgroup delegation?)"
        if not os.access(probe, os.W_OK):
            return f"permission denied: cannot create or change cgroups in {probe} (run as root)"
        return ""

    def quota_info(self) -> LeverInfo:
        use = self.quota_use
        why = self.why_unusable(use, self.quota_why)
        if use is None or why:
            return LeverInfo("quota", False, why)
        files = "cpu.max" if use.version == 2 else "cpu.cfs_quota_us"
        return LeverInfo("quota", True, range={
            "version": use.version, "group": str(use.group), "file": files,
            "period_us": self.cfg.period_us, "min_quota_us": MIN_QUOTA_US, "scope": "group",
        })

    def freeze_info(self) -> LeverInfo:
        use = self.freeze_use
        why = self.why_unusable(use, self.freeze_why)
        if use is None or why:
            return LeverInfo("freeze", False, why)
        files = "cgroup.freeze" if use.version == 2 else "freezer.state"
        return LeverInfo("freeze", True, range={
            "version": use.version, "group": str(use.group), "file": files,
        })

    # -- making the group --------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the group (and what it needs) in every hierarchy used; idempotent."""
        if self._ready:
            return
        uses = self.uses()
        if not uses:
            raise LeverError(
                f"no usable cgroup: quota: {self.quota_why}; freeze: {self.freeze_why}"
            )
        for use in uses:
            why = self.why_unusable(use, "")
            if why:
                raise LeverError(why)
        plan: dict[str, str] = {}
        for use in uses:
            for d in _missing_dirs(use.mount, use.group):
                plan[f"mkdir:{d}"] = "created"
            if use.version == 1 and use.group.is_dir() and use is self.quota_use:
                for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"):
                    plan[f"file:{use.group / name}"] = _read(use.group / name)
            if use.version == 2 and use.group.is_dir() and use is self.quota_use:
                plan[f"file:{use.group / 'cpu.max'}"] = _read(use.group / "cpu.max")
        q = self.quota_use
        if q is not None and q.version == 2:
            for d in _ancestors(q.mount, q.group.parent):
                if "cpu" not in _read(d / "cgroup.subtree_control").split():
                    plan[f"subtree:{d}"] = "cpu"
        self._remember(plan)
        for use in uses:
            for d in _missing_dirs(use.mount, use.group):
                _mkdir(d)
        if q is not None and q.version == 2:
            if self.cfg.agent_leaf:
                self._move_self(q.group.parent / self.cfg.agent_leaf)
            for d in _ancestors(q.mount, q.group.parent):
                if "cpu" not in _read(d / "cgroup.subtree_control").split():
                    _write(d / "cgroup.subtree_control", "+cpu", hint=_subtree_hint(d))
            if not (q.group / "cpu.max").exists():
                raise LeverError(f"{q.group} has no cpu.max although cpu is enabled above it")
        if q is not None and q.version == 1 and self.cfg.period_us != _read_int(
            q.group / "cpu.cfs_period_us"
        ):
            _write(q.group / "cpu.cfs_period_us", str(self.cfg.period_us))
        f = self.freeze_use
        if f is not None and f.version == 2 and not (f.group / "cgroup.freeze").exists():
            raise LeverError(f"{f.group} has no cgroup.freeze: the kernel is older than 5.2")
        self._ready = True

    def _move_self(self, leaf: Path) -> None:
        if not leaf.is_dir():
            _mkdir(leaf)
        _write(leaf / "cgroup.procs", str(os.getpid()))

    def _remember(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self._memory.setdefault(key, value)  # first wins, as in the record
        if self._record is None or not values:
            return
        try:
            self._record.remember_all(RECORD_NAME, values)
        except OSError as exc:
            raise LeverError(
                f"cannot save what the cgroup setup changes to {self._record.path}: {exc}; "
                "nothing was changed"
            ) from exc

    # -- processes ---------------------------------------------------------------------------
    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` files a worker writes its pid to (before it execs)."""
        return [u.group / "cgroup.procs" for u in self.uses()]

    def add(self, pid: int) -> None:
        self.ensure()
        for path in self.procs_files():
            _write(path, str(pid))

    def pids(self) -> set[int]:
        out: set[int] = set()
        for use in self.uses():
            try:
                out.update(int(t) for t in (use.group / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                raise LeverError(f"cannot list {use.group / 'cgroup.procs'}: {exc}") from exc
        return out

    # -- quota -------------------------------------------------------------------------------
    def set_quota(self, quota_us: int | None) -> None:
        """``quota_us`` of CPU time per period for the whole group; None = unlimited."""
        use = self.quota_use
        if use is None:
            raise LeverError(f"no cgroup quota here: {self.quota_why}")
        self.ensure()
        period = self.cfg.period_us
        if quota_us is not None:
            quota_us = max(MIN_QUOTA_US, quota_us)
        if use.version == 2:
            _write(use.group / "cpu.max", f"{'max' if quota_us is None else quota_us} {period}")
        else:
            _write(use.group / "cpu.cfs_quota_us", str(-1 if quota_us is None else quota_us))

    def quota(self) -> tuple[int | None, int]:
        """(quota_us or None for unlimited, period_us) as the kernel holds them."""
        use = self.quota_use
        if use is None:
            raise LeverError(f"no cgroup quota here: {self.quota_why}")
        if use.version == 2:
            text = _read(use.group / "cpu.max").split()
            if len(text) != 2:
                raise LeverError(f"{use.group / 'cpu.max'} holds {' '.join(text)!r}")
            return (None if text[0] == "max" else int(text[0])), int(text[1])
        q = _read_int(use.group / "cpu.cfs_quota_us")
        return (None if q < 0 else q), _read_int(use.group / "cpu.cfs_period_us")

    # -- freezer -----------------------------------------------------------------------------
    def freeze(self) -> None:
        use = self._freezer()
        self.ensure()
        if use.version == 2:
            _write(use.group / "cgroup.freeze", "1")
        else:
            _write(use.group / "freezer.state", "FROZEN")

    def thaw(self) -> None:
        use = self._freezer()
        if not use.group.is_dir():
            return
        if use.version == 2:
            _write(use.group / "cgroup.freeze", "0")
        else:
            _write(use.group / "freezer.state", "THAWED")

    def frozen(self) -> bool:
        """Whether every process in the group is frozen (the freeze has completed)."""
        use = self._freezer()
        if not use.group.is_dir():
            return False
        if use.version == 2:
            events = dict(
                line.split(None, 1) for line in _read(use.group / "cgroup.events").splitlines()
                if " " in line
            )
            return events.get("frozen", "0").strip() == "1"
        return _read(use.group / "freezer.state") == "FROZEN"

    def wait_frozen(self, timeout_s: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.frozen():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _freezer(self) -> _Use:
        if self.freeze_use is None:
            raise LeverError(f"no cgroup freezer here: {self.freeze_why}")
        return self.freeze_use

    # -- emptying and removing ---------------------------------------------------------------
    def kill_all(self, timeout_s: float = 2.0) -> set[int]:
        """SIGKILL every process in the group; returns the pids still there after the wait."""
        return _empty([u.group for u in self.uses()], timeout_s)

    def release(self) -> None:
        """Thaw, and undo what ``ensure`` did once no process is left; safe to call often."""
        if self.freeze_use is not None:
            self._try(self.thaw)
        recorded = self._record.originals(RECORD_NAME) if self._record is not None else {}
        values = recorded or dict(self._memory)
        if not values:
            self._ready = False
            return
        if self.pids():
            log.info("cgroup: %s still holds processes; left in place", self.uses()[0].group)
            return
        self._restore_recorded(values, kill=False)
        if self._record is not None:
            try:
                self._record.forget(RECORD_NAME)
            except OSError as exc:
                raise LeverError(
                    f"cgroup removed, but the record {self._record.path} could not be cleared: "
                    f"{exc}"
                ) from exc
        self._memory.clear()
        self._ready = False

    def _restore_recorded(self, values: dict[str, str], kill: bool) -> None:
        made = [Path(k.partition(":")[2]) for k in values if k.startswith("mkdir:")]
        if kill:
            # whatever a crashed run left in its groups is a worker nobody supervises now;
            # the groups are those it recorded, whatever this run's config says
            groups = {u.group for u in self.uses()} | set(made)
            left = _empty(sorted(g for g in groups if (g / "cgroup.procs").is_file()), 2.0)
            if left:
                raise LeverError(f"processes {sorted(left)} would not leave the worker cgroup")
        elif self.freeze_use is not None:
            self._try(self.thaw)
        errors = []
        for key, value in values.items():
            kind, _, where = key.partition(":")
            if kind == "file":
                try:
                    path = Path(where)
                    if path.exists() and _read(path) != value:
                        # cpu.max is written as "QUOTA PERIOD", which reads back the same way
                        _write(path, value)
                except LeverError as exc:
                    errors.append(str(exc))
        for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(f"cannot remove {d}: {exc.strerror}")
        subtrees = sorted((Path(k.partition(":")[2]) for k in values if k.startswith("subtree:")),
                          key=lambda p: len(p.parts), reverse=True)
        for d in subtrees:
            try:
                if d.is_dir() and "cpu" in _read(d / "cgroup.subtree_control").split():
                    _write(d / "cgroup.subtree_control", "-cpu")
            except LeverError as exc:
                # another cgroup below it may use cpu by now: leaving it on is harmless
                log.info("cgroup: left cpu enabled in %s: %s", d, exc)
        if errors:
            raise LeverError("cgroup: restore incomplete: " + "; ".join(errors))

    @staticmethod
    def _try(step: Any) -> bool:
        try:
            step()
            return True
        except LeverError as exc:
            log.warning("cgroup: %s", exc)
            return False


class QuotaLever:
    """CPU bandwidth of the workers' cgroup: ``Plan.quota * slots`` CPUs for the whole group."""

    name = "quota"

    def __init__(self, cgroup: WorkerCgroup, cpus: int | None = None) -> None:
        self.cgroup = cgroup
        self.cpus = cpus or os.cpu_count() or 1
        self._asked: int | None = -1  # quota_us last written; -1 = nothing written yet
        self._ticks = 0
        self._slots = 0

    def discover(self) -> LeverInfo:
        return self.cgroup.quota_info()

    def apply(self, plan: Plan) -> None:
        if plan.slots <= 0:
            return  # nothing runs: whatever the quota is, it costs nothing to keep
        self._slots = plan.slots
        want = self.quota_us(plan)
        self._ticks += 1
        if want == self._asked and self._ticks < RECHECK_EVERY:
            return
        if want == self._asked:
            self._ticks = 0
            if self.cgroup.quota()[0] == want:
                return
            log.info("quota: the group's quota changed outside the agent; writing it again")
        self.cgroup.set_quota(want)
        self._asked = want
        self._ticks = 0

    def quota_us(self, plan: Plan) -> int | None:
        """The group's quota for ``plan``: ``quota x slots`` CPUs; None (unlimited) only when
        that is every CPU the board has. At full quota on fewer slots it is a limit all the
        same: the group's jobs may have more threads than the plan has slots (a job wider
        than the free slots starts throttled, decision 0017), and the heat must stay the
        plan's."""
        cores = max(min(plan.quota, 1.0), 0.0) * plan.slots
        if cores >= self.cpus:
            return None
        return max(MIN_QUOTA_US, round(cores * self.cgroup.cfg.period_us))

    def read_back(self) -> dict[str, Any]:
        use = self.cgroup.quota_use
        if use is None or not use.group.is_dir():
            return {"quota": 1.0, "cores": None, "group": None}
        quota_us, period = self.cgroup.quota()
        cores = None if quota_us is None else quota_us / period
        share = 1.0 if cores is None else (cores / self._slots if self._slots else None)
        return {"quota": share, "cores": cores, "quota_us": quota_us, "period_us": period,
                "version": use.version, "group": str(use.group)}

    def restore(self) -> None:
        use = self.cgroup.quota_use
        if use is not None and use.group.is_dir() and self._asked != -1:
            self.cgroup.set_quota(None)
        self._asked = -1
        self._ticks = 0
        self.cgroup.release()


# -- file helpers ------------------------------------------------------------------------------


def _missing_dirs(mount: Path, group: Path) -> list[Path]:
    """Directories from just below ``mount`` down to ``group`` that do not exist yet."""
    rel = group.relative_to(mount)
    out, d = [], mount
    for part in rel.parts:
        d = d / part
        if not d.exists():
            out.append(d)
    return out


def _ancestors(mount: Path, parent: Path) -> list[Path]:
    """``mount`` and every directory down to ``parent``, top first."""
    out = [mount]
    d = mount
    for part in parent.relative_to(mount).parts:
        d = d / part
        out.append(d)
    return out


def _subtree_hint(d: Path) -> str:
    return (
        f"{d} may hold processes: cgroup v2 lets only cgroups without processes enable "
        "controllers for their children; under systemd give the service Delegate=yes, set "
        "cgroups.parent to its cgroup and cgroups.agent_leaf"
    )


def _mkdir(d: Path) -> None:
    try:
        d.mkdir()
    except FileExistsError:
        pass
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM):
            why += " (run as root, or delegate the cgroup sub-tree to the agent)"
        raise LeverError(f"cannot create the cgroup {d}: {why}") from exc


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise LeverError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_int(path: Path) -> int:
    text = _read(path)
    try:
        return int(text)
    except ValueError:
        raise LeverError(f"{path} holds {text!r}, expected a whole number") from None


def _write(path: Path, value: str, hint: str = "") -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM):
            why += " (run as root)"
        elif exc.errno == errno.ESRCH:
            why = "no such process"
        elif exc.errno == errno.EINVAL:
            why += ": the kernel refused the value"
        elif exc.errno in (errno.EBUSY, errno.EOPNOTSUPP) and hint:
            why += f": {hint}"
        raise LeverError(f"cannot write {value!r} to {path}: {why}") from exc


def _empty(groups: list[Path], timeout_s: float) -> set[int]:
    """Kill every process in ``groups``; the pids still there after ``timeout_s``.

    A group is thawed first: a task frozen by the v1 freezer cannot die, and one that is
    not frozen cannot fork once it has SIGKILL pending. v2's ``cgroup.kill`` (Linux 5.14)
    does it in one write, races with fork included.
    """

    def pids() -> set[int]:
        out: set[int] = set()
        for g in groups:
            try:
                out.update(int(t) for t in (g / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
        return out

    if not pids():
        return set()
    for g in groups:
        for name, value in (("cgroup.freeze", "0"), ("freezer.state", "THAWED")):
            if (g / name).is_file():
                try:
                    _write(g / name, value)
                except LeverError as exc:
                    log.warning("cgroup: %s", exc)
        if (g / "cgroup.kill").is_file():
            try:
                _write(g / "cgroup.kill", "1")
            except LeverError as exc:
                log.warning("cgroup: %s", exc)
    deadline = time.monotonic() + timeout_s
    while (left := pids()) and time.monotonic() < deadline:
        for pid in left:
            _kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    return pids()


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
