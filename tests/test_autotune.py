"""Autotuning: the relay experiment as a pure state machine, the model fit, the gain rules,
the ``tune`` command and its config overlay, and the proposed gains on three simulated rooms
of light, medium and heavy thermal mass, held to the control benchmark's targets."""

from __future__ import annotations

import argparse
import io
import json
import math
import random
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from qrad_agent.config import AgentConfig, ConfigError
from qrad_agent.core.autotune import (
    Fopdt,
    PidGains,
    RelayAutotune,
    simc_pi,
    simc_pid,
    step_response,
)
from qrad_agent.safety_settings import AutotuneConfig
from qrad_agent.sim.run import build_sim_agent, simulate
from qrad_agent.sim.scenario import Scenario, load_scenario
from qrad_agent.tune_cli import (
    OVERLAY_NAME,
    TuneSession,
    add_parser,
    apply_overlay,
    read_overlay,
    room_model_from_overlay,
    tune_in_sim,
    write_overlay,
)

PERIOD = 10.0
SETPOINT = 21.0


class Process:
    """A first-order-plus-dead-time room, read through a TMP102's 1/16 K steps with noise:
    ``tau dy/dt = -(y - base) + gain * u(t - dead)``; ``hold`` is the demand that holds the
    setpoint."""

    def __init__(self, gain: float, tau: float, dead: float, hold: float, seed: int = 1) -> None:
        self.gain, self.tau, self.hold = gain, tau, hold
        self.base = SETPOINT - gain * hold
        self.y = SETPOINT - 0.5
        self.queue = [hold] * max(1, round(dead / PERIOD))
        self.rng = random.Random(seed)

    def read(self) -> float:
        noisy = self.y + self.rng.gauss(0.0, 0.02)
        return round(noisy / 0.0625) * 0.0625

    def step(self, u: float) -> None:
        self.queue.append(u)
        applied = self.queue.pop(0)
        a = math.exp(-PERIOD / self.tau)
        self.y = self.base + self.gain * applied + a * (self.y - self.base - self.gain * applied)


def relay(process: Process, cfg: AutotuneConfig | None = None, bias: float | None = None,
          until: Callable[[RelayAutotune], bool] = lambda r: not r.running,
          max_s: float = 24 * 3600.0) -> RelayAutotune:
    tuner = RelayAutotune(cfg or AutotuneConfig(), SETPOINT, 0.0, bias)
    t = 0.0
    while t < max_s and not until(tuner):
        t += PERIOD
        process.step(tuner.update(t, process.read()))
    return tuner


# -- the experiment ------------------------------------------------------------------------------
def test_relay_finds_the_holding_bias_and_fits_the_room() -> None:
    room = Process(gain=5.0, tau=3000.0, dead=120.0, hold=0.3)
    tuner = relay(room)
    assert tuner.phase == "done", tuner.reason
    last = tuner.measured()[-AutotuneConfig().cycles:]
    # the adaptive bias came down from 0.5 to the demand that holds the room
    assert tuner.bias == pytest.approx(0.3, abs=0.05)
    assert all(c.asymmetry <= 0.25 for c in last)
    result = tuner.analyse(input_filter_s=60.0, period_s=PERIOD)
    m = result.model
    # Cycles much shorter than the time constant show how fast the room warms, K / tau, well;
    # K and tau apart only as far as the final step shows its bend. The SIMC gains depend on
    # K / tau alone while tau > 4 (tau_c + theta), and on tau where it is shorter: there the
    # bend is plain to see.
    assert m.gain_k / m.tau_s == pytest.approx(5.0 / 3000.0, rel=0.15)
    assert abs(m.dead_time_s - 120.0) <= 90.0
    assert result.fit_rms_k < 0.05
    true = simc_pi(Fopdt(5.0, 3000.0, 120.0), AutotuneConfig().tau_c_s, 65.0)
    assert result.simc_pi.kp == pytest.approx(true.kp, rel=0.2)
    # Ti: tau (50 min) for the true room, at most 4 (tau_c + theta) for the fitted one
    assert true.ti_s <= result.simc_pi.ti_s <= 4 * (AutotuneConfig().tau_c_s + 120.0 + 65.0)
    # the ultimate gain from the describing function: 4 d / (pi a)
    d = sum(c.d for c in last) / len(last)
    a = sum(c.amplitude_k for c in last) / len(last)
    assert result.ultimate_gain == pytest.approx(4 * d / (math.pi * a))
    assert result.extra_lag_s == pytest.approx(65.0)
    assert result.recommended is result.simc_pi


