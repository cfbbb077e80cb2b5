"""Scenario files, their loader, the weather and the shipped scenarios' physics."""

from __future__ import annotations

import itertools
import math
import statistics
from datetime import datetime
from pathlib import Path

import pytest

from qrad_agent.sim.room import Room2R2C
from qrad_agent.sim.scenario import ScenarioError, load_scenario, shipped_scenarios
from qrad_agent.sim.weather import Weather, WeatherParams

H = 3600.0
DAY = 86400.0

MINIMAL = """\
name = "t"
days = 7
{top}
[room]
c_air_j_per_k = 3.5e5
c_mass_j_per_k = 8.0e6
g_air_mass_w_per_k = 70.0
g_mass_out_w_per_k = 8.0
g_air_out_w_per_k = 5.0
g_window_w_per_k = 35.0
{room}
[weather]
{weather}
{rest}
"""


def write(
    tmp_path: Path, *, top: str = "", room: str = "", weather: str = "mean_c = 0.0",
    rest: str = "",
) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(MINIMAL.format(top=top, room=room, weather=weather, rest=rest))
    return path


def problems_of(path: Path | str) -> list[str]:
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    return err.value.problems


# ---- the shipped scenarios -------------------------------------------------------------


def test_the_three_scenarios_are_shipped() -> None:
    assert shipped_scenarios() == ["cold-snap", "mild-autumn", "winter-week"]


@pytest.mark.parametrize("name", ["winter-week", "cold-snap", "mild-autumn"])
def test_shipped_scenario_loads_by_name_and_by_path(name: str) -> None:
    sc = load_scenario(name)
    assert sc.name == name
    assert sc.source_path is not None and sc.source_path.name == f"{name}.toml"
    assert load_scenario(sc.source_path) == sc
    assert sc.start.weekday() == 0  # every shipped week starts on a Monday


@pytest.mark.parametrize("name", ["winter-week", "cold-snap", "mild-autumn"])
def test_shipped_radiator_holds_comfort_at_the_coldest_hour(name: str) -> None:
    sc = load_scenario(name)
    coldest = sc.make_weather().coldest_c(sc.days)
    need = sc.make_room().steady_state_power_w(sc.comfort_c, coldest)
    assert sc.radiator.max_power_w >= 1.2 * need


def test_winter_week_is_the_room_the_benchmark_expects() -> None:
    sc = load_scenario("winter-week")
    assert sc.radiator.max_power_w == 500.0
    room = sc.make_room()
    assert 10.0 <= room.ua_w_per_k() <= 13.0
    assert 0.55 <= room.steady_state_power_w(21.0, -3.0) / 500.0 <= 0.65
    assert sc.window_open(7 * H + 35 * 60) and not sc.window_open(7 * H + 45 * 60)
    coldest = sc.make_weather().coldest_c(sc.days)
    assert -6.0 < coldest < -2.0


def test_winter_week_night_warm_up_and_airing_are_realistic() -> None:
    p = load_scenario("winter-week").room
    # settle at comfort at 0 °C outdoors (the mass takes weeks: jump it to steady state)
    room = Room2R2C(p, 21.0)
    room.step(1e9, room.steady_state_power_w(21.0, 0.0), 0.0)
    night = Room2R2C(p, room.air_c, room.mass_c)
    for _ in range(8 * 60):
        night.step(60.0, 20.0, 0.0)  # the board idles at 20 W
    assert 2.0 <= 21.0 - night.air_c <= 4.0
    aired = Room2R2C(p, room.air_c, room.mass_c)
    aired.step(600.0, 20.0, 0.0, window_open=True)
    assert 1.0 <= 21.0 - aired.air_c <= 2.5
    warm = Room2R2C(p, night.air_c, night.mass_c)
    minutes = 0
    while warm.air_c < 21.0:
        warm.step(60.0, 500.0, 0.0)
        minutes += 1
    assert 60 <= minutes <= 180


def test_cold_snap_goes_from_mild_to_about_minus_twelve_and_back() -> None:
    sc = load_scenario("cold-snap")
    w = sc.make_weather()
    daily_means = [
        statistics.fmean(w.outdoor_c(d * DAY + h * H) for h in range(24)) for d in range(7)
    ]
    assert daily_means[0] > 1.0 and daily_means[-1] > 0.0
    assert min(daily_means) < -8.0
    assert -14.0 < w.coldest_c(sc.days) < -11.0
    assert sc.radiator.max_power_w == 740.0


