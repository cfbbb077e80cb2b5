"""BME280: Bosch's compensation against the datasheet example, and the driver against the
register-level emulator."""

from __future__ import annotations

import errno
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from qrad_agent.core.models import Quality
from qrad_agent.sensors.base import NotReady, SensorError, WrongChip
from qrad_agent.sensors.bme280 import (
    BME280,
    Calibration,
    compensate_humidity,
    compensate_pressure,
    compensate_temperature,
    max_measurement_s,
)
from qrad_agent.sim.chips.bme280 import DEFAULT_CALIBRATION, BME280Chip, pack_calibration
from qrad_agent.sim.chips.bus import EmulatedBus

# BMP280 datasheet §3.12 worked example (the BME280 shares the T and P compensation)
EXAMPLE = Calibration(
    t1=27504, t2=26435, t3=-1000,
    p1=36477, p2=-10685, p3=3024, p4=2855, p5=140, p6=-7, p7=15500, p8=-14600, p9=6000,
)  # fmt: skip
ADC_T, ADC_P = 519888, 415148


def float_temperature(adc_t: int, c: Calibration) -> tuple[float, float]:
    """Datasheet §8.1, the double-precision formula, as an independent check."""
    var1 = (adc_t / 16384.0 - c.t1 / 1024.0) * c.t2
    var2 = (adc_t / 131072.0 - c.t1 / 8192.0) ** 2 * c.t3
    return (var1 + var2) / 5120.0, var1 + var2


def float_pressure(adc_p: int, c: Calibration, t_fine: float) -> float:
    var1 = t_fine / 2.0 - 64000.0
    var2 = var1 * var1 * c.p6 / 32768.0
    var2 = var2 + var1 * c.p5 * 2.0
    var2 = var2 / 4.0 + c.p4 * 65536.0
    var1 = (c.p3 * var1 * var1 / 524288.0 + c.p2 * var1) / 524288.0
    var1 = (1.0 + var1 / 32768.0) * c.p1
    p = 1048576.0 - adc_p
    p = (p - var2 / 4096.0) * 6250.0 / var1
    var1 = c.p9 * p * p / 2147483648.0
    var2 = p * c.p8 / 32768.0
    return p + (var1 + var2 + c.p7) / 16.0


def float_humidity(adc_h: int, c: Calibration, t_fine: float) -> float:
    h = t_fine - 76800.0
    h = (adc_h - (c.h4 * 64.0 + c.h5 / 16384.0 * h)) * (
        c.h2 / 65536.0 * (1.0 + c.h6 / 67108864.0 * h * (1.0 + c.h3 / 67108864.0 * h))
    )
    h = h * (1.0 - c.h1 * h / 524288.0)
    return max(0.0, min(100.0, h))


