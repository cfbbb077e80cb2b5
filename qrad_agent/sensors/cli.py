"""``qrad-agent sensors scan|read``: find the sensors on a board, and read the configured ones.

Parsing and printing live here; the probing rules are in ``scan_bus`` and the judging in
``SensorMonitor``. ``add_parser`` hangs the ``sensors`` command on the main CLI;
``python -m qrad_agent.sensors.cli scan ...`` runs it on its own.

Scan policy: what scan sends to an address before it knows what is there
--------------------------------------------------------------------------
An I2C bus on a board can hold chips this agent does not know (ADCs, PWM drivers, EEPROMs,
power monitors), and a stray write can change their settings. So scan

- only looks at addresses where a supported chip can be strapped;
- at each, first uses reads only: SMBus register reads (which set the register pointer and
  read back, as ``i2cget`` and ``sensors-detect`` do) and plain one-byte reads;
- reads identity registers where the chip has them: MCP9808 manufacturer/device id
  (0x06/0x07), BME280 chip id (0xD0);
- for chips without identity registers, tells them apart by read-only register contents:
  TMP102 and LM75 share 0x48-0x4B and differ in their configuration register (the TMP102's
  read-only resolution bits 6:5 read 11, where the LM75's reserved bits 7:5 read 0); LM75A
  against LM75 shows only when a reading has bits below 0.5 °C, else it says so and
  proposes kind lm75, which reads both correctly. The AHT20 is recognised by its status
  byte's calibration bit;
- for command-driven chips, which have nothing to read until told what to send, the
  read-identity command *is* the identification step, and nothing else is sent before it
  answers with valid CRCs: SHT4x serial (0x89) and SHT3x serial (0x3780) at 0x44-0x46, the
  SCD4x serial (0x3682; a running SCD4x refuses it, and is then recognised by its data-ready
  word, 0xE4B8, which it answers while measuring), and at 0x40 the HTU21D/Si70xx electronic
  id (0xFC 0xC9), sent only after a read of its user register (0xE7) looks like one;
- writes anything else (a measurement command, a configuration write) only to a device it
  has identified, to take a first reading. An idle SCD4x is left in periodic measurement,
  as the agent's driver would leave it.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from qrad_agent.cli_args import number, show_config_error
from qrad_agent.config import AgentConfig, ConfigError, SensorConfig, load_config
from qrad_agent.core.fusion import fuse_room
from qrad_agent.core.models import Quality, Reading
from qrad_agent.sensors import REGISTRY, open_sensor
from qrad_agent.sensors.base import (
    CrcError,
    I2CBus,
    Measurement,
    NotReady,
    SensorDriver,
    SensorError,
    WrongChip,
    checked_words,
    command_read,
    i2c_read,
    swap16,
)
from qrad_agent.sensors.bme280 import BME280
from qrad_agent.sensors.ds18b20 import DS18B20, list_ds18b20
from qrad_agent.sensors.factory import (
    BoardCpuTemperature,
    BusPool,
    open_configured,
    open_smbus,
)
from qrad_agent.sensors.health import SensorMonitor
from qrad_agent.sensors.htu21d import HTU21D
from qrad_agent.sensors.mcp9808 import MCP9808
from qrad_agent.sensors.sht3x import SHT3x
from qrad_agent.sensors.sht4x import SHT4x
from qrad_agent.sysfs import Sysfs

_positive = number(float, "a number of seconds", above=0, unit=" seconds")
_count = number(int, "a whole number", at_least=1)


Sleep = Callable[[float], None]

EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2
SETTLE_S = 6.0  # longest wait for a first measurement: an SCD4x samples every 5 s
SETTLE_STEP_S = 0.5
SIM_AIR_C = 21.3  # off the LM75's half-degree grid, so the scan shows an LM75A as one
SIM_BOARD_C = 46.0
HOST_SYSFS_ROOT = "/"  # where scan looks for w1 and hwmon on a board
SIM_POWERED_S = 1.0  # emulated chips are this long past power-up when first read (as on a
# running board: past the AHT20's 40 ms start-up and the MCP9808's first 250 ms conversion)

# The emulated bench `scan --sim` probes: every supported kind, with the shared addresses
# occupied (TMP102 and LM75A in the 0x48 range, SHT4x and SHT3x at 0x44/0x45).
SIM_BENCH = [
    SensorConfig(name="mcp9808", kind="mcp9808", address=0x18),
    SensorConfig(name="aht20", kind="aht20", address=0x38),
    SensorConfig(name="htu21d", kind="htu21d", address=0x40),
    SensorConfig(name="sht4x", kind="sht4x", address=0x44),
    SensorConfig(name="sht3x", kind="sht3x", address=0x45),
    SensorConfig(name="tmp102", kind="tmp102", address=0x48),
    SensorConfig(name="lm75a", kind="lm75a", address=0x49),
    SensorConfig(name="scd4x", kind="scd4x", address=0x62),
    SensorConfig(name="bme280", kind="bme280", address=0x76),
    SensorConfig(name="probe", kind="ds18b20", device="28-0316a2790eff"),
    SensorConfig(name="board", kind="board"),
]


# -- scanning ---------------------------------------------------------------------------------
@dataclass
class Found:
    """A supported sensor scan found. ``certain``: identified by an identity register or a
    CRC-checked serial, not inferred from register contents."""

    kind: str
    identity: str
    certain: bool
    address: int | None = None  # I2C sensors
    device: str | None = None  # DS18B20
    note: str = ""
    reading: Measurement | None = None
    error: str | None = None  # why there is no first reading


@dataclass
class Unidentified:
    """Something answered at a supported chip's address but is not one scan can name."""

    address: int
    note: str


