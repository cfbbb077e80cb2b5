from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

import pytest

from qrad_agent.config import ComfortPeriod, OptimalStartConfig, ThermostatConfig, WindowConfig
from qrad_agent.core.models import Mode
from qrad_agent.core.thermostat import PREHEAT_MARGIN_S, Thermostat, ThermostatOutput

NOON = datetime(2024, 1, 1, 12, 0)  # a Monday, inside the 06:00-22:00 comfort period
NIGHT = datetime(2024, 1, 1, 2, 0)  # outside it
COMFORT_START = datetime(2024, 1, 1, 6, 0)


def make(**kw: Any) -> Thermostat:
    kw.setdefault("schedule", [ComfortPeriod(days="mon-sun", start="06:00", end="22:00")])
    return Thermostat(ThermostatConfig(**kw))


def no_learning_window(**kw: Any) -> Thermostat:
    return make(window=WindowConfig(enabled=False), **kw)


# ------------------------------------------------------------------ modes


@pytest.mark.parametrize(
    ("mode", "local", "target", "reason", "comfort_now"),
    [
        (Mode.OFF, NOON, None, "off", False),
        (Mode.FROST, NOON, 7.0, "frost", False),
        (Mode.ECO, NOON, 18.0, "eco", False),
        (Mode.COMFORT, NIGHT, 21.0, "comfort", True),
        (Mode.BOOST, NIGHT, 23.0, "boost", True),
        (Mode.AUTO, NOON, 21.0, "comfort", True),
        (Mode.AUTO, NIGHT, 18.0, "eco", False),
    ],
)
def test_every_mode(
    mode: Mode, local: datetime, target: float | None, reason: str, comfort_now: bool
) -> None:
    th = make()
    th.set_mode(mode, now=0.0)
    out = th.update(5.0, local, 21.5, 0.0)  # room warm: no preheat in auto at night
    assert out == ThermostatOutput(target, reason, comfort_now, False, 0.0)
    assert th.mode is mode


def test_initial_mode_comes_from_config() -> None:
    th = make(mode=Mode.ECO)
    assert th.mode is Mode.ECO
    assert th.update(0.0, NOON, 20.0, 0.0).target_c == 18.0


def test_auto_follows_the_schedule_boundaries() -> None:
    th = make(optimal_start=OptimalStartConfig(enabled=False))
    assert th.update(0, datetime(2024, 1, 1, 5, 59, 59), 17.0, 0).reason == "eco"
    assert th.update(10, datetime(2024, 1, 1, 6, 0), 17.0, 0).reason == "comfort"
    assert th.update(20, datetime(2024, 1, 1, 21, 59, 59), 21.0, 0).reason == "comfort"
    assert th.update(30, datetime(2024, 1, 1, 22, 0), 21.0, 0).reason == "eco"


# ------------------------------------------------------------------ boost


def test_boost_expires_and_returns_to_the_previous_mode() -> None:
    th = make(boost_s=600.0)
    th.set_mode(Mode.ECO, now=0.0)
    th.set_mode(Mode.BOOST, now=100.0)
    assert th.update(100.0, NOON, 20.0, 0).target_c == 23.0
    assert th.update(699.9, NOON, 20.0, 0).reason == "boost"
    out = th.update(700.0, NOON, 20.0, 0)
    assert (out.target_c, out.reason, out.comfort_now) == (18.0, "eco", False)
    assert th.mode is Mode.ECO


def test_boost_pressed_again_restarts_the_timer_and_keeps_the_return_mode() -> None:
    th = make(boost_s=600.0)
    th.set_mode(Mode.FROST, now=0.0)
    th.set_mode(Mode.BOOST, now=0.0)
    th.set_mode(Mode.BOOST, now=500.0)
    assert th.update(1000.0, NOON, 20.0, 0).reason == "boost"
    assert th.update(1100.0, NOON, 20.0, 0).reason == "frost"
    assert th.mode is Mode.FROST


