"""TMP102 driver against the TMP102 register emulator and fixed datasheet words."""

from __future__ import annotations

import ctypes
import errno

import pytest
from smbus2 import i2c_msg

from qrad_agent.sensors.tmp102 import TMP102
from qrad_agent.sim.chips.bus import EmulatedBus, RegisterChip
from qrad_agent.sim.chips.tmp102 import TMP102Chip
from tests.chip_rig import SimClock as Clock

ADDR = 0x48


def fixed_word(word: int) -> TMP102:
    """A driver on a chip whose temperature register holds ``word`` (MSB first on the wire)."""
    bus = EmulatedBus()
    chip = RegisterChip()
    chip.registers[0x00] = word.to_bytes(2, "big")
    bus.attach(ADDR, chip)
    return TMP102(bus, ADDR)


def warm_chip(temperature_c: float = 21.0) -> tuple[EmulatedBus, TMP102Chip, Clock]:
    clock = Clock()
    bus = EmulatedBus()
    chip = TMP102Chip(temperature_c, clock=clock)
    bus.attach(ADDR, chip)
    clock.now = 1.0  # well past the first conversion
    return bus, chip, clock


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        (0x7FF0, 127.9375),  # datasheet: the 12-bit maximum
        (0xE700, -25.0),  # datasheet
        (0x6400, 100.0),
        (0x1900, 25.0),
        (0x0040, 0.25),
        (0x0010, 0.0625),
        (0x0000, 0.0),
        (0xFFF0, -0.0625),  # smallest negative: the sign must extend through the shift
        (0xFC00, -4.0),
        (0xC900, -55.0),
        (0x8000, -128.0),  # the 12-bit minimum
        # extended (13-bit) mode: bit 0 set, one more integer bit
        (0x4B01, 150.0),
        (0x3E81, 125.0),
        (0x0009, 0.0625),
        (0xF381, -25.0),
        (0xE481, -55.0),
    ],
)
def test_datasheet_words(word: int, expected: float) -> None:
    m = fixed_word(word).read()
    assert m.temperature_c == expected
    assert m.raw == word
    assert m.humidity_pct is None


def test_smbus_word_byte_order_is_swapped() -> None:
    # 0x1900 is 25 °C; read_word_data returns 0x0019 (little-endian) and the driver must swap
    drv = fixed_word(0x1900)
    assert drv.bus.read_word_data(ADDR, 0x00) == 0x0019
    assert drv.read().temperature_c == 25.0


def test_reads_zero_before_first_conversion_then_the_temperature() -> None:
    clock = Clock()
    bus = EmulatedBus()
    bus.attach(ADDR, TMP102Chip(23.5, clock=clock))
    drv = TMP102(bus, ADDR)
    clock.now = 0.020
    assert drv.read().temperature_c == 0.0
    clock.now = 0.036
    assert drv.read().temperature_c == 23.5


@pytest.mark.parametrize("extended", [False, True])
def test_round_trip_over_the_range(extended: bool) -> None:
    bus, chip, _ = warm_chip()
    drv = TMP102(bus, ADDR)
    if extended:
        bus.write_i2c_block_data(ADDR, 0x01, [0x60, 0xA0 | 0x10])
        assert chip.extended
    t = -55.0
    while t <= 127.0:
        chip.temperature_c = t
        got = drv.read().temperature_c
        assert got is not None
        assert abs(got - t) <= 0.0625 / 2 + 1e-9, (t, got)
        t += 0.37
    if extended:
        chip.temperature_c = 149.9
        assert drv.read().temperature_c == pytest.approx(149.875)


def test_normal_mode_saturates_at_full_scale() -> None:
    bus, _, _ = warm_chip(140.0)
    assert TMP102(bus, ADDR).read().temperature_c == 127.9375


def test_identify_does_not_touch_the_bus() -> None:
    bus, _, _ = warm_chip()
    bus.inject(ADDR, "disconnect")
    before = bus.transactions
    assert "TMP102" in TMP102(bus, ADDR).identify()
    assert bus.transactions == before


@pytest.mark.parametrize(
    ("fault", "code"),
    [("nack", errno.EREMOTEIO), ("disconnect", errno.EREMOTEIO), ("timeout", errno.ETIMEDOUT)],
)
def test_bus_faults_propagate_as_oserror(fault: str, code: int) -> None:
    bus, _, _ = warm_chip()
    drv = TMP102(bus, ADDR)
    bus.inject(ADDR, fault)
    with pytest.raises(OSError) as info:
        drv.read()
    assert info.value.errno == code
    bus.inject(ADDR, None)
    assert drv.read().temperature_c == 21.0


def test_stuck_fault_freezes_the_raw_word() -> None:
    bus, chip, _ = warm_chip(20.0)
    drv = TMP102(bus, ADDR)
    chip.fault = "stuck"
    frozen = drv.read()
    chip.temperature_c = 24.0
    again = drv.read()
    assert again.raw == frozen.raw == 0x1400
    assert again.temperature_c == 20.0
    chip.fault = None
    assert drv.read().temperature_c == 24.0


def test_stuck_fault_repeats_the_last_word_sent() -> None:
    bus, chip, _ = warm_chip(20.0)
    drv = TMP102(bus, ADDR)
    first = drv.read()
    chip.fault = "stuck"
    chip.temperature_c = 24.0
    assert drv.read().raw == first.raw


def test_i2c_rdwr_combined_transfer_sees_msb_first() -> None:
    bus, _, _ = warm_chip(-25.0)
    pointer = i2c_msg.write(ADDR, [0x00])
    data = i2c_msg.read(ADDR, 2)
    bus.i2c_rdwr(pointer, data)
    assert ctypes.string_at(data.buf, 2) == bytes([0xE7, 0x00])  # the datasheet's -25 °C word
    assert TMP102(bus, ADDR).read().raw == 0xE700
