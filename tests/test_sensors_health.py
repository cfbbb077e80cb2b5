"""SensorMonitor: every quality, retries and counters, with real drivers on chip emulators."""

from __future__ import annotations

import errno
import math
from pathlib import Path
from typing import Any, ClassVar

import pytest

from qrad_agent.config import SensorConfig, SensorHealthConfig
from qrad_agent.core.models import Quality, Role
from qrad_agent.sensors import open_sensor
from qrad_agent.sensors.base import Measurement
from qrad_agent.sensors.ds18b20 import DS18B20
from qrad_agent.sensors.factory import BoardCpuTemperature
from qrad_agent.sensors.health import SensorMonitor
from qrad_agent.sim.chips.bus import EmulatedBus, EmulatedChip, RegisterChip
from qrad_agent.sim.chips.lm75 import LM75Chip
from qrad_agent.sim.chips.mcp9808 import MCP9808Chip
from qrad_agent.sim.chips.scd4x import SCD4xChip
from qrad_agent.sim.chips.sht3x import SHT3xChip
from qrad_agent.sim.chips.tmp102 import TMP102Chip
from qrad_agent.sim.hwmon import HwmonTree
from qrad_agent.sim.w1 import W1Tree

DEV = "28-0316a2790eff"


class Clock:
    """Simulated time: drivers' sleeps move it, so chips see their conversions finish."""

    def __init__(self, t: float = 10.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class FlakyBus(EmulatedBus):
    """An emulated bus whose next ``fail_next`` transfers are NACKed, then it recovers."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = 0

    def _chip(self, address: int) -> EmulatedChip:
        if self.fail_next:
            self.fail_next -= 1
            self.transactions += 1
            raise OSError(errno.EREMOTEIO, "Remote I/O error")
        return super()._chip(address)


def rig(chip: EmulatedChip, kind: str, address: int, role: Role = Role.ROOM,
        **settings: Any) -> tuple[SensorMonitor, FlakyBus, Clock]:
    clock = Clock()
    chip.clock = clock
    if hasattr(chip, "powered_at"):
        chip.powered_at = 0.0  # powered long before the agent starts
    bus = FlakyBus()
    bus.attach(address, chip)
    driver = open_sensor(kind, bus, address, sleep=clock.sleep)
    return SensorMonitor("s", role, driver, SensorHealthConfig(**settings)), bus, clock


def test_ok_reading_carries_values_identity_and_counters():
    mon, _, _ = rig(SHT3xChip(temperature_c=22.5, humidity_pct=40.0), "sht3x", 0x44)
    r = mon.poll(10.0)
    assert r.quality is Quality.OK and r.ok and r.detail == ""
    assert r.temperature_c == pytest.approx(22.5, abs=0.01)
    assert r.humidity_pct == pytest.approx(40.0, abs=0.01)
    assert (r.sensor, r.role, r.at) == ("s", Role.ROOM, 10.0)
    assert mon.identity == "SHT3x serial 0C1A5E77"
    c = mon.counters_dict()
    assert (c["reads"], c["good"], c["retries"], c["errors"], c["last_good_at"]) == (
        1, 1, 0, {}, 10.0)
    assert c["last_good"]["temperature_c"] == pytest.approx(22.5, abs=0.01)
    assert mon.healthy


def test_crc_error_is_classified_and_not_retried():
    chip = SHT3xChip()
    mon, bus, clock = rig(chip, "sht3x", 0x44)
    mon.poll(clock())
    chip.fault = "bad_crc"
    before = bus.transactions
    r = mon.poll(clock.t + 2)
    assert r.quality is Quality.CRC_ERROR and r.temperature_c is None
    assert "need CRC" in r.detail
    assert bus.transactions - before == 2  # one command, one read: no retry
    assert mon.counters_dict()["errors"] == {"crc_error": 1}
    assert not mon.healthy


def test_io_error_after_the_bounded_retries():
    mon, bus, clock = rig(TMP102Chip(21.0), "tmp102", 0x48)
    assert mon.poll(clock()).ok
    bus.inject(0x48, "timeout")
    before = bus.transactions
    r = mon.poll(12.0)
    assert r.quality is Quality.IO_ERROR  # it answered before: not missing
    assert "3 attempt(s)" in r.detail and "ETIMEDOUT" in r.detail
    assert bus.transactions - before == 3  # word read = one transfer each, three attempts
    c = mon.counters_dict()
    assert c["retries"] == 2 and c["errors"] == {"io_error": 1} and c["bad_in_a_row"] == 1


def test_retries_can_be_turned_off():
    mon, bus, clock = rig(TMP102Chip(21.0), "tmp102", 0x48, retries=0)
    mon.poll(clock())
    bus.fail_next = 1
    assert mon.poll(12.0).quality is Quality.IO_ERROR
    assert mon.counters.retries == 0


def test_a_transient_nack_is_absorbed_by_a_retry():
    mon, bus, clock = rig(TMP102Chip(21.0), "tmp102", 0x48)
    mon.poll(clock())
    bus.fail_next = 2  # two NACKs, the third attempt gets through
    r = mon.poll(12.0)
    assert r.ok and r.temperature_c == 21.0
    assert mon.counters.retries == 2 and mon.counters.errors == {}
    bus.fail_next = 3  # one more than the retries allow
    assert mon.poll(14.0).quality is Quality.IO_ERROR


def test_missing_until_the_chip_first_answers_then_io_error():
    clock = Clock()
    bus = EmulatedBus()
    mon = SensorMonitor("s", Role.ROOM, open_sensor("mcp9808", bus, 0x18))
    r = mon.poll(clock())
    assert r.quality is Quality.MISSING and r.detail.startswith("never answered")
    assert mon.poll(12.0).quality is Quality.MISSING
    chip = MCP9808Chip(21.0, clock=clock)
    bus.attach(0x18, chip)
    clock.t = 13.0  # past the chip's first conversion
    assert mon.poll(13.0).ok
    bus.inject(0x18, "disconnect")
    assert mon.poll(15.0).quality is Quality.IO_ERROR
    assert mon.counters.errors == {"missing": 2, "io_error": 1}


def test_wrong_chip_then_identified_again_after_it_was_lost():
    chip = MCP9808Chip(21.0)
    chip.fault = "wrong_id"
    mon, bus, clock = rig(chip, "mcp9808", 0x18)
    r = mon.poll(clock())
    assert r.quality is Quality.WRONG_CHIP and "expected 0x0054, found 0x1131" in r.detail
    assert mon.identity is None
    chip.fault = None
    assert mon.poll(12.0).ok and mon.identity is not None
    # unplugged, and a different part answers at the address afterwards: checked again
    bus.inject(0x18, "disconnect")
    assert mon.poll(14.0).quality is Quality.IO_ERROR and mon.identity is None
    bus.inject(0x18, None)
    chip.fault = "wrong_id"
    assert mon.poll(16.0).quality is Quality.WRONG_CHIP


def test_out_of_range_temperature_both_ends():
    hot = SHT3xChip(temperature_c=128.0)  # the word can say up to 130 °C; the chip is rated 125
    mon, _, _ = rig(hot, "sht3x", 0x44)
    r = mon.poll(10.0)
    assert r.quality is Quality.OUT_OF_RANGE and r.temperature_c is None
    assert "outside the chip's range -40..125 °C" in r.detail
    cold = TMP102Chip(-100.0)  # the register holds down to -128 °C; the chip is rated -55
    mon, _, _ = rig(cold, "tmp102", 0x48)
    assert mon.poll(10.0).quality is Quality.OUT_OF_RANGE


def test_out_of_range_co2():
    clock = Clock()
    chip = SCD4xChip(co2_ppm=50000.0, clock=clock)
    clock.t += 1.0  # past its power-up time
    bus = EmulatedBus()
    bus.attach(0x62, chip)
    mon = SensorMonitor("co2", Role.ROOM, open_sensor("scd4x", bus, 0x62, sleep=clock.sleep))
    mon.poll(clock())
    clock.t += 5.0
    r = mon.poll(clock())
    assert r.quality is Quality.OUT_OF_RANGE and "CO2 50000 ppm outside 0..40000" in r.detail


class HumidityDriver:
    """A driver whose chip reports what no emulated chip can: humidity above 100 % (the
    supported chips' formulas clip it). Only the monitor's check is under test here."""

    kind: ClassVar[str] = "fixed"
    addresses: ClassVar[tuple[int, ...]] = ()
    temperature_range_c: ClassVar[tuple[float, float]] = (-40.0, 125.0)
    dithers: ClassVar[bool] = False
    address = 0

    def __init__(self, humidity_pct: float, temperature_c: float = 21.0) -> None:
        self.humidity_pct = humidity_pct
        self.temperature_c = temperature_c

    def identify(self) -> str:
        return "fixed"

    def read(self) -> Measurement:
        return Measurement(temperature_c=self.temperature_c, humidity_pct=self.humidity_pct)


def test_out_of_range_humidity_and_nan_temperature():
    driver = HumidityDriver(104.0)
    mon = SensorMonitor("h", Role.ROOM, driver)
    r = mon.poll(1.0)
    assert r.quality is Quality.OUT_OF_RANGE and "humidity 104.0 %" in r.detail
    driver.humidity_pct = 55.0
    assert mon.poll(3.0).ok
    driver.temperature_c = math.nan
    assert mon.poll(5.0).quality is Quality.OUT_OF_RANGE


def test_implausible_spike_is_refused_and_is_not_the_new_reference():
    chip = TMP102Chip(21.0)
    mon, _, _ = rig(chip, "tmp102", 0x48)
    assert mon.poll(10.0).ok
    chip.temperature_c = 30.0
    r = mon.poll(12.0)
    assert r.quality is Quality.IMPLAUSIBLE_RATE and r.temperature_c is None
    assert "+9.00 K from the last accepted 21.00 °C 2 s ago" in r.detail
    chip.temperature_c = 21.0625
    assert mon.poll(14.0).ok  # judged against 21.0, not against the spike
    # the allowance grows with time: 1.5 K a minute after the last accepted value is fine
    chip.temperature_c = 22.5625
    assert mon.poll(74.0).ok


def test_a_real_step_that_persists_is_accepted_after_step_confirm_s():
    chip = TMP102Chip(21.0)
    mon, _, _ = rig(chip, "tmp102", 0x48, step_confirm_s=60.0)
    assert mon.poll(10.0).ok
    chip.temperature_c = 26.0  # e.g. the sensor was moved next to a sunny window
    t = 12.0
    while t < 72.0:
        r = mon.poll(t)
        assert r.quality is Quality.IMPLAUSIBLE_RATE, t
        t += 2.0
    # 60 s after the first refusal the level has held: a 5 K step is still far outside the
    # rate allowance (2 K/min x 62 s + 0.6 K), yet it is accepted
    r = mon.poll(72.0)
    assert r.ok and r.temperature_c == 26.0
    assert mon.poll(74.0).ok


def test_a_wandering_value_is_never_confirmed_as_a_step():
    chip = TMP102Chip(21.0)
    mon, _, _ = rig(chip, "tmp102", 0x48, step_confirm_s=20.0, max_rate_k_per_min=0.5)
    assert mon.poll(10.0).ok
    for i in range(1, 20):
        chip.temperature_c = 35.0 if i % 2 else 45.0  # a failing sensor jumping about
        assert mon.poll(10.0 + 2 * i).quality is Quality.IMPLAUSIBLE_RATE


def test_rate_limits_follow_the_role():
    chip = TMP102Chip(40.0)
    board, _, _ = rig(chip, "tmp102", 0x48, role=Role.BOARD)  # a CPU jumps: no rate check
    assert board.poll(10.0).ok
    chip.temperature_c = 90.0
    assert board.poll(12.0).ok
    exhaust_chip = TMP102Chip(25.0)
    exhaust, _, _ = rig(exhaust_chip, "tmp102", 0x48, role=Role.EXHAUST)  # 30 K/min
    assert exhaust.poll(10.0).ok
    exhaust_chip.temperature_c = 26.0
    assert exhaust.poll(11.0).ok  # 1 K in 1 s: inside 0.5 K + the 0.6 K margin
    exhaust_chip.temperature_c = 27.25
    assert exhaust.poll(12.0).quality is Quality.IMPLAUSIBLE_RATE  # 1.25 K: outside
    off_chip = TMP102Chip(21.0)
    off, _, _ = rig(off_chip, "tmp102", 0x48, max_rate_k_per_min=0)
    assert off.poll(10.0).ok
    off_chip.temperature_c = 35.0
    assert off.poll(12.0).ok


def test_stuck_on_a_dithering_chip():
    chip = TMP102Chip(21.0)
    chip.fault = "stuck"
    mon, _, _ = rig(chip, "tmp102", 0x48, stuck_after_s=60.0)
    for i in range(31):  # the same raw word from 10 s to 70 s: not yet 60 s
        chip.temperature_c = 21.0 + 0.01 * i  # the room moves; the chip does not
        assert mon.poll(10.0 + 2 * i).ok
    r = mon.poll(72.0)
    assert r.quality is Quality.STUCK and "0x1500 unchanged for 62 s" in r.detail
    chip.fault = None
    chip.temperature_c = 21.5
    assert mon.poll(74.0).ok


def test_a_non_dithering_chip_is_never_stuck():
    chip = LM75Chip(21.0)
    mon, _, clock = rig(chip, "lm75", 0x48, stuck_after_s=60.0)
    assert not mon.driver.dithers
    for i in range(200):  # 400 s of one half-degree code
        clock.t = 10.0 + 2 * i  # the chip converts on its own clock
        assert mon.poll(clock.t).ok


def test_not_ready_reuses_the_last_good_value_then_goes_stale(tmp_path: Path):
    tree = W1Tree(tmp_path)
    probe = tree.add(DEV, 19.5)
    mon = SensorMonitor("p", Role.ROOM, DS18B20(tree.sysfs, DEV),
                        SensorHealthConfig(hold_last_good_s=10.0))
    assert mon.poll(100.0).temperature_c == 19.5
    probe.fault = "power_on"  # 85 °C: a conversion that did not run
    held = mon.poll(104.0)
    assert held.ok and held.temperature_c == 19.5 and held.at == 104.0
    assert held.detail.startswith("last good value, 4.0 s old")
    assert mon.poll(110.0).ok  # 10 s: still within the hold
    stale = mon.poll(112.0)
    assert stale.quality is Quality.STALE and stale.temperature_c is None
    assert "last good value 12 s old (held at most 10 s)" in stale.detail
    c = mon.counters_dict()
    assert (c["held"], c["errors"], c["good"]) == (2, {"stale": 1}, 1)
    assert c["last_good_at"] == 100.0 and c["last_good"] == {"temperature_c": 19.5}
    probe.fault = None
    assert mon.poll(114.0).ok


def test_a_chip_without_a_first_measurement_is_stale_not_missing():
    clock = Clock()
    chip = SCD4xChip(co2_ppm=812.0, clock=clock)
    clock.t += 1.0  # past its power-up time
    bus = EmulatedBus()
    bus.attach(0x62, chip)
    mon = SensorMonitor("co2", Role.ROOM, open_sensor("scd4x", bus, 0x62, sleep=clock.sleep))
    r = mon.poll(clock())
    assert r.quality is Quality.STALE and "no new measurement" in r.detail
    assert mon.identity is not None and mon.identity.startswith("SCD41 serial")
    clock.t += 5.0
    r = mon.poll(clock())
    assert r.ok and r.co2_ppm == 812.0
    clock.t += 2.0  # between the 5 s samples: held, not dropped
    r = mon.poll(clock())
    assert r.ok and r.co2_ppm == 812.0 and mon.counters.held == 1


def test_board_adapter_through_the_monitor(tmp_path: Path):
    tree = HwmonTree.x86(tmp_path, cores=2, temperature_c=55.0)
    mon = SensorMonitor("cpu", Role.BOARD, BoardCpuTemperature(tree.sysfs))
    assert mon.poll(1.0).temperature_c == 55.0
    tree.set_cpu_temperature(160.0)
    assert mon.poll(2.0).quality is Quality.OUT_OF_RANGE


def test_from_config_takes_the_sensors_health_section():
    cfg = SensorConfig.model_validate(
        {"name": "r", "kind": "tmp102", "role": "intake", "health": {"retries": 0}}
    )
    bus = EmulatedBus()
    mon = SensorMonitor.from_config(cfg, open_sensor("tmp102", bus, 0x48))
    assert (mon.name, mon.role, mon.settings.retries) == ("r", Role.INTAKE, 0)
    assert mon.poll(1.0).quality is Quality.MISSING
    assert mon.counters.retries == 0


def test_counters_dict_after_a_mixed_history():
    chip = SHT3xChip(temperature_c=20.0)
    mon, bus, _ = rig(chip, "sht3x", 0x44)
    mon.poll(10.0)
    chip.fault = "bad_crc"
    mon.poll(12.0)
    chip.fault = None
    bus.fail_next = 1
    mon.poll(14.0)
    bus.inject(0x44, "nack")
    mon.poll(16.0)
    c = mon.counters_dict()
    assert c == {
        "identity": None,  # lost with the bus error; checked again when it answers
        "quality": "io_error",
        "reads": 4,
        "good": 2,
        "held": 0,
        "retries": 3,
        "errors": {"crc_error": 1, "io_error": 1},
        "errors_total": 2,
        "bad_in_a_row": 1,
        "last_good_at": 14.0,
        "last_good": {"temperature_c": pytest.approx(20.0, abs=0.01),
                      "humidity_pct": pytest.approx(45.0, abs=0.01)},
    }


def test_register_chip_base_is_usable_for_a_missing_register():
    # a TMP102 driver pointed at a chip without register 0x00 gets the bus's remote I/O error
    class Empty(RegisterChip):
        pass

    mon, _, _ = rig(Empty(), "tmp102", 0x48)
    r = mon.poll(10.0)
    assert r.quality is Quality.MISSING and "EREMOTEIO" in r.detail


def test_a_rarely_read_steady_chip_is_not_called_stuck_by_time_alone():
    """Polled once a minute, a dithering chip in a steady room may repeat its word for a
    quarter of an hour: stuck takes the repeats as well as the time."""
    chip = TMP102Chip(21.0)
    chip.fault = "stuck"
    mon, _, _ = rig(chip, "tmp102", 0x48, stuck_after_s=900.0)
    for i in range(30):  # 29 repeats over 29 minutes: past the time, not the repeats
        assert mon.poll(60.0 * i).ok, i
    r = mon.poll(60.0 * 30)  # the 30th repeat
    assert r.quality is Quality.STUCK and "unchanged for 1800 s" in r.detail
