"""`qrad-agent sensors scan|read`: real subprocesses against the emulated bench, and the scan
policy against emulated buses with chips at shared addresses."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qrad_agent.config import parse_config
from qrad_agent.sensors import cli as sensors_cli
from qrad_agent.sensors.cli import PROBES, Found, add_parser, scan_bus
from qrad_agent.sim.chips.bus import EmulatedBus, EmulatedChip, RegisterChip
from qrad_agent.sim.chips.lm75 import LM75AChip, LM75Chip
from qrad_agent.sim.chips.scd4x import READ_MEASUREMENT, START_PERIODIC, STOP_PERIODIC, SCD4xChip
from qrad_agent.sim.chips.sht3x import SHT3xChip
from qrad_agent.sim.chips.sht4x import SHT4xChip
from qrad_agent.sim.chips.tmp102 import TMP102Chip

REPO = Path(__file__).resolve().parents[1]
DEV = "28-0316a2790eff"

CONFIG = f"""
[[sensors]]
name = "air"
kind = "sht3x"
address = 0x44

[[sensors]]
name = "co2"
kind = "scd4x"

[[sensors]]
name = "wall"
kind = "lm75a"
address = 0x4c

[[sensors]]
name = "out"
kind = "ds18b20"
device = "{DEV}"
role = "exhaust"

