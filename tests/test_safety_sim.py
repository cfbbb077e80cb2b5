"""Every fault of docs/safety.md injected into the simulated radiator, at the lowest level the
simulator has: the emulated I2C bus (unplugged), the chip emulators (stuck value, bad CRC),
what a chip measures (moved outside, beside a heat source), the hwmon tree (CPU
over-temperature), the room model (window left open) and the loop itself (stall). The agent's
real code runs unchanged. Each test checks the documented detection bound, that the heat went
to the safe state, and the documented recovery.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from qrad_agent.agent import Agent
from qrad_agent.config import AgentConfig, SensorConfig, SensorHealthConfig
from qrad_agent.core.controller import Decision
from qrad_agent.core.safety import SafetyEvent, SafetyVerdict
from qrad_agent.safety_settings import SafetyConfig
from qrad_agent.sim.run import build_sim_agent
from qrad_agent.sim.scenario import Scenario, WindowEvent, load_scenario
from qrad_agent.sim.world import SimWorld

H = 3600.0
PERIOD = 10.0
SAFETY = SafetyConfig()  # the agent runs with the defaults until AgentConfig carries them
HEALTH = SensorHealthConfig()
FAULT_AT = 8 * H  # Monday 08:00: the room has been at comfort for two hours


@dataclass
class Tick:
    t: float
    decision: Decision
    verdict: SafetyVerdict
    power_w: float
    air_c: float


def calm(**update: object) -> Scenario:
    """winter-week without its morning airing: only the injected fault disturbs the room."""
    return load_scenario("winter-week").model_copy(update={"windows": [], **update})


def build(sensors: list[SensorConfig] | None = None,
          scenario: Scenario | None = None) -> tuple[Agent, SimWorld]:
    cfg = AgentConfig()
    update: dict[str, object] = {
        "control": cfg.control.model_copy(update={"sensor_period_s": PERIOD}),
    }
    if sensors is not None:
        update["sensors"] = sensors
    return build_sim_agent(cfg.model_copy(update=update), scenario or calm())


def run(agent: Agent, world: SimWorld, until: float,
        hook: Callable[[SimWorld], None] | None = None) -> list[Tick]:
    """Step the world in control periods; ``hook`` changes what the hardware sees after each
    step, before the agent polls it."""
    ticks = []
    while world.t < until - 1e-6:
        world.step(PERIOD)
        if hook is not None:
            hook(world)
        d = agent.service(world.t, world.local)
        if d is not None:
            v = agent.stats.last_verdict
            assert v is not None
            ticks.append(Tick(world.t, d, v, world.power_w, world.room.air_c))
    return ticks


def events(agent: Agent, check: str, kind: str | None = None,
           since: float = 0.0) -> list[SafetyEvent]:
    return [e for e in agent.events
            if e.check == check and (kind is None or e.kind == kind) and e.at >= since]


def dynamic_share(world: SimWorld, power_w: float) -> float:
    """The radiator's power above idle as a share of its dynamic range."""
    m = world.model
    return (power_w - m.idle_w) / (world.scenario.radiator.cores * m.slot_w)


@pytest.fixture
def room() -> Iterator[tuple[Agent, SimWorld]]:
    agent, world = build()
    run(agent, world, FAULT_AT)
    yield agent, world
    agent.stop()
    world.close()


def test_unplugged_sensor_walks_the_failsafe_ladder_and_back(room: tuple[Agent, SimWorld]) -> None:
    agent, world = room
    fs = SAFETY.failsafe
    before = agent.stats.last_decision
    assert before is not None and before.demand > 0.3
    world.sensors.inject("room", "disconnect")  # the bus: the chip no longer answers
    ticks = run(agent, world, FAULT_AT + fs.hold_s + 0.5 * H)
    down = events(agent, "failsafe", "step_down")
    # detected on the first poll after the unplugging: one control period
    assert down[0].at - FAULT_AT <= PERIOD
    assert "primary -> hold" in down[0].reason
    # hold: the demand that held the room, bounded, for hold_s
    hold = [k for k in ticks if k.t - FAULT_AT < fs.hold_s - PERIOD]
    held = hold[-1].decision.demand
    assert 0.3 <= held <= fs.hold_max_demand
    assert all(k.decision.demand == pytest.approx(held) for k in hold)
    # then the safe demand (none): the workers are paused, the board idles
    assert "hold -> safe" in down[1].reason
    assert abs(down[1].at - down[0].at - fs.hold_s) <= PERIOD
    safe = [k for k in ticks if k.t > down[1].at + PERIOD]
    assert safe and all(k.decision.demand == 0.0 for k in safe)
    assert all(dynamic_share(world, k.power_w) < 0.02 for k in safe)
    # plugged back in: the room temperature is used again, one step up after recover_s
    world.sensors.inject("room", None)
    back = world.t
    run(agent, world, back + 0.25 * H)
    up = events(agent, "failsafe", "step_up", since=back)
    assert len(up) == 1 and "safe -> primary" in up[0].reason
    assert up[0].at - back <= fs.recover_s + 2 * PERIOD
    assert agent.stats.last_room.temperature_c is not None
    assert agent.stats.last_decision is not None and agent.stats.last_decision.demand > 0.3