def test_a_fast_room_shows_its_gain_and_time_constant_apart() -> None:
    room = Process(gain=4.0, tau=1200.0, dead=60.0, hold=0.4, seed=3)
    result = relay(room).analyse(60.0, PERIOD)
    assert result.model.gain_k == pytest.approx(4.0, rel=0.25)
    assert result.model.tau_s == pytest.approx(1200.0, rel=0.25)
    assert result.simc_pi.ti_s == pytest.approx(result.model.tau_s)  # Ti = tau here


def test_a_lopsided_start_is_nudged_and_still_completes() -> None:
    # a bias far too high: even the relay's low output warms the room past the band
    room = Process(gain=5.0, tau=3000.0, dead=60.0, hold=0.25)
    tuner = relay(room, bias=0.85)
    assert tuner.phase == "done", tuner.reason
    assert any(c.nudged for c in tuner.cycles)
    assert not any(c.nudged for c in tuner.measured()[-AutotuneConfig().cycles:])
    assert tuner.bias == pytest.approx(0.25, abs=0.06)


def test_the_final_step_runs_until_the_room_is_step_rise_above() -> None:
    room = Process(gain=5.0, tau=3000.0, dead=60.0, hold=0.3)
    tuner = relay(room, until=lambda r: r.phase != "running")
    assert tuner.phase == "step" and tuner.demand == 1.0
    assert "step" in tuner.progress(0.0)
    tuner = relay(Process(gain=5.0, tau=3000.0, dead=60.0, hold=0.3))
    assert tuner.samples[-1].temperature_c >= SETPOINT + AutotuneConfig().step_rise_k - 0.1
    assert tuner.demand == 0.0  # done: the agent takes over


def test_a_step_disturbed_by_an_airing_is_cut_at_its_peak() -> None:
    room = Process(gain=5.0, tau=3000.0, dead=60.0, hold=0.3)
    tuner = relay(room, until=lambda r: r.phase != "running")
    t = step_start = tuner.samples[-1].at
    for _ in range(30):  # full heat, the room warms
        t += PERIOD
        room.step(tuner.update(t, room.read()))
    peak_at = max((s for s in tuner.samples if s.at >= step_start),
                  key=lambda s: s.temperature_c).at
    room.base -= 20.0  # a window opens: the room cools under full heat
    while tuner.running:
        t += PERIOD
        room.step(tuner.update(t, room.read()))
    assert tuner.phase == "done" and "disturbed" in tuner.reason
    assert tuner.samples[-1].at <= peak_at + PERIOD  # nothing after the peak is fitted
    assert tuner.analyse().fit_rms_k < 0.05


@pytest.mark.parametrize(
    ("feed", "why"),
    [
        (lambda t: SETPOINT + 2.1, "over-temperature"),
        (lambda t: None if t > 100 else SETPOINT, "no room temperature for 3"),
        (lambda t: SETPOINT - 5.0, "time limit"),
    ],
)
def test_the_experiment_aborts_safely(feed: Callable[[float], float | None], why: str) -> None:
    cfg = AutotuneConfig(max_s=3600.0)
    tuner = RelayAutotune(cfg, SETPOINT, 0.0)
    t = 0.0
    while tuner.running and t < 2 * 3600:
        t += PERIOD
        u = tuner.update(t, feed(t))
    assert tuner.phase == "aborted" and why in tuner.reason
    assert u == 0.0 and tuner.demand == 0.0
    with pytest.raises(ValueError, match="the relay experiment is aborted"):
        tuner.analyse()


def test_a_safety_trip_aborts_the_experiment() -> None:
    tuner = RelayAutotune(AutotuneConfig(), SETPOINT, 0.0)
    assert tuner.update(10.0, SETPOINT - 0.5) > 0.5
    assert tuner.update(20.0, SETPOINT - 0.5, trip="CPU at 90 °C") == 0.0
    assert tuner.phase == "aborted" and tuner.reason == "safety trip: CPU at 90 °C"


