"""MCP9808 driver against the MCP9808 register emulator and fixed datasheet bytes."""

from __future__ import annotations

import ctypes
import errno

import pytest
from smbus2 import i2c_msg

from qrad_agent.sensors.base import SensorError, WrongChip, swap16
from qrad_agent.sensors.mcp9808 import MCP9808
from qrad_agent.sim.chips.bus import EmulatedBus, RegisterChip
from qrad_agent.sim.chips.mcp9808 import CONVERSION_S, MCP9808Chip
from tests.chip_rig import SimClock as Clock

ADDR = 0x18


def fixed(ambient: bytes, manufacturer: int = 0x0054, device: int = 0x0400) -> MCP9808:
    bus = EmulatedBus()
    chip = RegisterChip()
    chip.registers.update({0x05: ambient, 0x06: manufacturer.to_bytes(2, "big"),
                           0x07: device.to_bytes(2, "big")})
    bus.attach(ADDR, chip)
    return MCP9808(bus, ADDR)


def running(temperature_c: float = 21.0) -> tuple[EmulatedBus, MCP9808Chip, Clock]:
    clock = Clock()
    bus = EmulatedBus()
    chip = MCP9808Chip(temperature_c, clock=clock)
    bus.attach(ADDR, chip)
    clock.now = 1.0
    return bus, chip, clock


def limit_bytes(celsius: float) -> list[int]:
    word = round(celsius * 4) << 2 & 0x1FFC
    return [word >> 8, word & 0xFF]


@pytest.mark.parametrize(
    ("upper", "lower", "expected"),
    [
        (0x01, 0x94, 25.25),  # the datasheet's example
        (0x07, 0xD0, 125.0),
        (0x00, 0x01, 0.0625),
        (0x00, 0x00, 0.0),
        (0x1F, 0xFF, -0.0625),  # the sign bit with every data bit set
        (0x1E, 0x70, -25.0),  # the datasheet sample code's sign term would give +231
        (0x1D, 0x80, -40.0),
        (0x0F, 0xFF, 255.9375),  # register full scale
        (0x10, 0x00, -256.0),
    ],
)
@pytest.mark.parametrize("flags", [0x00, 0x20, 0x40, 0x80, 0xC0, 0xE0])
def test_datasheet_bytes_with_every_alert_flag(upper: int, lower: int, expected: float,
                                               flags: int) -> None:
    m = fixed(bytes([upper | flags, lower])).read()
    assert m.temperature_c == expected
    assert m.raw == (upper << 8 | lower)  # flags never reach raw, so they cannot hide "stuck"


def test_power_on_limits_raise_two_flags_that_the_driver_ignores() -> None:
    bus, _, _ = running(25.25)
    wire = swap16(bus.read_word_data(ADDR, 0x05))
    assert wire == 0xC194  # T >= T_CRIT (0 °C) and T > T_UPPER (0 °C)
    assert MCP9808(bus, ADDR).read().temperature_c == 25.25


@pytest.mark.parametrize(
    ("temperature", "flags"),
    [(21.0, 0x00), (30.0, 0x00), (30.25, 0x40), (40.0, 0xC0), (17.75, 0x20), (-10.0, 0x20)],
)
def test_alert_flags_follow_the_limits(temperature: float, flags: int) -> None:
    bus, chip, clock = running()
    bus.write_i2c_block_data(ADDR, 0x02, limit_bytes(30.0))  # T_UPPER
    bus.write_i2c_block_data(ADDR, 0x03, limit_bytes(18.0))  # T_LOWER
    bus.write_i2c_block_data(ADDR, 0x04, limit_bytes(40.0))  # T_CRIT
    chip.temperature_c = temperature
    clock.now += CONVERSION_S[3]
    assert swap16(bus.read_word_data(ADDR, 0x05)) >> 8 & 0xE0 == flags
    assert MCP9808(bus, ADDR).read().temperature_c == temperature


