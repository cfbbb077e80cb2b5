"""HTU21D / Si7021 driver against the HTU21D command emulator, through smbus2.i2c_msg."""

from __future__ import annotations

import errno

import pytest

from qrad_agent.sensors.base import CrcError, SensorError, WrongChip, sensirion_crc8
from qrad_agent.sensors.htu21d import HTU21D, HUMIDITY_WAIT_S, TEMPERATURE_WAIT_S
from qrad_agent.sim.chips.bus import EmulatedBus, EmulatedChip
from qrad_agent.sim.chips.htu21d import HTU21DChip
from tests.chip_rig import SimClock

ADDR = 0x40


class Clock(SimClock):
    start = 3.0


class Recording(HTU21DChip):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.writes: list[bytes] = []

    def i2c_write(self, data: bytes) -> None:
        self.writes.append(data)
        super().i2c_write(data)


class Answers(EmulatedChip):
    """Answers each command byte with fixed bytes: for datasheet words the model cannot make."""

    def __init__(self, answers: dict[int, bytes]) -> None:
        super().__init__()
        self.answers = answers
        self.command = 0

    def i2c_write(self, data: bytes) -> None:
        self.command = data[0]

    def i2c_read(self, length: int) -> bytes:
        return self.answers[self.command][:length]


def rig(temperature_c: float = 21.0, humidity_pct: float = 45.0, variant: str = "htu21d"):
    clock = Clock()
    bus = EmulatedBus()
    chip = Recording(temperature_c=temperature_c, humidity_pct=humidity_pct, variant=variant,
                     clock=clock)
    bus.attach(ADDR, chip)
    return bus, chip, clock, HTU21D(bus, ADDR, sleep=clock.sleep)


def framed(word: int) -> bytes:
    pair = [word >> 8, word & 0xFF]
    return bytes([*pair, sensirion_crc8(pair, init=0x00)])


def fixed(t: bytes, rh: bytes) -> HTU21D:
    bus = EmulatedBus()
    bus.attach(ADDR, Answers({0xF3: t, 0xF5: rh}))
    return HTU21D(bus, ADDR, sleep=lambda _: None)


def test_datasheet_examples_with_their_crcs() -> None:
    # HTU21D datasheet: temperature word 0x683A (CRC 0x7C) is 24.7 °C, humidity word 0x4E85
    # (CRC 0x6B) is 32.3 %RH, both after clearing the status bits
    assert sensirion_crc8([0x68, 0x3A], init=0x00) == 0x7C
    m = fixed(b"\x68\x3a\x7c", b"\x4e\x85\x6b").read()
    assert m.temperature_c == pytest.approx(-46.85 + 175.72 * 0x6838 / 65536)
    assert m.temperature_c == pytest.approx(24.7, abs=0.02)
    assert m.humidity_pct == pytest.approx(-6 + 125 * 0x4E84 / 65536)
    assert m.humidity_pct == pytest.approx(32.3, abs=0.05)
    assert m.raw == 0x6838


def test_sensirion_init_would_not_do() -> None:
    # the same bytes with the SHT3x CRC start value are a CRC error, not a reading
    with pytest.raises(CrcError, match="0x68 0x3A need CRC 0x7C, chip sent 0x"):
        fixed(bytes([0x68, 0x3A, sensirion_crc8([0x68, 0x3A])]), b"\x4e\x85\x6b").read()


@pytest.mark.parametrize(
    ("t_word", "t"), [(0x0000, -46.85), (0xFFFC, -46.85 + 175.72 * 0xFFFC / 65536),
                      (0x0003, -46.85)],
)
def test_temperature_edges_and_status_bits(t_word: int, t: float) -> None:
    m = fixed(framed(t_word), framed(0x8002)).read()
    assert m.temperature_c == pytest.approx(t, abs=1e-9)


@pytest.mark.parametrize(
    ("rh_word", "rh"),
    [(0x0002, 0.0), (0x0C4A, 0.0), (0x0C4E, 0.00433349609375), (0x8002, 56.5),
     (0xD912, 99.987548828125), (0xD91A, 100.0), (0xFFFE, 100.0)],
)
def test_humidity_formula_and_clipping(rh_word: int, rh: float) -> None:
    m = fixed(framed(0x6838), framed(rh_word)).read()
    assert m.humidity_pct == pytest.approx(rh, abs=1e-9)


def test_commands_waits_and_status_bits_on_the_wire() -> None:
    bus, chip, clock, drv = rig(25.0, 50.0)
    m = drv.read()
    assert chip.writes == [b"\xf3", b"\xf5"]
    assert clock.slept == [TEMPERATURE_WAIT_S, HUMIDITY_WAIT_S]
    assert m.raw is not None and m.raw & 0x3 == 0
    # the emulator sets the humidity status bit; a fresh read shows it on the wire
    bus.write(ADDR, b"\xf5")
    clock.now += 0.02
    assert bus.read(ADDR, 3)[1] & 0x03 == 0x02
    bus.write(ADDR, b"\xf3")
    clock.now += 0.06
    assert bus.read(ADDR, 3)[1] & 0x03 == 0x00


