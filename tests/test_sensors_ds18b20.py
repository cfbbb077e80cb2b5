"""DS18B20 through a w1 sysfs tree: the kernel's w1_slave format, CRC verdicts, 85 °C."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrad_agent.core.models import Quality
from qrad_agent.sensors.base import CrcError, NotReady, SensorError
from qrad_agent.sensors.ds18b20 import DS18B20, dallas_crc8, list_ds18b20
from qrad_agent.sim.w1 import W1Tree, kernel_milli_c, scratchpad
from qrad_agent.sysfs import Sysfs

DEV = "28-0316a2790eff"

# As published for a DS18B20 at 23.125 °C (and the power-on scratchpad): real kernel output
GOOD = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"
POWER_ON = "50 05 4b 46 7f ff 0c 10 1c : crc=1c YES\n50 05 4b 46 7f ff 0c 10 1c t=85000\n"


def write_raw(root: Path, text: str, device: str = DEV) -> DS18B20:
    directory = root / "sys/bus/w1/devices" / device
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "w1_slave").write_text(text)
    return DS18B20(Sysfs(root), device)


def test_dallas_crc_of_published_scratchpads():
    assert dallas_crc8(bytes.fromhex("72014b467fff0e10")) == 0x57
    assert dallas_crc8(bytes.fromhex("50054b467fff0c10")) == 0x1C
    assert dallas_crc8(b"") == 0
    # a message followed by its own CRC checks to zero (the property the 1-Wire spec uses)
    pad = bytes.fromhex("72014b467fff0e1057")
    assert dallas_crc8(pad) == 0


def test_published_yes_line_reads(tmp_path: Path):
    m = write_raw(tmp_path, GOOD).read()
    assert m.temperature_c == 23.125
    assert m.raw == 0x0172
    assert m.humidity_pct is None


def test_emulator_writes_the_published_line(tmp_path: Path):
    tree = W1Tree(tmp_path)
    tree.add(DEV, 23.125)
    assert (tmp_path / "sys/bus/w1/devices" / DEV / "w1_slave").read_text() == GOOD
    tree.sensors[DEV].fault = "power_on"
    assert (tmp_path / "sys/bus/w1/devices" / DEV / "w1_slave").read_text() == POWER_ON


def test_power_on_85_is_not_a_measurement(tmp_path: Path):
    with pytest.raises(NotReady, match=r"85\.000 °C, its power-on value") as info:
        write_raw(tmp_path, POWER_ON).read()
    assert info.value.quality is Quality.STALE


def test_no_line_is_a_crc_error_even_with_a_plausible_t(tmp_path: Path):
    text = "72 01 4b 46 7f ff 0e 10 58 : crc=57 NO\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"
    with pytest.raises(CrcError, match="crc=57") as info:
        write_raw(tmp_path, text).read()
    assert info.value.quality is Quality.CRC_ERROR


def test_a_yes_line_whose_bytes_do_not_check_is_refused(tmp_path: Path):
    text = "73 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n73 01 4b 46 7f ff 0e 10 57 t=23187\n"
    with pytest.raises(CrcError, match="does not check"):
        write_raw(tmp_path, text).read()


def test_emulated_bad_crc_shows_last_good_bytes_and_a_corrupt_t(tmp_path: Path):
    tree = W1Tree(tmp_path)
    sensor = tree.add(DEV, 21.5)
    good = scratchpad(21.5)
    sensor.fault = "bad_crc"
    line1, line2 = (tree.devices / DEV / "w1_slave").read_text().splitlines()
    assert line1.endswith("NO")
    assert line2.startswith(" ".join(f"{b:02x}" for b in good))  # the kernel's cached copy
    assert line2.split("t=")[1] != "21500"  # computed from the corrupted bytes
    with pytest.raises(CrcError):
        DS18B20(tree.sysfs, DEV).read()
    sensor.fault = None
    assert DS18B20(tree.sysfs, DEV).read().temperature_c == 21.5


@pytest.mark.parametrize(
    ("celsius", "raw"),
    # DS18B20 datasheet, table "temperature/data relationship"
    [
        (125.0, 0x07D0),
        (85.0, 0x0550),
        (25.0625, 0x0191),
        (10.125, 0x00A2),
        (0.5, 0x0008),
        (0.0, 0x0000),
        (-0.5, 0xFFF8),
        (-10.125, 0xFF5E),
        (-25.0625, 0xFE6F),
        (-55.0, 0xFC90),
    ],
)
def test_datasheet_temperature_table(celsius: float, raw: int):
    pad = scratchpad(celsius)
    assert pad[0] | (pad[1] << 8) == raw
    assert dallas_crc8(pad[:8]) == pad[8]


def test_negative_values_and_kernel_truncation(tmp_path: Path):
    tree = W1Tree(tmp_path)
    sensor = tree.add(DEV, -10.0625)  # raw 0xFF5F = -161 counts
    assert kernel_milli_c(scratchpad(-10.0625)) == -10062  # C truncates toward zero
    m = DS18B20(tree.sysfs, DEV).read()
    assert m.temperature_c == -10.062
    assert m.raw == -161
    sensor.temperature_c = -55.0
    assert DS18B20(tree.sysfs, DEV).read().temperature_c == -55.0


def test_round_trip_across_the_range(tmp_path: Path):
    tree = W1Tree(tmp_path)
    sensor = tree.add(DEV)
    driver = DS18B20(tree.sysfs, DEV)
    for tenth in range(-550, 1251, 37):
        sensor.temperature_c = tenth / 10
        expected = round(tenth / 10 * 16) / 16
        assert driver.read().temperature_c == pytest.approx(expected, abs=0.001)


def test_lower_resolution_drops_the_low_bits(tmp_path: Path):
    tree = W1Tree(tmp_path)
    tree.add(DEV, 21.3125, resolution_bits=9)
    pad = scratchpad(21.3125, 9)
    assert pad[4] == 0x1F  # configuration register for 9 bit
    assert DS18B20(tree.sysfs, DEV).read().temperature_c == 21.0
    assert scratchpad(21.3125, 11)[4] == 0x5F
    with pytest.raises(ValueError, match="9, 10, 11 or 12"):
        scratchpad(21.0, 8)


def test_shorted_line_passes_the_crc_but_is_refused(tmp_path: Path):
    tree = W1Tree(tmp_path)
    tree.add(DEV).fault = "shorted"
    assert "crc=00 YES" in (tree.devices / DEV / "w1_slave").read_text()
    with pytest.raises(SensorError, match="all-zero") as info:
        DS18B20(tree.sysfs, DEV).read()
    assert info.value.quality is Quality.IO_ERROR


@pytest.mark.parametrize(
    "text",
    ["", "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n", "garbage\nmore garbage\n"],
)
def test_empty_truncated_or_garbled_files(tmp_path: Path, text: str):
    with pytest.raises(SensorError, match="w1_slave"):
        write_raw(tmp_path, text).read()


def test_unplugged_sensor(tmp_path: Path):
    tree = W1Tree(tmp_path)
    tree.add(DEV)
    driver = DS18B20(tree.sysfs, DEV)
    assert driver.identify() == f"DS18B20 {DEV}"
    tree.remove(DEV)
    with pytest.raises(SensorError, match="missing"):
        driver.read()
    with pytest.raises(SensorError, match="missing"):
        driver.identify()


def test_listing_finds_only_ds18b20s(tmp_path: Path):
    tree = W1Tree(tmp_path)
    tree.add("28-00000a0b0c0d")
    tree.add("28-000000000002")
    tree.add("10-000802b4c2a1")  # a DS18S20: another family
    (tree.devices / "28-0000000000ff").mkdir()  # a half-registered device, no w1_slave yet
    assert list_ds18b20(tree.sysfs) == ["28-000000000002", "28-00000a0b0c0d"]
    assert list_ds18b20(Sysfs(tmp_path / "nowhere")) == []


def test_ids_are_validated_and_give_the_address(tmp_path: Path):
    driver = DS18B20(Sysfs(tmp_path), DEV)
    assert driver.address == 0x0316A2790EFF
    assert driver.kind == "ds18b20"
    for bad in ("0316a2790eff", "10-0316a2790eff", "28-0316A2790EFF", "28-0316a2790ef"):
        with pytest.raises(ValueError, match="28-0316a2790eff"):
            DS18B20(Sysfs(tmp_path), bad)


def test_emulator_refuses_unknown_faults(tmp_path: Path):
    with pytest.raises(ValueError, match="bad_crc, power_on, shorted"):
        W1Tree(tmp_path).add(DEV).fault = "stuck"
