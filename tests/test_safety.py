"""The safety supervisor, pure: readings and ``now`` in, cap, floor and events out."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from qrad_agent.core.fusion import RoomEstimate
from qrad_agent.core.models import Quality, Reading, Role
from qrad_agent.core.safety import (
    NO_HEAT,
    SafetyInputs,
    SafetySupervisor,
    SafetyVerdict,
    gain_time_s,
)
from qrad_agent.core.safety_checks import CheckResult
from qrad_agent.safety_settings import (
    AutotuneConfig,
    CpuSafetyConfig,
    HeatingCheckConfig,
    RoomModelConfig,
    SafetyConfig,
)

PERIOD = 10.0


def room(name: str, temp: float | None, quality: Quality = Quality.OK,
         role: Role = Role.ROOM) -> Reading:
    if temp is None and quality is Quality.OK:
        quality = Quality.IO_ERROR
    return Reading(name, role, quality, 0.0, temp if quality is Quality.OK else None)


def board(temp: float | None) -> Reading:
    return room("board", temp, role=Role.BOARD)


class Driver:
    """Feeds a supervisor one tick per control period, remembering the applied demand the way
    the agent does (the verdict applied to what the controller wanted)."""

    def __init__(self, cfg: SafetyConfig | None = None) -> None:
        self.sup = SafetySupervisor(cfg or SafetyConfig(), PERIOD)
        self.t = 0.0
        self.applied = 0.0
        self.events: list[tuple[float, str, str, str]] = []

    def tick(self, readings: list[Reading], target: float | None = 21.0,
             wanted: float = 0.5, crit: float | None = None,
             outdoor: float | None = None) -> SafetyVerdict:
        self.t += PERIOD
        v = self.sup.evaluate(self.t, SafetyInputs(
            readings=readings, target_c=target, demand=self.applied, cpu_critical_c=crit,
            outdoor_c=outdoor))
        self.applied = v.apply(wanted)
        self.events += [(e.at, e.check, e.kind, e.reason) for e in v.events]
        return v

    def run(self, seconds: float, readings: list[Reading], **kw: object) -> SafetyVerdict:
        """``seconds`` worth of ticks (at least one); the verdict of the last."""
        for _ in range(max(1, round(seconds / PERIOD))):
            v = self.tick(readings, **kw)  # type: ignore[arg-type]
        return v

    def kinds(self, check: str) -> list[str]:
        return [k for _, c, k, _ in self.events if c == check]


# -- the verdict ------------------------------------------------------------------------------
def test_a_cap_wins_over_a_floor_and_zero_stops() -> None:
    est = RoomEstimate(20.0, 1, 1)
    assert SafetyVerdict(0.3, 1.0, (), {}, est).apply(0.1) == pytest.approx(0.3)
    assert SafetyVerdict(1.0, 0.6, (), {}, est).apply(0.1) == pytest.approx(0.6)
    assert SafetyVerdict(1.0, None, (), {}, est).apply(0.8) == pytest.approx(0.8)
    assert SafetyVerdict(0.0, 1.0, (), {}, est).apply(0.9) == 0.0
    assert SafetyVerdict(0.0, None, (), {}, est).stopped
    assert SafetyVerdict(NO_HEAT, None, (), {}, est).apply(1.0) < 0.01  # paused, not stopped


def test_healthy_single_sensor_is_left_alone() -> None:
    d = Driver()
    v = d.run(3600, [room("room", 21.0)])
    assert v.limit == 1.0 and v.force_demand is None and not d.events
    assert v.room.temperature_c == 21.0
    assert v.states["failsafe"] == "primary" and v.states["cpu_temperature"] == "no-sensor"


# -- CPU temperature -----------------------------------------------------------------------------
def test_cpu_thresholds_come_from_the_critical_limit_else_from_config() -> None:
    d = Driver()
    d.tick([room("room", 21.0), board(86.0)], crit=105.0, wanted=0.8)
    assert not d.events  # 86 < 105 - 15
    v = d.tick([room("room", 21.0), board(91.0)], crit=105.0, wanted=0.8)
    assert v.states["cpu_temperature"] == "reducing"
    d2 = Driver()
    v2 = d2.tick([room("room", 21.0), board(86.0)], crit=None, wanted=0.8)  # config: 100
    assert v2.states["cpu_temperature"] == "reducing"
    d3 = Driver()  # a nonsense critical value from a broken driver: the config's is used
    v3 = d3.tick([room("room", 21.0), board(86.0)], crit=7.0, wanted=0.8)
    assert v3.states["cpu_temperature"] == "reducing"


def test_cpu_cap_starts_at_the_applied_demand_and_falls_at_its_rate() -> None:
    d = Driver()
    d.run(60, [room("room", 21.0), board(60.0)], crit=100.0, wanted=0.8)
    v = d.tick([room("room", 21.0), board(86.0)], crit=100.0, wanted=0.8)
    # entered at the applied 0.8, already lowered by one period at 1 %/s
    assert v.limit == pytest.approx(0.8 - 0.01 * PERIOD)
    assert v.limited_by == "cpu_temperature"
    v = d.tick([room("room", 21.0), board(86.0)], crit=100.0, wanted=0.8)
    assert v.limit == pytest.approx(0.6)
    # between threshold - 2 K and the threshold the cap holds still
    v = d.tick([room("room", 21.0), board(84.0)], crit=100.0, wanted=0.8)
    assert v.limit == pytest.approx(0.6)
    # well below, and the cap is what holds the demand back: it rises at 0.2 %/s
    v = d.tick([room("room", 21.0), board(70.0)], crit=100.0, wanted=0.8)
    assert v.limit == pytest.approx(0.62)
    # not rising while the controller asks less than the cap: nothing is proven
    v = d.tick([room("room", 21.0), board(70.0)], crit=100.0, wanted=0.1)
    v = d.tick([room("room", 21.0), board(70.0)], crit=100.0, wanted=0.1)
    assert v.limit == pytest.approx(0.64)
    v = d.run(600, [room("room", 21.0), board(70.0)], crit=100.0, wanted=1.0)
    assert v.limit == 1.0 and v.states["cpu_temperature"] == "ok"
    assert d.kinds("cpu_temperature") == ["trip", "reset"]


def test_cpu_stop_pauses_everything_and_resumes_with_hysteresis() -> None:
    d = Driver()
    v = d.tick([room("room", 21.0), board(96.0)], crit=100.0, wanted=1.0)
    assert v.limit == NO_HEAT and d.applied < 1e-3
    assert v.apply(1.0) < 1e-3
    v = d.tick([room("room", 21.0), board(80.0)], crit=100.0, wanted=1.0)
    assert v.limit == NO_HEAT  # 80 > 85 - 10: still cooling
    v = d.tick([room("room", 21.0), board(75.0)], crit=100.0, wanted=1.0)
    assert v.limit == pytest.approx(SafetyConfig().cpu.resume_cap)
    assert d.kinds("cpu_temperature") == ["trip", "reset"]


def test_repeated_stops_latch_until_a_person_resets() -> None:
    d = Driver()
    for _ in range(3):
        d.tick([room("room", 21.0), board(97.0)], crit=100.0, wanted=1.0)
        d.run(300, [room("room", 21.0), board(60.0)], crit=100.0, wanted=1.0)
    v = d.tick([room("room", 21.0), board(40.0)], crit=100.0, wanted=1.0)
    assert v.latched and v.limit == 0.0  # workers stopped, cool or not
    assert v.states["cpu_temperature"] == "latched"
    v = d.run(7200, [room("room", 21.0), board(40.0)], crit=100.0, wanted=1.0)
    assert v.latched and v.limit == 0.0
    with pytest.raises(ValueError, match="no safety check named 'cpu'; checks: "):
        d.sup.reset(d.t, "cpu")
    events = d.sup.reset(d.t, "cpu_temperature")
    assert len(events) == 1 and events[0].kind == "reset"
    v = d.tick([room("room", 21.0), board(40.0)], crit=100.0, wanted=1.0)
    assert not v.latched and v.limit == pytest.approx(SafetyConfig().cpu.resume_cap)


def test_lost_cpu_sensor_caps_the_heat_after_its_grace() -> None:
    d = Driver()
    d.run(60, [room("room", 21.0), board(60.0)], crit=100.0, wanted=1.0)
    v = d.run(50, [room("room", 21.0), board(None)], wanted=1.0)
    assert v.limit == 1.0
    v = d.run(20, [room("room", 21.0), board(None)], wanted=1.0)
    assert v.limit == pytest.approx(0.5) and v.states["cpu_temperature"] == "sensor-lost"
    v = d.tick([room("room", 21.0), board(60.0)], crit=100.0, wanted=1.0)
    assert v.limit == 1.0
    assert d.kinds("cpu_temperature") == ["trip", "reset"]


# -- room and exhaust over-temperature, frost ----------------------------------------------------
def test_room_over_temperature_means_no_heat_in_any_mode_until_hysteresis() -> None:
    d = Driver()
    v = d.tick([room("room", 28.0)], target=None, wanted=1.0)  # even a floor cannot heat
    assert v.limit == NO_HEAT and v.limited_by == "room_over_temperature"
    v = d.tick([room("room", 27.2)], wanted=1.0)
    assert v.limit == NO_HEAT
    v = d.tick([room("room", 27.0)], wanted=1.0)
    assert v.limit == 1.0
    assert d.kinds("room_over_temperature") == ["trip", "reset"]
    ev = [e for e in d.events if e[1] == "room_over_temperature"]
    assert "28" in ev[0][3] and "27" in ev[0][3]  # the value and the reset threshold


def test_an_over_temperature_outlives_its_sensor_for_the_hold_only() -> None:
    d = Driver()
    d.tick([room("room", 28.5)], wanted=0.0)
    v = d.run(SafetyConfig().failsafe.hold_s, [room("room", None)], wanted=0.0)
    assert v.limit == NO_HEAT  # last seen too hot: the held heat must not come
    v = d.tick([room("room", None)], wanted=0.0)
    assert v.limit == 1.0 and d.kinds("room_over_temperature") == ["trip", "reset"]


def test_exhaust_sensor_limit_where_one_is_fitted() -> None:
    d = Driver()
    exhaust = room("grille", 61.0, role=Role.EXHAUST)
    v = d.tick([room("room", 21.0), exhaust], wanted=1.0)
    assert v.limit == NO_HEAT and v.limited_by == "exhaust_over_temperature"
    v = d.tick([room("room", 21.0), room("grille", 56.0, role=Role.EXHAUST)], wanted=1.0)
    assert v.limit == NO_HEAT
    v = d.tick([room("room", 21.0), room("grille", 55.0, role=Role.EXHAUST)], wanted=1.0)
    assert v.limit == 1.0


def test_frost_protection_heats_even_in_mode_off() -> None:
    d = Driver()
    v = d.tick([room("room", 6.9)], target=None, wanted=0.0)
    assert v.force_demand == 1.0 and d.applied == 1.0
    v = d.tick([room("room", 7.9)], target=None, wanted=0.0)
    assert v.force_demand == 1.0
    v = d.tick([room("room", 8.0)], target=None, wanted=0.0)
    assert v.force_demand is None and d.applied == 0.0
    assert d.kinds("frost") == ["trip", "reset"]
    off = SafetyConfig(frost={"enabled": False})  # type: ignore[arg-type]
    d2 = Driver(off)
    assert d2.tick([room("room", 3.0)], target=None, wanted=0.0).force_demand is None


# -- the failsafe ladder --------------------------------------------------------------------------
def test_ladder_steps_down_one_rung_at_a_time_with_an_event_each() -> None:
    d = Driver()
    fs = SafetyConfig().failsafe
    d.run(3600, [room("a", 21.0), room("b", 21.2)], wanted=0.4)
    v = d.tick([room("a", None), room("b", 21.2)], wanted=0.4)
    assert d.sup.ladder.basis.value == pytest.approx(0.4)
    assert v.states["failsafe"] == "others" and v.room.temperature_c == 21.2
    assert v.force_demand is None
    v = d.tick([room("a", None), room("b", None, Quality.CRC_ERROR)], wanted=0.0)
    assert v.states["failsafe"] == "hold"
    assert v.force_demand == pytest.approx(0.4, abs=0.01)  # what held the room
    assert d.applied == pytest.approx(0.4, abs=0.01)
    v = d.run(fs.hold_s - 3 * PERIOD, [room("a", None), room("b", None)], wanted=0.0)
    assert v.states["failsafe"] == "hold"
    v = d.run(2 * PERIOD, [room("a", None), room("b", None)], wanted=0.0)
    assert v.states["failsafe"] == "hold"  # hold_s - PERIOD after the loss
    v = d.tick([room("a", None), room("b", None)], wanted=0.0)
    assert v.states["failsafe"] == "safe" and v.force_demand is None and d.applied == 0.0
    assert d.kinds("failsafe") == ["step_down", "step_down", "step_down"]
    # back up only after recover_s of health, straight to the best rung available
    v = d.run(fs.recover_s - 2 * PERIOD, [room("a", 21.0), room("b", 21.0)], wanted=0.4)
    assert v.states["failsafe"] == "safe" and v.room.temperature_c == 21.0
    v = d.run(3 * PERIOD, [room("a", 21.0), room("b", 21.0)], wanted=0.4)
    assert v.states["failsafe"] == "primary"
    assert d.kinds("failsafe")[-1] == "step_up"


def test_hold_is_bounded_by_hold_max_demand() -> None:
    d = Driver()
    d.run(3600, [room("room", 18.0)], wanted=1.0)
    v = d.tick([room("room", None)], wanted=0.0)
    assert v.force_demand == pytest.approx(SafetyConfig().failsafe.hold_max_demand)


def test_safe_rung_protects_from_frost_by_the_idle_board() -> None:
    cfg = SafetyConfig(failsafe={"hold_s": 0})  # type: ignore[arg-type]
    d = Driver(cfg)
    fs = cfg.failsafe
    # learn the idle board's offset above the room: 9 K
    d.run(24 * 3600, [room("room", 15.0), board(24.0)], wanted=0.0)
    assert d.sup.ladder.offset.value == pytest.approx(9.0, abs=0.1)
    d.tick([room("room", None), board(24.0)], wanted=0.0)
    # the board says the room is at 16 - 9 = 7 °C... not below frost_c: nothing
    v = d.run(fs.board_settle_s, [room("room", None), board(16.5)], wanted=0.0)
    assert v.force_demand is None
    # 15.5 - 9 = 6.5 °C: a burst of frost heat, then idle to measure again
    v = d.tick([room("room", None), board(15.5)], wanted=0.0)
    assert v.force_demand == 1.0 and "board frost burst" in v.states["failsafe"]
    hot = board(40.0)  # the CPUs heat while they run: not a room temperature
    v = d.run(fs.board_frost_burst_s - 2 * PERIOD, [room("room", None), hot], wanted=0.0)
    assert v.force_demand == 1.0
    v = d.run(2 * PERIOD, [room("room", None), hot], wanted=0.0)
    assert v.force_demand is None  # settling: idle until the board shows the room again
    v = d.run(fs.board_settle_s - 2 * PERIOD, [room("room", None), board(15.5)], wanted=0.0)
    assert v.force_demand is None
    v = d.run(3 * PERIOD, [room("room", None), board(15.5)], wanted=0.0)
    assert v.force_demand == 1.0


# -- heater-not-heating and misplaced sensors ----------------------------------------------------
def test_gain_time_comes_from_the_room_model() -> None:
    m = RoomModelConfig(gain_k=5.0, tau_s=4500.0, dead_time_s=120.0)
    assert gain_time_s(m, 0.5) == pytest.approx(120 + 2 * 4500 * math.log(2.5 / 2.0))
    assert gain_time_s(RoomModelConfig(gain_k=0.8), 0.5) == 3 * 3600.0  # cannot gain that
    assert gain_time_s(RoomModelConfig(tau_s=60.0), 0.5) == 900.0  # at least 15 minutes


def test_a_room_that_does_not_warm_under_heat_is_capped() -> None:
    d = Driver()
    hc = SafetyConfig().heating
    gain_time = d.sup.heating.gain_time_s
    d.run(3 * 3600, [room("room", 21.0)], wanted=0.5)  # the room held at 21 with 0.5
    start = d.t
    v = d.run(gain_time, [room("room", 15.0)], wanted=1.0)
    assert v.limit == 1.0 and not d.kinds("heating")
    # then 4 K of deficit beyond the band add up to 1 K·h in 15 minutes
    deficit = 21.0 - hc.band_k - 15.0
    v = d.run(3600 * hc.max_error_kh / deficit + 3 * PERIOD, [room("room", 15.0)], wanted=1.0)
    assert d.kinds("heating") == ["notice", "trip"]
    trip_at = next(e[0] for e in d.events if e[2] == "trip")
    assert trip_at - start <= gain_time + 3600 * hc.max_error_kh / deficit + 3 * PERIOD
    cap = 0.5 * (1 + hc.cap_margin) + 0.05
    assert v.limit == pytest.approx(cap, abs=0.01) and d.applied == pytest.approx(cap, abs=0.01)
    # a window closed: the sensor warms a kelvin within the window: the cap lifts
    v = d.run(600, [room("room", 16.2)], wanted=1.0)
    assert v.limit == 1.0 and d.kinds("heating")[-2:] == ["reset", "reset"]


def test_a_room_that_keeps_gaining_or_stalls_within_the_band_is_not_a_fault() -> None:
    d = Driver()
    temp = 15.0
    for _ in range(int(4 * 3600 / PERIOD)):  # warming 1 K/h from far below
        temp += 1.0 / 360
        d.tick([room("room", temp)], wanted=1.0)
    d.run(6 * 3600, [room("room", 19.5)], wanted=1.0)  # undersized: stalls 1.5 K short
    assert not d.kinds("heating") and d.sup.last is not None and d.sup.last.limit == 1.0


def test_weather_warming_a_sensor_outside_is_no_gain() -> None:
    d = Driver()
    gain_time = d.sup.heating.gain_time_s
    outdoor = 0.0
    for _ in range(int((gain_time + 1800) / PERIOD)):
        outdoor += 1.0 / 360  # the morning sun: 1 K/h on the sensor and the outdoor air
        d.tick([room("room", outdoor)], wanted=1.0, outdoor=outdoor)
    assert "trip" in d.kinds("heating")


def test_frost_heat_on_a_sensor_that_cannot_see_it_is_capped_low() -> None:
    d = Driver()
    v = d.run(4 * 3600, [room("room", 2.0)], target=None, wanted=0.0)  # mode off
    assert v.force_demand == 1.0  # frost protection believes the sensor …
    assert v.limit == pytest.approx(SafetyConfig().heating.min_cap)  # … but not for ever


def test_of_two_sensors_the_one_that_does_not_warm_is_distrusted() -> None:
    d = Driver()
    d.run(3 * 3600, [room("a", 21.0), room("b", 21.0)], wanted=0.5)
    temp = 15.0
    for _ in range(int(3 * 3600 / PERIOD)):
        temp += 1.0 / 360
        v = d.tick([room("a", min(temp, 19.0)), room("b", 15.0)], wanted=1.0)
    assert v.distrusted == frozenset({"b"}) and v.limit == 1.0
    assert v.room.temperature_c == pytest.approx(18.0, abs=0.01)  # a's, still warming
    assert d.sup.distrusted == frozenset({"b"})
    assert d.sup.trusted_room([room("a", 20.0), room("b", 10.0)]).temperature_c == 20.0


def test_of_two_sensors_the_one_warming_without_heat_is_distrusted_until_it_agrees() -> None:
    d = Driver()
    hc = SafetyConfig().heating
    d.run(3600, [room("a", 21.0), room("b", 21.0)], wanted=0.0)
    for i in range(60):  # b: +5 K in ten minutes, no heat
        v = d.tick([room("a", 21.0), room("b", 21.0 + min(5.0, i * 5.0 / 60))], wanted=0.0)
    assert v.distrusted == frozenset({"b"}) and v.room.temperature_c == 21.0
    assert v.limit == 1.0 and v.force_demand is None
    v = d.run(3600, [room("a", 21.0), room("b", 26.0)], wanted=0.0)
    assert v.distrusted == frozenset({"b"})  # still 5 K off
    v = d.run(hc.agree_s - 2 * PERIOD, [room("a", 21.0), room("b", 21.1)], wanted=0.0)
    assert v.distrusted == frozenset({"b"})
    v = d.run(3 * PERIOD, [room("a", 21.0), room("b", 21.1)], wanted=0.0)
    assert v.distrusted == frozenset()


def test_a_single_sensor_warming_without_heat_is_only_reported() -> None:
    d = Driver()
    d.run(3600, [room("room", 21.0)], wanted=0.0)
    for i in range(60):  # the sun on the room: the sensor is right
        v = d.tick([room("room", 21.0 + i * 3.0 / 60)], wanted=0.0)
    assert d.kinds("heating") == ["notice"]
    assert v.distrusted == frozenset() and v.limit == 1.0 and v.room.temperature_c is not None


def test_an_outlier_of_three_is_distrusted() -> None:
    cfg = SafetyConfig(heating={"outlier_s": 600})  # type: ignore[arg-type]
    d = Driver(cfg)
    sensors = [room("a", 21.0), room("b", 21.2), room("c", 25.0)]
    v = d.run(590, sensors, wanted=0.5)
    assert v.distrusted == frozenset()
    v = d.run(20, sensors, wanted=0.5)
    assert v.distrusted == frozenset({"c"}) and v.room.temperature_c == pytest.approx(21.1)


# -- loop stall ----------------------------------------------------------------------------
def test_a_late_tick_pauses_the_heat_for_recover_ticks() -> None:
    d = Driver()
    d.run(60, [room("room", 21.0)], wanted=0.6)
    d.t += 25.0  # 35 s since the last tick: within 3 periods + nothing
    v = d.tick([room("room", 21.0)], wanted=0.6)
    assert v.limit == NO_HEAT
    d2 = Driver()
    d2.run(60, [room("room", 21.0)], wanted=0.6)
    d2.t += 15.0  # 25 s: late, but not a stall
    assert d2.tick([room("room", 21.0)], wanted=0.6).limit == 1.0
    limits = [d.tick([room("room", 21.0)], wanted=0.6).limit for _ in range(4)]
    assert limits == [NO_HEAT, NO_HEAT, 1.0, 1.0]
    assert d.kinds("loop_stall") == ["trip", "reset"]
    trip = next(e for e in d.events if e[1] == "loop_stall")
    assert "35 s" in trip[3] and "limit 30 s" in trip[3]


# -- configuration -------------------------------------------------------------------------
def test_config_refuses_values_that_would_switch_protection_off() -> None:
    with pytest.raises(ValidationError, match=r"stop_margin_k .* must be below reduce_margin_k"):
        CpuSafetyConfig(stop_margin_k=20.0, reduce_margin_k=15.0)
    with pytest.raises(ValidationError, match="less than or equal to 35"):
        SafetyConfig(room={"max_c": 80.0})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        SafetyConfig(cpu={"critcal_c": 90.0})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"min_cap .* must not exceed max_cap"):
        HeatingCheckConfig(min_cap=0.8, max_cap=0.5)
    with pytest.raises(ValidationError, match=r"step_rise_k .* must be below max_excursion_k"):
        AutotuneConfig(step_rise_k=2.5, max_excursion_k=2.0)
    with pytest.raises(ValidationError, match=r"min_amplitude .* must not exceed amplitude"):
        AutotuneConfig(min_amplitude=0.4, amplitude=0.2)


def test_check_results_are_caps_in_range() -> None:
    r = CheckResult()
    assert r.limit == 1.0 and r.force_demand is None and not r.latched and not r.events