def test_a_safety_trip_in_the_agent_aborts_the_session_and_stops_the_heat() -> None:
    cfg = AgentConfig()
    cfg = cfg.model_copy(update={"control": cfg.control.model_copy(
        update={"sensor_period_s": cfg.control.period_s})})
    agent, world = build_sim_agent(cfg, load_scenario("winter-week"))
    try:
        session = TuneSession(agent, AutotuneConfig(), SETPOINT, 0.0)
        while world.t < 1800:
            world.step(PERIOD)
            assert session.step(world.t)
        for _ in range(10):  # the loop stalls: 100 s since its last tick
            world.step(PERIOD)
        assert not session.step(world.t)
        assert session.tuner.phase == "aborted"
        assert session.tuner.reason.startswith("safety trip: control tick came 100 s after")
        assert agent.stats.last_decision is not None
        assert agent.stats.last_decision.plan.quota == 0.0  # no heat
    finally:
        agent.stop()
        world.close()


def test_a_setpoint_near_the_room_limit_is_refused() -> None:
    with pytest.raises(ValueError, match=r"setpoint 27.5 °C cannot be tuned at; allowed: 5 to 27"):
        RelayAutotune(AutotuneConfig(), 27.5, 0.0)


# -- gain rules ---------------------------------------------------------------------------------
def test_simc_and_ziegler_nichols_rules() -> None:
    m = Fopdt(gain_k=5.0, tau_s=4500.0, dead_time_s=100.0)
    pi = simc_pi(m, tau_c_s=900.0, extra_lag_s=65.0)
    kc = 4500.0 / (5.0 * (900.0 + 165.0))
    assert pi.kp == pytest.approx(kc)
    assert pi.ti_s == pytest.approx(min(4500.0, 4 * 1065.0))
    fast = simc_pi(Fopdt(5.0, 1800.0, 0.0), tau_c_s=900.0)
    assert fast.ti_s == pytest.approx(1800.0)  # tau < 4 (tau_c + theta): Ti = tau
    pid = simc_pid(m, 900.0, 65.0)
    td = 165.0 / 3.0  # series Td = theta / 3, then to the parallel form
    assert pid.kp == pytest.approx(kc * (1 + td / pi.ti_s))
    assert pid.ti_s == pytest.approx(pi.ti_s + td)
    assert pid.td_s == pytest.approx(pi.ti_s * td / (pi.ti_s + td))
    room = Process(gain=5.0, tau=3000.0, dead=120.0, hold=0.3)
    r = relay(room).analyse()
    ku, pu = r.ultimate_gain, r.ultimate_period_s
    assert (r.zn_pi.kp, r.zn_pi.ti_s) == pytest.approx((0.45 * ku, pu / 1.2))
    assert (r.zn_pid.kp, r.zn_pid.ti_s, r.zn_pid.td_s) == pytest.approx(
        (0.6 * ku, pu / 2, pu / 8))


def test_step_response_of_simc_on_its_own_model_is_calm() -> None:
    m = Fopdt(5.0, 4500.0, 60.0)
    gains = simc_pi(m, 900.0, 65.0)
    resp = step_response(m, gains, 65.0)
    assert resp.overshoot_k < 0.1  # SIMC with Ti = 4 (tau_c + theta) overshoots a little
    assert resp.rise_s < 3 * (900 + 125)
    assert resp.settle_s < 6 * (900 + 125)
    wild = step_response(m, PidGains("wild", 20.0, 0.05), 65.0)
    assert wild.overshoot_k > resp.overshoot_k


