"""PID: windup recovery, no derivative kick, bumpless gain change, saturation, state export."""

from __future__ import annotations

import pytest

from qrad_agent.core.pid import PID


def run_plant(pid: PID, setpoint: float, t0: float, temp: float, seconds: float,
              gain_k: float = 10.0, tau_s: float = 1800.0, ambient: float = 10.0,
              dt: float = 10.0) -> tuple[float, float, list[float]]:
    """A first-order room: full demand holds ``ambient + gain_k``. Returns (t, temp, outputs)."""
    t, outs = t0, []
    while t < t0 + seconds:
        u = pid.update(t, setpoint, temp)
        outs.append(u)
        temp += (ambient + gain_k * u - temp) * dt / tau_s
        t += dt
    return t, temp, outs


def test_output_is_clamped_to_unit_range() -> None:
    pid = PID(kp=1.0, ki=0.01)
    assert pid.update(0, 30.0, 10.0) == 1.0
    assert pid.update(10, 0.0, 30.0) == 0.0


def test_integral_does_not_wind_up_while_saturated() -> None:
    pid = PID(kp=0.3, ki=0.001)
    # an unreachable setpoint for an hour: the output sits at 1 and the integral must stay
    # bounded, so that when the setpoint comes down the output follows promptly
    t, temp, _ = run_plant(pid, 40.0, 0.0, 15.0, 3600, gain_k=10.0)
    assert pid.integral <= 1.0
    _, _, outs = run_plant(pid, 18.0, t, temp, 600, gain_k=10.0)
    # plant holds 10 + 10u, temp ~ 20 > 18: demand must fall below 1 within 10 minutes
    assert min(outs) < 0.9


def test_conditional_integration_stops_growth_at_saturation() -> None:
    pid = PID(kp=0.5, ki=0.01)
    pid.update(0, 25.0, 15.0)  # saturated high
    before = pid.integral
    pid.update(10, 25.0, 15.0)
    assert pid.integral == before  # error still pushes up: no integration


def test_settles_on_setpoint_with_integral_action() -> None:
    pid = PID(kp=0.3, ki=0.0002)
    _, temp, outs = run_plant(pid, 16.0, 0.0, 12.0, 8 * 3600)
    assert temp == pytest.approx(16.0, abs=0.05)
    assert outs[-1] == pytest.approx(0.6, abs=0.03)  # 10 + 10*0.6 = 16


def test_no_derivative_kick_on_setpoint_change() -> None:
    pid = PID(kp=0.2, ki=0.0, kd=500.0, d_filter_s=60.0)
    for i in range(10):
        pid.update(i * 10.0, 18.0, 17.5)
    before = pid.output
    after = pid.update(100.0, 21.0, 17.5)  # a 3 K setpoint step, measurement unchanged
    # only the proportional term moves: 0.2 * 3 K; the derivative sees no change in temperature
    assert after - before == pytest.approx(0.6, abs=1e-9)
    assert pid.terms.d == pytest.approx(0.0, abs=1e-12)


def test_derivative_opposes_a_rising_measurement_and_is_filtered() -> None:
    pid = PID(kp=0.0, ki=0.0, kd=1000.0, d_filter_s=100.0, out_min=-1.0)
    pid.update(0.0, 20.0, 20.0)
    pid.update(10.0, 20.0, 20.1)  # 0.01 K/s rise; filter lets in dt/(tau+dt) = 1/11 of it
    assert pid.terms.d == pytest.approx(-1000.0 * 0.01 / 11, rel=1e-9)


def test_gain_change_is_bumpless() -> None:
    pid = PID(kp=0.3, ki=0.0002, kd=100.0, d_filter_s=60.0)
    t, temp, _ = run_plant(pid, 19.0, 0.0, 14.0, 3000)
    # same inputs before and after the change: the output must not jump
    out_before = pid.update(t, 19.0, temp)
    pid.set_gains(0.8, 0.0005, 300.0, 60.0)
    out_after = pid.update(t, 19.0, temp)
    assert out_after == pytest.approx(out_before, abs=1e-9)
    assert pid.kp == 0.8


def test_disengage_keeps_integral_and_resumes_without_kick() -> None:
    pid = PID(kp=0.3, ki=0.0002, kd=800.0, d_filter_s=60.0)
    _, temp, _ = run_plant(pid, 16.0, 0.0, 12.0, 6 * 3600)
    integral = pid.integral
    pid.disengage()
    assert pid.output == 0.0 and pid.integral == integral
    # the room cooled 2 K while disengaged; on re-engage the stale slope must not kick
    out = pid.update(1e6, 16.0, temp - 2.0)
    assert pid.terms.d == 0.0
    assert out == pytest.approx(min(1.0, 0.3 * (16.0 - temp + 2.0) + integral), abs=1e-3)


def test_state_export_survives_restart() -> None:
    pid = PID(kp=0.3, ki=0.0002)
    run_plant(pid, 16.0, 0.0, 12.0, 6 * 3600)
    fresh = PID(kp=0.3, ki=0.0002)
    fresh.import_state(pid.export_state())
    assert fresh.integral == pid.integral > 0.3
    fresh.import_state({"integral": 7.0})  # a corrupt store cannot push demand past the range
    assert fresh.integral == 1.0


def test_rejects_empty_output_range() -> None:
    with pytest.raises(ValueError, match="out_min"):
        PID(1.0, 0.0, out_min=1.0, out_max=1.0)