def test_mild_autumn_has_low_demand_and_sunny_afternoons() -> None:
    sc = load_scenario("mild-autumn")
    w = sc.make_weather()
    room = sc.make_room()
    temps = [w.outdoor_c(t * 600.0) for t in range(7 * 144)]
    assert min(temps) > 5.0 and max(temps) < 17.0
    assert room.steady_state_power_w(21.0, min(temps)) < 0.4 * sc.radiator.max_power_w
    assert sc.gains_w(13 * H) == 180.0 and sc.gains_w(3 * H) == 0.0
    assert room.air_c == 19.5  # initial_c overrides eco_c


# ---- the loader's errors -----------------------------------------------------------------


def test_unknown_key_is_named(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, room="colour = 'blue'"))
    assert len(problems) == 1
    assert problems[0].startswith("room.colour: unknown key")
    assert "docs/scenarios.md" in problems[0]


def test_bad_time_of_day_is_named(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, rest='[[windows]]\nat = "25:00"\nminutes = 10'))
    assert problems == [
        "windows.0.at: '25:00' is not a time of day; use HH:MM from 00:00 to 23:59 "
        "(got '25:00')"
    ]


def test_negative_capacity_is_named(tmp_path: Path) -> None:
    path = write(tmp_path)
    path.write_text(path.read_text().replace("c_air_j_per_k = 3.5e5", "c_air_j_per_k = -5"))
    (problem,) = problems_of(path)
    assert problem.startswith("room.c_air_j_per_k:")
    assert "1000" in problem and "-5" in problem


def test_cross_field_errors_name_their_keys(tmp_path: Path) -> None:
    (p1,) = problems_of(write(tmp_path, top="eco_c = 22.0"))
    assert p1.startswith("eco_c (22.0) must not exceed comfort_c (21.0)")
    rest = '[[overrides]]\nday = 7\nat = "10:00"\ntarget_c = 22\nhours = 1'
    (p2,) = problems_of(write(tmp_path, rest=rest))
    assert p2.startswith("overrides.0.day: 7 is after the run's last day index (6")


def test_source_path_cannot_be_set_in_the_file(tmp_path: Path) -> None:
    assert problems_of(write(tmp_path, top='source_path = "/etc"')) == [
        "source_path: set by the loader; remove it from the file"
    ]


def test_unknown_name_lists_the_shipped_scenarios() -> None:
    (problem,) = problems_of("arctic-winter")
    assert "cold-snap, mild-autumn, winter-week" in problem


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "nope.toml")[0].startswith("cannot read the file")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    assert problems_of(bad)[0].startswith("not valid TOML")


# ---- events and gains --------------------------------------------------------------------


def test_window_open_timing_across_days(tmp_path: Path) -> None:
    rest = """
[[windows]]
at = "07:30"
minutes = 10
days = "sat,sun"
[[windows]]
at = "23:50"
minutes = 20
days = "fri"
[[windows]]
at = "12:00"
minutes = 5
from_day = 2
"""
    sc = load_scenario(write(tmp_path, rest=rest))  # starts Monday 00:00
    sat = 5 * DAY
    assert not sc.window_open(7.5 * H + 60)  # Monday morning: weekends only
    assert not sc.window_open(sat + 7.5 * H - 1)
    assert sc.window_open(sat + 7.5 * H)
    assert sc.window_open(sat + 7.5 * H + 599)
    assert not sc.window_open(sat + 7.5 * H + 600)  # the end is exclusive
    assert sc.window_open(sat + DAY + 7.5 * H + 300)  # Sunday too
    # Friday's late opening runs past midnight into Saturday
    assert sc.window_open(4 * DAY + 23 * H + 55 * 60)
    assert sc.window_open(sat + 5 * 60)
    assert not sc.window_open(sat + 10 * 60)
    assert not sc.window_open(3 * DAY + 5 * 60)  # Thursday just after midnight: no
    # the noon opening starts on day index 2 (Wednesday)
    assert not sc.window_open(1 * DAY + 12 * H + 60)
    assert sc.window_open(2 * DAY + 12 * H + 60)
    assert sc.window_open(6 * DAY + 12 * H + 60)


def test_an_opening_past_midnight_belongs_to_the_day_it_started(tmp_path: Path) -> None:
    rest = '[[windows]]\nat = "23:50"\nminutes = 20\nfrom_day = 2'
    sc = load_scenario(write(tmp_path, rest=rest))
    assert not sc.window_open(2 * DAY + 5 * 60)  # the tail of day 1's opening: day 1 is off
    assert sc.window_open(2 * DAY + 23 * H + 55 * 60)
    assert sc.window_open(3 * DAY + 5 * 60)


