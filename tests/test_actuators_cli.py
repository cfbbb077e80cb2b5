"""``actuators show|test`` and ``calibrate`` (through their own parser, as ``qrad-agent``
will add it), and ``open_levers``' inventory, on emulated boards in temp dirs."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from qrad_agent.actuators import open_levers
from qrad_agent.actuators.base import Lever
from qrad_agent.actuators.cli import add_parser, run_test, sim_bench
from qrad_agent.actuators.cpufreq import CpufreqLever
from qrad_agent.actuators.restore import RestoreRecord
from qrad_agent.actuators.settings import RaplLimitConfig
from qrad_agent.config import ActuatorsConfig, AgentConfig, CpufreqConfig
from qrad_agent.core.models import Plan
from qrad_agent.core.power import PowerModel
from qrad_agent.sim.cpufreq import make_cpufreq_tree
from qrad_agent.sim.rapl import make_rapl_tree
from qrad_agent.sysfs import Sysfs

P0_MAX = "devices/system/cpu/cpufreq/policy0/scaling_max_freq"


def run(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="qrad-agent")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out = io.StringIO()
    code = args.func(args, out)
    return code, out.getvalue()


def board_config(tmp_path: Path, extra: str = "") -> Path:
    """A config whose sysfs root and state dir are temp dirs (a board with nothing in it)."""
    (tmp_path / "sys").mkdir(exist_ok=True)
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[node]
state_dir = "{tmp_path / 'state'}"

[actuators.cpufreq]
sysfs_root = "{tmp_path / 'sys'}"
{extra}
""")
    return path


# -- show --------------------------------------------------------------------------------------


def test_show_sim_json_lists_levers_and_power() -> None:
    code, text = run(["actuators", "show", "--sim", "--json"])
    assert code == 0
    doc = json.loads(text)
    levers = {lv["name"]: lv for lv in doc["levers"]}
    assert levers["cpufreq"]["available"]
    assert levers["cpufreq"]["current"]["freq_khz"] == 3_000_000
    assert levers["cpufreq"]["range"]["min_khz"] == 800_000
    assert levers["slots"]["current"]["running"] == 0
    assert levers["rapl"] == {**levers["rapl"], "available": False,
                              "why_not": "disabled in config (actuators.rapl.enabled)"}
    reading = doc["power"]["reading"]
    assert reading["source"] == "rapl"
    assert reading["watts"] == pytest.approx(20.0, abs=2.0)  # the sim board idles at 20 W


def test_show_on_the_board_shows_originals_without_restoring_them(tmp_path: Path) -> None:
    tree = make_cpufreq_tree(tmp_path / "sys")
    make_rapl_tree(tmp_path / "sys")
    cfg = board_config(tmp_path)
    # an agent is running and has capped the frequency, its originals in the record
    record = RestoreRecord(tmp_path / "state" / "restore.json")
    CpufreqLever(tree, record).apply(Plan(1, 1_200_000, 1.0))
    before = record.path.read_text()
    code, text = run(["actuators", "show", "-c", str(cfg)])
    assert code == 0
    assert "cpufreq      freq cap 1.20 GHz" in text
    assert f"{P0_MAX}=3000000" in text  # the original the running agent holds
    assert "no cgroup filesystem at" in text
    assert "power: 0.0 W from rapl (ok)" in text  # the emulated counter stands still
    assert record.path.read_text() == before  # show changed nothing
    assert Sysfs(tmp_path / "sys").read_int(P0_MAX) == 1_200_000


# -- test --------------------------------------------------------------------------------------


def test_actuators_test_sim_steps_each_lever_and_restores() -> None:
    bench = sim_bench(AgentConfig())
    try:
        out = io.StringIO()
        results = run_test(bench, 2.0, out)
        freq = bench.lever("cpufreq")
        assert freq is not None
        assert freq.read_back()["freq_khz"] == 3_000_000  # restored
    finally:
        bench.close()
    by = {r.label: r for r in results}
    assert [r.label for r in results] == [
        "idle", "all slots", "half the slots", "lowest frequency", "half quota",
        "all slots again", "idle again"]
    assert all(not r.errors for r in results)
    # the measured effect: 20 W idle, 120 W per slot at 3 GHz (the default model)
    assert by["idle"].power.watts == pytest.approx(20.0, abs=1.0)
    assert by["all slots"].power.watts == pytest.approx(500.0, abs=1.0)
    assert by["half the slots"].power.watts == pytest.approx(260.0, abs=1.0)
    assert by["lowest frequency"].power.watts == pytest.approx(86.1, abs=1.0)
    assert by["half quota"].power.watts == pytest.approx(260.0, abs=1.0)
    assert by["half quota"].cpus == pytest.approx(2.0)
    assert by["lowest frequency"].read_back["cpufreq"]["freq_khz"] == 800_000
    assert all(r.power.source == "rapl" for r in results)
    assert out.getvalue().rstrip().endswith("restored every lever")


def test_actuators_test_command_sim() -> None:
    code, text = run(["actuators", "test", "--sim", "--step-s", "1"])
    assert code == 0
    assert "lowest frequency   4 slots @ 0.80 GHz x 100%" in text
    assert "freq cap 0.80 GHz" in text


