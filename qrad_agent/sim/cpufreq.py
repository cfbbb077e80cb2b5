"""An emulated cpufreq (and intel_pstate) sysfs tree that answers writes as the kernel does.

The tree is made of real files in a directory, laid out as under ``/sys``, so drivers use the
plain ``Sysfs`` code paths (globbing, reading, checking permissions). Writes to the limit
attributes go through ``EmulatedCpufreqSysfs.write``, which applies the kernel's rules and
updates the files to what the kernel would then show.

What is emulated, after ``drivers/cpufreq/cpufreq.c`` of current kernels (5.3 and later,
where the limits became frequency QoS requests):

* A write to ``scaling_min_freq``/``scaling_max_freq`` is parsed like ``kstrtoul(buf, 0)``
  (decimal, ``0x`` hex, leading-``0`` octal, one trailing newline); anything else fails with
  EINVAL and changes nothing. Values that do not fit 32 bits are refused with EINVAL here as
  well: the kernel narrows them to a signed QoS value, which no caller should rely on.
* The written value becomes the policy's *request*; the kernel keeps both requests and
  recomputes the effective limits from them on every change (``cpufreq_set_policy``):
  max = clamp(req_max, cpuinfo_min, cpuinfo_max); min = clamp(req_min, cpuinfo_min, max);
  then max resolves to the highest table frequency <= max (CPUFREQ_RELATION_H) and min to the
  lowest >= min (CPUFREQ_RELATION_L); a min that resolves above max is lowered to max.
  Because the request is kept, lowering max below min and raising it again brings the old
  min back, as on a real board.
* With ``refuse_min_above_max`` set, a write that would put min above max fails with EINVAL
  instead, as kernels before 5.3 did: the reason tools write the min first when lowering.
* ``scaling_governor`` accepts only a name listed in ``scaling_available_governors``.
* Files carry the kernel's permission bits, and a write to a file without a write bit fails
  with EACCES even for root, as kernfs refuses to open such attributes for writing.
* ``scaling_cur_freq`` shows the frequency a fully loaded CPU runs at: the effective max
  (further limited by intel_pstate's ``max_perf_pct``). A radiator's CPUs are busy by design.

intel_pstate, after ``drivers/cpufreq/intel_pstate.c``: ``max_perf_pct`` is clamped to
[min_perf_pct, 100], ``min_perf_pct`` to [the hardware floor, max_perf_pct], where the floor
is the lowest P-state as a percentage of the turbo P-state, rounded up. Both parse like
``sscanf("%u")``. The cap they set is ceil(turbo_pstate * max_perf_pct / 100) P-states of
100 MHz. ``no_turbo`` is stored (any non-zero number reads back 1) but its effect is not
modelled: the emulator knows no base frequency. Mode switches through ``status`` are not
emulated.

Attaching to an existing tree (``EmulatedCpufreqSysfs(root)``) takes the files as the
kernel's current requests, so a second process can drive a tree that another one made.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import math
import os
import re
import stat
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from qrad_agent.sysfs import Sysfs

CPU_DIR = "devices/system/cpu"
PSTATE_STEP_KHZ = 100_000  # one intel P-state ratio step (bus clock 100 MHz)
_U32_MAX = 0xFFFF_FFFF
_TABLE_STEP_KHZ = 100_000
_GOVERNORS = "conservative ondemand userspace powersave performance schedutil"
_PSTATE_GOVERNORS = "performance powersave"
_INTEL_DRIVERS = ("intel_pstate", "intel_cpufreq")
_RW = 0o644
_RO = 0o444


@dataclass
class _Policy:
    dir: Path  # resolved
    cpuinfo_min: int
    cpuinfo_max: int
    table: list[int]  # ascending; empty when the driver has no frequency table
    req_min: int
    req_max: int
    governor: str
    governors: frozenset[str]
    min: int = 0
    max: int = 0
    cur: int = 0
    shown: dict[str, str] = field(default_factory=dict)  # attribute -> text as read
    mirror: dict[str, tuple[int, int]] = field(default_factory=dict)  # attribute -> fd, size


@dataclass
class _Pstate:
    dir: Path
    status: str
    floor_pct: int
    turbo_pstate: int
    max_pct: int = 100
    min_pct: int = 0
    no_turbo: int = 0
    shown: dict[str, str] = field(default_factory=dict)
    mirror: dict[str, tuple[int, int]] = field(default_factory=dict)


_POLICY_ATTRS = ("scaling_min_freq", "scaling_max_freq", "scaling_governor", "scaling_cur_freq")
_PSTATE_ATTRS = ("max_perf_pct", "min_perf_pct", "no_turbo", "status")


class EmulatedCpufreqSysfs(Sysfs):
    """The kernel side of the tree under ``root``.

    Reads of the emulated attributes are answered from the emulator's state, as the kernel
    answers them from its own; the files mirror that state for any other reader (another
    process, a person with ``cat``). The mirror is kept through open descriptors, because
    truncating opens cost ~100 µs each and the simulator moves the cap every few ticks.
    Only one emulator should drive a tree at a time; other processes read the files.
    """

    def __init__(self, root: Path | str) -> None:
        super().__init__(root)
        # For tests: every write attempt in order, and the number of reads (bounded so a
        # simulated week does not grow it without limit).
        self.writes: deque[tuple[str, str]] = deque(maxlen=1000)
        self.reads = 0
        self.refuse_min_above_max = False
        self._policies: dict[Path, _Policy] = {}
        self._pstate: _Pstate | None = None
        self._targets: dict[str, tuple[_Policy | _Pstate, str, str] | None] = {}
        self._effective_max = 0
        self._fds: list[int] = []
        weakref.finalize(self, _close_all, self._fds)
        self._load()

    def close(self) -> None:
        """Close the mirror's descriptors (also done when the emulator is collected).

        The emulator stays usable: a later change reopens what it needs.
        """
        _close_all(self._fds)
        owners: list[_Policy | _Pstate] = [*self._policies.values()]
        if self._pstate is not None:
            owners.append(self._pstate)
        for obj in owners:
            obj.mirror.clear()

    # -- the Sysfs surface ---------------------------------------------------------------
    def read(self, rel: str) -> str:
        self.reads += 1
        target = self._target(rel)
        if target is not None:
            text = target[0].shown.get(target[1])
            if text is not None:
                return text
        return super().read(rel)

    def write(self, rel: str, value: str | int) -> None:
        buf = f"{value}\n"  # what the base class would hand the kernel
        self.writes.append((rel, str(value)))
        target = self._target(rel)
        path = target[2] if target is not None else str(self.path(rel))
        mode = os.stat(path).st_mode  # FileNotFoundError, as from open()
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not mode & 0o222 or not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        if target is None:
            super().write(rel, value)
        elif isinstance(target[0], _Policy):
            self._write_policy(target[0], target[1], buf, path)
        else:
            self._write_pstate(target[0], target[1], buf, path)

    # -- for the simulator -----------------------------------------------------------------
    def effective_max_khz(self) -> int:
        """The frequency a loaded CPU runs at now: the lowest effective cap over policies."""
        return self._effective_max

    # -- kernel rules ----------------------------------------------------------------------
    def _write_policy(self, pol: _Policy, attr: str, buf: str, where: str) -> None:
        if attr == "scaling_cur_freq":
            # no store method: kernfs refuses whatever the mode bits say
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), where)
        if attr == "scaling_governor":
            words = buf.split()
            name = words[0] if words else ""
            if name not in pol.governors:
                raise OSError(errno.EINVAL, f"unknown governor {name!r}", where)
            pol.governor = name
            self._show(pol, attr, name)
            return
        value = _kstrtoul(buf, where)
        if self.refuse_min_above_max and (
            (attr == "scaling_max_freq" and value < pol.min)
            or (attr == "scaling_min_freq" and value > pol.max)
        ):
            raise OSError(errno.EINVAL, "min would exceed max", where)
        if attr == "scaling_max_freq":
            pol.req_max = value
        else:
            pol.req_min = value
        self._settle(pol)
        self._refresh_effective()

    def _settle(self, pol: _Policy) -> None:
        hi = min(max(pol.req_max, pol.cpuinfo_min), pol.cpuinfo_max)
        lo = min(max(pol.req_min, pol.cpuinfo_min), hi)
        hi = _resolve_high(pol.table, hi)
        lo = _resolve_low(pol.table, lo)
        pol.max = hi
        pol.min = min(lo, hi)
        pol.cur = pol.max
        if self._pstate is not None and self._pstate.status != "off":
            pol.cur = max(pol.min, min(pol.max, self._pstate_cap_khz(pol)))
        self._show(pol, "scaling_max_freq", str(pol.max))
        self._show(pol, "scaling_min_freq", str(pol.min))
        self._show(pol, "scaling_cur_freq", str(pol.cur))

    def _pstate_cap_khz(self, pol: _Policy) -> int:
        ps = self._pstate
        assert ps is not None
        perf = math.ceil(ps.turbo_pstate * ps.max_pct / 100)
        return max(pol.cpuinfo_min, perf * PSTATE_STEP_KHZ)

    def _write_pstate(self, ps: _Pstate, attr: str, buf: str, where: str) -> None:
        if attr == "status":
            if buf.strip() != ps.status:
                raise OSError(errno.EOPNOTSUPP, "the emulator does not switch modes", where)
            return
        if attr == "no_turbo":
            text = buf[:-1] if buf.endswith("\n") else buf
            if not (text.isascii() and text.isdigit()):
                raise OSError(errno.EINVAL, f"not a number: {text!r}", where)
            ps.no_turbo = 1 if int(text) else 0
            self._show(ps, attr, str(ps.no_turbo))
            return
        m = re.match(r"\s*([0-9]+)", buf)
        if m is None:
            raise OSError(errno.EINVAL, f"not a number: {buf.strip()!r}", where)
        value = int(m.group(1))
        if attr == "max_perf_pct":
            ps.max_pct = min(max(value, ps.min_pct), 100)
            self._show(ps, attr, str(ps.max_pct))
        else:
            ps.min_pct = min(max(value, ps.floor_pct), ps.max_pct)
            self._show(ps, attr, str(ps.min_pct))
        for pol in self._policies.values():
            self._settle(pol)
        self._refresh_effective()

    def _refresh_effective(self) -> None:
        self._effective_max = min((p.cur for p in self._policies.values()), default=0)

    def _show(self, obj: _Policy | _Pstate, attr: str, text: str) -> None:
        if obj.shown.get(attr) == text:
            return
        obj.shown[attr] = text
        data = f"{text}\n".encode()
        fd, size = obj.mirror.get(attr, (-1, 0))
        if fd < 0:
            fd = _open_for_mirror(obj.dir / attr)
            self._fds.append(fd)
            size = os.fstat(fd).st_size
        os.pwrite(fd, data, 0)
        if len(data) < size:
            os.ftruncate(fd, len(data))
        obj.mirror[attr] = (fd, len(data))

    def _target(self, rel: str) -> tuple[_Policy | _Pstate, str, str] | None:
        """The emulated attribute behind ``rel`` (through symlinks), and its file."""
        try:
            return self._targets[rel]
        except KeyError:
            pass
        real = self.path(rel).resolve()
        found: tuple[_Policy | _Pstate, str, str] | None = None
        pol = self._policies.get(real.parent)
        if pol is not None and real.name in _POLICY_ATTRS:
            found = (pol, real.name, str(real))
        ps = self._pstate
        if ps is not None and real.parent == ps.dir and real.name in _PSTATE_ATTRS:
            found = (ps, real.name, str(real))
        self._targets[rel] = found
        return found

    # -- loading an existing tree ------------------------------------------------------------
    def _load(self) -> None:
        cpu = self.path(CPU_DIR)
        dirs = sorted(cpu.glob("cpufreq/policy*"), key=_natural)
        if not dirs:
            found = sorted(cpu.glob("cpu[0-9]*/cpufreq"), key=_natural)
            dirs = [d for d in found if not d.is_symlink()]
        for d in dirs:
            try:
                pol = _load_policy(d.resolve())
            except (OSError, ValueError):
                continue  # a broken policy (as some tests make) is left to plain file IO
            self._policies[pol.dir] = pol
        pdir = cpu / "intel_pstate"
        if (pdir / "status").exists() and self._policies:
            first = next(iter(self._policies.values()))
            turbo = max(1, first.cpuinfo_max // PSTATE_STEP_KHZ)
            lowest = max(1, first.cpuinfo_min // PSTATE_STEP_KHZ)
            ps = _Pstate(
                dir=pdir.resolve(),
                status=(pdir / "status").read_text().strip(),
                floor_pct=math.ceil(lowest * 100 / turbo),
                turbo_pstate=turbo,
            )
            ps.shown["status"] = ps.status
            if ps.status != "off":
                ps.max_pct = int((pdir / "max_perf_pct").read_text())
                ps.min_pct = int((pdir / "min_perf_pct").read_text())
                ps.no_turbo = int((pdir / "no_turbo").read_text())
                ps.shown.update(
                    max_perf_pct=str(ps.max_pct),
                    min_perf_pct=str(ps.min_pct),
                    no_turbo=str(ps.no_turbo),
                )
            self._pstate = ps
        for pol in self._policies.values():
            self._settle(pol)
        self._refresh_effective()


def _load_policy(d: Path) -> _Policy:
    table_file = d / "scaling_available_frequencies"
    table = sorted(int(t) for t in table_file.read_text().split()) if table_file.exists() else []
    govs = d / "scaling_available_governors"
    names = govs.read_text().split() if govs.exists() else _GOVERNORS.split()
    pol = _Policy(
        dir=d,
        cpuinfo_min=int((d / "cpuinfo_min_freq").read_text()),
        cpuinfo_max=int((d / "cpuinfo_max_freq").read_text()),
        table=table,
        req_min=int((d / "scaling_min_freq").read_text()),
        req_max=int((d / "scaling_max_freq").read_text()),
        governor=(d / "scaling_governor").read_text().strip(),
        governors=frozenset(names),
    )
    pol.shown = {
        name: (d / name).read_text().strip()
        for name in _POLICY_ATTRS
        if (d / name).is_file()
    }
    return pol


def _open_for_mirror(path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY)
    except PermissionError:
        # a 0444 attribute owned by an unprivileged user running the emulator: the kernel
        # can always update its own files, so lift the mode for the open only
        mode = os.stat(path).st_mode
        os.chmod(path, mode | stat.S_IWUSR)
        try:
            return os.open(path, os.O_WRONLY)
        finally:
            os.chmod(path, mode)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def make_cpufreq_tree(
    root: Path,
    cpus: int = 4,
    min_khz: int = 800_000,
    max_khz: int = 3_000_000,
    available_khz: list[int] | None = None,
    driver: str = "acpi-cpufreq",
    intel_pstate: bool = False,
    *,
    per_cpu_dirs: bool = False,
) -> EmulatedCpufreqSysfs:
    """Lay out ``root/devices/system/cpu`` as a kernel with ``driver`` would, one policy per CPU.

    ``available_khz``: None gives a table in 100 MHz steps from ``min_khz`` (but no table for
    intel_pstate/intel_cpufreq, which never have one); ``[]`` gives no
    ``scaling_available_frequencies`` file. ``intel_pstate`` adds
    ``devices/system/cpu/intel_pstate``, in mode active for driver intel_pstate, passive for
    intel_cpufreq and off otherwise. ``per_cpu_dirs`` lays out the old kernels' real
    ``cpuN/cpufreq`` directories with no ``cpufreq/policyN``.
    """
    if cpus < 1:
        raise ValueError(f"cpus must be at least 1, got {cpus}")
    if not 0 < min_khz <= max_khz:
        raise ValueError(f"need 0 < min_khz <= max_khz, got {min_khz} and {max_khz}")
    if driver == "intel_pstate" and not intel_pstate:
        raise ValueError("driver 'intel_pstate' needs intel_pstate=True")
    if available_khz is None:
        if driver in _INTEL_DRIVERS:
            table: list[int] = []
        else:
            table = list(range(min_khz, max_khz + 1, _TABLE_STEP_KHZ))
            if table[-1] != max_khz:
                table.append(max_khz)
    else:
        table = sorted(set(available_khz))
        outside = [f for f in table if not min_khz <= f <= max_khz]
        if outside:
            raise ValueError(
                f"available_khz {outside} lie outside [min_khz, max_khz] = [{min_khz}, {max_khz}]"
            )
    root = Path(root)
    cpu = root / CPU_DIR
    governors = _PSTATE_GOVERNORS if driver == "intel_pstate" else _GOVERNORS
    governor = "powersave" if driver == "intel_pstate" else "schedutil"
    for n in range(cpus):
        (cpu / f"cpu{n}").mkdir(parents=True, exist_ok=True)
        d = cpu / f"cpu{n}" / "cpufreq" if per_cpu_dirs else cpu / "cpufreq" / f"policy{n}"
        d.mkdir(parents=True, exist_ok=True)
        files = {
            "affected_cpus": (str(n), _RO),
            "related_cpus": (str(n), _RO),
            "cpuinfo_min_freq": (str(min_khz), _RO),
            "cpuinfo_max_freq": (str(max_khz), _RO),
            "cpuinfo_transition_latency": ("10000", _RO),
            "scaling_driver": (driver, _RO),
            "scaling_available_governors": (governors, _RO),
            "scaling_governor": (governor, _RW),
            "scaling_min_freq": (str(min_khz), _RW),
            "scaling_max_freq": (str(max_khz), _RW),
            "scaling_cur_freq": (str(max_khz), _RO),
        }
        if table:
            # the kernel lists the table in its own order (descending for acpi-cpufreq),
            # each entry followed by a space
            files["scaling_available_frequencies"] = (
                "".join(f"{f} " for f in reversed(table)),
                _RO,
            )
        for name, (text, mode) in files.items():
            _write_file(d / name, text, mode)
        if not per_cpu_dirs:
            link = cpu / f"cpu{n}" / "cpufreq"
            if not link.is_symlink():
                link.symlink_to(Path("..") / "cpufreq" / f"policy{n}")
    if intel_pstate:
        pdir = cpu / "intel_pstate"
        pdir.mkdir(parents=True, exist_ok=True)
        status = {"intel_pstate": "active", "intel_cpufreq": "passive"}.get(driver, "off")
        _write_file(pdir / "status", status, _RW)
        if status != "off":
            turbo = max(1, max_khz // PSTATE_STEP_KHZ)
            lowest = max(1, min_khz // PSTATE_STEP_KHZ)
            _write_file(pdir / "max_perf_pct", "100", _RW)
            _write_file(pdir / "min_perf_pct", str(math.ceil(lowest * 100 / turbo)), _RW)
            _write_file(pdir / "no_turbo", "0", _RW)
            _write_file(pdir / "num_pstates", str(turbo - lowest + 1), _RO)
    return EmulatedCpufreqSysfs(root)


def _kstrtoul(buf: str, where: str) -> int:
    text = buf[:-1] if buf.endswith("\n") else buf
    if text.startswith("+"):
        text = text[1:]
    base = 10
    digits = text
    if text[:2].lower() == "0x":
        base, digits = 16, text[2:]
    elif len(text) > 1 and text[0] == "0":
        base, digits = 8, text[1:]
    allowed = {8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}[base]
    if not digits or any(c not in allowed for c in digits):
        raise OSError(errno.EINVAL, f"not a number: {text!r}", where)
    value = int(digits, base)
    if value > _U32_MAX:
        raise OSError(errno.EINVAL, f"{value} does not fit 32 bits", where)
    return value


def _resolve_high(table: list[int], khz: int) -> int:
    """CPUFREQ_RELATION_H: the highest table frequency at or below ``khz`` (else the lowest)."""
    if not table:
        return khz
    i = bisect.bisect_right(table, khz)
    return table[i - 1] if i else table[0]


def _resolve_low(table: list[int], khz: int) -> int:
    """CPUFREQ_RELATION_L: the lowest table frequency at or above ``khz`` (else the highest)."""
    if not table:
        return khz
    i = bisect.bisect_left(table, khz)
    return table[i] if i < len(table) else table[-1]


def _write_file(path: Path, text: str, mode: int | None = None) -> None:
    with open(path, "w") as f:
        f.write(f"{text}\n")
    if mode is not None:
        os.chmod(path, mode)


def _natural(p: Path) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]