@pytest.mark.parametrize("variant", ["htu21d", "si7021"])
def test_round_trip_over_the_range(variant: str) -> None:
    _, chip, _, drv = rig(variant=variant)
    t, rh = -40.0, 0.0
    while t <= 125.0:
        chip.temperature_c, chip.humidity_pct = t, rh
        m = drv.read()
        assert m.temperature_c is not None and m.humidity_pct is not None
        assert abs(m.temperature_c - t) <= 175.72 / 16384 / 2 + 1e-9, (t, m)  # 14 bit
        assert abs(m.humidity_pct - rh) <= 125 / 4096 / 2 + 1e-9, (rh, m)  # 12 bit
        t += 1.51
        rh = (rh + 8.3) % 100.0


@pytest.mark.parametrize(("variant", "t_s", "rh_s"), [("htu21d", 0.050, 0.016),
                                                     ("si7021", 0.0108, 0.0228)])
def test_chip_nacks_until_the_conversion_ends(variant: str, t_s: float, rh_s: float) -> None:
    bus, _, clock, _ = rig(variant=variant)
    for command, duration in ((b"\xf3", t_s), (b"\xf5", rh_s)):
        bus.write(ADDR, command)
        clock.now += duration * 0.99
        with pytest.raises(OSError, match="converting") as info:
            bus.read(ADDR, 3)
        assert info.value.errno == errno.EREMOTEIO
        clock.now += duration * 0.02
        assert len(bus.read(ADDR, 3)) == 3
        with pytest.raises(OSError, match="no data"):
            bus.read(ADDR, 3)
    assert t_s <= TEMPERATURE_WAIT_S and rh_s <= HUMIDITY_WAIT_S


def test_driver_that_does_not_wait_gets_a_nack() -> None:
    bus, _, _, _ = rig()
    with pytest.raises(OSError) as info:
        HTU21D(bus, ADDR, sleep=lambda _: None).read()
    assert info.value.errno == errno.EREMOTEIO


@pytest.mark.parametrize(("variant", "name"), [("htu21d", "HTU21D (device id 0x32)"),
                                               ("si7021", "Si7021 (device id 0x15)")])
def test_identify_reads_the_device_id(variant: str, name: str) -> None:
    _, chip, _, drv = rig(variant=variant)
    assert drv.identify() == name
    assert chip.writes == [b"\xfc\xc9"]


def test_wrong_id_names_expected_and_found() -> None:
    _, chip, _, drv = rig()
    chip.fault = "wrong_id"
    with pytest.raises(WrongChip, match=r"expected one of 0x0D \(Si7013\).*found 0x5A") as info:
        drv.identify()
    assert info.value.quality == "wrong_chip"


def test_bad_crc_on_read_and_identify() -> None:
    _, chip, _, drv = rig(25.0)
    chip.fault = "bad_crc"
    with pytest.raises(CrcError, match="HTU21D temperature: bytes 0x"):
        drv.read()
    with pytest.raises(CrcError, match="electronic ID: bytes 0x32 0x00 need CRC 0x"):
        drv.identify()
    chip.fault = None
    assert drv.read().temperature_c == pytest.approx(25.0, abs=0.006)


def test_bad_crc_on_humidity_alone() -> None:
    with pytest.raises(CrcError, match="HTU21D humidity: bytes 0x4E 0x85 need CRC 0x6B"):
        fixed(b"\x68\x3a\x7c", b"\x4e\x85\x6a").read()


def test_stuck_repeats_the_last_words() -> None:
    _, chip, _, drv = rig(20.0, 40.0)
    before = drv.read()
    chip.fault = "stuck"
    chip.temperature_c, chip.humidity_pct = 26.0, 70.0
    assert drv.read() == before
    chip.fault = None
    after = drv.read()
    assert after.temperature_c == pytest.approx(26.0, abs=0.006)
    assert after.humidity_pct == pytest.approx(70.0, abs=0.016)


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


def test_user_register_and_soft_reset() -> None:
    for variant, default in (("htu21d", 0x02), ("si7021", 0x3A)):
        bus, _, _, _ = rig(variant=variant)
        assert bus.read_byte_data(ADDR, 0xE7) == default
        bus.write_byte_data(ADDR, 0xE6, default | 0x04 | 0x81)  # heater on, 11-bit
        assert bus.read_byte_data(ADDR, 0xE7) == default | 0x85
        bus.write_byte(ADDR, 0xFE)
        assert bus.read_byte_data(ADDR, 0xE7) == default | 0x04  # the heater bit survives


def test_unknown_variant_and_fault_are_refused() -> None:
    with pytest.raises(ValueError, match="allowed: htu21d, si7021"):
        HTU21DChip(variant="sht21")
    with pytest.raises(ValueError, match="allowed: bad_crc, stuck, wrong_id"):
        HTU21DChip().fault = "nack"