[[sensors]]
name = "cpu"
kind = "board"
"""


def run(*args: str, module: str = "qrad_agent.sensors.cli",
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


def wired() -> bool:
    from qrad_agent.cli import build_parser

    return "sensors" in build_parser().format_help()


# -- subprocesses -------------------------------------------------------------------------------
def test_scan_sim_json_finds_the_whole_bench_and_prints_valid_config():
    res = run("scan", "--sim", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["simulated"] is True and data["bus"] == 1
    where = {(f["kind"], f["address_hex"] or f["device"]) for f in data["found"]}
    assert where == {
        ("mcp9808", "0x18"), ("aht20", "0x38"), ("htu21d", "0x40"), ("sht4x", "0x44"),
        ("sht3x", "0x45"), ("tmp102", "0x48"), ("lm75a", "0x49"), ("scd4x", "0x62"),
        ("bme280", "0x76"), ("ds18b20", DEV), ("board", None),
    }
    assert data["unidentified"] == []
    by_kind = {f["kind"]: f for f in data["found"]}
    for kind, f in by_kind.items():
        assert f["error"] is None, kind
        expected = 46.0 if kind == "board" else 21.3
        assert f["reading"]["temperature_c"] == pytest.approx(expected, abs=0.07), kind
    assert by_kind["scd4x"]["reading"]["co2_ppm"] == 650.0
    assert by_kind["bme280"]["reading"]["pressure_pa"] == pytest.approx(101325, abs=5)
    assert by_kind["sht4x"]["identity"] == "SHT4x serial 0C1A5E77"
    assert by_kind["sht4x"]["certain"] is True and by_kind["tmp102"]["certain"] is False
    assert "share 0x44/0x45" in by_kind["sht3x"]["note"]
    # what scan says to put in the config is a valid config, with the sensors found
    cfg = parse_config(tomllib.loads(data["config"]))
    assert [(s.kind, s.address) for s in cfg.sensors][:3] == [
        ("mcp9808", 0x18), ("aht20", 0x38), ("htu21d", 0x40)]
    assert {s.kind for s in cfg.sensors} == {k for k, _ in where}


def test_scan_sim_text_names_found_chips_and_the_config_to_add():
    res = run("scan", "--sim", "--bus", "3")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("I2C bus 3 (simulated): 11 supported sensor(s) found")
    assert "0x49             lm75a" in res.stdout
    assert "Put in the config" in res.stdout
    assert 'name = "sht3x_45"' in res.stdout and "bus = 3\naddress = 0x45" in res.stdout


def test_read_sim_json_every_kind_ok(tmp_path: Path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(CONFIG)
    res = run("read", "--sim", "--json", "-c", str(cfg))
    assert res.returncode == 0, res.stderr + res.stdout
    data = json.loads(res.stdout)
    assert data["healthy"] is True and data["simulated"] is True
    sensors = {s["name"]: s for s in data["sensors"]}
    assert list(sensors) == ["air", "co2", "wall", "out", "cpu"]
    assert all(s["quality"] == "ok" for s in sensors.values())
    assert sensors["air"]["temperature_c"] == pytest.approx(21.3, abs=0.1)
    assert sensors["air"]["humidity_pct"] == pytest.approx(45.0, abs=0.5)
    assert sensors["co2"]["co2_ppm"] == pytest.approx(650.0, abs=2)
    assert sensors["out"]["temperature_c"] == pytest.approx(26.3, abs=0.1)  # exhaust: +5 K
    assert sensors["cpu"]["temperature_c"] == 46.0 and sensors["cpu"]["role"] == "board"
    assert sensors["wall"]["address"] == 0x4C and sensors["out"]["device"] == DEV
    air = sensors["air"]["counters"]
    assert (air["reads"], air["good"], air["errors"]) == (1, 1, {})
    assert air["identity"] == "SHT3x serial 0C1A5E77"
    # the SCD4x had no sample yet: read waited for its first one instead of failing
    co2 = sensors["co2"]["counters"]
    assert co2["good"] == 1 and co2["reads"] > 1 and set(co2["errors"]) == {"stale"}
    room = data["room"]
    assert (room["healthy"], room["configured"]) == (3, 3)
    assert room["co2_ppm"] == pytest.approx(650.0, abs=2)


def test_read_text_and_watch_rounds(tmp_path: Path):
    res = run("read", "--sim", "--watch", "0.05", "--count", "3", "--json")
    assert res.returncode == 0, res.stderr
    rounds = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["sensors"][0]["counters"]["reads"] for r in rounds] == [1, 2, 3]
    res = run("read", "--sim")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("sensors from the built-in default config (simulated):")
    assert "room         tmp102" in res.stdout and " ok " in res.stdout
    assert "room: 21.3" in res.stdout and "1 of 1 room sensor(s) healthy" in res.stdout


def test_watch_stops_cleanly_on_ctrl_c():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qrad_agent.sensors.cli", "read", "--sim", "--json",
         "--watch", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert [json.loads(line)["healthy"] for line in lines] == [True, True]


def test_read_config_errors_exit_2_naming_the_key(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sensors]]\nname = "p"\nkind = "ds18b20"\naddress = 0x48\n')
    res = run("read", "--sim", "-c", str(bad))
    assert res.returncode == 2
    assert "invalid configuration" in res.stderr
    assert "address does not apply to kind 'ds18b20'" in res.stderr
    clash = tmp_path / "clash.toml"
    clash.write_text('[[sensors]]\nname = "a"\nkind = "tmp102"\naddress = 0x48\n'
                     '[[sensors]]\nname = "b"\nkind = "lm75"\naddress = 0x48\n')
    res = run("read", "--sim", "-c", str(clash))
    assert res.returncode == 2 and "both at 0x48 on bus 1" in res.stderr
    res = run("read", "--watch", "-1")
    assert res.returncode == 2 and "must be above 0 seconds" in res.stderr


@pytest.mark.skipif(Path("/dev/i2c-1").exists(), reason="this machine has a real I2C bus 1")
def test_read_on_hardware_without_the_bus_reports_missing_and_exits_1():
    res = run("read", "--json")
    assert res.returncode == 1, res.stderr
    [room] = json.loads(res.stdout)["sensors"]
    assert room["quality"] == "missing"
    assert "cannot open /dev/i2c-1" in room["detail"]


@pytest.mark.skipif(Path("/dev/i2c-9").exists(), reason="this machine has an I2C bus 9")
def test_scan_on_hardware_without_the_bus_is_a_usage_error():
    res = run("scan", "--bus", "9")
    assert res.returncode == 2
    assert "cannot open I2C bus 9 (/dev/i2c-9)" in res.stderr


@pytest.mark.skipif(not wired(), reason="qrad_agent/cli.py does not call sensors add_parser yet")
def test_the_main_cli_has_the_sensors_command(tmp_path: Path):
    res = run("sensors", "scan", "--sim", "--json", module="qrad_agent")
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["found"]) == 11
    res = run("sensors", "read", "--sim", "--json", module="qrad_agent")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["healthy"] is True


# -- in process: exit codes at the bus boundary -----------------------------------------------
def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qrad-agent")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["sensors", *argv])


def test_scan_of_an_empty_bus_exits_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]):
    empty = EmulatedBus()
    monkeypatch.setattr(sensors_cli, "_open_smbus", lambda number: empty)
    monkeypatch.setattr(sensors_cli, "HOST_SYSFS_ROOT", str(tmp_path))
    args = parse("scan", "--json")
    assert args.func(args) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["found"] == [] and data["config"] == ""
    assert empty.transactions > 0  # it did probe


def test_read_exits_1_when_a_sensor_is_unhealthy(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]):
    bus = EmulatedBus()
    clock = [0.0]
    bus.attach(0x48, TMP102Chip(20.5, clock=lambda: clock[0]))
    clock[0] = 1.0
    monkeypatch.setattr(sensors_cli, "_open_smbus", lambda number: bus)
    cfg = tmp_path / "two.toml"
    cfg.write_text('[[sensors]]\nname = "a"\nkind = "tmp102"\naddress = 0x48\n'
                   '[[sensors]]\nname = "b"\nkind = "tmp102"\naddress = 0x49\n')
    args = parse("read", "-c", str(cfg), "--json")
    assert args.func(args) == 1
    data = json.loads(capsys.readouterr().out)
    assert [s["quality"] for s in data["sensors"]] == ["ok", "missing"]
    assert data["sensors"][0]["temperature_c"] == 20.5
    assert data["room"]["healthy"] == 1 and data["room"]["configured"] == 2


# -- the scan policy on emulated buses ----------------------------------------------------------
class Recorder(EmulatedChip):
    """Passes transfers to ``inner`` and keeps every write, to check what scan sent."""

    def __init__(self, inner: EmulatedChip) -> None:
        super().__init__()
        self.inner = inner
        self.writes: list[bytes] = []

    def i2c_write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.inner.i2c_write(data)

    def i2c_read(self, length: int) -> bytes:
        return self.inner.i2c_read(length)


class Registers(RegisterChip):
    """A chip scan does not support: fixed register contents, writes refused."""

    def __init__(self, registers: dict[int, bytes]) -> None:
        super().__init__()
        self.registers = dict(registers)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def bench(chips: dict[int, EmulatedChip]) -> tuple[EmulatedBus, Clock]:
    clock = Clock()
    bus = EmulatedBus()
    for address, chip in chips.items():
        target = chip.inner if isinstance(chip, Recorder) else chip
        target.clock = clock
        if hasattr(target, "powered_at"):
            target.powered_at = 0.0
        bus.attach(address, chip)
    clock.t = 1.0
    return bus, clock


def kinds(found: list[Found]) -> dict[int | None, str]:
    return {f.address: f.kind for f in found}


def test_every_i2c_kind_has_a_probe():
    from qrad_agent.sensors import REGISTRY

    assert set(PROBES) == set(REGISTRY)


def test_shared_addresses_are_told_apart():
    bus, clock = bench({
        0x44: SHT3xChip(temperature_c=20.0), 0x45: SHT4xChip(temperature_c=20.0),
        0x48: TMP102Chip(20.0), 0x49: LM75AChip(20.375), 0x4A: LM75Chip(20.0),
    })
    found, unknown = scan_bus(bus, clock.sleep)
    assert kinds(found) == {0x44: "sht3x", 0x45: "sht4x", 0x48: "tmp102", 0x49: "lm75a",
                            0x4A: "lm75"}
    assert unknown == []
    by = {f.address: f for f in found}
    assert by[0x49].reading is not None and by[0x49].reading.temperature_c == 20.375
    assert "cannot be told apart" in by[0x4A].note
    assert by[0x44].identity == "SHT3x serial 0C1A5E77"
    assert not by[0x48].certain and by[0x44].certain


def test_an_lm75a_at_a_whole_degree_is_reported_as_ambiguous():
    bus, clock = bench({0x4D: LM75AChip(21.0)})
    [f], _ = scan_bus(bus, clock.sleep)
    assert (f.kind, f.address, f.certain) == ("lm75", 0x4D, False)
    assert "use lm75a if the part is an LM75A" in f.note


def test_unknown_chips_at_supported_addresses_get_only_reads():
    # an ADS1115-like ADC at 0x48 (config 0x8583), and a chip at 0x40 whose register 0xE7
    # does not look like an HTU21D user register
    adc = Recorder(Registers({0x00: b"\x12\x34", 0x01: b"\x85\x83"}))
    pwm = Recorder(Registers({0xE7: b"\x00"}))
    bus, clock = bench({0x48: adc, 0x40: pwm})
    found, unknown = scan_bus(bus, clock.sleep)
    assert found == []
    notes = {u.address: u.note for u in unknown}
    assert set(notes) == {0x40, 0x48}
    assert "fits neither a TMP102" in notes[0x48] and "0x85" in notes[0x48]
    assert "electronic-id command was not sent" in notes[0x40]
    # nothing but register-pointer bytes went to either: no command, no register write
    assert adc.writes == [b"\x00", b"\x01"]
    assert pwm.writes == [b"\xe7"]


def test_a_measuring_scd4x_is_recognised_without_being_stopped():
    chip = SCD4xChip(co2_ppm=730.0)
    bus, clock = bench({0x62: chip})
    bus.write(0x62, START_PERIODIC.to_bytes(2, "big"))  # the agent started it earlier
    clock.t += 0.1
    [f], _ = scan_bus(bus, clock.sleep)
    assert f.kind == "scd4x" and f.identity.startswith("SCD4x (measuring")
    assert chip.measuring and STOP_PERIODIC not in chip.command_counts
    assert f.reading is not None and f.reading.co2_ppm == 730.0
    assert chip.command_counts[READ_MEASUREMENT] == 1


def test_an_idle_scd4x_gives_its_serial_and_variant():
    bus, clock = bench({0x62: SCD4xChip(co2_ppm=500.0, variant="SCD40")})
    [f], _ = scan_bus(bus, clock.sleep)
    assert f.identity == "SCD40 serial 0x3c4f8b0721e9" and f.certain
    assert f.reading is not None and f.reading.co2_ppm == 500.0


def test_a_bme280_id_mismatch_is_unidentified_with_the_reason():
    from qrad_agent.sim.chips.bme280 import BME280Chip

    bus, clock = bench({0x77: BME280Chip(chip_id=0x58)})
    found, [u] = scan_bus(bus, clock.sleep)
    assert found == [] and u.address == 0x77 and "BMP280" in u.note


def test_nack_everywhere_finds_nothing():
    bus, clock = bench({})
    found, unknown = scan_bus(bus, clock.sleep)
    assert (found, unknown) == ([], [])
    assert bus.transactions >= len(sensors_cli.probes_by_address())  # every address tried


def test_a_chip_answering_with_an_io_error_mid_scan_is_left_out():
    class Dead(EmulatedChip):
        def i2c_write(self, data: bytes) -> None:
            raise OSError(errno.EIO, "Input/output error")

    bus, clock = bench({0x18: Dead(), 0x76: Dead()})
    assert scan_bus(bus, clock.sleep) == ([], [])