def test_stuck_value_is_dropped_within_the_stuck_bound(room: tuple[Agent, SimWorld]) -> None:
    agent, world = room
    world.sensors.inject("room", "stuck")  # the chip repeats its last conversion
    run(agent, world, FAULT_AT + HEALTH.stuck_after_s + 0.5 * H)
    down = events(agent, "failsafe", "step_down")
    assert down, "a stuck sensor was never dropped"
    # detection bound: stuck_after_s (the health monitor) plus one poll
    assert down[0].at - FAULT_AT <= HEALTH.stuck_after_s + 2 * PERIOD
    assert agent.readings["room"].quality.value == "stuck"
    assert agent.stats.last_verdict is not None
    assert agent.stats.last_verdict.force_demand is not None  # the hold, not the stuck value
    world.sensors.inject("room", None)
    back = world.t
    run(agent, world, back + 0.2 * H)
    up = events(agent, "failsafe", "step_up", since=back)
    assert up and up[0].at - back <= SAFETY.failsafe.recover_s + 2 * PERIOD


def test_bad_crc_bursts_are_bridged_by_the_hold() -> None:
    agent, world = build([SensorConfig(name="room", kind="sht3x")])
    try:
        run(agent, world, FAULT_AT)
        air_before = world.room.air_c
        ticks = []
        for _ in range(4):
            world.sensors.inject("room", "bad_crc")  # the chip sends wrong CRC bytes
            burst = run(agent, world, world.t + 3 * PERIOD)
            world.sensors.inject("room", None)
            ticks += burst
            ticks += run(agent, world, world.t + 0.15 * H)
            # every bad poll is caught: no value, the hold takes over at once
            assert all(k.verdict.states["failsafe"] == "hold" for k in burst)
            assert all(k.verdict.room.temperature_c is None for k in burst)
            # and the heat goes on at the held demand: the burst does not reach the room
            assert all(k.decision.demand >= 0.3 for k in burst)
        down = events(agent, "failsafe", "step_down")
        up = events(agent, "failsafe", "step_up")
        assert len(down) == len(up) == 4  # an event at each step down and back up
        for d, u in zip(down, up, strict=True):
            assert 0 < u.at - d.at <= 3 * PERIOD + SAFETY.failsafe.recover_s + PERIOD
        assert abs(world.room.air_c - air_before) < 0.3
    finally:
        agent.stop()
        world.close()


def test_sensor_moved_outside_caps_the_heat_then_recovers(room: tuple[Agent, SimWorld]) -> None:
    agent, world = room
    hc = SAFETY.heating
    chip = world.sensors.chip("room")
    rng = random.Random(7)

    def outside(w: SimWorld) -> None:  # the sensor now measures the outdoor air
        chip.temperature_c = w.outdoor_c + rng.gauss(0.0, 0.03)  # type: ignore[union-attr]

    ticks = run(agent, world, FAULT_AT + 5 * H, outside)
    trips = [e for e in events(agent, "heating", "trip") if "room does not warm" in e.reason]
    assert trips, "a sensor outside was never detected"
    # bound: step_confirm_s before the new level is believed, then gain_time_s, then the
    # deficit beyond the band (at least 2.5 K: the target is at least frost_c) adds up to
    # max_error_kh
    gain_time = agent.supervisor.heating.gain_time_s
    bound = HEALTH.step_confirm_s + gain_time + 3600.0 * hc.max_error_kh / 2.5 + 2 * PERIOD
    assert trips[0].at - FAULT_AT <= bound
    cap = trips[0].values["cap"]
    assert isinstance(cap, float) and hc.min_cap <= cap <= hc.max_cap
    after = [k for k in ticks if k.t > trips[0].at]
    assert all(k.decision.demand <= cap + 1e-9 for k in after)
    # the real room never runs away: it stays near where the demand that held it holds it
    assert max(k.air_c for k in ticks) < 23.0
    # brought back inside: believed after step_confirm_s, and the cap lifts
    back = world.t
    run(agent, world, back + 0.3 * H)
    resets = events(agent, "heating", "reset", since=back)
    assert resets and resets[-1].at - back <= HEALTH.step_confirm_s + 2 * PERIOD
    assert agent.stats.last_verdict is not None and agent.stats.last_verdict.limit == 1.0