Probe = Callable[[I2CBus, int, Sleep], "Found | Unidentified | None"]


def _probe_mcp9808(bus: I2CBus, address: int, sleep: Sleep) -> Found | Unidentified | None:
    try:
        identity = MCP9808(bus, address).identify()
    except OSError:
        return None
    except WrongChip as exc:
        return Unidentified(address, f"not an MCP9808: {exc}")
    return Found("mcp9808", identity, True, address)


def _probe_bme280(bus: I2CBus, address: int, sleep: Sleep) -> Found | Unidentified | None:
    try:
        identity = BME280(bus, address, sleep=sleep).identify()
    except OSError:
        return None
    except WrongChip as exc:
        return Unidentified(address, f"not a BME280: {exc}")
    return Found("bme280", identity, True, address)


def _probe_aht20(bus: I2CBus, address: int, sleep: Sleep) -> Found | Unidentified | None:
    try:
        status = i2c_read(bus, address, 1)[0]
    except OSError:
        return None
    if status != 0xFF and status & 0x08:
        return Found(
            "aht20", f"AHT20 (status 0x{status:02x}, calibrated)", False, address,
            note="the AHT20 has no identity register: recognised by its status byte's "
            "calibration bit",
        )
    return Unidentified(
        address,
        f"a device answers with status 0x{status:02x} but its calibration bit (bit 3) is "
        "clear: an uncalibrated AHT20 would need the init command 0xBE, which scan does not "
        "send to an unidentified device; configure kind aht20 if it is one (the driver "
        "initialises it)",
    )


def _probe_htu21d(bus: I2CBus, address: int, sleep: Sleep) -> Found | Unidentified | None:
    try:
        user = bus.read_byte_data(address, 0xE7)
    except OSError:
        return None
    # bit 1 ("disable OTP reload") is 1 after reset on every family member; 0xFF is a bus
    # nobody drives. Anything else is some other chip, which must not get HTU21D commands.
    if user == 0xFF or not user & 0x02:
        return Unidentified(
            address,
            f"user register read (0xE7) gives 0x{user:02x}, not an HTU21D/Si70xx's; "
            "their electronic-id command was not sent",
        )
    try:
        identity = HTU21D(bus, address, sleep=sleep).identify()
    except OSError as exc:
        return Unidentified(address, f"no answer to the HTU21D electronic-id command: {exc}")
    except SensorError as exc:
        return Unidentified(address, f"not an HTU21D/Si70xx: {exc}")
    return Found("htu21d", identity, True, address)


