"""SCD4x driver against the command-level emulator, with the datasheet's example answers."""

from __future__ import annotations

import errno
from dataclasses import dataclass

import pytest

from qrad_agent.core.models import Quality
from qrad_agent.sensors.base import CrcError, NotReady, WrongChip
from qrad_agent.sensors.scd4x import RESTART_AFTER_NOT_READY, SCD4x
from qrad_agent.sim.chips.bus import EmulatedBus, EmulatedChip
from qrad_agent.sim.chips.scd4x import (
    DATA_READY,
    READ_MEASUREMENT,
    SENSOR_VARIANT,
    SERIAL_NUMBER,
    START_PERIODIC,
    STOP_PERIODIC,
    SCD4xChip,
)

T_STEP = 175 / 65535
RH_STEP = 100 / 65535


class SimClock:
    def __init__(self, t: float = 10.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Rig:
    clock: SimClock
    bus: EmulatedBus
    chip: SCD4xChip
    sensor: SCD4x

    def wait(self, seconds: float) -> None:
        self.clock.t += seconds


def rig(chip_class: type[SCD4xChip] = SCD4xChip, **chip_args: object) -> Rig:
    clock = SimClock()
    bus = EmulatedBus()
    chip = chip_class(clock=clock, **chip_args)  # type: ignore[arg-type]
    bus.attach(0x62, chip)
    clock.t += 1.0
    return Rig(clock, bus, chip, SCD4x(bus, sleep=clock.sleep))


def first_sample(r: Rig) -> None:
    """Start measuring and wait for the first sample, as the agent's polls would."""
    with pytest.raises(NotReady):
        r.sensor.read()
    r.wait(5.0)


def command(bus: EmulatedBus, code: int) -> None:
    bus.write(0x62, code.to_bytes(2, "big"))


# -- datasheet examples --------------------------------------------------------------------


def test_serial_number_example():
    # Datasheet get_serial_number example: 0xF896 CRC 0x31, 0x9F07 CRC 0xC2, 0x3BBE CRC 0x89
    r = rig(serial=0xF8969F073BBE)
    command(r.bus, SERIAL_NUMBER)
    r.wait(0.001)
    assert r.bus.read(0x62, 9) == bytes.fromhex("f896319f07c23bbe89")
    assert r.sensor.identify() == "SCD41 serial 0xf8969f073bbe"
    assert 0xF8969F073BBE == 273325796834238  # the decimal the datasheet gives


def test_read_measurement_example():
    # Datasheet read_measurement example: 0x01F4 -> 500 ppm, 0x6667 -> 25 °C, 0x5EB9 -> 37 %RH
    r = rig(
        co2_ppm=500,
        temperature_c=-45 + 175 * 0x6667 / 65535,
        humidity_pct=100 * 0x5EB9 / 65535,
    )
    first_sample(r)
    command(r.bus, READ_MEASUREMENT)
    r.wait(0.001)
    assert r.bus.read(0x62, 9) == bytes.fromhex("01f4336667a25eb93c")
    r.wait(5.0)
    m = r.sensor.read()
    assert m.co2_ppm == 500.0
    assert m.temperature_c == pytest.approx(25.0027, abs=1e-4)  # -45 + 175 * 26215 / 65535
    assert m.humidity_pct == pytest.approx(37.0016, abs=1e-4)  # 100 * 24249 / 65535
    assert m.raw == 0x6667
    assert m.pressure_pa is None


# -- periodic measurement and data-ready ---------------------------------------------------


def test_first_read_starts_measurement_and_is_not_ready():
    r = rig()
    with pytest.raises(NotReady, match="no new measurement") as info:
        r.sensor.read()
    assert info.value.quality is Quality.STALE
    assert r.chip.measuring
    assert r.chip.command_counts[START_PERIODIC] == 1
    r.wait(4.9)
    with pytest.raises(NotReady):
        r.sensor.read()
    r.wait(0.1)
    assert r.sensor.read().co2_ppm == 600.0
    assert r.chip.command_counts[START_PERIODIC] == 1  # started once


def test_samples_arrive_on_the_five_second_grid():
    r = rig()
    first_sample(r)
    assert r.chip.measuring_since is not None
    start = r.chip.measuring_since
    r.clock.t = start + 7.0
    r.sensor.read()
    with pytest.raises(NotReady):  # consumed; the next sample is due at 10 s, not 12 s
        r.sensor.read()
    r.clock.t = start + 9.99
    with pytest.raises(NotReady):
        r.sensor.read()
    r.clock.t = start + 10.0
    assert r.sensor.read().temperature_c == pytest.approx(21.0, abs=T_STEP)


def test_a_sensor_left_measuring_is_read_without_a_restart():
    r = rig()
    command(r.bus, START_PERIODIC)  # an earlier agent process started it
    r.wait(6.0)
    m = r.sensor.read()  # our start is refused, the data are there
    assert m.co2_ppm == 600.0
    assert r.chip.command_counts[START_PERIODIC] == 1


def test_read_measurement_without_new_data_is_nacked_by_the_emulator():
    r = rig()
    command(r.bus, START_PERIODIC)
    command(r.bus, READ_MEASUREMENT)
    r.wait(0.001)
    with pytest.raises(OSError):
        r.bus.read(0x62, 9)


def test_answers_need_the_execution_time():
    r = rig()
    command(r.bus, DATA_READY)
    with pytest.raises(OSError, match="executing"):
        r.bus.read(0x62, 3)
    command(r.bus, DATA_READY)
    r.wait(0.001)
    assert r.bus.read(0x62, 3) == bytes([0x80, 0x00, 0xA2])  # not ready, and its CRC


def test_commands_other_than_read_ready_stop_are_refused_while_measuring():
    r = rig()
    command(r.bus, START_PERIODIC)
    for code in (SERIAL_NUMBER, SENSOR_VARIANT, START_PERIODIC):
        with pytest.raises(OSError, match="while measuring"):
            command(r.bus, code)
    command(r.bus, STOP_PERIODIC)
    with pytest.raises(OSError, match="busy"):  # 500 ms to stop
        command(r.bus, SERIAL_NUMBER)
    r.wait(0.5)
    command(r.bus, SERIAL_NUMBER)


def test_identify_stops_a_running_sensor_and_read_starts_it_again():
    r = rig(variant="SCD40")
    first_sample(r)
    assert r.sensor.read().co2_ppm == 600.0
    before = r.clock.t
    assert r.sensor.identify().startswith("SCD40 serial 0x3c4f8b0721e9")
    assert r.clock.t - before >= 0.5
    assert not r.chip.measuring
    with pytest.raises(NotReady):
        r.sensor.read()
    assert r.chip.measuring
    r.wait(5.0)
    assert r.sensor.read().humidity_pct == pytest.approx(45.0, abs=RH_STEP)


def test_variants_by_name_and_an_unknown_one_is_the_wrong_chip():
    assert rig(variant="SCD43").sensor.identify().startswith("SCD43 ")
    r = rig()
    r.chip.fault = "wrong_id"
    with pytest.raises(WrongChip, match=r"0xf000; bits 15\.\.12 = 15") as info:
        r.sensor.identify()
    assert info.value.quality is Quality.WRONG_CHIP
    with pytest.raises(ValueError, match="SCD40, SCD41, SCD43"):
        SCD4xChip(variant="SCD30")


class OldFirmware(SCD4xChip):
    def i2c_write(self, data: bytes) -> None:
        if bytes(data[:2]) == SENSOR_VARIANT.to_bytes(2, "big"):
            raise OSError(errno.EREMOTEIO, "unknown command")
        super().i2c_write(data)


def test_firmware_without_the_variant_command_still_identifies():
    assert (
        rig(OldFirmware).sensor.identify() == "SCD4x serial 0x3c4f8b0721e9 (variant not reported)"
    )


# -- conversion edges and faults ------------------------------------------------------------


def test_round_trip_across_the_range():
    r = rig()
    first_sample(r)
    for co2 in (0.4, 400, 1234, 5000, 40000):
        for t in (-10.0, 0.0, 21.7, 60.0):
            for rh in (0.0, 45.5, 100.0):
                r.chip.co2_ppm, r.chip.temperature_c, r.chip.humidity_pct = co2, t, rh
                r.wait(5.0)
                if co2 < 0.5:
                    with pytest.raises(NotReady, match="0 ppm"):
                        r.sensor.read()
                    continue
                m = r.sensor.read()
                assert m.co2_ppm == round(co2)
                assert m.temperature_c == pytest.approx(t, abs=T_STEP / 2 + 1e-9)
                assert m.humidity_pct == pytest.approx(rh, abs=RH_STEP / 2 + 1e-9)


def test_full_scale_words():
    r = rig(temperature_c=-100.0, humidity_pct=-5.0, co2_ppm=70000)
    first_sample(r)
    m = r.sensor.read()
    assert (m.temperature_c, m.humidity_pct, m.co2_ppm, m.raw) == (-45.0, 0.0, 65535.0, 0)
    r.chip.temperature_c, r.chip.humidity_pct = 200.0, 120.0
    r.wait(5.0)
    m = r.sensor.read()
    assert (m.temperature_c, m.humidity_pct, m.raw) == (130.0, 100.0, 0xFFFF)


def test_bad_crc_is_reported_with_the_word():
    r = rig()
    first_sample(r)
    r.chip.fault = "bad_crc"
    with pytest.raises(CrcError, match="0xe4b8, word 0") as info:
        r.sensor.read()
    assert info.value.quality is Quality.CRC_ERROR
    r.chip.fault = None
    assert r.sensor.read().co2_ppm == 600.0  # the sample was not consumed by the failed poll


def test_stuck_sensor_repeats_its_words():
    r = rig(temperature_c=20.0)
    first_sample(r)
    first = r.sensor.read()
    r.chip.fault = "stuck"
    r.chip.temperature_c = 24.0
    r.wait(5.0)
    assert r.sensor.read().raw == first.raw


@pytest.mark.parametrize(
    ("fault", "code"), [("nack", errno.EREMOTEIO), ("timeout", errno.ETIMEDOUT)]
)
def test_bus_faults_surface_and_the_driver_recovers(fault: str, code: int) -> None:
    r = rig()
    first_sample(r)
    r.bus.inject(0x62, fault)
    with pytest.raises(OSError) as info:
        r.sensor.read()
    assert info.value.errno == code
    r.bus.inject(0x62, None)
    assert r.sensor.read().co2_ppm == 600.0
    assert r.chip.command_counts[START_PERIODIC] == 1  # the retried start was refused


def test_a_power_cycled_sensor_is_started_again():
    r = rig()
    first_sample(r)
    r.sensor.read()
    fresh = SCD4xChip(clock=r.clock, co2_ppm=800)  # lost power between polls: idle again
    r.bus.attach(0x62, fresh)
    r.wait(0.1)
    polls = 0
    while not fresh.measuring and polls <= 10 * RESTART_AFTER_NOT_READY:
        with pytest.raises(NotReady):
            r.sensor.read()
        r.wait(0.5)
        polls += 1
    assert polls == RESTART_AFTER_NOT_READY + 1  # the poll after the limit sends start
    r.wait(5.0)
    assert r.sensor.read().co2_ppm == 800.0


class Placeholder(EmulatedChip):
    """Always ready, always 0 ppm: the sample right after start on some firmware."""

    def i2c_write(self, data: bytes) -> None:
        self.last = bytes(data)

    def i2c_read(self, length: int) -> bytes:
        if self.last == DATA_READY.to_bytes(2, "big"):
            return bytes.fromhex("800604")
        return bytes.fromhex("000081") + bytes.fromhex("6667a25eb93c")


def test_zero_ppm_is_not_a_measurement():
    bus = EmulatedBus()
    bus.attach(0x62, Placeholder())
    with pytest.raises(NotReady, match="0 ppm"):
        SCD4x(bus, sleep=lambda s: None).read()


def test_after_a_bus_error_the_next_read_sends_start_at_once():
    r = rig()
    first_sample(r)
    fresh = SCD4xChip(clock=r.clock)  # reset: NACKs while it boots, then sits idle
    r.bus.attach(0x62, fresh)
    with pytest.raises(OSError):
        r.sensor.read()
    r.wait(0.1)
    with pytest.raises(NotReady):
        r.sensor.read()
    assert fresh.measuring  # no need to wait for the not-ready limit
    r.wait(5.0)
    assert r.sensor.read().co2_ppm == 600.0