def test_sensor_beside_a_heat_source_is_distrusted_and_trusted_again() -> None:
    agent, world = build([
        SensorConfig(name="room", kind="tmp102", address=0x48),
        SensorConfig(name="shelf", kind="tmp102", address=0x49),
    ])
    try:
        run(agent, world, FAULT_AT)
        chip = world.sensors.chip("shelf")
        start = world.t

        def beside_heater(w: SimWorld) -> None:  # a fan heater beside it: +6 K in 10 min
            chip.temperature_c = w.room.air_c + min(6.0, 6.0 * (w.t - start) / 600.0)  # type: ignore[union-attr]

        ticks = run(agent, world, start + 3 * H, beside_heater)
        trips = events(agent, "heating", "trip")
        assert trips and trips[0].values["sensor"] == "shelf"
        assert trips[0].at - start <= SAFETY.heating.window_s  # bound: one window
        # from then on the room temperature is the other sensor's, and the room stays warm
        after = [k for k in ticks if k.t > trips[0].at + 0.5 * H]
        assert all(k.verdict.distrusted == frozenset({"shelf"}) for k in after)
        assert all(abs(k.air_c - 21.0) < 0.5 for k in after)
        # the heater goes: trusted again after the unexplained warming has stopped for a
        # window and the sensors agreed for agree_s
        gone = world.t
        run(agent, world, gone + 1.5 * H)
        resets = [e for e in events(agent, "heating", "reset", since=gone)
                  if "agrees with the others" in e.reason]
        assert resets
        assert resets[0].at - gone <= SAFETY.heating.window_s + SAFETY.heating.agree_s + 3 * PERIOD
        assert agent.supervisor.distrusted == frozenset()
    finally:
        agent.stop()
        world.close()


def test_cpu_over_temperature_reduces_then_stops_then_resumes() -> None:
    agent, world = build([SensorConfig(name="room", kind="tmp102"),
                          SensorConfig(name="board", kind="board")])
    try:
        # early (the board's sysfs tree is slow to read): at 01:00 someone asks for 23 °C, so
        # the radiator runs flat out when the fan fails
        fault_at = 1 * H
        run(agent, world, fault_at)
        agent.controller.set_override(23.0, world.t, 2 * H)
        tree = world.sensors.hwmon
        assert tree is not None
        cpu = {"c": world.cpu_c()}
        trace: list[tuple[float, float]] = []

        def fan_failed(w: SimWorld) -> None:
            # the fan stops: 150 K at full power instead of 50, reached with a 60 s lag
            steady = w.room.air_c + 10.0 + 150.0 * w.power_w / w.scenario.radiator.max_power_w
            cpu["c"] += (steady - cpu["c"]) * (1.0 - math.exp(-PERIOD / 60.0))
            tree.set_cpu_temperature(cpu["c"])  # what hwmon's temp*_input now shows
            trace.append((w.t, cpu["c"]))

        ticks = run(agent, world, fault_at + 0.75 * H, fan_failed)
        crit = 100.0  # the x86 tree's coretemp temp*_crit
        reduce_c = crit - SAFETY.cpu.reduce_margin_k
        stop_c = crit - SAFETY.cpu.stop_margin_k
        temps = dict(trace)
        crossed = next(t for t, c in trace if c > reduce_c)
        trips = events(agent, "cpu_temperature", "trip")
        assert trips[0].at - crossed <= PERIOD  # detected at the next tick
        assert trips[0].thresholds["reduce_c"] == reduce_c  # derived from temp*_crit
        # the CPU lags its power by a minute: the first cap comes too late, and it reaches the
        # stop threshold; every worker is paused on that tick
        stops = [e for e in trips if "stop threshold" in e.reason]
        assert stops
        hit = next(t for t, c in trace if c >= stop_c)
        assert stops[0].at - hit <= PERIOD
        at_stop = next(k for k in ticks if k.t >= stops[0].at)
        assert at_stop.decision.plan.quota == 0.0 and at_stop.decision.demand < 1e-3
        # and resumes only below the resume threshold
        resumed = events(agent, "cpu_temperature", "reset")[0]
        assert temps[resumed.at] <= reduce_c - SAFETY.cpu.resume_hysteresis_k
        assert max(c for t, c in trace) < crit
        # the governor then finds what the dead fan can carry: never at the stop threshold
        # again, and still heating
        settled = [c for t, c in trace if t > fault_at + 0.25 * H]
        assert max(settled) < stop_c
        tail = [k for k in ticks if k.t > fault_at + 0.5 * H]
        assert 0.05 < sum(k.decision.demand for k in tail) / len(tail) < 0.6
        assert not agent.stats.last_verdict or not agent.stats.last_verdict.latched
        # fan repaired: the cap rises back to full at recover_rate_per_s
        fixed = world.t
        cap = agent.supervisor.cpu.cap
        run(agent, world, fixed + 0.25 * H)
        back = events(agent, "cpu_temperature", "reset", since=fixed)
        assert back and "back to full" in back[-1].reason
        assert back[-1].at - fixed <= (1.0 - cap) / SAFETY.cpu.recover_rate_per_s + 6 * PERIOD
    finally:
        agent.stop()
        world.close()


