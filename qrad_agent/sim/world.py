"""The simulated radiator and its room: the world the agent's real code runs against.

The room temperature reaches the agent through register-level chip emulators on an emulated
I2C bus; the frequency cap goes into an emulated cpufreq sysfs tree that clamps like the
kernel; slots and quota are simulated levers. Each step the radiator's electrical power is
computed from what the levers actually took (read back, as the kernel resolved it), and all
of it becomes heat in the room.
"""

from __future__ import annotations

import random
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

from qrad_agent.config import AgentConfig
from qrad_agent.core.power import PowerModel
from qrad_agent.sim.cpufreq import EmulatedCpufreqSysfs, make_cpufreq_tree
from qrad_agent.sim.levers import SimQuotaLever, SimSlotsLever
from qrad_agent.sim.room import Room2R2C
from qrad_agent.sim.scenario import Scenario
from qrad_agent.sim.sensors import SimSensors
from qrad_agent.sim.weather import Weather


def config_for_scenario(cfg: AgentConfig, scenario: Scenario) -> AgentConfig:
    """The agent config with the scenario's setpoints, schedule and radiator geometry."""
    r = scenario.radiator
    return cfg.model_copy(
        update={
            "thermostat": cfg.thermostat.model_copy(
                update={
                    "comfort_c": scenario.comfort_c,
                    "eco_c": scenario.eco_c,
                    "schedule": scenario.schedule,
                }
            ),
            "power_model": cfg.power_model.model_copy(
                update={"idle_w": r.idle_w, "slot_w": r.slot_w, "freq_exponent": r.freq_exponent}
            ),
            "allocator": cfg.allocator.model_copy(update={"slots": r.cores}),
            "sim": cfg.sim.model_copy(
                update={
                    "cores": r.cores,
                    "min_freq_khz": r.min_freq_khz,
                    "max_freq_khz": r.max_freq_khz,
                    "freq_step_khz": r.freq_step_khz,
                }
            ),
        }
    )


class SimWorld:
    def __init__(self, cfg: AgentConfig, scenario: Scenario, workdir: Path | None = None) -> None:
        self.cfg = cfg
        self.scenario = scenario
        self.t = 0.0  # seconds since the scenario's start
        # time drivers spent waiting for conversions (their injected sleep): chips see it, the
        # room does not, so a poll costs the simulated room nothing
        self.io_time = 0.0
        self._rng = random.Random(scenario.seed)
        start_c = scenario.room.initial_c if scenario.room.initial_c is not None else scenario.eco_c
        self.room = Room2R2C(scenario.room, start_c)
        base = scenario.source_path.parent if scenario.source_path else None
        self.weather = Weather(scenario.weather, scenario.start, scenario.seed, base)
        self.outdoor_c = self.weather.outdoor_c(0.0)
        self._next_weather = 60.0
        self.window_open = False
        self.local = scenario.start
        self._overrides = list(scenario.override_starts())  # (t_s, target_c, duration_s)
        r = scenario.radiator
        self.model = PowerModel(r.idle_w, r.slot_w, r.freq_exponent, r.max_freq_khz)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="qrad-sim-")
        root = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.root = root
        # every configured sensor's emulated hardware: I2C chips, w1 probes, hwmon tree
        self.sensors = SimSensors(cfg.sensors, self.clock, root, board_cores=r.cores)
        steps = range(r.min_freq_khz, r.max_freq_khz + 1, r.freq_step_khz)
        self.sysfs: EmulatedCpufreqSysfs = make_cpufreq_tree(
            root / "sys", cpus=r.cores, min_khz=r.min_freq_khz, max_khz=r.max_freq_khz,
            available_khz=list(steps),
        )
        self.slots = SimSlotsLever(r.cores)
        self.quota = SimQuotaLever()
        self.power_w = self.model.idle_w
        self.energy_wh = 0.0
        self._sense()

    def clock(self) -> float:
        return self.t + self.io_time

    def local_time(self) -> datetime:
        return self.local

    def lever_power_w(self) -> float:
        """What the radiator draws with the levers as they are now (as the kernel took them)."""
        return self.model.watts_of(
            self.slots.running, self.sysfs.effective_max_khz(), self.quota.quota
        )

    def step(self, dt: float) -> None:
        """Advance the world by ``dt`` seconds with the levers as they are now."""
        self.power_w = self.lever_power_w()
        if self.t >= self._next_weather:
            # the weather moves over hours: a minute's resolution costs the physics nothing
            self.outdoor_c = self.weather.outdoor_c(self.t)
            self._next_weather = self.t + 60.0
        self.window_open = self.scenario.window_open(self.t)
        self.room.step(
            dt, self.power_w, self.outdoor_c, self.window_open, self.scenario.gains_w(self.t)
        )
        self.energy_wh += self.power_w * dt / 3600.0
        self.t += dt
        self.local = self.scenario.start + timedelta(seconds=self.t)
        self._sense()

    def due_overrides(self) -> list[tuple[float, float]]:
        """Occupant overrides that have begun since the last call: (target_c, duration_s)."""
        due = []
        while self._overrides and self._overrides[0][0] <= self.t:
            _, target, duration = self._overrides.pop(0)
            due.append((target, duration))
        return due

    def cpu_c(self) -> float:
        """A plain CPU temperature model for board sensors: room air plus a rise with power."""
        return self.room.air_c + 10.0 + 50.0 * self.power_w / self.scenario.radiator.max_power_w

    def _sense(self) -> None:
        self.sensors.set_temperatures(
            self.room.air_c, self.cpu_c(), self._rng, self.cfg.sim.sensor_noise_k
        )

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
