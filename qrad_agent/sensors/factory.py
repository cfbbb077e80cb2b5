"""Drivers from configuration: one call for every sensor kind the config accepts.

I2C kinds go through ``open_sensor`` on the bus ``bus_for(cfg.bus)`` returns (the caller
decides what a bus is: ``smbus2.SMBus(n)`` on a board, an ``EmulatedBus`` in the simulator,
and keeps one per number). ``ds18b20`` reads the kernel's w1 files and ``board`` the hottest
CPU temperature from hwmon and thermal zones, both under ``sysfs``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from qrad_agent.config import SensorConfig
from qrad_agent.sensors import open_sensor
from qrad_agent.sensors.base import I2CBus, Measurement, SensorDriver, SensorError
from qrad_agent.sensors.board import BoardTemperature, board_temperatures, hottest_cpu
from qrad_agent.sensors.ds18b20 import DS18B20
from qrad_agent.sysfs import Sysfs


class BoardCpuTemperature:
    """The board's hottest CPU temperature, in the shape of a sensor driver.

    Each read scans hwmon and the thermal zones again: a sensor that appears late (a module
    loaded after boot) or drops out (``EIO``) is handled by ``board_temperatures`` itself.
    ``last`` keeps the reading chosen, with its source and critical limit, for the safety
    supervisor and for people.
    """

    kind: ClassVar[str] = "board"
    addresses: ClassVar[tuple[int, ...]] = ()
    # Wider than any die's rating: a value outside is a broken sensor, not a hot CPU. The
    # safety trip works from the critical limits, well inside this.
    temperature_range_c: ClassVar[tuple[float, float]] = (-40.0, 150.0)
    # hwmon values are often whole degrees (coretemp) that sit still under a steady load
    dithers: ClassVar[bool] = False

    def __init__(self, sysfs: Sysfs, psutil_fallback: bool = False) -> None:
        self.sysfs = sysfs
        self.psutil_fallback = psutil_fallback  # ask psutil when sysfs shows no temperature
        self.address = 0
        self.last: BoardTemperature | None = None

    def _hottest(self) -> BoardTemperature:
        if self.psutil_fallback:
            found = board_temperatures(self.sysfs)
        else:
            found = board_temperatures(self.sysfs, fallback=None)
        cpu = hottest_cpu(found)
        if cpu is None:
            seen = ", ".join(sorted({t.source for t in found})) or "no temperatures at all"
            where = self.sysfs.path("sys/class")
            raise SensorError(
                f"no CPU temperature under {where}/hwmon or {where}/thermal (found: {seen}); "
                "CPU sensors are coretemp, k10temp, zenpower, x86_pkg_temp or *cpu* zones"
            )
        return cpu

    def identify(self) -> str:
        cpu = self._hottest()
        crit = f", critical {cpu.critical_c:g} °C" if cpu.critical_c is not None else ""
        return f"hottest CPU sensor now: {cpu.source} {cpu.label!r}{crit}"

    def read(self) -> Measurement:
        cpu = self._hottest()
        self.last = cpu
        return Measurement(temperature_c=cpu.temperature_c, raw=round(cpu.temperature_c * 1000))


class UnopenableBus:
    """Stands in for an I2C bus that could not be opened (no ``/dev/i2c-N``, no permission):
    every transfer fails as an absent device does, so the sensors on it read ``missing`` with
    the reason, and the agent runs on with its other sensors instead of failing to start."""

    def __init__(self, number: int, why: str) -> None:
        self.message = f"cannot open /dev/i2c-{number}: {why}"

    def _fail(self) -> OSError:
        return OSError(errno.ENODEV, self.message)

    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        raise self._fail()

    def read_word_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        raise self._fail()

    def read_i2c_block_data(
        self, i2c_addr: int, register: int, length: int, force: bool | None = None
    ) -> list[int]:
        raise self._fail()

    def write_byte_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None:
        raise self._fail()

    def write_i2c_block_data(
        self, i2c_addr: int, register: int, data: list[int], force: bool | None = None
    ) -> None:
        raise self._fail()

    def i2c_rdwr(self, *i2c_msgs: Any) -> None:
        raise self._fail()


def open_smbus(number: int) -> I2CBus:
    """``smbus2.SMBus(number)``; raises ``OSError`` if the bus cannot be opened."""
    from smbus2 import SMBus

    bus: I2CBus = SMBus(number)
    return bus


class BusPool:
    """``bus_for`` for ``open_configured`` on a board: one bus object per number, opened on
    first use; a bus that cannot be opened becomes an ``UnopenableBus``."""

    def __init__(self, opener: Callable[[int], I2CBus] = open_smbus) -> None:
        self.opener = opener
        self.buses: dict[int, I2CBus] = {}

    def __call__(self, number: int) -> I2CBus:
        bus = self.buses.get(number)
        if bus is None:
            try:
                bus = self.opener(number)
            except OSError as exc:
                bus = UnopenableBus(number, exc.strerror or str(exc))
            self.buses[number] = bus
        return bus


def sysfs_for(cfg: SensorConfig) -> Sysfs:
    """The ``Sysfs`` a sysfs sensor reads: drivers name files ``sys/...`` under the parent of
    the mount point ``cfg.sysfs_root`` (which the config checks ends in ``/sys``)."""
    return Sysfs(Path(cfg.sysfs_root).parent)


def open_configured(
    cfg: SensorConfig,
    *,
    bus_for: Callable[[int], I2CBus],
    sysfs: Sysfs | None = None,
    sleep: Callable[[float], None] | None = None,
) -> SensorDriver:
    """The driver for one configured sensor.

    ``sysfs`` overrides ``cfg.sysfs_root`` (the simulator passes its tree). ``sleep`` replaces
    ``time.sleep`` in drivers that wait for conversions. Raises ``ValueError`` for a config
    this function cannot serve (a kind added to the config but not here).
    """
    if cfg.kind == "ds18b20":
        if cfg.device is None:  # the config refuses this; kept for configs built by hand
            raise ValueError(f"sensor {cfg.name!r}: kind ds18b20 needs device (28-…)")
        return DS18B20(sysfs or sysfs_for(cfg), cfg.device)
    if cfg.kind == "board":
        tree = sysfs or sysfs_for(cfg)
        # psutil reads the machine's own /sys: only a fallback when that is the tree meant
        on_host = sysfs is None and Path(cfg.sysfs_root) == Path("/sys")
        return BoardCpuTemperature(tree, psutil_fallback=on_host)
    return open_sensor(cfg.kind, bus_for(cfg.bus), cfg.address, sleep=sleep)


__all__ = [
    "BoardCpuTemperature", "BusPool", "UnopenableBus", "open_configured", "open_smbus",
    "sysfs_for",
]
