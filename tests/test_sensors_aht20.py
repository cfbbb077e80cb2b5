"""AHT20 driver against the command-level emulator (and hand-built frames)."""

from __future__ import annotations

import errno
from dataclasses import dataclass

import pytest

from qrad_agent.core.models import Quality
from qrad_agent.sensors.aht20 import AHT20
from qrad_agent.sensors.base import CrcError, Measurement, NotReady, WrongChip, sensirion_crc8
from qrad_agent.sim.chips.aht20 import AHT20Chip
from qrad_agent.sim.chips.bus import EmulatedBus, EmulatedChip

STEP_C = 200 / 2**20
STEP_PCT = 100 / 2**20


class SimClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t
        self.slept = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.t += seconds


@dataclass
class Rig:
    clock: SimClock
    bus: EmulatedBus
    chip: AHT20Chip
    sensor: AHT20


def rig(temperature_c: float = 21.0, humidity_pct: float = 45.0, calibrated: bool = True) -> Rig:
    clock = SimClock()
    bus = EmulatedBus()
    chip = AHT20Chip(temperature_c, humidity_pct, clock=clock, calibrated=calibrated)
    bus.attach(0x38, chip)
    clock.t += 1.0  # powered a second ago
    return Rig(clock, bus, chip, AHT20(bus, sleep=clock.sleep))


class FrameChip(EmulatedChip):
    """Answers every read with fixed bytes: to feed the driver exact datasheet frames."""

    def __init__(self, frame: bytes) -> None:
        super().__init__()
        self.frame = frame
        self.writes: list[bytes] = []

    def i2c_write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def i2c_read(self, length: int) -> bytes:
        return self.frame[:length]


def frame_for(status: int, rh_raw: int, t_raw: int) -> bytes:
    body = bytes(
        [
            status,
            rh_raw >> 12,
            (rh_raw >> 4) & 0xFF,
            ((rh_raw & 0xF) << 4) | (t_raw >> 16),
            (t_raw >> 8) & 0xFF,
            t_raw & 0xFF,
        ]
    )
    return body + bytes([sensirion_crc8(body)])


def read_frame(frame: bytes) -> tuple[Measurement, FrameChip]:
    bus = EmulatedBus()
    chip = FrameChip(frame)
    bus.attach(0x38, chip)
    return AHT20(bus, sleep=lambda s: None).read(), chip


def test_crc_is_the_datasheet_sensirion_crc():
    # AHT20 uses the same CRC-8 as Sensirion: poly 0x31, init 0xFF; SHT3x example 0xBEEF -> 0x92
    assert sensirion_crc8(b"\xbe\xef") == 0x92


def test_hand_built_frame_decodes_by_the_datasheet_formulas():
    # RH raw 0x80000 = half scale = 50 %; T raw 0x40000 = quarter scale -> 0.25*200-50 = 0 °C
    m, chip = read_frame(bytes([0x1C, 0x80, 0x00, 0x04, 0x00, 0x00, 0xC2]))
    assert m.humidity_pct == 50.0
    assert m.temperature_c == 0.0
    assert chip.writes[-1] == b"\xac\x33\x00"


def test_frames_at_the_corners():
    cases = [
        (0x80000, 0x40000, 50.0, 0.0),
        (0x00000, 0x00000, 0.0, -50.0),
        (0xFFFFF, 0xFFFFF, 100 - STEP_PCT, 150 - STEP_C),
        (0x33333, 0x5999A, 0x33333 / 2**20 * 100, 0x5999A / 2**20 * 200 - 50),
    ]
    for rh_raw, t_raw, rh, t in cases:
        m, chip = read_frame(frame_for(0x1C, rh_raw, t_raw))
        assert m.humidity_pct == pytest.approx(rh, abs=1e-9)
        assert m.temperature_c == pytest.approx(t, abs=1e-9)
        assert m.raw == t_raw
        assert m.pressure_pa is None and m.co2_ppm is None
        assert chip.writes[-1] == b"\xac\x33\x00"


def test_byte_three_is_shared_by_both_fields():
    # RH low nibble 0xA and T high nibble 0x5 live in the same byte: 0xA5
    m, _ = read_frame(frame_for(0x1C, 0x0000A, 0x50000))
    assert m.humidity_pct == pytest.approx(10 / 2**20 * 100)
    assert m.temperature_c == pytest.approx(0x50000 / 2**20 * 200 - 50)


def test_bad_crc_in_a_hand_built_frame():
    frame = bytearray(frame_for(0x1C, 0x80000, 0x40000))
    frame[6] ^= 0x01
    with pytest.raises(CrcError, match="CRC byte"):
        read_frame(bytes(frame))


def test_round_trip_across_the_range():
    r = rig()
    for t in (-40.0, -12.34, 0.0, 19.99, 21.5, 37.0, 85.0):
        for rh in (0.0, 0.5, 33.3, 50.0, 99.9):
            r.chip.temperature_c, r.chip.humidity_pct = t, rh
            m = r.sensor.read()
            assert m.temperature_c == pytest.approx(t, abs=STEP_C)
            assert m.humidity_pct == pytest.approx(rh, abs=STEP_PCT)