def _probe_sht(bus: I2CBus, address: int, sleep: Sleep) -> Found | Unidentified | None:
    notes = []
    for cls in (SHT4x, SHT3x):
        if address not in cls.addresses:
            continue
        try:
            identity = cls(bus, address, sleep=sleep).identify()
        except OSError:
            continue  # the other family NACKs a command of the wrong length
        except (WrongChip, CrcError) as exc:
            notes.append(f"{cls.kind}: {exc}")
            continue
        return Found(
            cls.kind, identity, True, address,
            note="SHT3x and SHT4x share 0x44/0x45; told apart by which serial-number "
            "command answers with valid CRCs",
        )
    return Unidentified(address, "; ".join(notes)) if notes else None


def _probe_lm75_tmp102(bus: I2CBus, address: int, sleep: Sleep) -> Found | Unidentified | None:
    try:
        raw = swap16(bus.read_word_data(address, 0x00))
        config = bus.read_byte_data(address, 0x01)
    except OSError:
        return None
    shared = "TMP102 and LM75 share 0x48-0x4B; neither has an identity register"
    if address <= 0x4B and config & 0x60 == 0x60:
        return Found(
            "tmp102", f"TMP102 (configuration 0x{config:02x}..)", False, address,
            note=f"{shared}: the read-only resolution bits 6:5 of the configuration "
            "register read 11, as on a TMP102",
        )
    if config & 0xE0 == 0:
        if raw & 0x0060:
            return Found(
                "lm75a", "LM75A-class 11-bit sensor (no identity register)", False, address,
                note="bits below 0.5 °C are set, so it resolves finer than an original LM75",
            )
        return Found(
            "lm75", "LM75 or LM75A (no identity register)", False, address,
            note="an LM75 and an LM75A cannot be told apart from this reading; kind lm75 "
            "reads both correctly (an LM75A then at 0.5 °C steps); run scan again at "
            "another temperature, or use lm75a if the part is an LM75A",
        )
    return Unidentified(
        address,
        f"configuration byte 0x{config:02x} fits neither a TMP102 (bits 6:5 = 11) nor an "
        "LM75 (bits 7:5 = 0): another chip (an ADC, a power monitor?)",
    )


SCD4X_SERIAL = b"\x36\x82"
SCD4X_VARIANT = b"\x20\x2f"
SCD4X_DATA_READY = b"\xe4\xb8"
SCD4X_EXECUTION_S = 0.001
SCD4X_VARIANTS = {0x0: "SCD40", 0x1: "SCD41", 0x5: "SCD43"}


def _probe_scd4x(bus: I2CBus, address: int, sleep: Sleep) -> Found | Unidentified | None:
    def query(command: bytes, words: int, what: str) -> list[int]:
        data = command_read(bus, address, command, 3 * words, SCD4X_EXECUTION_S, sleep)
        return checked_words(data, f"SCD4x {what}")

    try:
        high, mid, low = query(SCD4X_SERIAL, 3, "serial number")
    except CrcError as exc:
        return Unidentified(address, f"not an SCD4x: {exc}")
    except OSError:
        # a measuring SCD4x refuses everything but data-ready, read and stop
        try:
            (ready,) = query(SCD4X_DATA_READY, 1, "data-ready word")
        except (OSError, CrcError):
            return None
        return Found(
            "scd4x", f"SCD4x (measuring; data-ready word 0x{ready:04x})", True, address,
            note="periodic measurement is running (is the agent running?): the serial number "
            "cannot be read without stopping it, which scan does not do",
        )
    serial = f"serial 0x{(high << 32) | (mid << 16) | low:012x}"
    try:
        (variant,) = query(SCD4X_VARIANT, 1, "sensor variant")
    except (OSError, CrcError):
        return Found("scd4x", f"SCD4x {serial} (variant not reported)", True, address)
    name = SCD4X_VARIANTS.get(variant >> 12, f"SCD4x (unknown variant 0x{variant:04x})")
    return Found("scd4x", f"{name} {serial}", True, address)


