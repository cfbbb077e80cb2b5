"""The 2R2C room against results derived independently of its implementation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from qrad_agent.sim.room import Room2R2C, RoomParams

PARAMS = RoomParams(
    c_air_j_per_k=3.5e5,
    c_mass_j_per_k=8.0e6,
    g_air_mass_w_per_k=70.0,
    g_mass_out_w_per_k=8.0,
    g_air_out_w_per_k=5.0,
    g_window_w_per_k=35.0,
    heater_to_air=0.8,
)


def network_solution(
    p: RoomParams, q_w: float, out_c: float, window: bool = False
) -> tuple[float, float]:
    """Solve the two nodal heat balances by Cramer's rule."""
    g_am, g_mo = p.g_air_mass_w_per_k, p.g_mass_out_w_per_k
    g_ao = p.g_air_out_w_per_k + (p.g_window_w_per_k if window else 0.0)
    f = p.heater_to_air
    # (g_am + g_ao) Ta - g_am Tm = g_ao To + f q
    # -g_am Ta + (g_am + g_mo) Tm = g_mo To + (1 - f) q
    a, b, c, d = g_am + g_ao, -g_am, -g_am, g_am + g_mo
    r1, r2 = g_ao * out_c + f * q_w, g_mo * out_c + (1 - f) * q_w
    det = a * d - b * c
    return (r1 * d - b * r2) / det, (a * r2 - c * r1) / det


def derivatives(
    p: RoomParams, ta: float, tm: float, q_w: float, out_c: float, window: bool = False
) -> tuple[float, float]:
    g_ao = p.g_air_out_w_per_k + (p.g_window_w_per_k if window else 0.0)
    f = p.heater_to_air
    dta = (p.g_air_mass_w_per_k * (tm - ta) + g_ao * (out_c - ta) + f * q_w) / p.c_air_j_per_k
    dtm = (
        p.g_air_mass_w_per_k * (ta - tm)
        + p.g_mass_out_w_per_k * (out_c - tm)
        + (1 - f) * q_w
    ) / p.c_mass_j_per_k
    return dta, dtm


def eigenvalues(p: RoomParams, window: bool = False) -> tuple[float, float]:
    """Roots of the characteristic polynomial of the free system, slow one first."""
    g_ao = p.g_air_out_w_per_k + (p.g_window_w_per_k if window else 0.0)
    a11 = -(p.g_air_mass_w_per_k + g_ao) / p.c_air_j_per_k
    a12 = p.g_air_mass_w_per_k / p.c_air_j_per_k
    a21 = p.g_air_mass_w_per_k / p.c_mass_j_per_k
    a22 = -(p.g_air_mass_w_per_k + p.g_mass_out_w_per_k) / p.c_mass_j_per_k
    tr, det = a11 + a22, a11 * a22 - a12 * a21
    root = math.sqrt(tr * tr - 4 * det)
    return (tr + root) / 2, (tr - root) / 2


def test_steady_state_is_the_network_solution() -> None:
    room = Room2R2C(PARAMS, 12.0, 30.0)
    room.step(1e9, 300.0, -3.0, gains_w=50.0)
    ta, tm = network_solution(PARAMS, 350.0, -3.0)
    assert room.air_c == pytest.approx(ta, abs=1e-9)
    assert room.mass_c == pytest.approx(tm, abs=1e-9)
    # and the solution is not trivial: the air sits above the mass, both above outdoors
    assert ta > tm > -3.0


def test_steady_state_with_window_open_is_colder() -> None:
    shut = Room2R2C(PARAMS, 20.0)
    shut.step(1e9, 300.0, 0.0)
    aired = Room2R2C(PARAMS, 20.0)
    aired.step(1e9, 300.0, 0.0, window_open=True)
    ta, tm = network_solution(PARAMS, 300.0, 0.0, window=True)
    assert aired.air_c == pytest.approx(ta, abs=1e-9)
    assert aired.mass_c == pytest.approx(tm, abs=1e-9)
    assert aired.air_c < shut.air_c - 5.0


def test_steady_state_power_holds_the_air_at_the_target() -> None:
    room = Room2R2C(PARAMS, 15.0)
    power = room.steady_state_power_w(21.0, -3.0)
    room.step(1e9, power, -3.0)
    assert room.air_c == pytest.approx(21.0, abs=1e-9)
    # Heat put into the mass partly escapes through the walls, so it costs more than UA·ΔT.
    assert power > room.ua_w_per_k() * 24.0


