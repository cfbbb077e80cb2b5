"""Room and board sensors: one driver per chip, all of the same shape (see ``base.py``).

>>> from qrad_agent.sensors import open_sensor
>>> sensor = open_sensor("tmp102", bus=smbus2.SMBus(1), address=0x48)  # doctest: +SKIP
>>> sensor.read().temperature_c  # doctest: +SKIP
21.5
"""

from __future__ import annotations

from qrad_agent.sensors.base import I2CBus, Measurement, SensorDriver, SensorError
from qrad_agent.sensors.tmp102 import TMP102

# kind -> driver class. Each class carries its default addresses (``addresses[0]``).
REGISTRY: dict[str, type[SensorDriver]] = {
    cls.kind: cls
    for cls in (TMP102,)
}


def open_sensor(kind: str, bus: I2CBus, address: int | None = None) -> SensorDriver:
    """Return the driver for ``kind`` on ``bus`` at ``address`` (default: the chip's first)."""
    try:
        cls = REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown sensor kind {kind!r}; allowed: {', '.join(sorted(REGISTRY))}")\
            from None
    chosen = cls.addresses[0] if address is None else address
    if chosen not in cls.addresses:
        allowed = ", ".join(f"0x{a:02x}" for a in cls.addresses)
        raise ValueError(f"{kind} cannot be at address 0x{chosen:02x}; allowed: {allowed}")
    return cls(bus, chosen)  # type: ignore[call-arg]


__all__ = ["REGISTRY", "I2CBus", "Measurement", "SensorDriver", "SensorError", "open_sensor"]
