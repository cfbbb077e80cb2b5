"""The emulated hardware behind a sensor config: what the simulator, the ``--sim`` CLI and the
benchmarks read instead of real chips.

Every I2C sensor gets a register-level chip emulator on an ``EmulatedBus`` (one per bus
number), every ``ds18b20`` a w1 sysfs file in a ``W1Tree``, and ``board`` sensors an x86 hwmon
and thermal-zone tree, both under ``root``. The drivers are the real ones, opened with
``open_configured(cfg, bus_for=sim.bus_for, sysfs=sim.sysfs)``, so the simulator exercises
exactly the code that runs on a board.

``set_temperatures`` moves what the chips measure; ``chip(name)`` and ``inject(name, fault)``
reach one sensor's emulator for fault injection.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qrad_agent.config import SensorConfig
from qrad_agent.core.models import Role
from qrad_agent.sensors import REGISTRY
from qrad_agent.sim.chips import emulator_for
from qrad_agent.sim.chips.bus import EmulatedBus, EmulatedChip
from qrad_agent.sim.hwmon import HwmonTree
from qrad_agent.sim.w1 import FakeDS18B20, W1Tree
from qrad_agent.sysfs import Sysfs

BUS_FAULTS = ("nack", "timeout", "disconnect")
EXHAUST_RISE_K = 5.0  # above the room air, when the caller gives no exhaust temperature
DEFAULT_HUMIDITY_PCT = 45.0
DEFAULT_CO2_PPM = 650.0  # an occupied, ventilated room


class SimSensors:
    def __init__(
        self,
        sensors: list[SensorConfig],
        clock: Callable[[], float] | None = None,
        root: Path | str | None = None,
        board_cores: int = 4,
    ) -> None:
        self.configs = {s.name: s for s in sensors}
        self.clock = clock
        self.root = Path(root) if root is not None else None
        self.buses: dict[int, EmulatedBus] = {}
        self.humidity_pct = DEFAULT_HUMIDITY_PCT
        self.co2_ppm = DEFAULT_CO2_PPM
        self._i2c: dict[str, tuple[int, int, EmulatedChip]] = {}  # name -> bus, address, chip
        self._w1: W1Tree | None = None
        self._probes: dict[str, FakeDS18B20] = {}
        self._hwmon: HwmonTree | None = None
        taken: dict[tuple[int, int], str] = {}
        for s in sensors:
            if s.kind == "ds18b20":
                self._add_ds18b20(s)
            elif s.kind == "board":
                if self._hwmon is None:
                    self._hwmon = HwmonTree.x86(self._need_root(s), cores=board_cores)
            else:
                address = s.address if s.address is not None else REGISTRY[s.kind].addresses[0]
                other = taken.get((s.bus, address))
                if other is not None:
                    raise ValueError(
                        f"sensors {other!r} and {s.name!r} are both at 0x{address:02x} on bus "
                        f"{s.bus}; one I2C address holds one chip"
                    )
                taken[(s.bus, address)] = s.name
                chip = emulator_for(s.kind, clock=clock)
                self.bus_for(s.bus).attach(address, chip)
                self._i2c[s.name] = (s.bus, address, chip)
        # what set_temperatures moves, in config order: I2C chips and w1 probes alike have
        # temperature_c; humidity and CO2 only where the chip measures them
        self._targets: list[tuple[Any, Role, bool, bool]] = []
        for s in sensors:
            target: Any = None
            if s.name in self._i2c:
                target = self._i2c[s.name][2]
            elif s.kind == "ds18b20" and s.device is not None:
                target = self._probes[s.device]
            if target is not None:
                self._targets.append((
                    target, s.role, hasattr(target, "humidity_pct"), hasattr(target, "co2_ppm")
                ))

    def _need_root(self, s: SensorConfig) -> Path:
        if self.root is None:
            raise ValueError(
                f"sensor {s.name!r} (kind {s.kind}) lives in sysfs: SimSensors needs a root "
                f"directory for its tree"
            )
        return self.root

    def _add_ds18b20(self, s: SensorConfig) -> None:
        root = self._need_root(s)
        assert s.device is not None  # the config requires it for ds18b20
        if s.device in self._probes:
            raise ValueError(f"two sensors share the DS18B20 id {s.device}; each probe has one")
        if self._w1 is None:
            self._w1 = W1Tree(root)
        self._probes[s.device] = self._w1.add(s.device)

    # -- what drivers are given -------------------------------------------------------------
    def bus_for(self, number: int) -> EmulatedBus:
        """The emulated bus ``number`` (an empty one if no sensor is configured on it)."""
        bus = self.buses.get(number)
        if bus is None:
            bus = self.buses[number] = EmulatedBus()
        return bus

    @property
    def bus(self) -> EmulatedBus:
        """The bus of the first I2C sensor (bus 1 if there is none): the usual single bus."""
        first = next(iter(self._i2c.values()), None)
        return self.bus_for(first[0] if first else 1)

    @property
    def sysfs(self) -> Sysfs:
        if self.root is None:
            raise ValueError("SimSensors was built without a root: there is no sysfs tree")
        return Sysfs(self.root)

    @property
    def hwmon(self) -> HwmonTree | None:
        return self._hwmon

    # -- the physical world -----------------------------------------------------------------
    def set_temperatures(
        self,
        room_air_c: float,
        board_c: float,
        rng: random.Random | None = None,
        noise_k: float = 0.0,
        exhaust_c: float | None = None,
    ) -> None:
        """Set what every sensor measures, by role: room and intake sensors the room air,
        exhaust sensors ``exhaust_c`` (default: room air + 5 K), board sensors the CPU. Each
        sensor gets its own Gaussian noise of ``noise_k`` (needs ``rng``), as real chips do."""

        # called every simulated step: kept to plain loops over lists built once
        def noisy(value: float) -> float:
            return value + rng.gauss(0.0, noise_k) if rng is not None and noise_k else value

        by_role = {
            Role.ROOM: room_air_c,
            Role.INTAKE: room_air_c,
            Role.EXHAUST: room_air_c + EXHAUST_RISE_K if exhaust_c is None else exhaust_c,
            Role.BOARD: board_c,
        }
        for chip, role, has_rh, has_co2 in self._targets:
            chip.temperature_c = noisy(by_role[role])
            if has_rh:
                chip.humidity_pct = min(100.0, max(0.0, noisy(self.humidity_pct)))
            if has_co2:
                chip.co2_ppm = max(0.0, noisy(self.co2_ppm))
        if self._hwmon is not None:
            self._hwmon.set_cpu_temperature(board_c)

    # -- fault injection ----------------------------------------------------------------------
    def chip(self, name: str) -> EmulatedChip | FakeDS18B20 | HwmonTree:
        """The emulator behind sensor ``name``: an I2C chip (``.fault``, ``.temperature_c``),
        a DS18B20 probe (``.fault``), or the hwmon tree for a board sensor."""
        if name in self._i2c:
            return self._i2c[name][2]
        s = self.configs.get(name)
        if s is None:
            known = ", ".join(sorted(self.configs)) or "none"
            raise KeyError(f"no sensor named {name!r}; configured: {known}")
        if s.kind == "ds18b20" and s.device is not None:
            return self._probes[s.device]
        assert self._hwmon is not None  # a board sensor made the tree
        return self._hwmon

    def address(self, name: str) -> tuple[int, int]:
        """(bus, address) of I2C sensor ``name``."""
        if name not in self._i2c:
            raise KeyError(f"{name!r} is not an I2C sensor; I2C sensors: "
                           f"{', '.join(sorted(self._i2c)) or 'none'}")
        bus, address, _ = self._i2c[name]
        return bus, address

    def inject(self, name: str, fault: str | None) -> None:
        """Give sensor ``name`` a fault, or clear it with ``None``. For I2C sensors ``nack``,
        ``timeout`` and ``disconnect`` act on the bus, any other fault on the chip (what each
        emulator allows: ``bad_crc``, ``stuck``, ``wrong_id``, …); a DS18B20 takes
        ``bad_crc``, ``power_on``, ``shorted``."""
        if name in self._i2c:
            bus, address, chip = self._i2c[name]
            if fault in BUS_FAULTS:
                self.bus_for(bus).inject(address, fault)
                return
            if fault is None:
                self.bus_for(bus).inject(address, None)
            chip.fault = fault
            return
        target = self.chip(name)
        if isinstance(target, FakeDS18B20):
            target.fault = fault
            return
        raise ValueError(f"sensor {name!r} is a board sensor; change its tree via chip(name)")