def test_window_times_follow_a_start_that_is_not_midnight(tmp_path: Path) -> None:
    rest = '[[windows]]\nat = "07:30"\nminutes = 10\ndays = "tue"'
    sc = load_scenario(write(tmp_path, top="start = 2027-01-04T12:00:00", rest=rest))
    assert sc.window_open(19.5 * H + 60)  # Monday 12:00 + 19.5 h = Tuesday 07:30
    assert not sc.window_open(7.5 * H + 60)
    assert sc.local_time(19.5 * H) == datetime(2027, 1, 5, 7, 30)


def test_gains_interpolate_and_wrap_around_midnight(tmp_path: Path) -> None:
    top = 'gains = [{ at = "22:00", w = 100.0 }, { at = "02:00", w = 300.0 }]'
    sc = load_scenario(write(tmp_path, top=top))
    assert sc.gains_w(0.0) == pytest.approx(200.0)  # midnight: halfway 22:00 -> 02:00
    assert sc.gains_w(2 * H) == pytest.approx(300.0)
    assert sc.gains_w(12 * H) == pytest.approx(200.0)  # halfway 02:00 -> 22:00
    assert sc.gains_w(3 * DAY + 1 * H) == pytest.approx(250.0)
    no_gains = load_scenario(write(tmp_path))
    assert no_gains.gains_w(12 * H) == 0.0


def test_derived_tables_follow_a_copied_scenario(tmp_path: Path) -> None:
    top = 'gains = [{ at = "12:00", w = 100.0 }]'
    sc = load_scenario(write(tmp_path, top=top))
    assert sc.gains_w(0.0) == 100.0
    assert sc.model_copy(update={"gains": []}).gains_w(0.0) == 0.0
    later = sc.model_copy(update={"start": datetime(2027, 1, 4, 6, 0)})
    assert later.local_time(0.0).hour == 6
    assert later.gains_w(6 * H) == 100.0  # 12:00 local is now 6 h after the start
    # a used scenario (lookups built) still equals a fresh one
    assert sc == load_scenario(write(tmp_path, top=top))


def test_override_starts_are_seconds_from_the_start(tmp_path: Path) -> None:
    rest = """
[[overrides]]
day = 3
at = "18:00"
target_c = 23.0
hours = 2
[[overrides]]
day = 1
at = "08:00"
target_c = 22.0
hours = 0.5
"""
    sc = load_scenario(write(tmp_path, top="start = 2027-01-04T06:00:00", rest=rest))
    assert sc.override_starts() == [
        ((24 + 8 - 6) * H, 22.0, 1800.0),
        ((3 * 24 + 18 - 6) * H, 23.0, 7200.0),
    ]


# ---- weather -----------------------------------------------------------------------------

START = datetime(2027, 1, 4)


def test_daily_swing_is_coldest_at_five_and_warmest_at_three() -> None:
    w = Weather(WeatherParams(mean_c=1.0, daily_amplitude_c=3.0), START, seed=1)
    assert w.outdoor_c(5 * H) == pytest.approx(-2.0)
    assert w.outdoor_c(15 * H) == pytest.approx(4.0)
    assert w.outdoor_c(10 * H) == pytest.approx(1.0)  # halfway up
    assert w.outdoor_c(22 * H) == pytest.approx(1.0)  # halfway down (15:00 -> 05:00)
    assert w.outdoor_c(DAY + 5 * H) == pytest.approx(-2.0)
    assert w.coldest_c(2.0) == pytest.approx(-2.0)
    # a start at 05:00 shifts the clock: t = 0 is then the coldest moment
    w5 = Weather(WeatherParams(mean_c=1.0, daily_amplitude_c=3.0), START.replace(hour=5), 1)
    assert w5.outdoor_c(0.0) == pytest.approx(-2.0)


def test_trend_and_profile_add_to_the_mean() -> None:
    params = WeatherParams.model_validate({
        "mean_c": 0.0,
        "trend_c_per_day": -1.0,
        "profile": [{"day": 1, "offset_c": 0.0}, {"day": 3, "offset_c": -10.0}],
    })
    w = Weather(params, START, seed=1)
    assert w.outdoor_c(0.0) == pytest.approx(0.0)
    assert w.outdoor_c(2 * DAY) == pytest.approx(-2.0 - 5.0)
    assert w.outdoor_c(5 * DAY) == pytest.approx(-5.0 - 10.0)  # profile held after its end
    assert w.coldest_c(4.0) == pytest.approx(-14.0)


