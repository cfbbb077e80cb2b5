"""Board temperatures from hwmon and thermal zones laid out in a temp dir; psutil fallback."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import pytest

from qrad_agent.sensors.board import BoardTemperature, board_temperatures, hottest_cpu, is_cpu
from qrad_agent.sim.hwmon import HwmonTree
from qrad_agent.sysfs import Sysfs


class Shwtemp(NamedTuple):
    """The shape of psutil's sensors_temperatures() entries."""

    label: str
    current: float | None
    high: float | None
    critical: float | None


def no_fallback() -> Mapping[str, Sequence[Any]]:
    raise AssertionError("the fallback must not be consulted when sysfs has temperatures")


def test_x86_layout_labels_and_critical_limits(tmp_path: Path):
    tree = HwmonTree.x86(tmp_path, cores=2, temperature_c=47.125)
    temps = board_temperatures(tree.sysfs, fallback=no_fallback)
    assert temps == [
        BoardTemperature("hwmon:acpitz", "temp1", 27.8, 119.0),
        BoardTemperature("hwmon:coretemp", "Package id 0", 47.125, 100.0),
        BoardTemperature("hwmon:coretemp", "Core 0", 47.125, 100.0),
        BoardTemperature("hwmon:coretemp", "Core 1", 47.125, 100.0),
        BoardTemperature("hwmon:nvme", "Composite", 38.9, 84.8),
        BoardTemperature("thermal:acpitz", "thermal_zone0", 27.8, 119.0),
        BoardTemperature("thermal:x86_pkg_temp", "thermal_zone1", 47.125, None),
    ]


def test_hottest_cpu_follows_the_hottest_core_not_acpi_or_nvme(tmp_path: Path):
    tree = HwmonTree.x86(tmp_path, cores=4, temperature_c=60.0)
    tree.chips[1].channels[3].set(88.5)  # Core 2
    tree.chips[0].channels[0].set(95.0)  # acpitz: hot, but not the CPU
    tree.chips[2].channels[0].set(99.0)  # nvme
    hottest = hottest_cpu(board_temperatures(tree.sysfs))
    assert hottest == BoardTemperature("hwmon:coretemp", "Core 2", 88.5, 100.0)
    tree.set_cpu_temperature(70.0)
    hottest = hottest_cpu(board_temperatures(tree.sysfs))
    assert hottest is not None and hottest.temperature_c == 70.0


def test_amd_k10temp_without_critical_limits(tmp_path: Path):
    tree = HwmonTree(tmp_path)
    k10 = tree.add_chip("k10temp")
    k10.add_temp(71.25, "Tctl")
    k10.add_temp(51.25, "Tdie")  # Tctl carries a +20 °C offset on these parts
    k10.add_temp(49.0, "Tccd1")
    tree.add_chip("amdgpu").add_temp(80.0, "edge", 100.0)
    temps = board_temperatures(tree.sysfs)
    assert [t.label for t in temps] == ["Tctl", "Tdie", "Tccd1", "edge"]
    assert all(t.critical_c is None for t in temps[:3])
    assert hottest_cpu(temps) == BoardTemperature("hwmon:k10temp", "Tctl", 71.25)


def test_raspberry_pi_unlabelled_sensor_and_critical_trip(tmp_path: Path):
    tree = HwmonTree.raspberry_pi(tmp_path, temperature_c=54.768)
    temps = board_temperatures(tree.sysfs)
    assert temps == [
        BoardTemperature("hwmon:cpu_thermal", "temp1", 54.768, None),
        BoardTemperature("thermal:cpu-thermal", "thermal_zone0", 54.768, 110.0),
    ]
    assert all(is_cpu(t) for t in temps)
    # the first trip point is passive; the critical one is found by its type
    assert (tree.zones[0].directory / "trip_point_0_type").read_text() == "passive\n"