def test_boost_from_off_returns_to_off() -> None:
    th = make(boost_s=60.0)
    th.set_mode(Mode.OFF, 0.0)
    th.set_mode(Mode.BOOST, 0.0)
    assert th.update(59.0, NOON, 20.0, 0).target_c == 23.0
    assert th.update(60.0, NOON, 20.0, 0).target_c is None


def test_boost_from_config_starts_at_the_first_update_and_returns_to_auto() -> None:
    th = make(mode=Mode.BOOST, boost_s=120.0)
    assert th.update(1000.0, NIGHT, 22.0, 0).reason == "boost"
    assert th.update(1119.0, NIGHT, 22.0, 0).reason == "boost"
    assert th.update(1120.0, NIGHT, 22.0, 0).reason == "eco"
    assert th.mode is Mode.AUTO


def test_leaving_boost_by_hand_cancels_its_timer() -> None:
    th = make(boost_s=60.0)
    th.set_mode(Mode.BOOST, 0.0)
    th.set_mode(Mode.COMFORT, 10.0)
    assert th.update(1000.0, NIGHT, 22.0, 0).reason == "comfort"
    assert th.mode is Mode.COMFORT


# ------------------------------------------------------------------ override


@pytest.mark.parametrize("mode", [Mode.FROST, Mode.ECO, Mode.COMFORT, Mode.BOOST, Mode.AUTO])
def test_override_wins_in_every_mode_but_off_until_it_expires(mode: Mode) -> None:
    th = make(boost_s=7200.0)
    th.set_mode(mode, now=0.0)
    th.set_override(19.5, now=10.0, duration_s=300.0)
    assert th.override == (19.5, 310.0)
    out = th.update(309.0, NOON, 20.0, 0)
    assert (out.target_c, out.reason) == (19.5, "override")
    after = th.update(310.0, NOON, 20.0, 0)
    assert after.reason != "override"
    assert after.target_c == {
        Mode.FROST: 7.0, Mode.ECO: 18.0, Mode.COMFORT: 21.0, Mode.BOOST: 23.0, Mode.AUTO: 21.0
    }[mode]
    assert th.override is None


def test_override_has_no_effect_in_off() -> None:
    th = make()
    th.set_mode(Mode.OFF, 0.0)
    th.set_override(22.0, 0.0, 600.0)
    out = th.update(1.0, NOON, 18.0, 0)
    assert (out.target_c, out.reason) == (None, "off")


def test_set_mode_and_clear_override_drop_the_override() -> None:
    th = make()
    th.set_override(25.0, 0.0, 3600.0)
    th.set_mode(Mode.ECO, 1.0)
    assert th.update(2.0, NOON, 20.0, 0).target_c == 18.0
    th.set_override(25.0, 3.0, 3600.0)
    assert th.update(4.0, NOON, 20.0, 0).target_c == 25.0
    th.clear_override()
    assert th.update(5.0, NOON, 20.0, 0).target_c == 18.0


@pytest.mark.parametrize(
    ("target", "duration", "needle"),
    [
        (6.9, 60.0, "out of range"),
        (28.1, 60.0, "out of range"),
        (math.nan, 60.0, "out of range"),
        (20.0, 0.0, "positive"),
        (20.0, -5.0, "positive"),
        (20.0, math.inf, "positive"),
    ],
)
def test_override_rejects_bad_values(target: float, duration: float, needle: str) -> None:
    th = make()
    with pytest.raises(ValueError, match=needle):
        th.set_override(target, 0.0, duration)
    assert th.override is None


# ------------------------------------------------------------------ optimal start


def test_preheat_begins_at_comfort_start_minus_lead() -> None:
    th = no_learning_window(optimal_start=OptimalStartConfig(initial_rate_k_per_h=1.0))
    lead = 2 * 3600.0 + PREHEAT_MARGIN_S  # 2 K below comfort at 1 K/h, plus the margin
    begin = COMFORT_START - timedelta(seconds=lead)
    early = th.update(0.0, begin - timedelta(seconds=10), 19.0, 0.0)
    assert (early.target_c, early.reason, early.preheat_lead_s) == (18.0, "eco", lead)
    on = th.update(10.0, begin, 19.0, 0.0)
    assert (on.target_c, on.reason, on.comfort_now) == (21.0, "preheat", False)
    assert on.preheat_lead_s == lead


