"""The CLI as a user runs it: real subprocesses of `python -m qrad_agent`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def qrad(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qrad_agent", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


def test_config_validate_ok_and_invalid(tmp_path: Path) -> None:
    ok = qrad("config", "validate", str(REPO / "configs" / "qrad-agent.toml"))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[thermostat]\ncomfort_c = 40\nmood = "happy"\n')
    res = qrad("config", "validate", str(bad))
    assert res.returncode == 1
    assert "thermostat.comfort_c" in res.stderr and "28" in res.stderr
    assert "thermostat.mood: unknown key" in res.stderr
    assert res.stdout == ""


def test_config_schema_is_json_schema() -> None:
    res = qrad("config", "schema")
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    assert schema["title"] == "AgentConfig"
    assert "pid" in schema["properties"]


def test_simulate_json_has_the_documented_kpis() -> None:
    res = qrad("simulate", "--scenario", "winter-week", "--days", "1.5", "--json")
    assert res.returncode == 0, res.stderr
    k = json.loads(res.stdout)
    for key in ("discomfort_kh", "energy_kwh", "rms_error_k", "max_overshoot_k",
                "worker_starts", "compute_core_hours", "sim_days", "wall_s"):
        assert key in k, key
    assert k["sim_days"] == pytest.approx(1.5, abs=0.01)
    assert 0 < k["energy_kwh"] < 0.5 * 12  # half a scored day of a 500 W radiator at most
    assert k["controller"] == "agent"


def test_simulate_bangbang_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "run.png"
    res = qrad("simulate", "--scenario", str(REPO / "scenarios" / "mild-autumn.toml"),
               "--controller", "bangbang", "--days", "1.2", "--plot", str(png))
    assert res.returncode == 0, res.stderr
    assert "controller bangbang" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_unknown_scenario_says_what_exists() -> None:
    res = qrad("simulate", "--scenario", "tropical-week")
    assert res.returncode == 1
    assert "winter-week" in res.stderr and "Traceback" not in res.stderr


def test_run_sim_shows_live_readout_and_stops_cleanly_on_ctrl_c() -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qrad_agent", "run", "--sim", "--speed", "3600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )
    try:
        time.sleep(4)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("qrad-agent") and "winter-week" in lines[0]
    ticks = [ln for ln in lines if " room " in ln and " target " in ln]
    assert len(ticks) > 10  # an hour of simulated time at 3600x: one line per 10 s tick
    assert "demand" in ticks[-1] and "slots" in ticks[-1]
    assert "stopped (SIGINT)" in out and "levers restored" in out


def test_qrad_fleet_prints_help() -> None:
    res = subprocess.run([sys.executable, "-c", "from qrad_agent.fleet.cli import main; main()"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "qrad-fleet" in res.stdout
