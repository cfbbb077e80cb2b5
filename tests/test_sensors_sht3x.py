"""SHT3x driver against the SHT3x command emulator, through smbus2.i2c_msg transfers."""

from __future__ import annotations

import errno

import pytest

from qrad_agent.sensors.base import CrcError, SensorError, WrongChip, sensirion_crc8
from qrad_agent.sensors.sht3x import MEASURE_WAIT_S, SHT3x, checked_words
from qrad_agent.sim.chips.bus import EmulatedBus
from qrad_agent.sim.chips.sht3x import SHT3xChip
from tests.chip_rig import FixedAnswer, SimClock

ADDR = 0x44


class Clock(SimClock):
    start = 100.0


class Recording(SHT3xChip):
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
    return bus, chip, clock, SHT3x(bus, ADDR, sleep=clock.sleep)


def fixed(answer: bytes) -> SHT3x:
    bus = EmulatedBus()
    bus.attach(ADDR, FixedAnswer(answer))
    return SHT3x(bus, ADDR, sleep=lambda _: None)


def framed(*words: int) -> bytes:
    out = b""
    for w in words:
        out += bytes([w >> 8, w & 0xFF, sensirion_crc8([w >> 8, w & 0xFF])])
    return out


def test_datasheet_crc_example() -> None:
    assert sensirion_crc8([0xBE, 0xEF]) == 0x92
    assert checked_words(b"\xbe\xef\x92", "example") == [0xBEEF]
    with pytest.raises(CrcError, match="0xBE 0xEF need CRC 0x92, chip sent 0x93"):
        checked_words(b"\xbe\xef\x93", "example")


def test_datasheet_example_on_the_wire() -> None:
    _, chip, clock, drv = rig(25.0, 50.0)
    m = drv.read()
    assert chip.writes == [b"\x24\x00"]  # single shot, high repeatability, no stretching
    assert m.raw == 0x6666
    assert m.temperature_c == pytest.approx(25.0, abs=1e-9)
    assert m.humidity_pct == pytest.approx(50.0, abs=100 / 65535)
    assert clock.slept == [MEASURE_WAIT_S]


@pytest.mark.parametrize(
    ("t_word", "rh_word", "t", "rh"),
    [(0x0000, 0x0000, -45.0, 0.0), (0xFFFF, 0xFFFF, 130.0, 100.0), (0x6666, 0x8000, 25.0,
                                                                    50.00076295109483)],
)
def test_full_scale_words(t_word: int, rh_word: int, t: float, rh: float) -> None:
    m = fixed(framed(t_word, rh_word)).read()
    assert m.temperature_c == pytest.approx(t, abs=1e-9)
    assert m.humidity_pct == pytest.approx(rh, abs=1e-9)


def test_round_trip_over_the_range() -> None:
    _, chip, _, drv = rig()
    half_t, half_rh = 175 / 65535 / 2 + 1e-9, 100 / 65535 / 2 + 1e-9
    t, rh = -40.0, 0.0
    while t <= 125.0:
        chip.temperature_c, chip.humidity_pct = t, rh
        m = drv.read()
        assert m.temperature_c is not None and m.humidity_pct is not None
        assert abs(m.temperature_c - t) <= half_t, (t, m)
        assert abs(m.humidity_pct - rh) <= half_rh, (rh, m)
        t += 1.37
        rh = (rh + 7.9) % 100.0


def test_driver_waits_through_the_conversion() -> None:
    bus, _, clock, _ = rig(25.0)
    hasty = SHT3x(bus, ADDR, sleep=lambda _: None)
    with pytest.raises(OSError) as info:
        hasty.read()  # the chip NACKs the read header while converting
    assert info.value.errno == errno.EREMOTEIO
    clock.now += 0.0155
    assert SHT3x(bus, ADDR, sleep=clock.sleep).read().raw == 0x6666