def test_preheat_holds_until_comfort_even_when_the_room_warms_fast() -> None:
    th = no_learning_window()
    begin = COMFORT_START - timedelta(seconds=2 * 3600.0 + PREHEAT_MARGIN_S)
    assert th.update(0.0, begin, 19.0, 0.0).reason == "preheat"
    # The air warmed quickly: the recomputed lead is now far shorter than the time left.
    later = th.update(600.0, begin + timedelta(minutes=10), 20.9, 1.0)
    assert later.reason == "preheat"
    assert later.preheat_lead_s == pytest.approx(0.1 * 3600 + PREHEAT_MARGIN_S)
    at_start = th.update(9000.0, COMFORT_START, 21.0, 0.5)
    assert (at_start.reason, at_start.comfort_now) == ("comfort", True)
    # The next evening the latch is gone: it does not preheat at 22:00 for tomorrow.
    assert th.update(99000.0, datetime(2024, 1, 1, 22, 0), 19.0, 0.0).reason == "eco"


def test_lead_follows_a_room_that_cools_overnight() -> None:
    th = no_learning_window()
    # At 02:00 a room at 19 °C needs 2 h 10 min: not yet.
    assert th.update(0.0, datetime(2024, 1, 1, 2, 0), 19.0, 0.0).reason == "eco"
    # At 03:00 it has cooled to 18 °C and needs 3 h 10 min: it is already late.
    assert th.update(3600.0, datetime(2024, 1, 1, 3, 0), 18.0, 0.0).reason == "preheat"


def test_no_preheat_when_warm_enough_disabled_or_without_a_sensor() -> None:
    th = no_learning_window()
    five = datetime(2024, 1, 1, 5, 0)
    out = th.update(0.0, five, 21.0, 0.0)
    assert (out.reason, out.preheat_lead_s) == ("eco", 0.0)
    assert th.update(10.0, five, None, 0.0).reason == "eco"
    off = no_learning_window(optimal_start=OptimalStartConfig(enabled=False))
    out = off.update(0.0, datetime(2024, 1, 1, 5, 59), 15.0, 0.0)
    assert (out.reason, out.preheat_lead_s) == ("eco", 0.0)
    eco = no_learning_window(mode=Mode.ECO)
    out = eco.update(0.0, datetime(2024, 1, 1, 5, 59), 15.0, 0.0)
    assert (out.reason, out.preheat_lead_s) == ("eco", 0.0)


def test_lead_is_capped_by_max_lead_s() -> None:
    th = no_learning_window(
        optimal_start=OptimalStartConfig(initial_rate_k_per_h=0.1, max_lead_s=3 * 3600.0)
    )
    # 3 K at 0.1 K/h would be 30 h; the cap says 3 h.
    out = th.update(0.0, datetime(2024, 1, 1, 2, 59, 59), 18.0, 0.0)
    assert (out.reason, out.preheat_lead_s) == ("eco", 3 * 3600.0)
    assert th.update(1.0, datetime(2024, 1, 1, 3, 0), 18.0, 0.0).reason == "preheat"


def test_a_zero_cap_disables_preheat() -> None:
    th = no_learning_window(optimal_start=OptimalStartConfig(max_lead_s=0.0))
    assert th.update(0.0, datetime(2024, 1, 1, 5, 59), 15.0, 0.0).reason == "eco"


def test_reconfigured_schedule_drops_a_preheat_for_a_start_that_is_gone() -> None:
    th = no_learning_window()
    five = datetime(2024, 1, 1, 5, 0)
    assert th.update(0.0, five, 19.0, 0.0).reason == "preheat"
    th.reconfigure(ThermostatConfig(
        window=WindowConfig(enabled=False),
        schedule=[ComfortPeriod(days="mon-sun", start="17:00", end="22:00")],
    ))
    assert th.update(10.0, five, 19.0, 0.0).reason == "eco"


# ------------------------------------------------------------------ learning the warm-up rate


