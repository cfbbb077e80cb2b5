"""Levers of the simulated radiator that have no kernel interface to emulate.

Worker slots and the CPU quota are processes and cgroups on a real board (the actuators
package); in the simulator they are numbers the radiator's power model reads. They keep the
Lever shape so the agent drives them exactly as it drives real ones.
"""

from __future__ import annotations

from typing import Any

from qrad_agent.actuators.base import LeverInfo
from qrad_agent.core.models import Plan


class SimSlotsLever:
    name = "slots"

    def __init__(self, slots: int) -> None:
        self.max_slots = slots
        self.running = 0
        self.starts = 0

    def discover(self) -> LeverInfo:
        return LeverInfo(self.name, True, range={"max_slots": self.max_slots, "simulated": True})

    def apply(self, plan: Plan) -> None:
        n = max(0, min(plan.slots, self.max_slots))
        if n > self.running:
            self.starts += n - self.running
        self.running = n

    def read_back(self) -> dict[str, Any]:
        return {"running": self.running, "starts": self.starts}

    def restore(self) -> None:
        self.running = 0


class SimQuotaLever:
    name = "quota"

    def __init__(self) -> None:
        self.quota = 1.0

    def discover(self) -> LeverInfo:
        return LeverInfo(self.name, True, range={"min": 0.01, "max": 1.0, "simulated": True})

    def apply(self, plan: Plan) -> None:
        self.quota = min(1.0, max(0.01, plan.quota))

    def read_back(self) -> dict[str, Any]:
        return {"quota": self.quota}

    def restore(self) -> None:
        self.quota = 1.0