# -- calibrate ---------------------------------------------------------------------------------


def test_calibrate_sim_recovers_the_boards_model(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.toml"
    cfg.write_text("""
[power_model]
idle_w = 35
slot_w = 60
freq_exponent = 2.2

[sim]
cores = 2
""")
    code, text = run(["calibrate", "--sim", "-c", str(cfg), "--state-dir", str(tmp_path / "s"),
                      "--settle-s", "1", "--measure-s", "4"])
    assert code == 0, text
    doc = json.loads((tmp_path / "s" / "power_model.json").read_text())
    assert doc["idle_w"] == pytest.approx(35.0, abs=0.5)
    assert doc["slot_w"] == pytest.approx(60.0, abs=0.5)
    assert doc["freq_exponent"] == pytest.approx(2.2, abs=0.05)
    assert doc["source"] == "rapl" and doc["points"] == 7  # 0..2 slots, 4 lower frequencies
    assert "stored in" in text


def test_calibrate_refuses_without_a_meter_or_rapl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = run(["calibrate", "-c", str(board_config(tmp_path))])
    assert code == 2
    err = capsys.readouterr().err
    assert "calibrate needs measured power" in err
    assert "no meter configured" in err and "no class/powercap in sysfs" in err
    assert not (tmp_path / "state" / "power_model.json").exists()


def test_options_are_checked() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["actuators", "test", "--step-s", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate", "--freq-points", "many"])


# -- open_levers -------------------------------------------------------------------------------


def names(levers: list[Lever]) -> list[str]:
    return [lever.name for lever in levers]


def test_open_levers_on_a_bare_board_falls_back_to_the_duty_cycle(tmp_path: Path) -> None:
    levers, inventory = open_levers(ActuatorsConfig(), tmp_path, tmp_path / "state")
    assert names(levers) == ["duty_cycle", "slots"]
    why = {i.name: (i.available, i.why_not) for i in inventory}
    assert why["cpufreq"] == (False, "no cpufreq driver loaded")
    assert why["quota"] == (False, f"no cgroup filesystem at {tmp_path / 'fs/cgroup'} "
                                   "(not mounted)")
    assert why["freeze"][0] is False
    assert why["rapl"] == (False, "disabled in config (actuators.rapl.enabled)")
    assert why["duty_cycle"] == (True, "")


def test_open_levers_with_cpufreq_and_rapl(tmp_path: Path) -> None:
    make_cpufreq_tree(tmp_path)
    make_rapl_tree(tmp_path, limit_w=65.0)
    cfg = ActuatorsConfig(rapl=RaplLimitConfig(enabled=True))
    model = PowerModel(20, 40, 1.5, 3_000_000)
    levers, inventory = open_levers(cfg, tmp_path, tmp_path / "state", model=model)
    assert names(levers) == ["slots", "cpufreq", "rapl"]  # plain files: no kernel rules
    duty = next(i for i in inventory if i.name == "duty_cycle")
    assert not duty.available and duty.why_not.startswith("not needed")
    for lever in levers:
        if lever.name != "slots":  # no processes in this test
            lever.apply(Plan(1, 1_000_000, 1.0))
    assert Sysfs(tmp_path).read_int(P0_MAX) == 1_000_000
    for lever in levers:
        lever.restore()
    assert Sysfs(tmp_path).read_int(P0_MAX) == 3_000_000


def test_open_levers_reports_a_locked_rapl_limit(tmp_path: Path) -> None:
    tree = make_rapl_tree(tmp_path, locked=True)
    cfg = ActuatorsConfig(rapl=RaplLimitConfig(enabled=True))
    levers, inventory = open_levers(cfg, tmp_path, None, model=PowerModel(5, 5, 1.5, 1),
                                    sysfs=tree)
    assert "rapl" not in names(levers)
    rapl = next(i for i in inventory if i.name == "rapl")
    assert "firmware locked" in rapl.why_not


def test_open_levers_restores_a_crashed_run_even_for_a_disabled_lever(tmp_path: Path) -> None:
    tree = make_cpufreq_tree(tmp_path)
    make_rapl_tree(tmp_path, limit_w=65.0)
    state = tmp_path / "state"
    model = PowerModel(5, 5, 1.5, 3_000_000)
    on = ActuatorsConfig(rapl=RaplLimitConfig(enabled=True))
    levers, _ = open_levers(on, tmp_path, state, model=model, sysfs=tree)
    for lever in levers:
        if lever.name != "slots":
            lever.apply(Plan(1, 900_000, 1.0))
    assert tree.read_int(P0_MAX) == 900_000  # the agent died here, leaving its changes
    off = ActuatorsConfig(cpufreq=CpufreqConfig(enabled=False))  # and RAPL off by default
    levers, _ = open_levers(off, tmp_path, state, model=model, sysfs=tree)
    assert names(levers) == ["duty_cycle", "slots"]
    assert tree.read_int(P0_MAX) == 3_000_000
    assert Sysfs(tmp_path).read_int(
        "class/powercap/intel-rapl:0/constraint_0_power_limit_uw") == 65_000_000
    assert not (state / "restore.json").exists()