def warm_up(
    th: Thermostat,
    room_at: Any,
    *,
    t0: float = 0.0,
    step: float = 10.0,
    until_s: float = 12 * 3600.0,
    demand_at: Any = None,
) -> float:
    """Drive a comfort-mode warm-up; return the time the thermostat should end the episode."""
    th.set_mode(Mode.COMFORT, t0)
    t = 0.0
    while t <= until_s:
        room = room_at(t)
        demand = 1.0 if demand_at is None else demand_at(t, room)
        th.update(t0 + t, NOON, room, demand)
        if room >= 21.0 - 0.2 - 1e-9:
            return t
        t += step
    return t


def test_learns_the_rate_of_a_linear_warm_up() -> None:
    th = no_learning_window()
    end = warm_up(th, lambda t: 18.0 + 1.5 * t / 3600.0)
    assert end == pytest.approx(6720.0, abs=10)
    # 2.8 K in 6720 s = 1.5 K/h, blended half-and-half into 1.0 K/h.
    assert th.warmup_rate_k_per_h == pytest.approx(1.25, abs=1e-3)
    assert th.export_state()["warmup_episodes"] == 1.0


def test_learns_the_whole_episode_rate_of_a_nonlinear_warm_up() -> None:
    # Air first, walls later: an exponential approach to 24 °C with a 3 h time constant.
    tau = 3 * 3600.0
    th = no_learning_window()
    end = warm_up(th, lambda t: 24.0 - 6.0 * math.exp(-t / tau))
    expected_end = tau * math.log(6.0 / 3.2)
    assert end == pytest.approx(expected_end, abs=10)
    observed = 2.8 / (end / 3600.0)  # start to target, not the initial slope (2 K/h)
    assert observed < 1.5
    assert th.warmup_rate_k_per_h == pytest.approx(1.0 + 0.5 * (observed - 1.0), abs=1e-3)


def test_the_pid_backing_off_near_the_target_does_not_spoil_the_episode() -> None:
    th = no_learning_window()
    warm_up(
        th,
        lambda t: 18.0 + 2.0 * t / 3600.0,
        demand_at=lambda t, room: 1.0 if room < 20.0 else 0.3,
    )
    assert th.warmup_rate_k_per_h == pytest.approx(1.5, abs=1e-3)


def test_an_unsaturated_pid_still_pushing_keeps_the_episode() -> None:
    th = no_learning_window()
    warm_up(
        th,
        lambda t: 18.0 + 2.0 * t / 3600.0,
        demand_at=lambda t, room: 1.0 if room < 19.0 else 0.7,
    )
    assert th.warmup_rate_k_per_h == pytest.approx(1.5, abs=1e-3)


def test_demand_lost_far_from_the_target_aborts_the_episode() -> None:
    th = no_learning_window()
    warm_up(
        th,
        lambda t: 18.0 + 2.0 * t / 3600.0,
        demand_at=lambda t, room: 1.0 if t < 1800 else 0.0,
    )
    assert th.warmup_rate_k_per_h == 1.0
    assert th.export_state()["warmup_episodes"] == 0.0


def test_unsaturated_demand_never_starts_an_episode() -> None:
    th = no_learning_window()
    warm_up(th, lambda t: 18.0 + 2.0 * t / 3600.0, demand_at=lambda t, room: 0.9)
    assert th.warmup_rate_k_per_h == 1.0


def test_a_short_episode_is_ignored() -> None:
    th = no_learning_window()
    # 1 K gap closed in 8 minutes.
    warm_up(th, lambda t: 20.0 + 0.8 * t / 480.0)
    assert th.warmup_rate_k_per_h == 1.0


def test_a_small_rise_has_a_smaller_say() -> None:
    th = no_learning_window()
    # From 20.0 to 20.8 in 40 min: 1.2 K/h, but only 0.8 K of evidence.
    warm_up(th, lambda t: 20.0 + 1.2 * t / 3600.0)
    assert th.warmup_rate_k_per_h == pytest.approx(1.0 + 0.5 * 0.4 * 0.2, abs=1e-3)