# every supported I2C kind has a probe; several kinds share one where they share addresses
PROBES: dict[str, Probe] = {
    "mcp9808": _probe_mcp9808,
    "aht20": _probe_aht20,
    "htu21d": _probe_htu21d,
    "sht3x": _probe_sht,
    "sht4x": _probe_sht,
    "tmp102": _probe_lm75_tmp102,
    "lm75": _probe_lm75_tmp102,
    "lm75a": _probe_lm75_tmp102,
    "scd4x": _probe_scd4x,
    "bme280": _probe_bme280,
}


def probes_by_address() -> dict[int, list[Probe]]:
    """For each address a supported chip can have, the probes to run there, in order."""
    out: dict[int, list[Probe]] = {}
    for kind, cls in REGISTRY.items():
        probe = PROBES[kind]
        for address in cls.addresses:
            at = out.setdefault(address, [])
            if probe not in at:
                at.append(probe)
    return dict(sorted(out.items()))


def first_reading(driver: SensorDriver, sleep: Sleep) -> Measurement:
    """A read, waiting out "not ready" answers for up to ``SETTLE_S``."""
    waited = 0.0
    while True:
        try:
            return driver.read()
        except NotReady:
            if waited >= SETTLE_S:
                raise
            sleep(SETTLE_STEP_S)
            waited += SETTLE_STEP_S


def _take_reading(found: Found, driver: SensorDriver, sleep: Sleep) -> None:
    try:
        found.reading = first_reading(driver, sleep)
    except (SensorError, OSError) as exc:
        found.error = str(exc)


def scan_bus(bus: I2CBus, sleep: Sleep) -> tuple[list[Found], list[Unidentified]]:
    """Probe every address a supported chip can have, by the policy in the module doc."""
    found: list[Found] = []
    unknown: list[Unidentified] = []
    for address, probes in probes_by_address().items():
        notes = []
        hit: Found | None = None
        for probe in probes:
            result = probe(bus, address, sleep)
            if isinstance(result, Found):
                hit = result
                break
            if isinstance(result, Unidentified):
                notes.append(result.note)
        if hit is not None:
            _take_reading(hit, open_sensor(hit.kind, bus, address, sleep=sleep), sleep)
            found.append(hit)
        elif notes:
            unknown.append(Unidentified(address, "; ".join(notes)))
    return found, unknown


def scan_sysfs(sysfs: Sysfs, sleep: Sleep, psutil_fallback: bool) -> list[Found]:
    """DS18B20s on the w1 bus and the board's CPU temperature: no probing, the kernel lists
    them."""
    out = []
    for device in list_ds18b20(sysfs):
        probe = DS18B20(sysfs, device)
        hit = Found("ds18b20", probe.identify(), True, device=device)
        _take_reading(hit, probe, sleep)
        out.append(hit)
    board = BoardCpuTemperature(sysfs, psutil_fallback=psutil_fallback)
    try:
        identity = board.identify()
    except (SensorError, OSError):
        return out  # no CPU temperature: nothing to propose
    hit = Found("board", identity, True)
    _take_reading(hit, board, sleep)
    out.append(hit)
    return out


def config_for(found: Found, bus: int) -> str:
    """The ``[[sensors]]`` entry for a found sensor."""
    if found.kind == "board":
        return '[[sensors]]\nname = "board"\nkind = "board"\nrole = "board"\n'
    if found.device is not None:
        name = f"probe_{found.device[-6:]}"
        where = f'device = "{found.device}"\n'
    else:
        address = found.address or 0
        name = f"{found.kind}_{address:02x}"
        where = f"bus = {bus}\naddress = 0x{address:02x}\n"
    return (
        f'[[sensors]]\nname = "{name}"  # rename after where it is\nkind = "{found.kind}"\n'
        f'{where}role = "room"  # or intake, exhaust\n'
    )


# -- reading configured sensors -----------------------------------------------------------------
class SimClock:
    """Simulated time for ``--sim``: it follows the wall clock (so ``--watch`` shows time
    passing), while a driver's sleep only moves it forward, at no real cost."""

    def __init__(self, start: float = 1.0) -> None:
        self._origin = time.monotonic() - start
        self._skipped = 0.0

    def __call__(self) -> float:
        return time.monotonic() - self._origin + self._skipped

    def sleep(self, seconds: float) -> None:
        self._skipped += seconds


