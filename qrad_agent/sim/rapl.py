"""An emulated powercap (intel-rapl) sysfs tree that answers as the kernel does.

Real files in a directory, laid out as under ``/sys``: zones live in
``devices/virtual/powercap/intel-rapl/intel-rapl:N[:M]`` and ``class/powercap`` links to
them. Drivers use the plain ``Sysfs`` paths; writes go through ``EmulatedRaplSysfs.write``,
which applies the kernel's rules and updates the files.

What is emulated, after ``drivers/powercap/powercap_sys.c`` and
``drivers/powercap/intel_rapl_common.c``:

* ``energy_uj`` counts micro-joules and wraps to 0 after ``max_energy_range_uj`` (the
  counter is the 32-bit MSR times the energy unit, so it takes every value from 0 to the
  range, both included). It has no store method and mode 0400: root only, as since 5.10.
* ``constraint_N_power_limit_uw`` takes a decimal number (``kstrtoull``, base 10); the
  driver converts it to whole power units (``power_unit_uw``, 1/8 W on most parts),
  truncating, so the file reads back the value rounded down to a unit. A value that does not
  fit the 15-bit limit field is refused with EINVAL here (kernels differ; no caller should
  rely on it). A limit locked by the firmware (``locked``) refuses every write with ENODATA
  and keeps its value.
* ``enabled`` takes 0 or 1. Files have the kernel's permission bits and a write to a file
  without a write bit fails with EACCES even for root.

Energy is added by the simulation (``add_energy``); a package's ``core`` subzone counts a
fixed share of it. The emulator keeps its state in the files (the lock as a marker file), so
attaching a second emulator to a tree (``EmulatedRaplSysfs(root)``) picks it up.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from qrad_agent.sysfs import Sysfs

CLASS_DIR = "class/powercap"
DEVICE_DIR = "devices/virtual/powercap/intel-rapl"
LOCK_MARKER = ".emulator-locked"  # not a kernel file: the emulator's memory of the lock
CORE_SHARE = 0.7  # of a package's energy counted by its core subzone
_LIMIT_FIELD_MAX = 0x7FFF  # the MSR's power limit field is 15 bits of power units
_RW = 0o644
_RO = 0o444
_ROOT_ONLY = 0o400


@dataclass
class _Zone:
    dir: Path  # resolved
    name: str
    energy_uj: int
    range_uj: int
    unit_uw: int
    locked: bool
    parent: _Zone | None = None


class EmulatedRaplSysfs(Sysfs):
    def __init__(self, root: Path | str, power_unit_uw: int = 125_000) -> None:
        super().__init__(root)
        self.power_unit_uw = power_unit_uw
        self.writes: list[tuple[str, str]] = []  # every write attempt, for tests
        self._zones: dict[Path, _Zone] = {}
        self._load()

    # -- the Sysfs surface ---------------------------------------------------------------
    def write(self, rel: str, value: str | int) -> None:
        self.writes.append((rel, str(value)))
        path = self.path(rel).resolve()
        mode = os.stat(path).st_mode  # FileNotFoundError, as from open()
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not mode & 0o222:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        zone = self._zones.get(path.parent)
        attr = path.name
        if zone is None:
            super().write(rel, value)
            return
        text = str(value).strip()
        if attr == "enabled":
            if text not in ("0", "1"):
                raise OSError(errno.EINVAL, f"enabled takes 0 or 1, not {text!r}", str(path))
            _put(path, text)
        elif attr.startswith("constraint_") and attr.endswith("_power_limit_uw"):
            if zone.locked:
                raise OSError(errno.ENODATA, os.strerror(errno.ENODATA), str(path))
            if not (text.isascii() and text.isdigit()):
                raise OSError(errno.EINVAL, f"not a decimal number: {text!r}", str(path))
            units = int(text) // zone.unit_uw
            if units > _LIMIT_FIELD_MAX:
                raise OSError(errno.EINVAL, "does not fit the limit field", str(path))
            _put(path, str(units * zone.unit_uw))
        elif attr.startswith("constraint_") and attr.endswith("_time_window_us"):
            if zone.locked:
                raise OSError(errno.ENODATA, os.strerror(errno.ENODATA), str(path))
            if not (text.isascii() and text.isdigit()):
                raise OSError(errno.EINVAL, f"not a decimal number: {text!r}", str(path))
            _put(path, text)
        else:
            super().write(rel, value)

    # -- for the simulation and tests ------------------------------------------------------
    def zones(self) -> list[str]:
        """Names of the emulated zones as under ``class/powercap`` (intel-rapl:0, …)."""
        return sorted(z.dir.name for z in self._zones.values())

    def add_energy(self, joules: float, zone: str = "intel-rapl:0") -> None:
        """Count ``joules`` on ``zone`` (and the core share on its core subzone)."""
        z = self._zone(zone)
        self._count(z, round(joules * 1e6))
        for sub in self._zones.values():
            if sub.parent is z and sub.name == "core":
                self._count(sub, round(joules * 1e6 * CORE_SHARE))

    def set_energy(self, zone: str, energy_uj: int) -> None:
        """Put the counter at ``energy_uj`` (e.g. just below the wrap, for tests)."""
        z = self._zone(zone)
        if not 0 <= energy_uj <= z.range_uj:
            raise ValueError(f"energy_uj must be in [0, {z.range_uj}], got {energy_uj}")
        z.energy_uj = energy_uj
        _put(z.dir / "energy_uj", str(energy_uj))

    def lock(self, zone: str = "intel-rapl:0", locked: bool = True) -> None:
        """Lock (or unlock) the zone's limits as firmware does: writes then fail ENODATA."""
        z = self._zone(zone)
        z.locked = locked
        marker = z.dir / LOCK_MARKER
        if locked:
            marker.write_text("")
        elif marker.exists():
            marker.unlink()

    # -- internals -------------------------------------------------------------------------
    def _zone(self, name: str) -> _Zone:
        for z in self._zones.values():
            if z.dir.name == name:
                return z
        raise KeyError(f"no emulated RAPL zone {name!r}; zones: {', '.join(self.zones())}")

    def _count(self, z: _Zone, uj: int) -> None:
        z.energy_uj = (z.energy_uj + uj) % (z.range_uj + 1)
        _put(z.dir / "energy_uj", str(z.energy_uj))

    def _load(self) -> None:
        base = self.path(DEVICE_DIR)
        if not base.is_dir():
            return
        found = sorted(base.glob("intel-rapl:*"), key=lambda p: p.name) + sorted(
            base.glob("intel-rapl:*/intel-rapl:*"), key=lambda p: p.name
        )
        for d in found:
            d = d.resolve()
            try:
                zone = _Zone(
                    dir=d,
                    name=(d / "name").read_text().strip(),
                    energy_uj=int((d / "energy_uj").read_text()),
                    range_uj=int((d / "max_energy_range_uj").read_text()),
                    unit_uw=self.power_unit_uw,
                    locked=(d / LOCK_MARKER).exists(),
                    parent=self._zones.get(d.parent),
                )
            except (OSError, ValueError):
                continue  # a broken zone (as some tests make) is left to plain file IO
            self._zones[d] = zone


