"""Room fusion: the median of the healthy room sensors, and how many there are."""

from __future__ import annotations

from pathlib import Path

from qrad_agent.config import SensorConfig
from qrad_agent.core.fusion import RoomEstimate, fuse_room
from qrad_agent.core.models import Quality, Reading, Role
from qrad_agent.sensors.factory import open_configured
from qrad_agent.sensors.health import SensorMonitor
from qrad_agent.sim.sensors import SimSensors


class Clock:
    def __init__(self) -> None:
        self.t = 5.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def room(name: str, t: float | None, quality: Quality = Quality.OK, role: Role = Role.ROOM,
         rh: float | None = None, co2: float | None = None) -> Reading:
    return Reading(name, role, quality, 0.0, t, rh, None, co2)


def test_median_of_three_ignores_one_wild_sensor():
    est = fuse_room([room("a", 20.5), room("b", 21.0), room("c", 27.0)])
    assert est == RoomEstimate(21.0, 3, 3)


def test_median_of_two_is_their_mean():
    est = fuse_room([room("a", 20.0), room("b", 21.0)])
    assert (est.temperature_c, est.healthy, est.configured) == (20.5, 2, 2)


def test_only_one_of_three_room_sensors_healthy():
    est = fuse_room([
        room("a", None, Quality.CRC_ERROR),
        room("b", 21.7),
        room("c", None, Quality.MISSING),
    ])
    assert (est.temperature_c, est.healthy, est.configured) == (21.7, 1, 3)


def test_none_healthy_gives_no_temperature():
    est = fuse_room([
        room("a", None, Quality.STALE),
        room("b", None, Quality.IO_ERROR),
        room("c", None, Quality.STUCK),
    ])
    assert est == RoomEstimate(None, 0, 3)


def test_no_sensors_at_all():
    assert fuse_room([]) == RoomEstimate(None, 0, 0)


def test_other_roles_are_not_room_sensors():
    est = fuse_room([
        room("cpu", 71.0, role=Role.BOARD),
        room("out", 35.0, role=Role.EXHAUST),
        room("in", 20.0, role=Role.INTAKE),
        room("r", 21.25),
    ])
    assert (est.temperature_c, est.healthy, est.configured) == (21.25, 1, 1)


def test_a_bad_reading_never_contributes_even_if_it_carries_a_value():
    # a reading's quality decides, whatever a producer left in its value fields
    est = fuse_room([room("a", 40.0, Quality.IMPLAUSIBLE_RATE), room("b", 21.0)])
    assert (est.temperature_c, est.healthy) == (21.0, 1)


def test_humidity_and_co2_from_the_healthy_room_sensors_that_have_them():
    est = fuse_room([
        room("sht", 21.0, rh=40.0),
        room("scd", 21.4, rh=44.0, co2=900.0),
        room("tmp", 20.8),
        room("bad", None, Quality.CRC_ERROR, rh=99.0, co2=5000.0),
    ])
    assert est.temperature_c == 21.0
    assert est.humidity_pct == 42.0
    assert est.co2_ppm == 900.0
    assert fuse_room([room("tmp", 20.8)]).humidity_pct is None


def test_end_to_end_three_emulated_sensors_one_faulty(tmp_path: Path):
    sensors = [
        SensorConfig(name="a", kind="sht3x", address=0x44),
        SensorConfig(name="b", kind="tmp102", address=0x48),
        SensorConfig(name="c", kind="mcp9808", address=0x18),
    ]
    clock = Clock()
    sim = SimSensors(sensors, clock, tmp_path)
    clock.t += 1.0  # past the chips' first conversions
    monitors = [
        SensorMonitor.from_config(
            s, open_configured(s, bus_for=sim.bus_for, sysfs=sim.sysfs, sleep=clock.sleep)
        )
        for s in sensors
    ]
    sim.set_temperatures(21.5, 50.0)
    sim.inject("a", "bad_crc")
    sim.inject("b", "nack")
    est = fuse_room([m.poll(clock()) for m in monitors])
    assert (est.temperature_c, est.healthy, est.configured) == (21.5, 1, 3)
    sim.inject("a", None)
    sim.inject("b", None)
    clock.t += 2.0
    est = fuse_room([m.poll(clock()) for m in monitors])
    assert (est.healthy, est.configured) == (3, 3)
    assert est.temperature_c is not None and abs(est.temperature_c - 21.5) < 0.01
