"""Room and board sensors: one driver per chip, all of the same shape (see ``base.py``).

>>> from qrad_agent.sensors import open_sensor
>>> sensor = open_sensor("tmp102", bus=smbus2.SMBus(1), address=0x48)  # doctest: +SKIP
>>> sensor.read().temperature_c  # doctest: +SKIP
21.5

Every kind the config accepts, I2C or not (``ds18b20``, ``board``), is opened from its
``SensorConfig`` by ``qrad_agent.sensors.factory.open_configured``; ``SensorMonitor``
(``health.py``) judges each poll.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from qrad_agent.sensors.aht20 import AHT20
from qrad_agent.sensors.base import I2CBus, Measurement, SensorDriver, SensorError
from qrad_agent.sensors.bme280 import BME280
from qrad_agent.sensors.htu21d import HTU21D
from qrad_agent.sensors.lm75 import LM75, LM75A
from qrad_agent.sensors.mcp9808 import MCP9808
from qrad_agent.sensors.scd4x import SCD4x
from qrad_agent.sensors.sht3x import SHT3x
from qrad_agent.sensors.sht4x import SHT4x
from qrad_agent.sensors.tmp102 import TMP102

# kind -> driver class. Each class carries its default addresses (``addresses[0]``).
REGISTRY: dict[str, type[SensorDriver]] = {
    cls.kind: cls
    for cls in (TMP102, LM75, LM75A, MCP9808, SHT3x, SHT4x, HTU21D, AHT20, BME280, SCD4x)
}

# kinds read from sysfs rather than a bus, and how to open one directly
SYSFS_KINDS = {
    "ds18b20": "qrad_agent.sensors.ds18b20.DS18B20(sysfs, device_id)",
    "board": "qrad_agent.sensors.factory.BoardCpuTemperature(sysfs)",
}


def open_sensor(
    kind: str, bus: I2CBus, address: int | None = None, sleep: Callable[[float], None] | None = None
) -> SensorDriver:
    """Return the driver for ``kind`` on ``bus`` at ``address`` (default: the chip's first).

    ``sleep`` replaces ``time.sleep`` for chips that must wait for a conversion, so the
    simulator can advance its own clock instead of waiting.
    """
    try:
        cls = REGISTRY[kind]
    except KeyError:
        if kind in SYSFS_KINDS:
            raise ValueError(
                f"{kind} is not on an I2C bus: open it with "
                f"qrad_agent.sensors.factory.open_configured, or {SYSFS_KINDS[kind]}"
            ) from None
        raise ValueError(f"unknown sensor kind {kind!r}; allowed: {', '.join(sorted(REGISTRY))}")\
            from None
    chosen = cls.addresses[0] if address is None else address
    if chosen not in cls.addresses:
        allowed = ", ".join(f"0x{a:02x}" for a in cls.addresses)
        raise ValueError(f"{kind} cannot be at address 0x{chosen:02x}; allowed: {allowed}")
    if sleep is not None and "sleep" in inspect.signature(cls).parameters:
        return cls(bus, chosen, sleep=sleep)  # type: ignore[call-arg]
    return cls(bus, chosen)  # type: ignore[call-arg]


__all__ = [
    "REGISTRY", "SYSFS_KINDS", "I2CBus", "Measurement", "SensorDriver", "SensorError",
    "open_sensor",
]