def test_chip_conversion_times_and_one_answer_per_measurement() -> None:
    bus, _, clock, _ = rig()
    for command, duration in ((b"\x24\x00", 0.0155), (b"\x24\x0b", 0.0065), (b"\x24\x16", 0.0045)):
        bus.write(ADDR, command)
        clock.now += duration * 0.99
        with pytest.raises(OSError):
            bus.read(ADDR, 6)
        with pytest.raises(OSError):
            bus.write(ADDR, b"\x24\x00")  # busy: commands are not accepted either
        clock.now += duration * 0.02
        assert len(bus.read(ADDR, 6)) == 6
        with pytest.raises(OSError, match="no data"):
            bus.read(ADDR, 6)


def test_chip_partial_read_and_unknown_command() -> None:
    bus, _, clock, _ = rig(25.0)
    bus.write(ADDR, b"\x24\x00")
    clock.now += 0.02
    assert bus.read(ADDR, 3) == b"\x66\x66\x93"
    with pytest.raises(OSError, match="0x2C06"):
        bus.write(ADDR, b"\x2c\x06")  # clock-stretching mode: not emulated, so NACKed
    with pytest.raises(OSError, match="2 byte"):
        bus.write(ADDR, b"\x24")


def test_bad_crc_names_bytes_and_expected_crc() -> None:
    _, chip, _, drv = rig(25.0)
    chip.fault = "bad_crc"
    with pytest.raises(CrcError, match="0x66 0x66 need CRC 0x93, chip sent 0x6C") as info:
        drv.read()
    assert info.value.quality == "crc_error"
    chip.fault = None
    assert drv.read().raw == 0x6666


def test_bad_crc_on_the_humidity_word_alone() -> None:
    good = framed(0x6666, 0x8000)
    with pytest.raises(CrcError, match="0x80 0x00"):
        fixed(good[:5] + bytes([good[5] ^ 0x01])).read()


def test_identify_returns_the_crc_checked_serial() -> None:
    _, chip, _, drv = rig()
    chip.serial = 0x0C1A5E77
    assert drv.identify() == "SHT3x serial 0C1A5E77"
    assert chip.writes[-1] == b"\x37\x80"
    chip.fault = "bad_crc"
    with pytest.raises(CrcError, match="0x0C 0x1A need CRC 0xAD"):
        drv.identify()


def test_wrong_chip_answers_blank() -> None:
    _, chip, _, drv = rig()
    chip.fault = "wrong_id"
    with pytest.raises(WrongChip, match="expected two words with valid CRCs, found FF FF FF"):
        drv.identify()
    with pytest.raises(WrongChip, match="found 00 00 00 00 00 00"):
        fixed(bytes(6)).identify()


def test_stuck_repeats_the_last_words() -> None:
    _, chip, _, drv = rig(20.0, 40.0)
    before = drv.read()
    chip.fault = "stuck"
    chip.temperature_c, chip.humidity_pct = 24.0, 60.0
    assert drv.read() == before
    assert drv.read() == before
    chip.fault = None
    assert drv.read().temperature_c == pytest.approx(24.0, abs=0.002)


def test_faults_are_validated() -> None:
    with pytest.raises(ValueError, match="allowed: bad_crc, stuck, wrong_id"):
        SHT3xChip().fault = "crc"


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
    bus.inject(ADDR, None)
    assert drv.read().temperature_c == pytest.approx(21.0, abs=0.002)


def test_second_address_and_soft_reset() -> None:
    clock = Clock()
    bus = EmulatedBus()
    chip = bus.attach(0x45, SHT3xChip(temperature_c=-10.0, clock=clock))
    drv = SHT3x(bus, 0x45, sleep=clock.sleep)
    assert drv.read().temperature_c == pytest.approx(-10.0, abs=0.002)
    bus.write(0x45, b"\x24\x00")
    clock.now += 0.02
    bus.write(0x45, b"\x30\xa2")  # soft reset drops the pending answer
    with pytest.raises(OSError, match="no data"):
        bus.read(0x45, 6)
    assert isinstance(chip, SHT3xChip)
