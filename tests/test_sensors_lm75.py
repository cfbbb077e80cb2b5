"""LM75 (9-bit) and LM75A (11-bit) drivers against the LM75 register emulator."""

from __future__ import annotations

import ctypes
import errno

import pytest
from smbus2 import i2c_msg

from qrad_agent.sensors import base
from qrad_agent.sensors.lm75 import LM75, LM75A
from qrad_agent.sim.chips.bus import EmulatedBus, RegisterChip
from qrad_agent.sim.chips.lm75 import CONVERSION_S, LM75AChip, LM75Chip
from tests.chip_rig import SimClock as Clock

ADDR = 0x4A


def fixed_word(cls: type[LM75], word: int) -> LM75:
    bus = EmulatedBus()
    chip = RegisterChip()
    chip.registers[0x00] = word.to_bytes(2, "big")
    bus.attach(ADDR, chip)
    return cls(bus, ADDR)


def running(chip_cls: type[LM75Chip], temperature_c: float = 21.0):
    clock = Clock()
    bus = EmulatedBus()
    chip = chip_cls(temperature_c, clock=clock)
    bus.attach(ADDR, chip)
    clock.now = 0.5
    return bus, chip, clock


# the datasheets' tables of temperature against register content
@pytest.mark.parametrize(
    ("word", "expected"),
    [(0x7D00, 125.0), (0x1900, 25.0), (0x0080, 0.5), (0x0000, 0.0), (0xFF80, -0.5),
     (0xE700, -25.0), (0xC900, -55.0), (0x7F80, 127.5), (0x8000, -128.0)],
)
def test_lm75_datasheet_words(word: int, expected: float) -> None:
    m = fixed_word(LM75, word).read()
    assert m.temperature_c == expected
    assert m.raw == word


@pytest.mark.parametrize(
    ("word", "expected"),
    [(0x7F00, 127.0), (0x7EE0, 126.875), (0x7E20, 126.125), (0x7D00, 125.0), (0x1900, 25.0),
     (0x0020, 0.125), (0x0000, 0.0), (0xFFE0, -0.125), (0xE700, -25.0), (0xC920, -54.875),
     (0xC900, -55.0)],
)
def test_lm75a_datasheet_words(word: int, expected: float) -> None:
    m = fixed_word(LM75A, word).read()
    assert m.temperature_c == expected
    assert m.raw == word


def test_undefined_low_bits_are_ignored_in_value_and_raw() -> None:
    m = fixed_word(LM75, 0x197F).read()
    assert (m.temperature_c, m.raw) == (25.0, 0x1900)
    m = fixed_word(LM75A, 0xFFFF).read()
    assert (m.temperature_c, m.raw) == (-0.125, 0xFFE0)


def test_lm75_driver_on_an_lm75a_floors_to_half_degrees() -> None:
    assert fixed_word(LM75, 0x7EE0).read().temperature_c == 126.5
    assert fixed_word(LM75, 0xFFE0).read().temperature_c == -0.5


@pytest.mark.parametrize(("driver", "chip_cls", "step"), [(LM75, LM75Chip, 0.5),
                                                         (LM75A, LM75AChip, 0.125)])
def test_round_trip_over_the_range(driver: type[LM75], chip_cls: type[LM75Chip],
                                   step: float) -> None:
    bus, chip, clock = running(chip_cls)
    drv = driver(bus, ADDR)
    t = -55.0
    while t <= 125.0:
        chip.temperature_c = t
        clock.now += CONVERSION_S
        got = drv.read().temperature_c
        assert got is not None
        assert abs(got - t) <= step / 2 + 1e-9, (t, got)
        assert (got / step).is_integer()
        t += 0.29


@pytest.mark.parametrize(("driver", "chip_cls", "top", "bottom"),
                         [(LM75, LM75Chip, 127.5, -128.0), (LM75A, LM75AChip, 127.875, -128.0)])
def test_full_scale_saturates(driver: type[LM75], chip_cls: type[LM75Chip], top: float,
                              bottom: float) -> None:
    bus, chip, clock = running(chip_cls, 200.0)
    drv = driver(bus, ADDR)
    assert drv.read().temperature_c == top
    chip.temperature_c = -200.0
    clock.now += CONVERSION_S
    assert drv.read().temperature_c == bottom


def test_register_holds_the_last_conversion() -> None:
    clock = Clock()
    bus = EmulatedBus()
    chip = bus.attach(ADDR, LM75AChip(22.25, clock=clock))
    drv = LM75A(bus, ADDR)
    clock.now = 0.05
    assert drv.read().temperature_c == 0.0  # no conversion finished yet
    clock.now = 0.1
    assert drv.read().temperature_c == 22.25
    assert isinstance(chip, LM75AChip)
    chip.temperature_c = 30.0
    clock.now = 0.15
    assert drv.read().temperature_c == 22.25  # mid-conversion: still the old result
    clock.now = 0.2
    assert drv.read().temperature_c == 30.0


def test_stuck_repeats_the_last_word() -> None:
    bus, chip, clock = running(LM75AChip, 19.0)
    drv = LM75A(bus, ADDR)
    before = drv.read()
    chip.fault = "stuck"
    chip.temperature_c = 26.0
    clock.now += 10 * CONVERSION_S
    assert drv.read().raw == before.raw
    chip.fault = None
    clock.now += CONVERSION_S
    assert drv.read().temperature_c == 26.0


def test_faults_the_chip_cannot_have_are_refused() -> None:
    chip = LM75Chip()
    for fault in ("bad_crc", "wrong_id", "stuk"):
        with pytest.raises(ValueError, match="allowed: stuck"):
            chip.fault = fault


@pytest.mark.parametrize(
    ("fault", "code"),
    [("nack", errno.EREMOTEIO), ("disconnect", errno.EREMOTEIO), ("timeout", errno.ETIMEDOUT)],
)
def test_bus_faults_propagate(fault: str, code: int) -> None:
    bus, _, _ = running(LM75Chip)
    bus.inject(ADDR, fault)
    with pytest.raises(OSError) as info:
        LM75(bus, ADDR).read()
    assert info.value.errno == code
    assert not isinstance(info.value, base.SensorError)


def test_identify_names_the_kind_without_bus_traffic() -> None:
    bus, _, _ = running(LM75AChip)
    bus.inject(ADDR, "disconnect")
    assert LM75A(bus, ADDR).identify().startswith("LM75A")
    assert LM75(bus, ADDR).identify().startswith("LM75 ")
    assert bus.transactions == 0


def test_limit_and_config_registers() -> None:
    bus, chip, _ = running(LM75Chip)
    # power-on T_HYST 75 °C and T_OS 80 °C
    assert base.swap16(bus.read_word_data(ADDR, 0x02)) == 0x4B00
    assert base.swap16(bus.read_word_data(ADDR, 0x03)) == 0x5000
    bus.write_i2c_block_data(ADDR, 0x03, [0x55, 0xFF])
    assert chip.registers[0x03] == b"\x55\x80"
    bus.write_byte_data(ADDR, 0x01, 0x18)
    assert bus.read_byte_data(ADDR, 0x01) == 0x18
    with pytest.raises(OSError, match="0x00"):
        bus.write_i2c_block_data(ADDR, 0x00, [0, 0])


def test_i2c_rdwr_combined_transfer() -> None:
    bus, _, _ = running(LM75AChip, -25.0)
    msgs = i2c_msg.write(ADDR, [0x00]), i2c_msg.read(ADDR, 2)
    bus.i2c_rdwr(*msgs)
    assert ctypes.string_at(msgs[1].buf, 2) == b"\xe7\x00"