def test_out_of_scale_values_clamp_to_the_ends():
    r = rig(temperature_c=-80.0, humidity_pct=130.0)
    m = r.sensor.read()
    assert m.temperature_c == -50.0 and m.raw == 0
    assert m.humidity_pct == pytest.approx(100 - STEP_PCT)
    r.chip.temperature_c = 400.0
    assert r.sensor.read().raw == 0xFFFFF


def test_a_read_waits_for_the_conversion_in_simulated_time():
    r = rig()
    before = r.clock.t
    r.sensor.read()
    assert r.clock.t - before >= 0.080 + 0.040  # power-up wait once, then the measurement
    assert r.chip.measurements == 1
    before = r.clock.t
    r.sensor.read()
    assert r.clock.t - before == pytest.approx(0.080)  # no second power-up wait


def test_a_slow_conversion_is_polled_until_the_busy_bit_clears():
    r = rig(temperature_c=23.0)
    r.chip.conversion_s = 0.115
    before = r.clock.t
    m = r.sensor.read()
    assert m.temperature_c == pytest.approx(23.0, abs=STEP_C)
    assert r.clock.t - before >= 0.115 + 0.040


def test_a_chip_that_stays_busy_is_not_ready():
    r = rig()
    r.chip.fault = "busy"
    with pytest.raises(NotReady, match="still busy") as info:
        r.sensor.read()
    assert info.value.quality is Quality.STALE
    r.chip.fault = None
    r.clock.t += 1
    assert r.sensor.read().temperature_c == pytest.approx(21.0, abs=STEP_C)


def test_an_uncalibrated_chip_is_initialised_first():
    r = rig(calibrated=False)
    assert not r.chip.status() & 0x08
    ident = r.sensor.identify()
    assert r.chip.calibrated
    assert "calibrated" in ident and "0x18" in ident
    assert r.sensor.read().humidity_pct == pytest.approx(45.0, abs=STEP_PCT)


def test_a_chip_that_never_calibrates_is_the_wrong_chip():
    r = rig(calibrated=False)
    r.chip.fault = "wrong_id"
    with pytest.raises(WrongChip, match=r"0xBE 0x08 0x00") as info:
        r.sensor.read()
    assert info.value.quality is Quality.WRONG_CHIP


def test_losing_calibration_mid_run_is_not_ready_then_recovers():
    r = rig()
    r.sensor.read()
    r.chip.calibrated = False  # a brown-out
    with pytest.raises(NotReady, match="lost its calibration"):
        r.sensor.read()
    m = r.sensor.read()  # initialised again
    assert r.chip.calibrated
    assert m.temperature_c == pytest.approx(21.0, abs=STEP_C)


def test_bad_crc_from_the_emulator_and_recovery():
    r = rig()
    r.chip.fault = "bad_crc"
    with pytest.raises(CrcError) as info:
        r.sensor.read()
    assert info.value.quality is Quality.CRC_ERROR
    r.chip.fault = None
    assert r.sensor.read().humidity_pct == pytest.approx(45.0, abs=STEP_PCT)


def test_stuck_chip_repeats_its_raw_value():
    r = rig(temperature_c=20.0)
    first = r.sensor.read()
    r.chip.fault = "stuck"
    r.chip.temperature_c = 25.0
    assert r.sensor.read().raw == first.raw
    r.chip.fault = None
    assert r.sensor.read().temperature_c == pytest.approx(25.0, abs=STEP_C)


@pytest.mark.parametrize(
    ("fault", "code"), [("nack", errno.EREMOTEIO), ("timeout", errno.ETIMEDOUT)]
)
def test_bus_faults_surface_as_os_errors(fault, code):
    r = rig()
    r.sensor.read()
    r.bus.inject(0x38, fault)
    with pytest.raises(OSError) as info:
        r.sensor.read()
    assert info.value.errno == code
    r.bus.inject(0x38, None)
    assert r.sensor.read().temperature_c == pytest.approx(21.0, abs=STEP_C)


def test_emulator_does_not_answer_during_power_up():
    clock = SimClock()
    bus = EmulatedBus()
    bus.attach(0x38, AHT20Chip(clock=clock))
    with pytest.raises(OSError):
        bus.read(0x38, 1)
    clock.t += 0.041
    assert bus.read(0x38, 1)[0] & 0x08
    # and the driver, created at power-up, waits the 40 ms itself
    clock2 = SimClock()
    bus2 = EmulatedBus()
    bus2.attach(0x38, AHT20Chip(clock=clock2, temperature_c=-5.0))
    assert AHT20(bus2, sleep=clock2.sleep).read().temperature_c == pytest.approx(-5.0, abs=STEP_C)


def test_emulator_refuses_unknown_commands_and_reports_busy():
    r = rig()
    with pytest.raises(OSError, match="does not know"):
        r.bus.write(0x38, b"\x12\x34")
    r.bus.write(0x38, b"\xac\x33\x00")
    assert r.bus.read(0x38, 1)[0] & 0x80
    r.clock.t += 0.080
    assert not r.bus.read(0x38, 1)[0] & 0x80
