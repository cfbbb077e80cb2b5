"""Every sensor kind from its config, on emulated hardware; config errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrad_agent.config import ConfigError, SensorConfig, parse_config
from qrad_agent.core.models import Quality, Role
from qrad_agent.sensors import REGISTRY, open_sensor
from qrad_agent.sensors.base import SensorError
from qrad_agent.sensors.ds18b20 import DS18B20
from qrad_agent.sensors.factory import (
    BoardCpuTemperature,
    BusPool,
    UnopenableBus,
    open_configured,
    sysfs_for,
)
from qrad_agent.sensors.health import SensorMonitor
from qrad_agent.sim.chips.bus import EmulatedBus
from qrad_agent.sim.chips.scd4x import SCD4xChip
from qrad_agent.sim.chips.sht3x import SHT3xChip
from qrad_agent.sim.chips.tmp102 import TMP102Chip
from qrad_agent.sim.hwmon import HwmonTree
from qrad_agent.sim.sensors import SimSensors
from qrad_agent.sim.w1 import FakeDS18B20, W1Tree

DEV = "28-0316a2790eff"

# one of each I2C kind, at addresses that do not collide
I2C = [
    ("tmp102", 0x48), ("lm75", 0x49), ("lm75a", 0x4A), ("mcp9808", 0x18), ("sht3x", 0x44),
    ("sht4x", 0x45), ("htu21d", 0x40), ("aht20", 0x38), ("bme280", 0x76), ("scd4x", 0x62),
]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def problems(sensor: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config({"sensors": [sensor]})
    return err.value.problems


def test_every_i2c_kind_is_covered_here():
    assert {kind for kind, _ in I2C} == set(REGISTRY)


@pytest.mark.parametrize(("kind", "address"), I2C)
def test_every_i2c_kind_from_config_reads_the_room(kind: str, address: int, tmp_path: Path):
    cfg = SensorConfig(name="s", kind=kind, address=address)
    clock = Clock()
    sim = SimSensors([cfg], clock, tmp_path)
    sim.set_temperatures(22.0, 50.0)
    clock.t = 1.0  # past every chip's power-up and first conversion
    driver = open_configured(cfg, bus_for=sim.bus_for, sysfs=sim.sysfs, sleep=clock.sleep)
    assert type(driver) is REGISTRY[kind] and driver.address == address
    driver.identify()
    if kind == "scd4x":
        clock.t += 5.5  # its first periodic sample (identify stopped it, read starts it)
        with pytest.raises(SensorError):
            driver.read()
        clock.t += 5.0
    m = driver.read()
    step = 0.5 if kind == "lm75" else 0.125  # the coarsest resolutions in the set
    assert m.temperature_c == pytest.approx(22.0, abs=step / 2 + 0.01)


def test_i2c_sensors_use_the_bus_their_config_names(tmp_path: Path):
    cfgs = [SensorConfig(name="a", kind="tmp102", bus=3, address=0x48),
            SensorConfig(name="b", kind="tmp102", bus=1, address=0x48)]
    sim = SimSensors(cfgs, None, tmp_path)
    asked: list[int] = []

    def bus_for(n: int) -> EmulatedBus:
        asked.append(n)
        return sim.bus_for(n)

    for cfg in cfgs:
        open_configured(cfg, bus_for=bus_for)
    assert asked == [3, 1]
    assert sim.address("a") == (3, 0x48) and sim.chip("a") is sim.bus_for(3).chips[0x48]


def test_ds18b20_from_config(tmp_path: Path):
    cfg = SensorConfig(name="probe", kind="ds18b20", device=DEV, role=Role.EXHAUST)
    sim = SimSensors([cfg], None, tmp_path)
    sim.set_temperatures(20.0, 60.0, exhaust_c=31.5)
    driver = open_configured(cfg, bus_for=_no_bus, sysfs=sim.sysfs)
    assert isinstance(driver, DS18B20) and driver.device_id == DEV
    assert driver.read().temperature_c == 31.5
    probe = sim.chip("probe")
    assert isinstance(probe, FakeDS18B20)
    sim.inject("probe", "bad_crc")
    with pytest.raises(SensorError, match="CRC mismatch"):
        driver.read()


def test_sysfs_root_from_config_is_the_mount_point(tmp_path: Path):
    W1Tree(tmp_path).add(DEV, 18.25)
    cfg = SensorConfig(name="p", kind="ds18b20", device=DEV, sysfs_root=tmp_path / "sys")
    assert sysfs_for(cfg).root == tmp_path
    driver = open_configured(cfg, bus_for=_no_bus)  # no sysfs given: the config's
    assert driver.read().temperature_c == 18.25


def test_board_from_config_is_the_hottest_cpu(tmp_path: Path):
    cfg = SensorConfig(name="cpu", kind="board")
    assert cfg.role is Role.BOARD  # the default role of a board sensor
    sim = SimSensors([cfg], None, tmp_path, board_cores=2)
    sim.set_temperatures(20.0, 61.0)
    driver = open_configured(cfg, bus_for=_no_bus, sysfs=sim.sysfs)
    assert isinstance(driver, BoardCpuTemperature) and driver.kind == "board"
    assert driver.read().temperature_c == 61.0
    tree = sim.chip("cpu")
    assert isinstance(tree, HwmonTree)
    coretemp = tree.chips[1]
    coretemp.channels[2].set(78.5)  # Core 1 runs hotter than the package reads
    assert driver.read().temperature_c == 78.5
    assert driver.last is not None and driver.last.label == "Core 1"
    assert driver.last.critical_c == 100.0
    assert "coretemp" in driver.identify() and "critical 100 °C" in driver.identify()


def test_board_without_cpu_sensors_is_an_error_naming_what_was_found(tmp_path: Path):
    tree = HwmonTree(tmp_path)
    tree.add_chip("nvme").add_temp(38.0, "Composite")
    driver = BoardCpuTemperature(tree.sysfs)
    with pytest.raises(SensorError, match=r"no CPU temperature.*found: hwmon:nvme"):
        driver.read()


def test_open_sensor_public_api_still_works():
    bus = EmulatedBus()
    clock = Clock()
    bus.attach(0x49, TMP102Chip(23.5, clock=clock))
    clock.t = 1.0  # past its first conversion
    sensor = open_sensor("tmp102", bus=bus, address=0x49)
    assert sensor.read().temperature_c == 23.5
    with pytest.raises(ValueError, match="allowed: 0x48, 0x49, 0x4a, 0x4b"):
        open_sensor("tmp102", bus=bus, address=0x50)
    with pytest.raises(ValueError, match="allowed: aht20"):
        open_sensor("ds1621", bus=bus)
    with pytest.raises(ValueError, match="ds18b20 is not on an I2C bus: open it with"):
        open_sensor("ds18b20", bus=bus)


def test_sim_sensors_refuse_two_chips_at_one_address(tmp_path: Path):
    cfgs = [SensorConfig(name="a", kind="tmp102", address=0x48),
            SensorConfig(name="b", kind="lm75", address=0x48)]
    with pytest.raises(ValueError, match="'a' and 'b' are both at 0x48 on bus 1"):
        SimSensors(cfgs, None, tmp_path)


def test_sim_sensors_set_temperatures_by_role(tmp_path: Path):
    cfgs = [SensorConfig(name="r", kind="sht3x", address=0x44),
            SensorConfig(name="i", kind="tmp102", address=0x48, role=Role.INTAKE),
            SensorConfig(name="x", kind="tmp102", address=0x49, role=Role.EXHAUST),
            SensorConfig(name="b", kind="tmp102", address=0x4A, role=Role.BOARD),
            SensorConfig(name="c", kind="scd4x")]
    sim = SimSensors(cfgs, None, tmp_path)
    sim.humidity_pct, sim.co2_ppm = 52.0, 1100.0
    sim.set_temperatures(20.0, 55.0)
    sht, co2 = sim.chip("r"), sim.chip("c")
    assert isinstance(sht, SHT3xChip) and isinstance(co2, SCD4xChip)
    tmps = [sim.chip(n) for n in "ixb"]
    assert all(isinstance(c, TMP102Chip) for c in tmps)
    temps = [c.temperature_c for c in tmps if isinstance(c, TMP102Chip)]
    assert (sht.temperature_c, *temps, co2.temperature_c) == (20.0, 20.0, 25.0, 55.0, 20.0)
    assert sht.humidity_pct == 52.0 and co2.humidity_pct == 52.0
    assert co2.co2_ppm == 1100.0
    with pytest.raises(KeyError, match="configured: b, c, i, r, x"):
        sim.chip("nope")


def test_config_device_is_required_for_ds18b20_and_refused_elsewhere():
    [line] = problems({"name": "p", "kind": "ds18b20"})
    assert line.startswith("sensors.0: device is required for kind 'ds18b20'")
    [line] = problems({"name": "p", "kind": "tmp102", "device": DEV})
    assert "device does not apply to kind 'tmp102'" in line
    [line] = problems({"name": "p", "kind": "board", "device": DEV})
    assert "device does not apply to kind 'board'" in line


def test_config_device_pattern():
    [line] = problems({"name": "p", "kind": "ds18b20", "device": "28-0316A2790EFF"})
    assert line.startswith("sensors.0.device: not a DS18B20 id") and "28-0316A2790EFF" in line
    [line] = problems({"name": "p", "kind": "ds18b20", "device": "10-0316a2790eff"})
    assert "12 lowercase hex digits" in line


def test_config_bus_and_address_do_not_apply_to_sysfs_kinds():
    [line] = problems({"name": "p", "kind": "ds18b20", "device": DEV, "address": 0x48})
    assert "address does not apply to kind 'ds18b20'" in line
    [line] = problems({"name": "c", "kind": "board", "bus": 2, "address": 0x48})
    assert "address and bus do not apply to kind 'board'" in line and "remove them" in line


def test_config_sysfs_root_rules():
    [line] = problems({"name": "c", "kind": "board", "sysfs_root": "/tmp/tree"})
    assert line.startswith("sensors.0.sysfs_root: must be the directory where sysfs is mounted")
    [line] = problems({"name": "t", "kind": "tmp102", "sysfs_root": "/sys"})
    assert "sysfs_root does not apply to kind 'tmp102'" in line


def test_config_board_role():
    [line] = problems({"name": "c", "kind": "board", "role": "room"})
    assert "role 'room' is not allowed for kind 'board'" in line
    cfg = parse_config({"sensors": [{"name": "c", "kind": "board", "role": "board"}]})
    assert cfg.sensors[0].role is Role.BOARD


def test_config_address_must_suit_the_kind():
    [line] = problems({"name": "t", "kind": "bme280", "address": 0x48})
    assert "address 0x48 is not one a bme280 can be strapped to" in line
    assert "allowed for bme280: 0x76, 0x77" in line


def test_config_unknown_kind_lists_the_sysfs_kinds_too():
    [line] = problems({"name": "t", "kind": "ds1621"})
    assert "sensors.0.kind" in line and "board" in line and "ds18b20" in line


def test_config_health_thresholds():
    cfg = parse_config({"sensors": [{
        "name": "r", "kind": "tmp102",
        "health": {"max_rate_k_per_min": 1.5, "stuck_after_s": 1200, "hold_last_good_s": 30},
    }]})
    h = cfg.sensors[0].health
    assert (h.max_rate_k_per_min, h.stuck_after_s, h.hold_last_good_s, h.retries) == (
        1.5, 1200.0, 30.0, 2)
    [line] = problems({"name": "r", "kind": "tmp102", "health": {"retries": 9}})
    assert line.startswith("sensors.0.health.retries") and "5" in line
    [line] = problems({"name": "r", "kind": "tmp102", "health": {"rate": 1}})
    assert line.startswith("sensors.0.health.rate: unknown key")


def test_bus_pool_opens_each_bus_once_and_stands_in_for_a_missing_one():
    opened: list[int] = []
    emulated = EmulatedBus()

    def opener(number: int) -> EmulatedBus:
        opened.append(number)
        if number == 4:
            raise FileNotFoundError(2, "No such file or directory")
        return emulated

    pool = BusPool(opener)
    assert pool(1) is emulated and pool(1) is emulated
    missing = pool(4)
    assert isinstance(missing, UnopenableBus) and pool(4) is missing
    assert opened == [1, 4]
    cfg = SensorConfig(name="r", kind="tmp102", bus=4)
    monitor = SensorMonitor.from_config(cfg, open_configured(cfg, bus_for=pool))
    r = monitor.poll(1.0)
    assert r.quality is Quality.MISSING
    assert "cannot open /dev/i2c-4: No such file or directory" in r.detail


def _no_bus(number: int) -> EmulatedBus:
    raise AssertionError(f"a sysfs sensor asked for I2C bus {number}")
