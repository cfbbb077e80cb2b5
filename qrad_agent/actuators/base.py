"""The one shape every lever has: discover, apply, read back, restore.

A lever is one way to change how much heat the board makes (a CPU frequency cap, a CPU
quota, the number of worker slots, …). ``discover()`` says whether this board has it, its
range, and why not if not; ``apply()`` takes the whole ``Plan`` and uses the part it owns;
``read_back()`` reports what the hardware actually took (the kernel clamps); ``restore()``
puts back what the board had before the agent touched it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from qrad_agent.core.models import Plan


class LeverError(Exception):
    """A lever could not read or change a setting; the message says which and why."""


@dataclass(frozen=True)
class LeverInfo:
    name: str
    available: bool
    why_not: str = ""  # for people: "no cpufreq driver", "permission denied", …
    range: dict[str, Any] = field(default_factory=dict)  # e.g. {"min_khz": …, "max_khz": …}


class Lever(Protocol):
    name: str

    def discover(self) -> LeverInfo: ...
    def apply(self, plan: Plan) -> None: ...
    def read_back(self) -> dict[str, Any]: ...
    def restore(self) -> None: ...