class SimClock:
    def __init__(self, t: float = 50.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Rig:
    clock: SimClock
    bus: EmulatedBus
    chip: BME280Chip
    sensor: BME280


def rig(address: int = 0x76, **chip_args: object) -> Rig:
    clock = SimClock()
    bus = EmulatedBus()
    chip = BME280Chip(clock=clock, **chip_args)  # type: ignore[arg-type]
    bus.attach(address, chip)
    return Rig(clock, bus, chip, BME280(bus, address, sleep=clock.sleep))


# -- compensation ------------------------------------------------------------------------------


def test_temperature_worked_example():
    centi_c, t_fine = compensate_temperature(ADC_T, EXAMPLE)
    assert (centi_c, t_fine) == (2508, 128422)  # 25.08 °C, as the datasheet prints
    t_float, t_fine_float = float_temperature(ADC_T, EXAMPLE)
    assert t_float == pytest.approx(25.0825, abs=1e-4)
    assert t_fine == int(t_fine_float)


def test_pressure_worked_example():
    _, t_fine = compensate_temperature(ADC_T, EXAMPLE)
    q24_8 = compensate_pressure(ADC_P, EXAMPLE, t_fine)
    # The datasheet's table prints 25767236; carrying out its own 64-bit formula gives
    # 25767233 (0.012 Pa lower). The formula is what chips and the reference driver run.
    assert q24_8 == 25767233
    assert abs(q24_8 - 25767236) <= 3
    assert q24_8 / 256 == pytest.approx(100653.25, abs=0.01)
    _, t_fine_float = float_temperature(ADC_T, EXAMPLE)
    assert float_pressure(ADC_P, EXAMPLE, t_fine_float) == pytest.approx(100653.27, abs=0.01)


def test_integer_and_float_formulas_agree_across_the_range():
    cal = DEFAULT_CALIBRATION
    for adc_t in range(300000, 720000, 21111):
        centi_c, t_fine = compensate_temperature(adc_t, cal)
        t_float, t_fine_float = float_temperature(adc_t, cal)
        assert centi_c / 100 == pytest.approx(t_float, abs=0.01)
        for adc_p in range(250000, 600000, 35000):
            p_int = compensate_pressure(adc_p, cal, t_fine) / 256
            assert p_int == pytest.approx(float_pressure(adc_p, cal, t_fine_float), abs=1.0)
        for adc_h in range(0, 65536, 4099):
            h_int = compensate_humidity(adc_h, cal, t_fine) / 1024
            assert h_int == pytest.approx(float_humidity(adc_h, cal, t_fine_float), abs=0.05)


def test_humidity_clamps_at_both_ends():
    _, t_fine = compensate_temperature(ADC_T, DEFAULT_CALIBRATION)
    assert compensate_humidity(0, DEFAULT_CALIBRATION, t_fine) == 0
    assert compensate_humidity(0xFFFF, DEFAULT_CALIBRATION, t_fine) == 100 * 1024


def test_void_calibration_gives_zero_pressure_not_a_division_error():
    void = Calibration(27504, 26435, -1000, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert compensate_pressure(ADC_P, void, 128422) == 0


# The datasheet's C (§4.2.3, §8.2), compiled: an oracle for C's own integer semantics
# (32/64-bit types, arithmetic shifts, truncating division), independent of Python's.
REFERENCE_C = r"""
#include <stdint.h>
#include <stdio.h>
typedef int32_t S32; typedef int64_t S64; typedef uint32_t U32;
S32 T1, T2, T3, P1, P2, P3, P4, P5, P6, P7, P8, P9, H1, H2, H3, H4, H5, H6, t_fine;
S32 comp_T(S32 adc_T) {
    S32 var1, var2, T;
    var1 = ((((adc_T >> 3) - ((S32)T1 << 1))) * ((S32)T2)) >> 11;
    var2 = (((((adc_T >> 4) - ((S32)T1)) * ((adc_T >> 4) - ((S32)T1))) >> 12) * ((S32)T3)) >> 14;
    t_fine = var1 + var2;
    T = (t_fine * 5 + 128) >> 8;
    return T;
}
U32 comp_P(S32 adc_P) {
    S64 var1, var2, p;
    var1 = ((S64)t_fine) - 128000;
    var2 = var1 * var1 * (S64)P6;
    var2 = var2 + ((var1 * (S64)P5) << 17);
    var2 = var2 + (((S64)P4) << 35);
    var1 = ((var1 * var1 * (S64)P3) >> 8) + ((var1 * (S64)P2) << 12);
    var1 = (((((S64)1) << 47) + var1)) * ((S64)P1) >> 33;
    if (var1 == 0) return 0;
    p = 1048576 - adc_P;
    p = (((p << 31) - var2) * 3125) / var1;
    var1 = (((S64)P9) * (p >> 13) * (p >> 13)) >> 25;
    var2 = (((S64)P8) * p) >> 19;
    p = ((p + var1 + var2) >> 8) + (((S64)P7) << 4);
    return (U32)p;
}
U32 comp_H(S32 adc_H) {
    S32 v;
    v = (t_fine - ((S32)76800));
    v = (((((adc_H << 14) - (((S32)H4) << 20) - (((S32)H5) * v)) + ((S32)16384)) >> 15)
         * (((((((v * ((S32)H6)) >> 10) * (((v * ((S32)H3)) >> 11) + ((S32)32768))) >> 10)
              + ((S32)2097152)) * ((S32)H2) + 8192) >> 14));
    v = (v - (((((v >> 15) * (v >> 15)) >> 7) * ((S32)H1)) >> 4));
    v = (v < 0 ? 0 : v);
    v = (v > 419430400 ? 419430400 : v);
    return (U32)(v >> 12);
}
int main(void) {
    if (scanf("%d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d", &T1, &T2, &T3, &P1,
              &P2, &P3, &P4, &P5, &P6, &P7, &P8, &P9, &H1, &H2, &H3, &H4, &H5, &H6) != 18)
        return 2;
    S32 t, p, h;
    while (scanf("%d %d %d", &t, &p, &h) == 3) {
        S32 T = comp_T(t);
        printf("%d %d %u %u\n", T, t_fine, comp_P(p), comp_H(h));
    }
    return 0;
}
"""


def test_compensation_matches_the_datasheet_c_compiled(tmp_path: Path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the datasheet's reference code")
    (tmp_path / "ref.c").write_text(REFERENCE_C)
    subprocess.run([cc, "-O1", "-o", str(tmp_path / "ref"), str(tmp_path / "ref.c")], check=True)
    cals = [DEFAULT_CALIBRATION, replace(DEFAULT_CALIBRATION, h4=-100, h5=-7, h3=75, h6=-20)]
    for cal in cals:
        inputs = [  # 3000 points spread over every channel's range
            (300000 + i * 139, 250000 + (i * 7919) % 350000, (i * 104729) % 65536)
            for i in range(3000)
        ]
        stdin = " ".join(str(getattr(cal, f)) for f in cal.__dataclass_fields__) + "\n"
        stdin += "\n".join(f"{t} {p} {h}" for t, p, h in inputs) + "\n"
        out = subprocess.run(
            [str(tmp_path / "ref")], input=stdin, capture_output=True, text=True, check=True
        ).stdout.split("\n")
        assert len(out) == len(inputs) + 1
        for (adc_t, adc_p, adc_h), line in zip(inputs, out, strict=False):
            centi_c, t_fine = compensate_temperature(adc_t, cal)
            ours = (
                centi_c,
                t_fine,
                compensate_pressure(adc_p, cal, t_fine),
                compensate_humidity(adc_h, cal, t_fine),
            )
            assert ours == tuple(int(v) for v in line.split()), (adc_t, adc_p, adc_h)


# -- calibration registers -----------------------------------------------------------------


def test_calibration_bytes_decode_by_hand():
    block_a = bytes.fromhex(
        "706b 4367 18fc 7d8e 43d6 d00b 270b 8c00 f9ff 8c3c f8c6 7017 00 4b".replace(" ", "")
    )
    # E1..E7: H2 = 0x0172 = 370, H3 = 0, E4 = 0x13, E5 = 0x25, E6 = 0x03, H6 = 0x1E
    # H4 = 0x13 << 4 | 0x5 = 309 ; H5 = 0x03 << 4 | 0x2 = 50
    block_b = bytes([0x72, 0x01, 0x00, 0x13, 0x25, 0x03, 0x1E])
    cal = Calibration.from_registers(block_a, block_b)
    assert cal == DEFAULT_CALIBRATION
    assert pack_calibration(cal) == (block_a, block_b)


def test_negative_h4_h5_share_nibbles_correctly():
    # H4 = -100 = 0xF9C: E4 = 0xF9, E5 low nibble 0xC; H5 = -7 = 0xFF9: E6 = 0xFF, E5 high 0x9
    block_b = bytes([0x00, 0x00, 0x00, 0xF9, 0x9C, 0xFF, 0x00])
    cal = Calibration.from_registers(bytes(24) + b"\x00\x00", block_b)
    assert (cal.h4, cal.h5) == (-100, -7)
    for h4, h5 in ((-2048, 2047), (2047, -2048), (0, -1), (-1, 0)):
        packed = pack_calibration(replace(EXAMPLE, h4=h4, h5=h5))
        assert Calibration.from_registers(*packed).h4 == h4
        assert Calibration.from_registers(*packed).h5 == h5
    with pytest.raises(ValueError, match="12-bit"):
        pack_calibration(replace(EXAMPLE, h4=2048))


def test_calibration_blocks_of_the_wrong_size_are_refused():
    with pytest.raises(ValueError, match="26 and 7"):
        Calibration.from_registers(bytes(24), bytes(7))


# -- driver against the emulator ----------------------------------------------------------


def test_identify_accepts_only_chip_id_0x60():
    r = rig()
    assert r.sensor.identify() == "BME280 (chip id 0x60)"
    r.chip.fault = "wrong_id"
    with pytest.raises(WrongChip, match=r"0x58 at 0x76 is a BMP280") as info:
        r.sensor.identify()
    assert info.value.quality is Quality.WRONG_CHIP
    assert "0x60" in str(info.value)
    with pytest.raises(WrongChip, match="BME680"):
        rig(chip_id=0x61).sensor.identify()
    with pytest.raises(WrongChip, match="0x42 at 0x77 is not a Bosch sensor"):
        rig(address=0x77, chip_id=0x42).sensor.identify()


class FixedCodes(BME280Chip):
    """Converts to given ADC codes whatever the physical values: for worked examples."""

    codes = (0, 0, 0)

    def raw_codes(self) -> tuple[int, int, int]:
        return self.codes


def test_worked_example_through_the_registers():
    clock = SimClock()
    bus = EmulatedBus()
    chip = FixedCodes(clock=clock)  # default calibration carries the example's T and P trims
    bus.attach(0x76, chip)
    sensor = BME280(bus, sleep=clock.sleep)
    chip.codes = (ADC_P, ADC_T, 0x6A3B)  # adc_P 0x655AC: its xlsb nibble 0xC must count
    m = sensor.read()
    assert bytes(chip.memory[0xF7:0xFF]) == bytes.fromhex("655ac07eed006a3b")
    assert m.temperature_c == 25.08
    assert m.pressure_pa == 25767233 / 256
    assert m.raw == ADC_T
    _, t_fine = compensate_temperature(ADC_T, DEFAULT_CALIBRATION)
    assert m.humidity_pct == compensate_humidity(0x6A3B, DEFAULT_CALIBRATION, t_fine) / 1024
    chip.codes = (ADC_P, ADC_T + 0xB, 0x6A3B)  # a temperature xlsb nibble too
    assert sensor.read().raw == ADC_T + 0xB


def test_a_bmp280_is_refused_before_any_measurement():
    r = rig()
    r.chip.fault = "wrong_id"
    with pytest.raises(WrongChip):
        r.sensor.read()
    assert r.chip.measurements == 0


def test_round_trip_across_the_range():
    r = rig()
    for t in (-40.0, -7.77, 0.0, 19.5, 21.37, 26.5, 40.0, 85.0):
        for p in (30000.0, 87654.3, 101325.0, 110000.0):
            for h in (0.0, 3.3, 45.0, 87.5, 100.0):
                r.chip.temperature_c, r.chip.pressure_pa, r.chip.humidity_pct = t, p, h
                m = r.sensor.read()
                assert m.temperature_c == pytest.approx(t, abs=0.011)
                assert m.pressure_pa == pytest.approx(p, abs=2.0)  # 16-bit at x1: 2.6 Pa steps
                assert m.humidity_pct == pytest.approx(h, abs=0.02)
                assert m.co2_ppm is None


def test_emulator_quantises_to_16_bits_at_x1_oversampling():
    r = rig(temperature_c=23.456)
    m = r.sensor.read()
    assert m.raw is not None and m.raw & 0xF == 0  # xlsb nibble is empty at 16-bit resolution
    assert r.chip.memory[0xF9] & 0xF0 == 0


def test_ctrl_hum_is_written_before_ctrl_meas():
    # Humidity oversampling only takes effect with the next ctrl_meas write; a driver doing
    # them the other way round would read the skipped-channel value 0x8000 on a fresh chip.
    r = rig(humidity_pct=62.0)
    m = r.sensor.read()
    assert m.humidity_pct == pytest.approx(62.0, abs=0.02)
    assert r.chip.memory[0xF2] == 0x01 and r.chip.memory[0xF4] & 0xFC == 0x24


def test_humidity_oversampling_needs_a_ctrl_meas_write():
    r = rig()
    r.bus.write_byte_data(0x76, 0xF4, 0x25)  # forced, T and P x1, humidity still skipped
    r.bus.write_byte_data(0x76, 0xF2, 0x01)  # too late for this measurement
    r.clock.t += 0.01
    data = r.bus.read_i2c_block_data(0x76, 0xF7, 8)
    assert (data[6], data[7]) == (0x80, 0x00)
    assert (data[0], data[3]) != (0x80, 0x80)


def test_forced_mode_sets_measuring_then_returns_to_sleep():
    r = rig()
    r.bus.write_i2c_block_data(0x76, 0xF2, [0x01, 0xF4, 0x25])  # register/value pairs
    assert r.bus.read_byte_data(0x76, 0xF3) & 0x08
    assert r.bus.read_byte_data(0x76, 0xF4) & 0x03 == 0x01
    r.clock.t += 0.008  # typical time at x1/x1/x1
    assert not r.bus.read_byte_data(0x76, 0xF3) & 0x08
    assert r.bus.read_byte_data(0x76, 0xF4) == 0x24  # mode bits back to sleep
    assert r.chip.measurements == 1


def test_a_read_waits_the_datasheet_maximum():
    r = rig()
    r.sensor.read()  # loads calibration
    before = r.clock.t
    r.sensor.read()
    assert max_measurement_s() == pytest.approx(0.0093)
    assert r.clock.t - before == pytest.approx(0.0093)


def test_a_chip_that_keeps_measuring_is_not_ready():
    r = rig()
    r.chip.fault = "busy"
    with pytest.raises(NotReady, match="still measuring") as info:
        r.sensor.read()
    assert info.value.quality is Quality.STALE
    r.chip.fault = None
    assert r.sensor.read().temperature_c == pytest.approx(21.0, abs=0.011)


class LostWrites(BME280Chip):
    """A chip that acknowledges ctrl_meas but never starts: data keep their reset values."""

    def write_register(self, register: int, data: bytes) -> None:
        if register != 0xF4:
            super().write_register(register, data)


def test_reset_values_in_every_channel_mean_no_measurement():
    clock = SimClock()
    bus = EmulatedBus()
    bus.attach(0x76, LostWrites(clock=clock))
    with pytest.raises(NotReady, match="reset values"):
        BME280(bus, sleep=clock.sleep).read()


def test_soft_reset_restores_reset_values():
    r = rig()
    r.sensor.read()
    r.bus.write_byte_data(0x76, 0xE0, 0xB6)
    data = r.bus.read_i2c_block_data(0x76, 0xF7, 8)
    assert data == [0x80, 0x00, 0x00, 0x80, 0x00, 0x00, 0x80, 0x00]
    assert r.bus.read_byte_data(0x76, 0xF4) == 0


def test_zero_calibration_is_an_error_not_a_reading():
    void = Calibration(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    clock = SimClock()
    bus = EmulatedBus()
    chip = BME280Chip(clock=clock)
    bus.attach(0x76, chip)
    chip.memory[0x88 : 0x88 + 26], chip.memory[0xE1 : 0xE1 + 7] = pack_calibration(void)
    with pytest.raises(SensorError, match="dig_T1=0"):
        BME280(bus, sleep=clock.sleep).read()


def test_stuck_data_registers_repeat_the_raw_value():
    r = rig(temperature_c=20.0)
    first = r.sensor.read()
    r.chip.fault = "stuck"
    r.chip.temperature_c = 30.0
    assert r.sensor.read().raw == first.raw
    r.chip.fault = None
    assert r.sensor.read().temperature_c == pytest.approx(30.0, abs=0.011)


def test_emulator_refuses_unknown_faults():
    with pytest.raises(ValueError, match="allowed: busy, stuck, wrong_id"):
        rig().chip.fault = "bad_crc"  # the BME280 protocol has no CRC


@pytest.mark.parametrize(
    ("fault", "code"), [("nack", errno.EREMOTEIO), ("timeout", errno.ETIMEDOUT)]
)
def test_bus_faults_surface_as_os_errors(fault: str, code: int) -> None:
    r = rig()
    r.sensor.read()
    r.bus.inject(0x76, fault)
    with pytest.raises(OSError) as info:
        r.sensor.read()
    assert info.value.errno == code
    r.bus.inject(0x76, None)
    assert r.sensor.read().pressure_pa == pytest.approx(101325.0, abs=2.0)


def test_calibration_is_read_once():
    r = rig()
    r.sensor.read()
    cal = r.sensor.calibration
    assert cal == DEFAULT_CALIBRATION
    r.chip.memory[0x88] ^= 0xFF  # later NVM changes are not re-read
    r.sensor.read()
    assert r.sensor.calibration is cal