def test_negative_and_sub_degree_values(tmp_path: Path):
    tree = HwmonTree(tmp_path)
    chip = tree.add_chip("lm75")
    chip.add_temp(-12.5)
    chip.add_temp(0.001)
    assert [t.temperature_c for t in board_temperatures(tree.sysfs)] == [-12.5, 0.001]
    assert (chip.directory / "temp1_input").read_text() == "-12500\n"


def test_legacy_device_directory(tmp_path: Path):
    tree = HwmonTree(tmp_path)
    tree.add_chip("coretemp", legacy=True).add_temp(42.0, "Physical id 0", 90.0)
    assert (tmp_path / "sys/class/hwmon/hwmon0/device/name").exists()
    assert board_temperatures(tree.sysfs) == [
        BoardTemperature("hwmon:coretemp", "Physical id 0", 42.0, 90.0)
    ]


def test_faulted_and_unreadable_channels_are_left_out(tmp_path: Path):
    tree = HwmonTree(tmp_path)
    chip = tree.add_chip("nct6775")
    chip.add_temp(30.0, "SYSTIN").set_fault(True)
    chip.add_temp(45.0, "CPUTIN").make_unreadable()
    chip.add_temp(33.0, "AUXTIN0").set_fault(False)
    tree.add_zone("acpitz", 26.0)
    (tree.zones[0].directory / "temp").write_text("not a number\n")
    temps = board_temperatures(tree.sysfs, fallback=None)
    assert temps == [BoardTemperature("hwmon:nct6775", "AUXTIN0", 33.0)]


def test_many_hwmon_devices_in_natural_order(tmp_path: Path):
    tree = HwmonTree(tmp_path)
    for i in range(12):
        tree.add_chip(f"chip{i}").add_temp(float(i))
    temps = board_temperatures(tree.sysfs)
    assert [t.temperature_c for t in temps] == [float(i) for i in range(12)]  # hwmon10 last


def test_psutil_fallback_only_when_sysfs_is_empty(tmp_path: Path):
    entries = {
        "coretemp": [
            Shwtemp("Package id 0", 61.0, 80.0, 100.0),
            Shwtemp("Core 0", 58.0, 80.0, 100.0),
        ],
        "acpitz": [Shwtemp("", 27.8, None, None), Shwtemp("", None, None, None)],
    }
    temps = board_temperatures(Sysfs(tmp_path), fallback=lambda: entries)
    assert temps == [
        BoardTemperature("psutil:coretemp", "Package id 0", 61.0, 100.0),
        BoardTemperature("psutil:coretemp", "Core 0", 58.0, 100.0),
        BoardTemperature("psutil:acpitz", "acpitz", 27.8, None),
    ]
    assert hottest_cpu(temps) == temps[0]
    assert board_temperatures(Sysfs(tmp_path), fallback=None) == []


def test_default_fallback_is_psutil(tmp_path: Path):
    # On a machine without hwmon psutil returns {}; on one with it, the same entries.
    reader = getattr(psutil, "sensors_temperatures", None)
    raw = reader() if reader else {}
    expected = sum(1 for entries in raw.values() for e in entries if e.current is not None)
    assert len(board_temperatures(Sysfs(tmp_path))) == expected


def test_hottest_cpu_of_nothing():
    assert hottest_cpu([]) is None
    assert hottest_cpu([BoardTemperature("hwmon:nvme", "Composite", 50.0)]) is None


@pytest.mark.parametrize(
    ("source", "cpu"),
    [
        ("hwmon:coretemp", True),
        ("hwmon:k10temp", True),
        ("hwmon:zenpower", True),
        ("thermal:x86_pkg_temp", True),
        ("thermal:cpu0-thermal", True),
        ("thermal:soc_thermal", True),
        ("thermal:TCPU", True),
        ("thermal:B0D4", True),
        ("hwmon:acpitz", False),
        ("thermal:pch_skylake", False),
        ("hwmon:iwlwifi_1", False),
        ("hwmon:amdgpu", False),
        ("thermal:INT3400 Thermal", False),
    ],
)
def test_which_chips_count_as_cpu(source: str, cpu: bool):
    assert is_cpu(BoardTemperature(source, "x", 40.0)) is cpu