def test_ua_is_the_series_parallel_conductance() -> None:
    room = Room2R2C(PARAMS, 20.0)
    assert room.ua_w_per_k() == pytest.approx(5.0 + 70.0 * 8.0 / 78.0)
    all_in_air = Room2R2C(PARAMS.model_copy(update={"heater_to_air": 1.0}), 20.0)
    assert all_in_air.steady_state_power_w(21.0, 1.0) == pytest.approx(room.ua_w_per_k() * 20.0)
    assert all_in_air.steady_state_power_w(10.0, 15.0) == pytest.approx(-room.ua_w_per_k() * 5.0)


def test_free_decay_matches_the_two_mode_solution() -> None:
    out = 2.0
    ta0, tm0 = 21.0, 19.0
    slow, fast = eigenvalues(PARAMS)
    # Ta(t) - To = c1 e^{slow t} + c2 e^{fast t}; match the value and slope at t = 0.
    dta0, _ = derivatives(PARAMS, ta0, tm0, 0.0, out)
    c2 = (dta0 - slow * (ta0 - out)) / (fast - slow)
    c1 = (ta0 - out) - c2
    room = Room2R2C(PARAMS, ta0, tm0)
    t = 0.0
    for dt in (30.0, 600.0, 3600.0, 7200.0, 86400.0):
        room.step(dt, 0.0, out)
        t += dt
        expected = out + c1 * math.exp(slow * t) + c2 * math.exp(fast * t)
        assert room.air_c == pytest.approx(expected, abs=1e-9)


def test_free_decay_dominant_time_constant() -> None:
    out = -5.0
    room = Room2R2C(PARAMS, 21.0, 20.0)
    room.step(20 * 3600.0, 0.0, out)  # let the fast mode die out (tau_fast ~ 1.25 h)
    before = room.air_c - out
    room.step(24 * 3600.0, 0.0, out)
    after = room.air_c - out
    slow, fast = eigenvalues(PARAMS)
    measured = math.log(after / before) / (24 * 3600.0)
    assert measured == pytest.approx(slow, rel=1e-6)
    # the well-insulated room: days for the building, about an hour for the air
    assert 3 * 86400 < -1 / slow < 15 * 86400
    assert 0.5 * 3600 < -1 / fast < 3 * 3600


def test_energy_balance_over_one_step() -> None:
    p = PARAMS
    heat, gains, out, dt = 450.0, 120.0, -4.0, 900.0
    room = Room2R2C(p, 19.0, 18.0)
    room.step(dt, heat, out, gains_w=gains)
    stored = p.c_air_j_per_k * (room.air_c - 19.0) + p.c_mass_j_per_k * (room.mass_c - 18.0)
    # integrate the losses along the exact trajectory (fine sub-steps, trapezoid rule)
    fine = Room2R2C(p, 19.0, 18.0)
    n, lost = 9000, 0.0

    def loss(r: Room2R2C) -> float:
        return p.g_air_out_w_per_k * (r.air_c - out) + p.g_mass_out_w_per_k * (r.mass_c - out)

    for _ in range(n):
        before = loss(fine)
        fine.step(dt / n, heat, out, gains_w=gains)
        lost += 0.5 * (before + loss(fine)) * dt / n
    assert stored == pytest.approx((heat + gains) * dt - lost, rel=1e-6)
    assert stored > 0


def rk4(p: RoomParams, ta: float, tm: float, q: float, out: float, t: float, h: float,
        window: bool = False) -> tuple[float, float]:
    for _ in range(round(t / h)):
        k1 = derivatives(p, ta, tm, q, out, window)
        k2 = derivatives(p, ta + h / 2 * k1[0], tm + h / 2 * k1[1], q, out, window)
        k3 = derivatives(p, ta + h / 2 * k2[0], tm + h / 2 * k2[1], q, out, window)
        k4 = derivatives(p, ta + h * k3[0], tm + h * k3[1], q, out, window)
        ta += h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        tm += h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return ta, tm


@pytest.mark.parametrize("window", [False, True])
def test_large_steps_agree_with_an_independent_integrator(window: bool) -> None:
    big = Room2R2C(PARAMS, 18.0, 17.0)
    for _ in range(30):
        big.step(60.0, 500.0, -3.0, window_open=window)
    ta, tm = rk4(PARAMS, 18.0, 17.0, 500.0, -3.0, 1800.0, 2.0, window)
    assert big.air_c == pytest.approx(ta, abs=1e-7)
    assert big.mass_c == pytest.approx(tm, abs=1e-7)
    assert big.air_c > 18.5 if not window else big.air_c < 18.0


