"""A hwmon + thermal-zone tree in a directory, shaped like ``/sys/class/{hwmon,thermal}``.

Values are stored as the kernel shows them (integer milli °C, one value and a newline per
file) and can be changed at any time; the simulator moves them with its thermal model.

>>> tree = HwmonTree.x86(tmp_path, cores=2)                # doctest: +SKIP
>>> tree.set_cpu_temperature(71.5)                         # doctest: +SKIP
>>> board_temperatures(tree.sysfs)                          # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from qrad_agent.sysfs import Sysfs


def _write(path: Path, value: str | int) -> None:
    path.write_text(f"{value}\n")


def _milli(temperature_c: float) -> int:
    return round(temperature_c * 1000)


class HwmonChannel:
    """One ``temp<N>_*`` group of a hwmon chip."""

    def __init__(self, directory: Path, index: int, cpu: bool) -> None:
        self.directory = directory
        self.index = index
        self.cpu = cpu  # moved by HwmonTree.set_cpu_temperature

    @property
    def input_path(self) -> Path:
        return self.directory / f"temp{self.index}_input"

    def set(self, temperature_c: float) -> None:
        _write(self.input_path, _milli(temperature_c))

    def set_fault(self, fault: bool) -> None:
        _write(self.directory / f"temp{self.index}_fault", int(fault))

    def make_unreadable(self) -> None:
        """Reads of the input now fail with an OSError, as a sensor in error does (EIO)."""
        self.input_path.unlink()
        self.input_path.mkdir()


class HwmonChip:
    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.channels: list[HwmonChannel] = []
        directory.mkdir(parents=True, exist_ok=True)
        _write(directory / "name", name)

    def add_temp(
        self,
        temperature_c: float,
        label: str | None = None,
        critical_c: float | None = None,
        cpu: bool = False,
    ) -> HwmonChannel:
        channel = HwmonChannel(self.directory, len(self.channels) + 1, cpu)
        channel.set(temperature_c)
        if label is not None:
            _write(self.directory / f"temp{channel.index}_label", label)
        if critical_c is not None:
            _write(self.directory / f"temp{channel.index}_crit", _milli(critical_c))
        self.channels.append(channel)
        return channel


class ThermalZone:
    def __init__(self, directory: Path, kind: str, cpu: bool) -> None:
        self.directory = directory
        self.kind = kind
        self.cpu = cpu
        directory.mkdir(parents=True, exist_ok=True)
        _write(directory / "type", kind)
        self.trips = 0

    def set(self, temperature_c: float) -> None:
        _write(self.directory / "temp", _milli(temperature_c))

    def add_trip(self, kind: str, temperature_c: float) -> None:
        """A trip point: ``passive``, ``active``, ``hot`` or ``critical``."""
        _write(self.directory / f"trip_point_{self.trips}_type", kind)
        _write(self.directory / f"trip_point_{self.trips}_temp", _milli(temperature_c))
        self.trips += 1


class HwmonTree:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.hwmon_dir = self.root / "sys/class/hwmon"
        self.thermal_dir = self.root / "sys/class/thermal"
        self.hwmon_dir.mkdir(parents=True, exist_ok=True)
        self.thermal_dir.mkdir(parents=True, exist_ok=True)
        self.chips: list[HwmonChip] = []
        self.zones: list[ThermalZone] = []

    @property
    def sysfs(self) -> Sysfs:
        return Sysfs(self.root)

    def add_chip(self, name: str, legacy: bool = False) -> HwmonChip:
        """A hwmon device; ``legacy`` puts its files under ``hwmonN/device/`` (old kernels)."""
        directory = self.hwmon_dir / f"hwmon{len(self.chips)}"
        if legacy:
            directory.mkdir()
            directory = directory / "device"
        chip = HwmonChip(directory, name)
        self.chips.append(chip)
        return chip

    def add_zone(
        self,
        kind: str,
        temperature_c: float,
        critical_c: float | None = None,
        cpu: bool = False,
    ) -> ThermalZone:
        zone = ThermalZone(self.thermal_dir / f"thermal_zone{len(self.zones)}", kind, cpu)
        zone.set(temperature_c)
        if critical_c is not None:
            zone.add_trip("passive", critical_c - 10.0)
            zone.add_trip("critical", critical_c)
        self.zones.append(zone)
        return zone

    def set_cpu_temperature(self, temperature_c: float) -> None:
        """Move every channel and zone marked ``cpu`` to ``temperature_c``."""
        for chip in self.chips:
            for channel in chip.channels:
                if channel.cpu:
                    channel.set(temperature_c)
        for zone in self.zones:
            if zone.cpu:
                zone.set(temperature_c)

    @classmethod
    def x86(cls, root: Path | str, cores: int = 4, temperature_c: float = 45.0) -> HwmonTree:
        """An Intel board: coretemp (package + cores, crit 100 °C), ACPI and NVMe sensors,
        the package and ACPI thermal zones."""
        tree = cls(root)
        tree.add_chip("acpitz").add_temp(27.8, critical_c=119.0)
        coretemp = tree.add_chip("coretemp")
        coretemp.add_temp(temperature_c, "Package id 0", 100.0, cpu=True)
        for core in range(cores):
            coretemp.add_temp(temperature_c, f"Core {core}", 100.0, cpu=True)
        tree.add_chip("nvme").add_temp(38.9, "Composite", 84.8)
        tree.add_zone("acpitz", 27.8, critical_c=119.0)
        tree.add_zone("x86_pkg_temp", temperature_c, cpu=True)
        return tree

    @classmethod
    def raspberry_pi(cls, root: Path | str, temperature_c: float = 50.0) -> HwmonTree:
        """A Raspberry Pi: one SoC sensor, seen both as hwmon and as a thermal zone."""
        tree = cls(root)
        tree.add_chip("cpu_thermal").add_temp(temperature_c, cpu=True)
        tree.add_zone("cpu-thermal", temperature_c, critical_c=110.0, cpu=True)
        return tree