def test_a_target_change_aborts_the_episode() -> None:
    def room(t: float) -> float:
        return 18.0 + t / 3600.0 if t < 3600.0 else 19.0 + 3.0 * (t - 3600.0) / 3600.0

    th = no_learning_window()
    th.set_mode(Mode.COMFORT, 0.0)
    t = 0.0
    while t < 3600.0:
        th.update(t, NOON, room(t), 1.0)
        t += 10.0
    th.set_override(22.0, t, 36000.0)
    while t < 4 * 3600.0:
        th.update(t, NOON, room(t), 1.0)
        t += 10.0
    # Only the episode begun by the override counts: 19 -> 21.8 °C at 3 K/h. Had the first
    # one run on to 20.8 °C it would have taught about 1.75 K/h.
    assert th.export_state()["warmup_episodes"] == 1.0
    assert th.warmup_rate_k_per_h == pytest.approx(2.0, abs=1e-3)


def test_learning_is_bounded() -> None:
    fast = no_learning_window(optimal_start=OptimalStartConfig(initial_rate_k_per_h=20.0))
    fast.set_override(28.0, 0.0, 36000.0)
    fast.update(0.0, NOON, 7.0, 1.0)
    fast.update(700.0, NOON, 27.9, 1.0)  # 20.9 K in under 12 minutes
    assert fast.warmup_rate_k_per_h == 20.0

    slow = no_learning_window(optimal_start=OptimalStartConfig(initial_rate_k_per_h=0.06))
    warm_up(slow, lambda t: 18.0 + 0.028 * t / 3600.0, step=600.0, until_s=110 * 3600.0)
    assert slow.warmup_rate_k_per_h == 0.05


def test_a_learned_rate_shortens_the_lead() -> None:
    th = no_learning_window()
    warm_up(th, lambda t: 18.0 + 3.0 * t / 3600.0)  # 1 + 0.5 * (3 - 1) = 2 K/h
    assert th.warmup_rate_k_per_h == pytest.approx(2.0, abs=1e-3)
    th.set_mode(Mode.AUTO, 50000.0)
    out = th.update(50000.0, datetime(2024, 1, 2, 4, 0), 19.0, 0.0)
    assert out.preheat_lead_s == pytest.approx(3600.0 + PREHEAT_MARGIN_S, abs=5)


def test_state_survives_a_restart_and_a_reconfigure() -> None:
    th = no_learning_window()
    warm_up(th, lambda t: 18.0 + 3.0 * t / 3600.0)
    state = th.export_state()
    fresh = no_learning_window()
    fresh.import_state(state)
    assert fresh.warmup_rate_k_per_h == th.warmup_rate_k_per_h
    assert fresh.export_state() == state
    fresh.reconfigure(ThermostatConfig(
        comfort_c=22.0, optimal_start=OptimalStartConfig(initial_rate_k_per_h=5.0)
    ))
    assert fresh.warmup_rate_k_per_h == pytest.approx(2.0, abs=1e-3)
    # Nothing learned yet: a new initial rate is taken.
    other = no_learning_window()
    other.reconfigure(ThermostatConfig(optimal_start=OptimalStartConfig(initial_rate_k_per_h=3.0)))
    assert other.warmup_rate_k_per_h == 3.0


@pytest.mark.parametrize(
    "state",
    [
        {"warmup_rate_k_per_h": 0.0},
        {"warmup_rate_k_per_h": 25.0},
        {"warmup_rate_k_per_h": math.nan},
        {"warmup_rate_k_per_h": "fast"},
        {"warmup_rate_k_per_h": True},
        {"warmup_episodes": -1.0},
        {"warmup_episodes": 1.5},
    ],
)
def test_import_rejects_bad_state(state: dict[str, object]) -> None:
    th = no_learning_window()
    with pytest.raises(ValueError, match=next(iter(state))):
        th.import_state(state)
    assert th.warmup_rate_k_per_h == 1.0


def test_import_ignores_unknown_and_missing_keys() -> None:
    th = no_learning_window()
    th.import_state({"something_new": 3.0})
    assert th.export_state() == {"warmup_rate_k_per_h": 1.0, "warmup_episodes": 0.0}