def _open_smbus(number: int) -> I2CBus:
    return open_smbus(number)


def _buses_present() -> str:
    found = sorted(glob.glob("/dev/i2c-*"), key=lambda p: int(p.rsplit("-", 1)[-1]))
    return ", ".join(found) or "none (is the I2C interface enabled, i2c-dev loaded?)"


def _reading_dict(r: Reading) -> dict[str, Any]:
    return {
        "quality": r.quality.value, "temperature_c": r.temperature_c,
        "humidity_pct": r.humidity_pct, "pressure_pa": r.pressure_pa, "co2_ppm": r.co2_ppm,
        "detail": r.detail,
    }


def _measurement_dict(m: Measurement | None) -> dict[str, float] | None:
    if m is None:
        return None
    values = {
        "temperature_c": m.temperature_c, "humidity_pct": m.humidity_pct,
        "pressure_pa": m.pressure_pa, "co2_ppm": m.co2_ppm,
    }
    return {k: v for k, v in values.items() if v is not None}


def _values_text(t: float | None, rh: float | None, pa: float | None, co2: float | None) -> str:
    parts = []
    if t is not None:
        parts.append(f"{t:7.2f} °C")
    if rh is not None:
        parts.append(f"{rh:5.1f} %RH")
    if pa is not None:
        parts.append(f"{pa / 100:7.1f} hPa")
    if co2 is not None:
        parts.append(f"{co2:5.0f} ppm CO2")
    return "  ".join(parts)


class ReadSession:
    """The configured sensors, opened once, each behind a ``SensorMonitor``."""

    def __init__(self, cfg: AgentConfig, sim: bool, workdir: Path) -> None:
        self.cfg = cfg
        self.sim = sim
        self.rng = random.Random(7)
        self.sim_sensors = None
        self.clock: Callable[[], float]
        self.sleep: Sleep
        if sim:
            from qrad_agent.sim.sensors import SimSensors

            sim_clock = SimClock()
            self.clock, self.sleep = sim_clock, sim_clock.sleep
            self.sim_sensors = SimSensors(cfg.sensors, sim_clock, workdir)
            sim_clock.sleep(SIM_POWERED_S)
            bus_for: Callable[[int], I2CBus] = self.sim_sensors.bus_for
            sysfs: Sysfs | None = self.sim_sensors.sysfs
        else:
            self.clock, self.sleep = time.monotonic, time.sleep
            # looked up at call time, so tests can put an emulated bus behind it
            bus_for, sysfs = BusPool(lambda number: _open_smbus(number)), None
        self.monitors = [
            SensorMonitor.from_config(
                s, open_configured(s, bus_for=bus_for, sysfs=sysfs, sleep=self.sleep)
            )
            for s in cfg.sensors
        ]
        self.readings: dict[str, Reading] = {}

    def _move_world(self) -> None:
        if self.sim_sensors is not None:
            noise = self.cfg.sim.sensor_noise_k
            self.sim_sensors.set_temperatures(SIM_AIR_C, SIM_BOARD_C, self.rng, noise)

    def round(self) -> bool:
        """Poll every sensor once (waiting out first "not ready" answers); True if all ok."""
        self._move_world()
        now = self.clock()
        for m in self.monitors:
            self.readings[m.name] = m.poll(now)
        waited = 0.0
        while waited < SETTLE_S:
            pending = [m for m in self.monitors if self.readings[m.name].quality is Quality.STALE]
            if not pending:
                break
            self.sleep(SETTLE_STEP_S)
            waited += SETTLE_STEP_S
            now = self.clock()
            for m in pending:
                self.readings[m.name] = m.poll(now)
        return all(r.ok for r in self.readings.values())

    def as_dict(self) -> dict[str, Any]:
        room = fuse_room(self.readings.values())
        sensors = []
        for s, m in zip(self.cfg.sensors, self.monitors, strict=True):
            sensors.append({
                "name": s.name, "kind": s.kind, "role": s.role.value,
                "bus": s.bus if s.kind not in ("ds18b20", "board") else None,
                "address": s.address if s.address is not None else (
                    REGISTRY[s.kind].addresses[0] if s.kind in REGISTRY else None),
                "device": s.device,
                **_reading_dict(self.readings[s.name]),
                "counters": m.counters_dict(),
            })
        return {
            "simulated": self.sim,
            "healthy": all(r.ok for r in self.readings.values()),
            "room": {
                "temperature_c": room.temperature_c, "humidity_pct": room.humidity_pct,
                "co2_ppm": room.co2_ppm, "healthy": room.healthy, "configured": room.configured,
            },
            "sensors": sensors,
        }

    def print_text(self, out: TextIO, source: str) -> None:
        data = self.as_dict()
        print(f"sensors from {source}{' (simulated)' if self.sim else ''}:", file=out)
        for s in data["sensors"]:
            where = s["device"] or (
                f"bus {s['bus']} 0x{s['address']:02x}" if s["address"] is not None else "sysfs"
            )
            c = s["counters"]
            values = _values_text(
                s["temperature_c"], s["humidity_pct"], s["pressure_pa"], s["co2_ppm"]
            )
            print(
                f"  {s['name']:<12} {s['kind']:<8} {s['role']:<8} {where:<16} "
                f"{s['quality']:<16} {values}",
                file=out,
            )
            errors = ", ".join(f"{k} {v}" for k, v in c["errors"].items()) or "none"
            print(
                f"      reads {c['reads']}, good {c['good']}, held {c['held']}, retries "
                f"{c['retries']}, errors: {errors}; identity: {c['identity'] or '-'}",
                file=out,
            )
            if s["detail"]:
                print(f"      {s['detail']}", file=out)
        room = data["room"]
        shown = "none" if room["temperature_c"] is None else f"{room['temperature_c']:.2f} °C"
        print(
            f"room: {shown} from {room['healthy']} of {room['configured']} room sensor(s) "
            "healthy",
            file=out,
        )


