"""The board's electrical power, which is the radiator's heat output, from the best source.

Sources, best first: a Modbus electricity meter (the whole board, as billed), RAPL energy
counters (the CPU packages: most of the board's power, measured), the power model (idle
watts plus watts per busy slot, from the plan that was applied: an estimate). Every
``PowerReading`` says which source it came from and how far it can be trusted.

``PowerChooser.read`` reads every source each time (RAPL needs consecutive counter samples,
the model is free, the meter is the one slow read) and hands back the first good reading,
so a meter that misses an answer is stood in for by RAPL or the model for that reading only.
Nothing here raises on a failed read: failures are counted and carried in the reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qrad_agent.core.models import Plan, Quality

if TYPE_CHECKING:
    from collections.abc import Callable

    from qrad_agent.actuators.settings import MeteringConfig
    from qrad_agent.core.power import PowerModel
    from qrad_agent.metering.modbus import InstrumentLike
    from qrad_agent.sysfs import Sysfs

METER, RAPL, MODEL = "meter", "rapl", "model"


@dataclass(frozen=True, slots=True)
class PowerReading:
    source: str  # "meter", "rapl" or "model"
    at: float  # monotonic seconds of the read
    watts: float | None
    quality: Quality = Quality.OK
    detail: str = ""  # why the quality is not ok, or how the figure was made, for people
    extras: dict[str, float] = field(default_factory=dict)  # voltage_v, energy_kwh, energy_j, …

    @property
    def ok(self) -> bool:
        return self.quality is Quality.OK and self.watts is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "watts": None if self.watts is None else round(self.watts, 3),
            "quality": self.quality.value,
            "detail": self.detail,
            **{k: round(v, 4) for k, v in self.extras.items()},
        }


class PowerSource(Protocol):
    name: str

    def read(self, now: float) -> PowerReading: ...
    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SourceInfo:
    """A source the board has or lacks, and why not, for ``meta`` and ``actuators show``."""

    name: str
    available: bool
    why_not: str = ""


class PowerChooser:
    """Reads the sources in order of preference and returns the first good reading."""

    def __init__(self, sources: list[PowerSource], inventory: list[SourceInfo] | None = None):
        if not sources:
            raise ValueError("a power chooser needs at least one source (the model)")
        self.sources = sources
        self.inventory = inventory or [SourceInfo(s.name, True) for s in sources]
        self.last: dict[str, PowerReading] = {}

    @property
    def measured(self) -> bool:
        """Whether a source other than the model is present: what calibration needs."""
        return any(s.name != MODEL for s in self.sources)

    def read(self, now: float) -> PowerReading:
        chosen: PowerReading | None = None
        for source in self.sources:
            reading = source.read(now)
            self.last[source.name] = reading
            if chosen is None and reading.ok:
                chosen = reading
        return chosen if chosen is not None else self.last[self.sources[0].name]

    def observe(self, plan: Plan) -> None:
        """Tell the model source the plan now in force (what it estimates from)."""
        for source in self.sources:
            observe = getattr(source, "observe", None)
            if observe is not None:
                observe(plan)

    def describe(self) -> dict[str, Any]:
        return {
            "sources": [
                {"name": i.name, "available": i.available, "why_not": i.why_not}
                for i in self.inventory
            ],
            "details": {s.name: s.describe() for s in self.sources},
            "last": {name: r.as_dict() for name, r in self.last.items()},
        }

    def close(self) -> None:
        for source in self.sources:
            close = getattr(source, "close", None)
            if close is not None:
                close()


def open_power(
    cfg: MeteringConfig,
    sysfs: Sysfs,
    model: PowerModel,
    *,
    instrument_factory: Callable[[Any], InstrumentLike] | None = None,
) -> PowerChooser:
    """The sources this board has, best first, the power model always last."""
    from qrad_agent.metering.modbus import ModbusMeter
    from qrad_agent.metering.model import ModelPowerSource
    from qrad_agent.metering.rapl import RaplEnergySource

    sources: list[PowerSource] = []
    inventory: list[SourceInfo] = []
    if cfg.meter is None:
        inventory.append(SourceInfo(METER, False, "no meter configured ([metering.meter])"))
    elif cfg.source in ("auto", "meter"):
        sources.append(ModbusMeter(cfg.meter, instrument_factory=instrument_factory))
        inventory.append(SourceInfo(METER, True))
    else:
        inventory.append(SourceInfo(METER, False, f"not used: metering.source = {cfg.source!r}"))
    if not cfg.rapl:
        inventory.append(SourceInfo(RAPL, False, "disabled in config (metering.rapl = false)"))
    elif cfg.source not in ("auto", "rapl"):
        inventory.append(SourceInfo(RAPL, False, f"not used: metering.source = {cfg.source!r}"))
    else:
        rapl = RaplEnergySource(sysfs, max_w=cfg.rapl_max_w)
        why = rapl.unavailable()
        inventory.append(SourceInfo(RAPL, not why, why))
        if not why:
            sources.append(rapl)
    sources.append(ModelPowerSource(model))
    inventory.append(SourceInfo(MODEL, True))
    return PowerChooser(sources, inventory)


def energy_file(state_dir: Path) -> Path:
    return Path(state_dir) / "energy.json"