# -- the overlay and the command -------------------------------------------------------------------
def test_overlay_round_trip_and_refusals(tmp_path: Path) -> None:
    room = Process(gain=5.0, tau=3000.0, dead=120.0, hold=0.3)
    result = relay(room).analyse(60.0, PERIOD)
    path = tmp_path / OVERLAY_NAME
    path.write_text(json.dumps({"format": 1, "config": {"thermostat": {"comfort_c": 20.5}}}))
    data = write_overlay(path, result, SETPOINT)
    assert read_overlay(path) == data
    assert data["config"]["thermostat"]["comfort_c"] == 20.5  # merged, not replaced
    cfg = apply_overlay(AgentConfig(), data)
    # the fitted model seeds optimal start and the heating checks
    assert cfg.thermostat.optimal_start.initial_rate_k_per_h == pytest.approx(
        result.model.slope_k_per_h / 2, abs=0.01)
    assert cfg.safety.room_model.tau_s == pytest.approx(result.model.tau_s, abs=0.1)
    assert cfg.pid.kp == pytest.approx(result.simc_pi.kp, rel=1e-3)
    assert cfg.pid.ki == pytest.approx(result.simc_pi.ki, rel=1e-3)
    assert cfg.thermostat.comfort_c == 20.5
    model = room_model_from_overlay(data)
    assert model is not None and model.tau_s == pytest.approx(result.model.tau_s, abs=0.1)
    assert read_overlay(tmp_path / "absent.json") == {"format": 1, "config": {}}
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_overlay(path)
    path.write_text(json.dumps({"format": 2, "config": {}}))
    with pytest.raises(ConfigError, match="format 2 is not understood; allowed: 1"):
        read_overlay(path)
    with pytest.raises(ConfigError) as err:
        apply_overlay(AgentConfig(), {"config": {"pid": {"kp": 99.0}}})
    assert any("pid.kp" in p and "less than or equal to 10" in p for p in err.value.problems)


def test_tune_command_on_the_simulator_applies_the_gains(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[node]\nstate_dir = "{tmp_path}"\n')
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", "--sim", "--scenario", "winter-week", "--apply",
                              "-c", str(config)])
    out = io.StringIO()
    with redirect_stdout(out):
        assert args.func(args) == 0
    text = out.getvalue()
    assert "relay experiment: done" in text
    assert "simc-pi" in text and "recommended" in text and "ziegler-nichols-pid" in text
    assert "1 K step: 90 % in" in text
    overlay = read_overlay(tmp_path / OVERLAY_NAME)
    kp = overlay["config"]["pid"]["kp"]
    assert 0.3 < kp < 3.0
    assert f"kp {kp:7.3f}" in text or f"kp {kp:.3f}" in text.replace("  ", " ")


# -- three rooms ----------------------------------------------------------------------------------
def scaled_room(name: str, air: float, mass: float) -> Scenario:
    """winter-week with its air and mass capacities scaled: lighter rooms react faster."""
    s = load_scenario("winter-week")
    room = s.room.model_copy(update={
        "c_air_j_per_k": s.room.c_air_j_per_k * air,
        "c_mass_j_per_k": s.room.c_mass_j_per_k * mass,
    })
    return s.model_copy(update={"name": name, "room": room})


ROOMS = {
    # timber frame and plasterboard: a fifth of the masonry, a lighter air node
    "light": scaled_room("light", 0.8, 0.25),
    "medium": scaled_room("medium", 1.0, 1.0),
    # stone walls, a heavy floor and furniture
    "heavy": scaled_room("heavy", 2.0, 3.0),
}
DAYS = 3.0  # the first is the warm-up the scores leave out


@pytest.mark.parametrize("name", list(ROOMS))
def test_autotuned_gains_meet_the_control_targets(name: str) -> None:
    scenario = ROOMS[name]
    tuned = tune_in_sim(AgentConfig(), scenario)
    assert tuned.result is not None, tuned.session.tuner.reason
    gains = tuned.result.recommended
    base = AgentConfig()
    cfg = base.model_copy(update={"pid": base.pid.model_copy(
        update={"kp": gains.kp, "ki": gains.ki, "kd": gains.kd})})
    agent = simulate(cfg, scenario, "agent", days=DAYS)
    bangbang = simulate(AgentConfig(), scenario, "bangbang", days=DAYS)
    assert agent.discomfort_kh <= bangbang.discomfort_kh / 3.0, (agent, bangbang)
    assert agent.rms_error_k <= 0.1, agent
    # and the model it fitted is the room's: the air node's time constant, C / (G_mass + G_out)
    r = scenario.room
    tau = r.c_air_j_per_k / (r.g_air_mass_w_per_k + r.g_air_out_w_per_k)
    assert tuned.result.model.tau_s == pytest.approx(tau, rel=0.3)
