"""SHT4x driver against the SHT4x command emulator, through smbus2.i2c_msg transfers."""

from __future__ import annotations

import errno

import pytest

from qrad_agent.sensors.base import CrcError, SensorError, WrongChip, sensirion_crc8
from qrad_agent.sensors.sht4x import MEASURE_WAIT_S, SERIAL_WAIT_S, SHT4x
from qrad_agent.sim.chips.bus import EmulatedBus
from qrad_agent.sim.chips.sht4x import SHT4xChip
from tests.chip_rig import FixedAnswer, SimClock

ADDR = 0x44


class Clock(SimClock):
    start = 5.0


class Recording(SHT4xChip):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.writes: list[bytes] = []

    def i2c_write(self, data: bytes) -> None:
        self.writes.append(data)
        super().i2c_write(data)


def rig(temperature_c: float = 21.0, humidity_pct: float = 45.0):
    clock = Clock()
    bus = EmulatedBus()
    chip = Recording(temperature_c=temperature_c, humidity_pct=humidity_pct, clock=clock)
    bus.attach(ADDR, chip)
    return bus, chip, clock, SHT4x(bus, ADDR, sleep=clock.sleep)


def framed(*words: int) -> bytes:
    out = b""
    for w in words:
        out += bytes([w >> 8, w & 0xFF, sensirion_crc8([w >> 8, w & 0xFF])])
    return out


def fixed(answer: bytes) -> SHT4x:
    bus = EmulatedBus()
    bus.attach(ADDR, FixedAnswer(answer))
    return SHT4x(bus, ADDR, sleep=lambda _: None)


def test_measurement_on_the_wire() -> None:
    _, chip, clock, drv = rig(25.0, 50.0)
    m = drv.read()
    assert chip.writes == [b"\xfd"]
    assert clock.slept == [MEASURE_WAIT_S]
    assert m.raw == 0x6666
    assert m.temperature_c == pytest.approx(25.0, abs=1e-9)
    # 50 %RH is S = 56/125 of full scale
    assert m.humidity_pct == pytest.approx(50.0, abs=125 / 65535 / 2)


@pytest.mark.parametrize(
    ("rh_word", "rh"),
    [
        (0x0000, 0.0),  # -6 %RH by the formula: clipped
        (3146, 0.0),  # -6 + 125 * 3146 / 65535 = 0.0006: just above the clip
        (0x8000, 56.50095369650),
        (58982, 100.0),  # 106.5 by the formula: clipped
        (0xFFFF, 100.0),
    ],
)
def test_humidity_formula_and_clipping(rh_word: int, rh: float) -> None:
    m = fixed(framed(0x6666, rh_word)).read()
    assert m.humidity_pct == pytest.approx(rh, abs=1e-3)
    assert m.humidity_pct is not None and 0.0 <= m.humidity_pct <= 100.0


@pytest.mark.parametrize(("t_word", "t"), [(0x0000, -45.0), (0xFFFF, 130.0), (0x1D8D, -24.8)])
def test_temperature_edges(t_word: int, t: float) -> None:
    got = fixed(framed(t_word, 0x8000)).read().temperature_c
    assert got == pytest.approx(t, abs=175 / 65535 / 2)


def test_round_trip_over_the_range() -> None:
    _, chip, _, drv = rig()
    t, rh = -40.0, 0.0
    while t <= 125.0:
        chip.temperature_c, chip.humidity_pct = t, rh
        m = drv.read()
        assert m.temperature_c is not None and m.humidity_pct is not None
        assert abs(m.temperature_c - t) <= 175 / 65535 / 2 + 1e-9, (t, m)
        assert abs(m.humidity_pct - rh) <= 125 / 65535 / 2 + 1e-9, (rh, m)
        t += 1.13
        rh = (rh + 6.1) % 100.0


def test_driver_waits_through_the_conversion() -> None:
    bus, _, clock, _ = rig(25.0)
    with pytest.raises(OSError) as info:
        SHT4x(bus, ADDR, sleep=lambda _: None).read()
    assert info.value.errno == errno.EREMOTEIO
    clock.now += 0.0083
    assert SHT4x(bus, ADDR, sleep=clock.sleep).read().raw == 0x6666


def test_chip_precisions_and_commands() -> None:
    bus, _, clock, _ = rig()
    for command, duration in ((b"\xfd", 0.0083), (b"\xf6", 0.0045), (b"\xe0", 0.0016)):
        bus.write(ADDR, command)
        clock.now += duration * 0.99
        with pytest.raises(OSError, match="converting"):
            bus.read(ADDR, 6)
        clock.now += duration * 0.02
        assert len(bus.read(ADDR, 6)) == 6
    with pytest.raises(OSError, match="0x24"):
        bus.write(ADDR, b"\x24")  # an SHT3x command means nothing here
    with pytest.raises(OSError, match="1 byte"):
        bus.write(ADDR, b"\x24\x00")


def test_identify_serial() -> None:
    _, chip, clock, drv = rig()
    chip.serial = 0x12345678
    assert drv.identify() == "SHT4x serial 12345678"
    assert chip.writes == [b"\x89"]
    assert clock.slept == [SERIAL_WAIT_S]


def test_bad_crc_on_read_and_identify() -> None:
    _, chip, _, drv = rig(25.0)
    chip.fault = "bad_crc"
    with pytest.raises(CrcError, match="0x66 0x66 need CRC 0x93, chip sent 0x6C"):
        drv.read()
    with pytest.raises(CrcError, match="serial number"):
        drv.identify()


def test_wrong_id() -> None:
    _, chip, _, drv = rig()
    chip.fault = "wrong_id"
    with pytest.raises(WrongChip, match=r"command 0x89.*found FF FF FF FF FF FF"):
        drv.identify()
    chip.fault = None
    assert drv.identify().startswith("SHT4x serial")


def test_stuck_repeats_the_last_words() -> None:
    _, chip, _, drv = rig(20.0, 40.0)
    before = drv.read()
    chip.fault = "stuck"
    chip.temperature_c = 30.0
    assert drv.read() == before
    chip.fault = None
    assert drv.read() != before


@pytest.mark.parametrize(
    ("fault", "code"),
    [("nack", errno.EREMOTEIO), ("disconnect", errno.EREMOTEIO), ("timeout", errno.ETIMEDOUT)],
)
def test_bus_faults_propagate(fault: str, code: int) -> None:
    bus, _, _, drv = rig()
    bus.inject(ADDR, fault)
    for call in (drv.read, drv.identify):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == code
        assert not isinstance(info.value, SensorError)