def _put(path: Path, text: str) -> None:
    # the kernel can always update its own files, whatever their mode says to users
    mode = path.stat().st_mode if path.exists() else None
    if mode is not None and not mode & stat.S_IWUSR:
        os.chmod(path, mode | stat.S_IWUSR)
    try:
        with open(path, "w") as f:
            f.write(f"{text}\n")
    finally:
        if mode is not None and not mode & stat.S_IWUSR:
            os.chmod(path, stat.S_IMODE(mode))


def _file(path: Path, text: str, mode: int) -> None:
    path.write_text(f"{text}\n")
    os.chmod(path, mode)


def make_rapl_tree(
    root: Path,
    packages: int = 1,
    *,
    limit_w: float = 65.0,
    max_power_w: float = 95.0,
    short_limit_w: float = 80.0,
    max_energy_range_uj: int = 262_143_328_850,
    power_unit_uw: int = 125_000,
    energy_uj: int = 0,
    enabled: bool = True,
    locked: bool = False,
    psys: bool = False,
) -> EmulatedRaplSysfs:
    """Lay out ``root`` as a kernel with intel_rapl loaded: ``packages`` package zones (each
    with ``core`` and ``uncore`` subzones), and a ``psys`` platform zone if asked."""
    if packages < 0:
        raise ValueError(f"packages must not be negative, got {packages}")
    if max_energy_range_uj < 1:
        raise ValueError(f"max_energy_range_uj must be positive, got {max_energy_range_uj}")
    root = Path(root)
    base = root / DEVICE_DIR
    base.mkdir(parents=True, exist_ok=True)
    (root / CLASS_DIR).mkdir(parents=True, exist_ok=True)
    _file(base / "enabled", "1", _RW)
    _link(root, "intel-rapl", base)

    def zone(d: Path, name: str, constraints: bool) -> None:
        d.mkdir(parents=True, exist_ok=True)
        _file(d / "name", name, _RO)
        _file(d / "enabled", "1" if enabled else "0", _RW)
        _file(d / "energy_uj", str(energy_uj), _ROOT_ONLY)
        _file(d / "max_energy_range_uj", str(max_energy_range_uj), _RO)
        if constraints:
            for n, (cname, watts, window) in enumerate(
                (("long_term", limit_w, 27_983_872), ("short_term", short_limit_w, 2_440))
            ):
                uw = int(watts * 1e6) // power_unit_uw * power_unit_uw
                _file(d / f"constraint_{n}_name", cname, _RO)
                _file(d / f"constraint_{n}_power_limit_uw", str(uw), _RW)
                _file(d / f"constraint_{n}_time_window_us", str(window), _RW)
                _file(d / f"constraint_{n}_max_power_uw", str(int(max_power_w * 1e6)), _RO)
        _link(root, d.name, d)

    for n in range(packages):
        pkg = base / f"intel-rapl:{n}"
        zone(pkg, f"package-{n}", True)
        zone(pkg / f"intel-rapl:{n}:0", "core", False)
        zone(pkg / f"intel-rapl:{n}:1", "uncore", False)
    if psys:
        zone(base / f"intel-rapl:{packages}", "psys", True)
    tree = EmulatedRaplSysfs(root, power_unit_uw)
    if locked:
        for n in range(packages):
            tree.lock(f"intel-rapl:{n}")
    return tree


def _link(root: Path, name: str, target: Path) -> None:
    link = root / CLASS_DIR / name
    if not link.exists() and not link.is_symlink():
        link.symlink_to(os.path.relpath(target, link.parent))