def test_one_large_step_equals_many_small_ones() -> None:
    one = Room2R2C(PARAMS, 18.0, 17.5)
    one.step(3600.0, 500.0, 0.0, gains_w=80.0)
    many = Room2R2C(PARAMS, 18.0, 17.5)
    for _ in range(1800):
        many.step(2.0, 500.0, 0.0, gains_w=80.0)
    assert one.air_c == pytest.approx(many.air_c, abs=1e-9)
    assert one.mass_c == pytest.approx(many.mass_c, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    c_air=st.floats(1e4, 1e7),
    c_mass=st.floats(1e5, 1e9),
    g_am=st.floats(1.0, 1000.0),
    g_mo=st.floats(0.5, 100.0),
    g_ao=st.floats(0.5, 100.0),
    f=st.floats(0.0, 1.0),
    dt1=st.floats(0.0, 5000.0),
    dt2=st.floats(0.0, 5000.0),
)
def test_steps_compose_for_any_room(
    c_air: float, c_mass: float, g_am: float, g_mo: float, g_ao: float, f: float,
    dt1: float, dt2: float,
) -> None:
    p = RoomParams(
        c_air_j_per_k=c_air, c_mass_j_per_k=c_mass, g_air_mass_w_per_k=g_am,
        g_mass_out_w_per_k=g_mo, g_air_out_w_per_k=g_ao, g_window_w_per_k=0.0, heater_to_air=f,
    )
    joint = Room2R2C(p, 20.0, 15.0)
    joint.step(dt1 + dt2, 300.0, 0.0)
    split = Room2R2C(p, 20.0, 15.0)
    split.step(dt1, 300.0, 0.0)
    split.step(dt2, 300.0, 0.0)
    assert joint.air_c == pytest.approx(split.air_c, abs=1e-7)
    assert joint.mass_c == pytest.approx(split.mass_c, abs=1e-7)


def test_huge_and_zero_steps_are_stable() -> None:
    room = Room2R2C(PARAMS, 21.0, 20.0)
    room.step(0.0, 500.0, -10.0)
    assert (room.air_c, room.mass_c) == (21.0, 20.0)
    room.step(1e15, 0.0, -10.0)
    assert room.air_c == pytest.approx(-10.0, abs=1e-9)
    assert room.mass_c == pytest.approx(-10.0, abs=1e-9)


def test_negative_step_is_refused() -> None:
    room = Room2R2C(PARAMS, 21.0)
    with pytest.raises(ValueError, match="dt must be"):
        room.step(-1.0, 0.0, 0.0)


def test_open_window_loses_heat_faster() -> None:
    shut = Room2R2C(PARAMS, 21.0, 20.0)
    aired = Room2R2C(PARAMS, 21.0, 20.0)
    for _ in range(60):
        shut.step(10.0, 0.0, 0.0)
        aired.step(10.0, 0.0, 0.0, window_open=True)
    # over 10 minutes the extra loss is about g_window * ΔT * t, shared by air and buffer
    extra_j = (shut.air_c - aired.air_c) * PARAMS.c_air_j_per_k \
        + (shut.mass_c - aired.mass_c) * PARAMS.c_mass_j_per_k
    assert 0.8 * 35.0 * 21.0 * 600 < extra_j < 35.0 * 21.0 * 600
    assert 1.0 < shut.air_c - aired.air_c < 2.5
    # the window's fast mode is faster than the shut room's
    assert eigenvalues(PARAMS, window=True)[1] < eigenvalues(PARAMS)[1]


@pytest.mark.parametrize(
    ("key", "value"),
    [("c_air_j_per_k", -1.0), ("g_air_mass_w_per_k", 0.0), ("heater_to_air", 1.5)],
)
def test_room_params_reject_impossible_values(key: str, value: float) -> None:
    data = PARAMS.model_dump() | {key: value}
    with pytest.raises(ValidationError) as err:
        RoomParams.model_validate(data)
    assert err.value.errors()[0]["loc"] == (key,)


def test_room_params_reject_unknown_keys() -> None:
    with pytest.raises(ValidationError) as err:
        RoomParams.model_validate(PARAMS.model_dump() | {"c_air": 1.0})
    assert err.value.errors()[0]["type"] == "extra_forbidden"