def test_noise_is_deterministic_per_seed_and_independent_of_query_order() -> None:
    params = WeatherParams(mean_c=0.0, noise_c=1.5)
    times = [i * 1234.5 for i in range(500)]
    a = Weather(params, START, seed=42)
    b = Weather(params, START, seed=42)
    series_a = [a.outdoor_c(t) for t in times]
    series_b = [b.outdoor_c(t) for t in reversed(times)][::-1]
    assert series_a == series_b
    c = Weather(params, START, seed=43)
    assert [c.outdoor_c(t) for t in times] != series_a


def test_noise_is_smooth_with_the_asked_spread() -> None:
    w = Weather(WeatherParams(mean_c=0.0, noise_c=2.0, noise_hours=6.0), START, seed=5)
    hourly = [w.outdoor_c(h * H) for h in range(50_000)]
    assert statistics.pstdev(hourly) == pytest.approx(2.0, rel=0.05)
    # AR(1) with a 6-hour correlation time: neighbours one hour apart correlate e^(-1/6)
    m = statistics.fmean(hourly)
    lag1 = statistics.fmean((x - m) * (y - m) for x, y in itertools.pairwise(hourly))
    assert lag1 / statistics.pvariance(hourly) == pytest.approx(math.exp(-1 / 6), abs=0.02)
    # interpolated between the hourly points: no jumps within an hour
    assert w.outdoor_c(10.5 * H) == pytest.approx((hourly[10] + hourly[11]) / 2)


def test_csv_weather_interpolates_and_holds_its_ends(tmp_path: Path) -> None:
    (tmp_path / "w.csv").write_text("hours,outdoor_c\n0,0.0\n1,2.0\n3,-2.0\n")
    w = Weather(WeatherParams(csv="w.csv"), START, seed=1, base_dir=tmp_path)
    assert w.outdoor_c(0.5 * H) == pytest.approx(1.0)
    assert w.outdoor_c(2 * H) == pytest.approx(0.0)
    assert w.outdoor_c(10 * H) == pytest.approx(-2.0)
    assert w.csv_end_s == 3 * H
    shifted = Weather(
        WeatherParams(csv="w.csv", trend_c_per_day=4.8), START, seed=1, base_dir=tmp_path
    )
    assert shifted.outdoor_c(1 * H) == pytest.approx(2.2)  # trend adds to measured data


def test_csv_relative_to_the_scenario_file(tmp_path: Path) -> None:
    rows = "\n".join(f"{h},{-h / 10}" for h in range(0, 24 * 7 + 1, 6))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "week.csv").write_text("hours,outdoor_c\n" + rows + "\n")
    sc = load_scenario(write(tmp_path, weather='csv = "data/week.csv"'))
    w = sc.make_weather()
    assert w.outdoor_c(9 * H) == pytest.approx(-0.9)
    assert w.coldest_c(sc.days) == pytest.approx(-16.8)


def test_csv_problems_are_reported(tmp_path: Path) -> None:
    (tmp_path / "short.csv").write_text("hours,outdoor_c\n0,1\n24,2\n")
    (problem,) = problems_of(write(tmp_path, weather='csv = "short.csv"'))
    assert problem.startswith("weather.csv: the data ends at 24 h but the run lasts 168 h")
    (tmp_path / "bad.csv").write_text("time,temp\n0,1\n")
    (problem,) = problems_of(write(tmp_path, weather='csv = "bad.csv"'))
    assert "header 'hours,outdoor_c'" in problem
    (tmp_path / "back.csv").write_text("hours,outdoor_c\n0,1\n5,1\n4,1\n")
    (problem,) = problems_of(write(tmp_path, weather='csv = "back.csv"'))
    assert "back.csv:4: hours must increase strictly (4 after 5)" in problem
    (problem,) = problems_of(write(tmp_path, weather='csv = "absent.csv"'))
    assert problem.startswith("weather.csv: cannot read weather CSV")


def test_weather_needs_a_mean_or_a_csv_but_not_both(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, weather="noise_c = 1.0"))
    assert problem == "weather: set mean_c (°C) or csv (a file of hours,outdoor_c)"
    (tmp_path / "w.csv").write_text("hours,outdoor_c\n0,1\n200,1\n")
    (problem,) = problems_of(write(tmp_path, weather='csv = "w.csv"\nmean_c = 3.0'))
    assert problem == "weather: csv replaces mean_c; remove it or remove csv"
