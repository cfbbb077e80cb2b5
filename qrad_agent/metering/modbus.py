"""A Modbus RTU electricity meter (Eastron SDM120/SDM230 built in) through ``minimalmodbus``.

The meter is read once per control tick: active power first, with ``retries`` more attempts,
then each configured extra (voltage, current, energy) once. A line that loses a frame
(timeout), garbles one (CRC error), or a meter that is unplugged or never was, is counted in
``stats`` and shows in the reading's quality; ``read`` never raises. When the power register
fails the extras are skipped, so a dead meter costs at most ``(1 + retries) * timeout_s``
of the tick, and a port that cannot be opened is retried every ``REOPEN_S`` seconds only.

Eastron meters keep every quantity as a 32-bit IEEE float in two input registers (function
code 04), high word first; addresses from the SDM120 and SDM230 manuals, which agree on
these. Other meters describe their registers in the config (``registers``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from qrad_agent.actuators.settings import ModbusMeterConfig, RegisterSpec
from qrad_agent.core.models import Quality
from qrad_agent.metering import METER, PowerReading

log = logging.getLogger(__name__)

REOPEN_S = 30.0  # how long a port that could not be opened is left before trying again

_EASTRON = {
    "voltage_v": RegisterSpec(address=0x0000),
    "current_a": RegisterSpec(address=0x0006),
    "power_w": RegisterSpec(address=0x000C),
    "power_factor": RegisterSpec(address=0x001E),
    "frequency_hz": RegisterSpec(address=0x0046),
    "energy_kwh": RegisterSpec(address=0x0048),  # import active energy
}
REGISTER_MAPS: dict[str, dict[str, RegisterSpec]] = {
    "sdm120": dict(_EASTRON),
    "sdm230": dict(_EASTRON),
    "custom": {},
}


class InstrumentLike(Protocol):
    """What the meter uses of ``minimalmodbus.Instrument``."""

    def read_float(
        self, registeraddress: int, functioncode: int = ..., number_of_registers: int = ...,
        byteorder: int = ...,
    ) -> float: ...
    def read_long(
        self, registeraddress: int, functioncode: int = ..., signed: bool = ...,
        byteorder: int = ..., number_of_registers: int = ...,
    ) -> int: ...
    def read_register(
        self, registeraddress: int, number_of_decimals: int = ..., functioncode: int = ...,
        signed: bool = ...,
    ) -> int | float: ...


@dataclass
class MeterStats:
    reads: int = 0  # calls of read()
    ok: int = 0  # reads that gave a power figure
    requests: int = 0  # Modbus requests sent
    retries: int = 0  # requests that repeated a failed one
    timeouts: int = 0  # no answer within timeout_s
    crc_errors: int = 0  # an answer whose checksum was wrong
    bad_responses: int = 0  # an answer of the wrong shape, or a value that is not a number
    exceptions: int = 0  # the meter answered with a Modbus exception (wrong register map?)
    port_errors: int = 0  # the serial port could not be opened or used
    last_error: str = ""


class _PortError(Exception):
    pass


def open_instrument(cfg: ModbusMeterConfig) -> InstrumentLike:
    """A ``minimalmodbus.Instrument`` on the configured port (opens the port)."""
    import minimalmodbus

    raw = minimalmodbus.Instrument(cfg.port, cfg.slave, mode=minimalmodbus.MODE_RTU)
    raw.serial.baudrate = cfg.baudrate
    raw.serial.bytesize = 8
    raw.serial.parity = cfg.parity
    raw.serial.stopbits = cfg.stopbits
    raw.serial.timeout = cfg.timeout_s
    # bytes left on the line by noise or a late answer must not be taken for the next answer
    raw.clear_buffers_before_each_transaction = True
    raw.close_port_after_each_call = False
    inst: InstrumentLike = raw
    return inst


class ModbusMeter:
    name = METER

    def __init__(
        self,
        cfg: ModbusMeterConfig,
        *,
        instrument_factory: Callable[[ModbusMeterConfig], InstrumentLike] | None = None,
    ) -> None:
        self.cfg = cfg
        self.registers = {**REGISTER_MAPS[cfg.model], **cfg.registers}
        missing = [q for q in ("power_w", *cfg.extras) if q not in self.registers]
        if missing:
            raise ValueError(
                f"meter model {cfg.model!r} has no register for {missing}: add them under "
                "registers, or leave them out of extras"
            )
        self.stats = MeterStats()
        self._factory = instrument_factory or open_instrument
        self._inst: InstrumentLike | None = None
        self._retry_open_at = -math.inf
        self._answered = False  # the meter has answered at least once since start

    def read(self, now: float) -> PowerReading:
        self.stats.reads += 1
        try:
            inst = self._instrument(now)
        except _PortError as exc:
            return PowerReading(self.name, now, None, Quality.MISSING, str(exc))
        watts, quality, why = self._read_quantity(inst, "power_w", 1 + self.cfg.retries)
        if watts is None:
            if quality is Quality.IO_ERROR and not self._answered:
                quality = Quality.MISSING  # never heard from: nothing at that address
            return PowerReading(self.name, now, None, quality, why)
        self._answered = True
        self.stats.ok += 1
        extras: dict[str, float] = {}
        for q in self.cfg.extras:
            value, _, _ = self._read_quantity(inst, q, 1)
            if value is not None:
                extras[q] = value
        return PowerReading(self.name, now, watts, Quality.OK, "", extras)

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "port": c.port, "model": c.model, "slave": c.slave,
            "serial": f"{c.baudrate} {8}{c.parity}{c.stopbits}", "timeout_s": c.timeout_s,
            "stats": asdict(self.stats),
        }

    def close(self) -> None:
        inst, self._inst = self._inst, None
        serial = getattr(inst, "serial", None)
        if serial is not None:
            try:
                serial.close()
            except Exception as exc:  # closing a port that vanished must not stop the agent
                log.debug("meter: closing %s: %s", self.cfg.port, exc)

    # -- steps -----------------------------------------------------------------------------
    def _instrument(self, now: float) -> InstrumentLike:
        if self._inst is not None:
            return self._inst
        if now < self._retry_open_at:
            wait = self._retry_open_at - now
            raise _PortError(f"{self.stats.last_error} (next try in {wait:.0f} s)")
        try:
            self._inst = self._factory(self.cfg)
        except Exception as exc:  # SerialException, OSError, ValueError for a bad port name
            self.stats.port_errors += 1
            self._retry_open_at = now + REOPEN_S
            self.stats.last_error = f"cannot open the meter's port {self.cfg.port}: {exc}"
            log.warning("meter: %s", self.stats.last_error)
            raise _PortError(self.stats.last_error) from exc
        return self._inst

    def _read_quantity(
        self, inst: InstrumentLike, quantity: str, attempts: int
    ) -> tuple[float | None, Quality, str]:
        import minimalmodbus
        import serial

        spec = self.registers[quantity]
        quality, why = Quality.IO_ERROR, ""
        for attempt in range(attempts):
            self.stats.requests += 1
            if attempt:
                self.stats.retries += 1
            try:
                value = _decode(inst, spec)
            # minimalmodbus' errors are OSErrors too: the most specific come first
            except minimalmodbus.NoResponseError:
                self.stats.timeouts += 1
                quality = Quality.IO_ERROR
                why = f"{quantity}: no answer within {self.cfg.timeout_s} s"
            except minimalmodbus.InvalidResponseError as exc:
                if "checksum" in str(exc).lower():
                    self.stats.crc_errors += 1
                    quality, why = Quality.CRC_ERROR, f"{quantity}: answer with a bad CRC"
                else:
                    self.stats.bad_responses += 1
                    quality, why = Quality.IO_ERROR, f"{quantity}: malformed answer: {exc}"
            except minimalmodbus.SlaveReportedException as exc:
                # the meter understood and refused: repeating will not change its mind
                self.stats.exceptions += 1
                self.stats.last_error = (
                    f"{quantity}: the meter refused register 0x{spec.address:04X} "
                    f"(function {spec.functioncode}): {exc}; check the register map"
                )
                return None, Quality.IO_ERROR, self.stats.last_error
            except (serial.SerialException, OSError) as exc:
                self.stats.port_errors += 1
                self.stats.last_error = f"{quantity}: serial port {self.cfg.port} failed: {exc}"
                self.close()  # reopened at the next read
                return None, Quality.IO_ERROR, self.stats.last_error
            else:
                if math.isfinite(value):
                    return value, Quality.OK, ""
                self.stats.bad_responses += 1
                quality, why = Quality.OUT_OF_RANGE, f"{quantity}: the meter sent {value}"
            self.stats.last_error = why
        return None, quality, f"{why} (after {attempts} attempts)" if attempts > 1 else why


def _decode(inst: InstrumentLike, spec: RegisterSpec) -> float:
    import minimalmodbus

    order = (
        minimalmodbus.BYTEORDER_BIG if spec.word_order == "big"
        else minimalmodbus.BYTEORDER_LITTLE_SWAP  # low word first, each word big-endian
    )
    if spec.kind == "float32":
        raw: float = inst.read_float(spec.address, spec.functioncode, 2, order)
    elif spec.kind in ("int32", "uint32"):
        raw = inst.read_long(spec.address, spec.functioncode, spec.kind == "int32", order)
    else:
        raw = inst.read_register(spec.address, 0, spec.functioncode, spec.kind == "int16")
    return float(raw) * spec.scale
