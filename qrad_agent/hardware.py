"""Ports of a real board: I2C buses, sysfs levers. The composition root's hardware half."""

from __future__ import annotations

import logging
from pathlib import Path

from qrad_agent.actuators.base import Lever
from qrad_agent.actuators.cpufreq import open_frequency_lever
from qrad_agent.actuators.restore import RestoreRecord
from qrad_agent.agent import Agent, make_allocator, make_controller
from qrad_agent.config import AgentConfig
from qrad_agent.sensors.factory import BusPool, open_configured
from qrad_agent.sensors.health import SensorMonitor
from qrad_agent.sysfs import Sysfs

log = logging.getLogger("qrad_agent")


def build_hardware_agent(cfg: AgentConfig) -> Agent:
    import os

    state_dir = Path(cfg.node.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    bus_for = BusPool()  # a bus that cannot be opened leaves its sensors "missing"
    monitors = [
        SensorMonitor.from_config(s, open_configured(s, bus_for=bus_for)) for s in cfg.sensors
    ]
    levers: list[Lever] = []
    min_khz, max_khz, table = 0, 0, []
    if cfg.actuators.cpufreq.enabled:
        freq = open_frequency_lever(
            Sysfs(cfg.actuators.cpufreq.sysfs_root), RestoreRecord(state_dir / "restore.json")
        )
        info = freq.discover()
        if info.available:
            levers.append(freq)
            min_khz, max_khz = info.range["min_khz"], info.range["max_khz"]
            table = list(info.range.get("available_khz", []))
        else:
            log.warning("frequency lever unavailable: %s", info.why_not)
    if not max_khz:
        min_khz = max_khz = 1_000_000  # no frequency lever: the allocator works in slots only
    allocator = make_allocator(cfg, os.cpu_count() or 1, min_khz, max_khz, table)
    controller = make_controller("agent", cfg, allocator)
    return Agent(cfg, monitors, levers, controller, state_file=state_dir / "controller.json")