def test_identify_checks_both_id_registers() -> None:
    bus, _, _ = running()
    assert MCP9808(bus, ADDR).identify() == \
        "MCP9808 (manufacturer 0x0054, device 0x04, revision 0x00)"


def test_wrong_manufacturer_is_named() -> None:
    bus, chip, _ = running()
    chip.fault = "wrong_id"
    with pytest.raises(WrongChip, match=r"expected 0x0054, found 0x1131") as info:
        MCP9808(bus, ADDR).identify()
    assert info.value.quality == "wrong_chip"
    chip.fault = None
    assert MCP9808(bus, ADDR).identify().startswith("MCP9808")


def test_wrong_device_id_is_named() -> None:
    drv = fixed(b"\x01\x94", manufacturer=0x0054, device=0x0502)
    with pytest.raises(WrongChip, match=r"expected 0x04, found 0x05"):
        drv.identify()
    # the revision byte may change between silicon revisions; only the device byte counts
    assert "revision 0x07" in fixed(b"\x01\x94", device=0x0407).identify()


def test_round_trip_over_the_range() -> None:
    bus, chip, clock = running()
    drv = MCP9808(bus, ADDR)
    t = -40.0
    while t <= 125.0:
        chip.temperature_c = t
        clock.now += CONVERSION_S[3]
        got = drv.read().temperature_c
        assert got is not None
        assert abs(got - t) <= 0.0625 / 2 + 1e-9, (t, got)
        t += 0.173


def test_register_holds_the_last_conversion_and_follows_resolution() -> None:
    clock = Clock()
    bus = EmulatedBus()
    chip = MCP9808Chip(22.3, clock=clock)
    bus.attach(ADDR, chip)
    drv = MCP9808(bus, ADDR)
    clock.now = 0.2
    assert drv.read().temperature_c == 0.0  # power-on value: no conversion finished yet
    clock.now = 0.25
    assert drv.read().temperature_c == 22.3125
    bus.write_byte_data(ADDR, 0x08, 0x00)  # 0.5 °C resolution, 30 ms conversions
    assert bus.read_byte_data(ADDR, 0x08) == 0x00
    chip.temperature_c = 22.8
    clock.now = 0.49
    assert drv.read().temperature_c == 22.3125  # the 0.0625 °C conversion still running
    clock.now = 0.5
    assert drv.read().temperature_c == 23.0
    chip.temperature_c = -3.3
    clock.now = 0.53
    assert drv.read().temperature_c == -3.5


def test_stuck_repeats_the_last_conversion() -> None:
    bus, chip, clock = running(20.0)
    drv = MCP9808(bus, ADDR)
    before = drv.read()
    chip.fault = "stuck"
    chip.temperature_c = 23.0
    clock.now += 5.0
    assert drv.read().raw == before.raw
    chip.fault = None
    clock.now += CONVERSION_S[3]
    assert drv.read().temperature_c == 23.0


def test_faults_the_chip_cannot_have_are_refused() -> None:
    with pytest.raises(ValueError, match="allowed: stuck, wrong_id"):
        MCP9808Chip().fault = "bad_crc"


@pytest.mark.parametrize(
    ("fault", "code"),
    [("nack", errno.EREMOTEIO), ("disconnect", errno.EREMOTEIO), ("timeout", errno.ETIMEDOUT)],
)
def test_bus_faults_propagate(fault: str, code: int) -> None:
    bus, _, _ = running()
    drv = MCP9808(bus, ADDR)
    bus.inject(ADDR, fault)
    for call in (drv.read, drv.identify):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == code
        assert not isinstance(info.value, SensorError)


def test_i2c_rdwr_combined_transfer_and_read_only_registers() -> None:
    bus, _, _ = running(25.25)
    msgs = i2c_msg.write(ADDR, [0x05]), i2c_msg.read(ADDR, 2)
    bus.i2c_rdwr(*msgs)
    assert ctypes.string_at(msgs[1].buf, 2) == b"\xc1\x94"
    with pytest.raises(OSError, match="writable"):
        bus.write_i2c_block_data(ADDR, 0x06, [0, 0])
