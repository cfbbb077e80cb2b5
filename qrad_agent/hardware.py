"""Ports of a real board: I2C buses, sysfs levers, power sources. The hardware half of the
composition root (the simulator's half is ``sim/run.py``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from qrad_agent.actuators import open_levers
from qrad_agent.actuators.cpufreq import open_frequency_lever
from qrad_agent.agent import Agent, make_allocator, make_controller
from qrad_agent.config import AgentConfig, ConfigError
from qrad_agent.core.power import PowerModel
from qrad_agent.metering import energy_file, open_power
from qrad_agent.metering.energy import EnergyAccumulator
from qrad_agent.metering.model import load_fitted
from qrad_agent.sensors.factory import BusPool, open_configured
from qrad_agent.sensors.health import SensorMonitor
from qrad_agent.sysfs import Sysfs
from qrad_agent.tune_cli import apply_overlay, overlay_path, read_overlay

log = logging.getLogger("qrad_agent")


def with_overlay(cfg: AgentConfig) -> AgentConfig:
    """``cfg`` with what `qrad-agent tune --apply` stored; an unusable overlay is logged and
    left out (the file's own config still runs: a broken overlay must not stop the heating)."""
    try:
        return apply_overlay(cfg, read_overlay(overlay_path(cfg)))
    except ConfigError as exc:
        log.error("ignoring the config overlay: %s", exc)
        return cfg


def build_hardware_agent(cfg: AgentConfig) -> Agent:
    cfg = with_overlay(cfg)
    state_dir = Path(cfg.node.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    bus_for = BusPool()  # a bus that cannot be opened leaves its sensors "missing"
    monitors = [
        SensorMonitor.from_config(s, open_configured(s, bus_for=bus_for)) for s in cfg.sensors
    ]
    root = cfg.actuators.cpufreq.sysfs_root
    # the frequency range first: the power model is scaled to the board's top frequency
    freq = open_frequency_lever(Sysfs(root)).discover()
    min_khz = int(freq.range.get("min_khz", 0)) if freq.available else 0
    max_khz = int(freq.range.get("max_khz", 0)) if freq.available else 0
    table = list(freq.range.get("available_khz", [])) if freq.available else []
    if not max_khz:
        min_khz = max_khz = 1_000_000  # no frequency lever: the allocator works in slots only
    pm = cfg.power_model
    model = load_fitted(state_dir, max_khz) or PowerModel(
        pm.idle_w, pm.slot_w, pm.freq_exponent, max_khz
    )
    levers, inventory = open_levers(cfg.actuators, root, state_dir, model=model)
    for info in inventory:
        if not info.available:
            log.warning("lever %s unavailable: %s", info.name, info.why_not)
    slots = cfg.actuators.workers.max_slots or os.cpu_count() or 1
    allocator = make_allocator(cfg, slots, min_khz, max_khz, table)
    controller = make_controller("agent", cfg, allocator)
    power = open_power(cfg.metering, Sysfs(root), model)
    energy = EnergyAccumulator(
        energy_file(state_dir), cfg.metering.energy_save_s, cfg.metering.max_gap_s
    )
    agent = Agent(cfg, monitors, levers, controller, state_file=state_dir / "controller.json")
    agent.inventory = inventory
    agent.attach_power(power, energy)
    return agent