def test_window_left_open_caps_the_heat_until_it_is_closed() -> None:
    # Monday: the window is opened at 09:00 and forgotten for five hours
    agent, world = build(scenario=calm(windows=[WindowEvent(at="09:00", minutes=300)]))
    try:
        hc = SAFETY.heating
        opened, closed = 9 * H, 14 * H
        run(agent, world, opened)
        ticks = run(agent, world, closed)
        trips = [e for e in events(agent, "heating", "trip") if "room does not warm" in e.reason]
        assert trips, "heating into an open window was never detected"
        # bound: the thermostat's window pause (at most max_off_s), gain_time_s, then the
        # deficit beyond the band (at least 2 K here) adds up to max_error_kh
        max_off = AgentConfig().thermostat.window.max_off_s
        gain_time = agent.supervisor.heating.gain_time_s
        assert trips[0].at - opened <= max_off + gain_time + 3600.0 * hc.max_error_kh / 2.0
        cap = trips[0].values["cap"]
        assert isinstance(cap, float)
        after = [k for k in ticks if k.t > trips[0].at]
        assert after and all(k.decision.demand <= cap + 1e-9 for k in after)
        assert all(dynamic_share(world, k.power_w) <= cap + 0.01 for k in after[1:])
        # closed: the room warms visibly, the cap lifts, comfort comes back
        ticks = run(agent, world, closed + 3 * H)
        resets = [e for e in events(agent, "heating", "reset", since=closed)
                  if "cap is lifted" in e.reason]
        assert resets and resets[0].at - closed <= hc.window_s
        assert max(k.decision.demand for k in ticks if k.t > resets[0].at) > 0.95
        assert abs(world.room.air_c - 21.0) < 0.3
    finally:
        agent.stop()
        world.close()


def test_loop_stall_pauses_the_heat_until_ticks_come_on_time(
    room: tuple[Agent, SimWorld],
) -> None:
    agent, world = room
    sc = SAFETY.stall
    for _ in range(30):  # five minutes in which the loop did not run; the room did
        world.step(PERIOD)
    resumed = world.t
    ticks = run(agent, world, resumed + 2 * H / 60)
    trip = events(agent, "loop_stall", "trip")
    assert len(trip) == 1 and trip[0].at == resumed + PERIOD  # the first tick after it
    assert trip[0].values["gap_s"] == pytest.approx(310.0)
    # safe state: workers paused, the board at idle, for recover_ticks ticks
    paused = ticks[: sc.recover_ticks]
    assert all(k.decision.plan.quota == 0.0 for k in paused)
    assert all(dynamic_share(world, k.power_w) < 0.02 for k in paused[1:])
    reset = events(agent, "loop_stall", "reset")
    assert len(reset) == 1 and reset[0].at == ticks[sc.recover_ticks].t
    assert all(k.decision.demand > 0.3 for k in ticks[sc.recover_ticks:])
