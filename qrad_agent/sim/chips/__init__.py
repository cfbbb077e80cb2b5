"""Register-level emulators of the supported I2C chips, by sensor kind."""

from __future__ import annotations

from collections.abc import Callable

from qrad_agent.sim.chips.aht20 import AHT20Chip
from qrad_agent.sim.chips.bme280 import BME280Chip
from qrad_agent.sim.chips.bus import EmulatedBus, EmulatedChip
from qrad_agent.sim.chips.htu21d import HTU21DChip
from qrad_agent.sim.chips.lm75 import LM75AChip, LM75Chip
from qrad_agent.sim.chips.mcp9808 import MCP9808Chip
from qrad_agent.sim.chips.scd4x import SCD4xChip
from qrad_agent.sim.chips.sht3x import SHT3xChip
from qrad_agent.sim.chips.sht4x import SHT4xChip
from qrad_agent.sim.chips.tmp102 import TMP102Chip

EMULATORS: dict[str, Callable[..., EmulatedChip]] = {
    "tmp102": TMP102Chip,
    "lm75": LM75Chip,
    "lm75a": LM75AChip,
    "mcp9808": MCP9808Chip,
    "sht3x": SHT3xChip,
    "sht4x": SHT4xChip,
    "htu21d": HTU21DChip,
    "aht20": AHT20Chip,
    "bme280": BME280Chip,
    "scd4x": SCD4xChip,
}


def emulator_for(kind: str, clock: Callable[[], float] | None = None) -> EmulatedChip:
    try:
        factory = EMULATORS[kind]
    except KeyError:
        raise ValueError(
            f"no emulator for sensor kind {kind!r}; emulated: {', '.join(sorted(EMULATORS))}"
        ) from None
    return factory(clock=clock)


__all__ = ["EMULATORS", "EmulatedBus", "EmulatedChip", "emulator_for"]
