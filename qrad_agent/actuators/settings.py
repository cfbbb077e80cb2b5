"""Config sections of the levers and the power sources.

They are defined here, next to the code they configure, and are fields of the agent's config:
``[actuators.workers]``, ``[actuators.cgroups]``, ``[actuators.duty_cycle]``,
``[actuators.rapl]`` and ``[metering]``. This module imports nothing of the agent's, so
``config.py`` can import it.

Every field has bounds and a default that is safe on a board nobody has tuned: nothing here
makes the agent touch a setting the board did not offer, and the RAPL limit, the one lever
that could hold the heat below what the room asks for, is off unless asked.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from qrad_agent.section import Section

_CGROUP_NAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,64}$")


def _cgroup_path(v: str, what: str) -> str:
    parts = [p for p in v.strip("/").split("/") if p]
    if not parts:
        raise ValueError(f"{what} must name at least one cgroup, e.g. 'qrad-agent'")
    bad = [p for p in parts if p in (".", "..") or not _CGROUP_NAME.match(p)]
    if bad:
        raise ValueError(
            f"{what} {v!r} has invalid parts {bad}: use names of letters, digits and _.@:- "
            "separated by '/', without '.' or '..'"
        )
    return "/".join(parts)


class WorkersConfig(Section):
    """The processes that make the heat: one per running slot."""

    enabled: bool = True
    # argv of the worker, run without a shell; empty = the built-in CPU burner
    command: list[str] = Field(default_factory=list)
    max_slots: Annotated[int, Field(ge=0, le=256)] = 0  # 0 = one per CPU
    nice: Annotated[int, Field(ge=0, le=19)] = 19  # the board's own work always comes first
    stop_grace_s: Annotated[float, Field(ge=0.1, le=300)] = 10.0  # SIGTERM, then SIGKILL
    # what happens to a slot the plan no longer wants: stopped, or suspended (SIGSTOP, or the
    # cgroup freezer when no slot is wanted) and resumed first when slots are wanted again
    shed: Literal["stop", "suspend"] = "stop"
    restart_min_s: Annotated[float, Field(ge=0.1, le=3600)] = 5.0  # first wait after an exit
    restart_max_s: Annotated[float, Field(ge=0.1, le=86400)] = 300.0  # the wait doubles to this
    healthy_run_s: Annotated[float, Field(ge=1, le=86400)] = 60.0  # a run this long resets it
    cwd: Path | None = None
    env: dict[str, str] = Field(default_factory=dict)  # added to the agent's environment
    log_file: Path | None = None  # workers' stdout and stderr; None = discarded

    @field_validator("command")
    @classmethod
    def _argv(cls, v: list[str]) -> list[str]:
        if v and (not v[0].strip() or any("\0" in a for a in v)):
            raise ValueError(
                "command must be an argv list whose first item names the program, e.g. "
                "['/usr/bin/boinc', '--daemon'], with no NUL bytes; [] runs the built-in burner"
            )
        return v

    @model_validator(mode="after")
    def _backoff_ordered(self) -> WorkersConfig:
        if self.restart_min_s > self.restart_max_s:
            raise ValueError(
                f"restart_min_s ({self.restart_min_s}) must not exceed restart_max_s "
                f"({self.restart_max_s})"
            )
        return self


class CgroupConfig(Section):
    """The cgroup the workers run in: CPU bandwidth (quota) and the freezer.

    The group is ``<root>/<hierarchy>/<parent>/<name>``. Under systemd, give the service
    ``Delegate=yes`` and set ``parent`` to its cgroup (``system.slice/qrad-agent.service``);
    on cgroup v2 also set ``agent_leaf`` so the agent moves itself out of ``parent`` (v2 lets
    only cgroups without processes hand controllers to their children).
    """

    enabled: bool = True
    root: Path | None = None  # where cgroups are mounted; None = <sysfs_root>/fs/cgroup
    parent: str = "qrad-agent"
    name: str = "workers"
    version: Literal["auto", "v2", "v1"] = "auto"  # auto: v2 where it has the controller
    period_us: Annotated[int, Field(ge=1000, le=1_000_000)] = 100_000
    freeze: bool = True  # suspend every worker at once through the freezer (shed = suspend)
    agent_leaf: str | None = None

    @field_validator("parent")
    @classmethod
    def _parent(cls, v: str) -> str:
        return _cgroup_path(v, "parent")

    @field_validator("name", "agent_leaf")
    @classmethod
    def _leaf(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not _CGROUP_NAME.match(v) or v in (".", ".."):
            raise ValueError(
                f"{v!r} is not a cgroup name: use 1-64 letters, digits and _.@:-, no '/'"
            )
        return v

    @model_validator(mode="after")
    def _distinct(self) -> CgroupConfig:
        if self.agent_leaf is not None and self.agent_leaf == self.name:
            raise ValueError(
                f"agent_leaf and name are both {self.name!r}: the agent must not sit in the "
                "workers' cgroup (it would be throttled and frozen with them)"
            )
        return self


class DutyCycleConfig(Section):
    """SIGSTOP/SIGCONT duty cycle of the workers, as the BOINC client throttles.

    ``auto`` uses it only where neither a frequency cap nor a cgroup quota exists.
    """

    mode: Literal["auto", "on", "off"] = "auto"
    period_s: Annotated[float, Field(ge=0.1, le=60)] = 1.0
    min_duty: Annotated[float, Field(ge=0.01, le=1)] = 0.05  # shortest on-time, as a share


class RaplLimitConfig(Section):
    """RAPL long-term package power limit, set a little above what the plan should draw.

    It is a guard, not the main lever: the cap is the power model's watts for the plan times
    ``headroom``, so it only bites when the board draws more than the plan asked for. Off by
    default: it changes a firmware setting, and an untuned model would hold the heat down.
    """

    enabled: bool = False
    headroom: Annotated[float, Field(ge=1.0, le=3.0)] = 1.2
    min_w: Annotated[float, Field(ge=1, le=1000)] = 5.0  # never cap a package below this
    min_change_w: Annotated[float, Field(ge=0, le=100)] = 1.0  # smaller moves are not written


# -- power and energy ------------------------------------------------------------------------

METER_QUANTITIES = (
    "power_w", "voltage_v", "current_a", "power_factor", "frequency_hz", "energy_kwh",
)


class RegisterSpec(Section):
    """Where a meter keeps one quantity, and how to decode it."""

    address: Annotated[int, Field(ge=0, le=0xFFFF)]
    functioncode: Literal[3, 4] = 4  # 4 = input registers (Eastron), 3 = holding registers
    kind: Literal["float32", "int16", "uint16", "int32", "uint32"] = "float32"
    word_order: Literal["big", "little"] = "big"  # of 32-bit values; "little" = swapped words
    scale: Annotated[float, Field(gt=0)] = 1.0  # raw value times this gives the unit


class ModbusMeterConfig(Section):
    """A Modbus RTU electricity meter on a serial port (RS-485 adapter)."""

    port: Annotated[str, Field(min_length=1)]  # e.g. /dev/ttyUSB0 or /dev/serial/by-id/…
    model: Literal["sdm120", "sdm230", "custom"] = "sdm120"
    slave: Annotated[int, Field(ge=1, le=247)] = 1
    baudrate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 2400
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    timeout_s: Annotated[float, Field(ge=0.02, le=5)] = 0.5
    retries: Annotated[int, Field(ge=0, le=5)] = 2  # extra attempts at the power register
    # built-in map entries replaced or added; a "custom" meter needs at least power_w
    registers: dict[str, RegisterSpec] = Field(default_factory=dict)
    extras: list[str] = Field(default_factory=lambda: ["voltage_v", "current_a", "energy_kwh"])

    @field_validator("registers")
    @classmethod
    def _known_names(cls, v: dict[str, RegisterSpec]) -> dict[str, RegisterSpec]:
        unknown = sorted(set(v) - set(METER_QUANTITIES))
        if unknown:
            raise ValueError(
                f"unknown meter quantities {unknown}; allowed: {', '.join(METER_QUANTITIES)}"
            )
        return v

    @field_validator("extras")
    @classmethod
    def _known_extras(cls, v: list[str]) -> list[str]:
        unknown = sorted((set(v) - set(METER_QUANTITIES)) | (set(v) & {"power_w"}))
        if unknown:
            raise ValueError(
                f"extras {unknown} are not extra quantities; allowed: "
                f"{', '.join(q for q in METER_QUANTITIES if q != 'power_w')}"
            )
        return v

    @model_validator(mode="after")
    def _custom_has_power(self) -> ModbusMeterConfig:
        if self.model == "custom" and "power_w" not in self.registers:
            raise ValueError("a custom meter needs registers.power_w (address, kind, …)")
        return self


class MeteringConfig(Section):
    """Where the board's electrical power comes from: the best source present is used.

    ``auto``: the meter if one is configured and answers, else RAPL energy counters, else the
    power model. Naming one source uses it, with the model as the fallback.
    """

    source: Literal["auto", "meter", "rapl", "model"] = "auto"
    meter: ModbusMeterConfig | None = None
    rapl: bool = True  # read RAPL energy counters where the kernel offers them
    rapl_max_w: Annotated[float, Field(gt=0, le=100_000)] = 1000.0  # above this = a bad sample
    energy_save_s: Annotated[float, Field(ge=5, le=3600)] = 60.0  # Wh total persisted this often
    max_gap_s: Annotated[float, Field(ge=1, le=3600)] = 120.0  # longer gaps are not integrated

    @model_validator(mode="after")
    def _named_source_present(self) -> MeteringConfig:
        if self.source == "meter" and self.meter is None:
            raise ValueError("source = 'meter' needs a [metering.meter] section (port, model, …)")
        if self.source == "rapl" and not self.rapl:
            raise ValueError("source = 'rapl' needs rapl = true")
        return self