# -- commands -------------------------------------------------------------------------------------
def cmd_scan(args: argparse.Namespace) -> int:
    out = sys.stdout
    with contextlib.ExitStack() as stack:
        if args.sim:
            from qrad_agent.sim.sensors import SimSensors

            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qrad-scan-")))
            clock = SimClock()
            bench = [
                s.model_copy(update={"bus": args.bus}) if s.kind in REGISTRY else s
                for s in SIM_BENCH
            ]
            sim = SimSensors(bench, clock, workdir)
            sim.set_temperatures(SIM_AIR_C, SIM_BOARD_C)
            clock.sleep(SIM_POWERED_S)
            bus: I2CBus = sim.bus_for(args.bus)
            sleep: Sleep = clock.sleep
            sysfs, psutil_fallback = sim.sysfs, False
        else:
            try:
                bus = _open_smbus(args.bus)
            except OSError as exc:
                print(
                    f"cannot open I2C bus {args.bus} (/dev/i2c-{args.bus}): "
                    f"{exc.strerror or exc}; buses present: {_buses_present()}",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            sleep, sysfs = time.sleep, Sysfs(HOST_SYSFS_ROOT)
            psutil_fallback = HOST_SYSFS_ROOT == "/"  # psutil reads this machine's own /sys
        found, unknown = scan_bus(bus, sleep)
        found += scan_sysfs(sysfs, sleep, psutil_fallback)
    toml = "\n".join(config_for(f, args.bus) for f in found)
    if args.json:
        print(json.dumps({
            "bus": args.bus,
            "simulated": args.sim,
            "found": [
                {
                    "kind": f.kind, "address": f.address,
                    "address_hex": None if f.address is None else f"0x{f.address:02x}",
                    "device": f.device, "identity": f.identity, "certain": f.certain,
                    "note": f.note, "reading": _measurement_dict(f.reading), "error": f.error,
                    "config": config_for(f, args.bus),
                }
                for f in found
            ],
            "unidentified": [
                {"address": u.address, "address_hex": f"0x{u.address:02x}", "note": u.note}
                for u in unknown
            ],
            "config": toml,
        }, indent=2), file=out)
    else:
        where = f"I2C bus {args.bus}{' (simulated)' if args.sim else ''}"
        print(f"{where}: {len(found)} supported sensor(s) found", file=out)
        for f in found:
            at = f.device or ("sysfs" if f.address is None else f"0x{f.address:02x}")
            how = "identified" if f.certain else "inferred"
            values = (
                _values_text(f.reading.temperature_c, f.reading.humidity_pct,
                             f.reading.pressure_pa, f.reading.co2_ppm)
                if f.reading else f"no reading: {f.error}"
            )
            print(f"  {at:<16} {f.kind:<8} {values}", file=out)
            print(f"      {f.identity} ({how})", file=out)
            if f.note:
                print(f"      {f.note}", file=out)
        for u in unknown:
            print(f"  0x{u.address:02x}  unidentified: {u.note}", file=out)
        if found:
            print("\nPut in the config (qrad-agent.toml):\n", file=out)
            print(toml, file=out)
    return EXIT_OK if found else EXIT_UNHEALTHY


def cmd_read(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config) if args.config else AgentConfig()
    except ConfigError as exc:
        show_config_error(exc)
        return EXIT_USAGE
    source = args.config or "the built-in default config"
    with contextlib.ExitStack() as stack:
        # the simulator's w1 and hwmon trees; unused on hardware
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qrad-read-")))
        try:
            session = ReadSession(cfg, args.sim, workdir)
        except ValueError as exc:  # a config the simulator cannot build (shared addresses)
            print(f"{source}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        rounds = 0
        code = EXIT_OK
        if args.watch:
            # Ctrl-C ends --watch, even when started with SIGINT ignored (as background jobs
            # of a non-interactive shell are)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                code = EXIT_OK if session.round() else EXIT_UNHEALTHY
                rounds += 1
                if args.json:
                    data = session.as_dict()
                    print(json.dumps(data, indent=None if args.watch else 2), flush=True)
                else:
                    if args.watch:
                        print(f"-- {time.strftime('%H:%M:%S')}", flush=True)
                    session.print_text(sys.stdout, source)
                    sys.stdout.flush()
                if args.watch is None or (args.count and rounds >= args.count):
                    break
                time.sleep(args.watch)
        except KeyboardInterrupt:
            pass  # the way out of --watch: report the last round's health
    return code


def _bus_number(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a bus number (0-255)") from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"bus number must be 0-255, got {text}")
    return value


def cmd_sensors(args: argparse.Namespace) -> int:
    if args.sensors_cmd == "scan":
        return cmd_scan(args)
    return cmd_read(args)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sensors`` command (``scan``, ``read``) to the main CLI's subcommands."""
    p = subparsers.add_parser(
        "sensors", help="find sensors on the I2C bus, or read the configured ones",
        description="Exit codes: 0 ok; 1 a configured sensor is unhealthy (read) or nothing "
        "was found (scan); 2 usage or configuration error.",
    )
    sub = p.add_subparsers(dest="sensors_cmd", required=True, metavar="ACTION")
    scan = sub.add_parser(
        "scan", help="probe the addresses of supported chips and print config entries",
        description="Probe only the addresses supported chips can have; identify them by "
        "their identity registers where they exist, never write to a device before it is "
        "identified; list DS18B20s and the CPU temperature from sysfs.",
    )
    scan.add_argument("--bus", type=_bus_number, default=1, help="I2C bus number (default 1)")
    scan.add_argument("--json", action="store_true", help="print one JSON object")
    scan.add_argument("--sim", action="store_true",
                      help="scan an emulated bench with every supported chip")
    read = sub.add_parser(
        "read", help="read every configured sensor: value, quality, counters",
    )
    read.add_argument("-c", "--config", help="config file (default: the built-in config)")
    read.add_argument("--json", action="store_true",
                      help="print JSON (one object per line with --watch)")
    read.add_argument("--watch", type=_positive, metavar="SECONDS",
                      help="read again every SECONDS until Ctrl-C")
    read.add_argument("--count", type=_count, metavar="N",
                      help="with --watch: stop after N rounds")
    read.add_argument("--sim", action="store_true",
                      help="read the configured sensors from emulated chips")
    p.set_defaults(func=cmd_sensors)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qrad_agent.sensors.cli scan|read ...``: the command on its own."""
    parser = argparse.ArgumentParser(prog="qrad-agent")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sensors", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