def test_reconfigure_keeps_the_mode_unless_the_config_mode_changed() -> None:
    th = make()
    th.set_mode(Mode.ECO, 0.0)
    th.reconfigure(ThermostatConfig(comfort_c=22.0))
    kept = th.mode
    th.reconfigure(ThermostatConfig(comfort_c=22.0, mode=Mode.COMFORT))
    assert (kept, th.mode) == (Mode.ECO, Mode.COMFORT)
    assert th.update(0.0, NIGHT, 20.0, 0.0).target_c == 22.0


# ------------------------------------------------------------------ window detection


WIN = WindowConfig(enabled=True, drop_k=0.6, within_s=300.0, max_off_s=1800.0)


def steady(th: Thermostat, t0: float, t1: float, room: float, step: float = 10.0) -> float:
    t = t0
    while t < t1:
        out = th.update(t, NOON, room, 0.5)
        assert not out.window_open, t
        t += step
    return t


def test_a_fast_drop_opens_the_window() -> None:
    th = make(window=WIN, mode=Mode.COMFORT)
    t = steady(th, 0.0, 600.0, 21.0)
    # 0.6 K in 300 s, from the last steady sample: open exactly when the full drop is seen.
    t -= 10.0
    for i in range(1, 31):
        out = th.update(t + 10 * i, NOON, 21.0 - 0.02 * i, 0.5)
        assert out.window_open is (i == 30), i
    assert (out.target_c, out.reason, out.comfort_now) == (7.0, "window", True)


def test_the_same_drop_slowly_does_not() -> None:
    th = make(window=WIN, mode=Mode.COMFORT)
    t = steady(th, 0.0, 600.0, 21.0)
    for i in range(1, 91):  # 0.6 K over 900 s
        out = th.update(t + 10 * i, NOON, 21.0 - 0.6 * i / 90, 0.5)
        assert not out.window_open, i
    assert out.reason == "comfort"


def test_a_drop_spread_beyond_within_s_is_not_a_window() -> None:
    th = make(window=WIN, mode=Mode.COMFORT)
    th.update(0.0, NOON, 21.0, 0.5)
    assert not th.update(301.0, NOON, 20.3, 0.5).window_open  # the 21.0 is too old now


def open_window(th: Thermostat) -> float:
    t = steady(th, 0.0, 300.0, 21.0)
    out = th.update(t, NOON, 20.2, 0.5)
    assert out.window_open
    return t


def test_max_off_s_bounds_the_pause_and_the_drop_is_not_seen_again() -> None:
    th = make(window=WIN, mode=Mode.COMFORT)
    t0 = open_window(th)
    room = 20.2
    t = t0
    while t < t0 + 1800.0 - 10:
        t += 10
        room -= 0.01  # still falling at 1 mK/s, above a third of the 2 mK/s detection rate
        assert th.update(t, NOON, room, 0.5).window_open, t
    out = th.update(t0 + 1800.0, NOON, room, 0.5)
    assert (out.window_open, out.reason, out.target_c) == (False, "comfort", 21.0)
    steady(th, t0 + 1810.0, t0 + 3000.0, room)


def test_a_rise_ends_it_early_but_not_within_two_minutes() -> None:
    th = make(window=WIN, mode=Mode.COMFORT)
    t0 = open_window(th)
    assert th.update(t0 + 30, NOON, 19.8, 0.5).window_open  # still falling: new low
    assert th.update(t0 + 60, NOON, 20.1, 0.5).window_open  # risen 0.3 K but too soon
    assert th.update(t0 + 110, NOON, 20.1, 0.5).window_open
    assert th.update(t0 + 120, NOON, 19.95, 0.5).window_open  # only 0.15 K above the low
    out = th.update(t0 + 130, NOON, 20.0, 0.5)
    assert (out.window_open, out.reason) == (False, "comfort")


