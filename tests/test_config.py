"""Configuration: defaults valid, every error names key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrad_agent.config import AgentConfig, ConfigError, json_schema, load_config, parse_days

REPO = Path(__file__).resolve().parents[1]


def problems(data: dict[str, object]) -> list[str]:
    from qrad_agent.config import parse_config

    with pytest.raises(ConfigError) as err:
        parse_config(data)
    return err.value.problems


def test_shipped_configs_are_valid() -> None:
    for name in ("sim.toml", "qrad-agent.toml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.sensors, name


def test_defaults_are_the_simulated_radiator() -> None:
    cfg = AgentConfig()
    assert cfg.sensors[0].kind == "tmp102" and cfg.sensors[0].address == 0x48
    assert cfg.control.period_s == 10.0


def test_unknown_key_is_named() -> None:
    [line] = problems({"pid": {"kp": 0.3, "kpp": 1}})
    assert line.startswith("pid.kpp: unknown key")


def test_bad_value_names_key_value_and_limit() -> None:
    [line] = problems({"thermostat": {"comfort_c": 45}})
    assert "thermostat.comfort_c" in line and "45" in line and "28" in line


def test_unknown_sensor_kind_lists_allowed() -> None:
    [line] = problems({"sensors": [{"name": "a", "kind": "ds1621"}]})
    assert "sensors.0.kind" in line and "tmp102" in line and "ds1621" in line


def test_bad_schedule_time_and_days() -> None:
    lines = problems({"thermostat": {"schedule": [
        {"days": "mon-fri", "start": "25:00", "end": "22:00"},
        {"days": "monday", "start": "06:00", "end": "07:00"},
    ]}})
    assert any("schedule.0.start" in x and "HH:MM" in x for x in lines)
    assert any("schedule.1.days" in x and "mon, tue" in x for x in lines)


def test_cross_field_rules() -> None:
    [line] = problems({"thermostat": {"eco_c": 22, "comfort_c": 21}})
    assert "eco_c <= comfort_c" in line
    [line] = problems({"control": {"period_s": 5, "sensor_period_s": 10}})
    assert "sensor_period_s" in line
    twins = [{"name": "a", "kind": "tmp102"}, {"name": "a", "kind": "tmp102"}]
    [line] = problems({"sensors": twins})
    assert "unique" in line and "a" in line


def test_parse_days() -> None:
    assert parse_days("mon-fri") == [0, 1, 2, 3, 4]
    assert parse_days("sat,sun") == [5, 6]
    assert parse_days("fri-mon") == [0, 4, 5, 6]  # wraps over the weekend
    assert parse_days("daily") == list(range(7))


def test_load_errors_for_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pid\nkp = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_schema_lists_sections() -> None:
    schema = json_schema()
    assert {"node", "control", "pid", "thermostat", "allocator", "sensors"} <= set(
        schema["properties"]
    )
    assert schema.get("additionalProperties") is False


def test_sim_toml_is_the_embedded_default() -> None:
    # the README promises `run --sim` without -c is the radiator configs/sim.toml describes
    assert load_config(REPO / "configs" / "sim.toml") == AgentConfig()