def test_a_fall_that_slows_to_a_crawl_ends_it_without_a_rise() -> None:
    # Cold walls in the morning: after the window closes the air keeps sinking, slowly.
    th = make(window=WIN, mode=Mode.COMFORT)
    t0 = open_window(th)
    room, t = 20.2, t0
    while t < t0 + 170:  # still open: 0.15 K a minute
        t += 10
        room -= 0.025
        assert th.update(t, NOON, room, 0.5).window_open, t
    ended_at = None
    while t < t0 + 600:  # closed: 0.025 K a minute, well under a third of 0.12 K/min
        t += 10
        room -= 0.004
        if not th.update(t, NOON, room, 0.5).window_open:
            ended_at = t
            break
    assert ended_at is not None and ended_at - (t0 + 170) <= 200  # within the 3-minute span


def test_a_new_drop_after_the_window_closed_is_detected_again() -> None:
    th = make(window=WIN, mode=Mode.COMFORT)
    t0 = open_window(th)
    assert not th.update(t0 + 200, NOON, 20.5, 0.5).window_open
    assert not th.update(t0 + 210, NOON, 20.5, 0.5).window_open
    assert th.update(t0 + 300, NOON, 19.9, 0.5).window_open


@pytest.mark.parametrize("mode", [Mode.FROST, Mode.ECO, Mode.COMFORT, Mode.BOOST, Mode.AUTO])
def test_window_targets_frost_protection_even_over_an_override(mode: Mode) -> None:
    th = make(window=WIN, mode=mode)
    th.set_override(25.0, 0.0, 36000.0)
    open_window(th)
    out = th.update(400.0, NOON, 19.0, 0.5)
    assert (out.target_c, out.reason, out.window_open) == (7.0, "window", True)


def test_window_never_overrides_off() -> None:
    th = make(window=WIN, mode=Mode.OFF)
    t = steady(th, 0.0, 300.0, 21.0)
    out = th.update(t, NOON, 20.2, 0.0)
    assert (out.target_c, out.reason) == (None, "off")


def test_missing_room_temperature_leaves_the_history_alone() -> None:
    th = make(window=WIN, mode=Mode.COMFORT)
    th.update(0.0, NOON, 21.0, 0.5)
    for i in range(1, 20):
        assert not th.update(10.0 * i, NOON, None, 0.5).window_open
    # The sample from before the gap still counts.
    assert th.update(200.0, NOON, 20.4, 0.5).window_open


def test_the_pause_ends_at_max_off_s_without_a_sensor() -> None:
    th = make(window=WIN, mode=Mode.COMFORT)
    t0 = open_window(th)
    assert th.update(t0 + 1000, NOON, None, 0.5).window_open
    assert not th.update(t0 + 1800, NOON, None, 0.5).window_open


def test_disabled_window_detection() -> None:
    th = make(window=WindowConfig(enabled=False), mode=Mode.COMFORT)
    th.update(0.0, NOON, 21.0, 0.5)
    assert not th.update(10.0, NOON, 18.0, 0.5).window_open


def test_reconfigure_disabling_detection_ends_an_open_window() -> None:
    th = make(window=WIN, mode=Mode.COMFORT)
    t0 = open_window(th)
    th.reconfigure(ThermostatConfig(mode=Mode.COMFORT, window=WindowConfig(enabled=False)))
    assert th.update(t0 + 10, NOON, 19.0, 0.5).reason == "comfort"


def test_a_window_during_a_warm_up_is_not_learned_from() -> None:
    th = make(window=WIN)
    th.set_mode(Mode.COMFORT, 0.0)
    room = 18.0
    t = 0.0
    while room < 20.8:
        # A window drops the air by 0.7 K in a minute one hour in; the rest is a warm-up.
        dip = 0.7 if 3600.0 <= t < 3700.0 else 0.0
        th.update(t, NOON, room - dip, 1.0)
        t += 10.0
        room += 1.5 * 10.0 / 3600.0
    for _ in range(720):  # and keep going until well past the settling time
        th.update(t, NOON, 20.9, 1.0)
        t += 10.0
    assert th.warmup_rate_k_per_h == 1.0
    assert th.export_state()["warmup_episodes"] == 0.0
