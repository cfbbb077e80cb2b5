"""An emulated I2C bus with the ``smbus2.SMBus`` methods drivers use.

Every SMBus call is reduced to the raw I2C transactions a real adapter would put on the wire
(a write of bytes, a read of N bytes), and each chip emulator answers those. So a driver that
reads a register with ``read_word_data`` and one that uses ``i2c_rdwr`` talk to the same chip
model, exactly as on hardware.

Bus-level faults (a chip that NACKs, times out, or is unplugged) are injected here, per
address; chip-level faults (bad CRC, stuck value) live in the chip emulators.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from typing import Any, ClassVar

I2C_M_RD = 0x0001  # the read flag in struct i2c_msg


class EmulatedChip:
    """Base class for chip emulators: the two transactions of the wire protocol.

    ``fault`` injects a chip-level fault from the chip's ``FAULTS``; a fault a chip cannot
    have (a CRC error on a chip without CRC, a typo) is refused, so a test cannot pass by
    injecting nothing.
    """

    address: int = 0
    FAULTS: ClassVar[frozenset[str]] = frozenset({"stuck"})

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        # The chip's own sense of time, for conversion delays; the simulator injects its clock.
        self.clock: Callable[[], float] = clock or (lambda: 0.0)
        self._fault: str | None = None

    @property
    def fault(self) -> str | None:
        return self._fault

    @fault.setter
    def fault(self, value: str | None) -> None:
        if value is not None and value not in self.FAULTS:
            raise ValueError(
                f"{type(self).__name__} cannot emulate fault {value!r}; allowed: "
                f"{', '.join(sorted(self.FAULTS))} (or None)"
            )
        self._fault = value

    def i2c_write(self, data: bytes) -> None:
        raise OSError(errno.EREMOTEIO, "chip does not accept writes")

    def i2c_read(self, length: int) -> bytes:
        raise OSError(errno.EREMOTEIO, "chip does not accept reads")


class RegisterChip(EmulatedChip):
    """A chip addressed through a register pointer (TMP102, LM75, MCP9808, BME280).

    A write's first byte sets the pointer, further bytes are written from there; a read
    returns bytes from the pointer on. ``registers`` maps a pointer to its bytes (MSB first,
    as the chip sends them); subclasses refresh it before a read.
    """

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self.pointer = 0
        self.registers: dict[int, bytes] = {}

    def i2c_write(self, data: bytes) -> None:
        if not data:
            return  # a quick write: only the address phase
        self.pointer = data[0]
        if len(data) > 1:
            self.write_register(self.pointer, bytes(data[1:]))

    def i2c_read(self, length: int) -> bytes:
        self.refresh()
        value = self.registers.get(self.pointer)
        if value is None:
            raise OSError(errno.EREMOTEIO, f"no register 0x{self.pointer:02x}")
        return (value * (length // max(1, len(value)) + 1))[:length]

    def refresh(self) -> None:
        """Update registers from the emulated physical state before a read."""

    def write_register(self, register: int, data: bytes) -> None:
        raise OSError(errno.EREMOTEIO, f"register 0x{register:02x} is read-only")


class EmulatedBus:
    """Stands in for ``smbus2.SMBus(n)``; chips are attached by address."""

    def __init__(self) -> None:
        self.chips: dict[int, EmulatedChip] = {}
        self.bus_faults: dict[int, str] = {}  # address -> "nack" | "timeout" | "disconnect"
        self.transactions = 0

    def attach(self, address: int, chip: EmulatedChip) -> EmulatedChip:
        chip.address = address
        self.chips[address] = chip
        return chip

    def inject(self, address: int, fault: str | None) -> None:
        """Set (or clear with ``None``) a bus fault: ``nack``, ``timeout`` or ``disconnect``."""
        if fault is None:
            self.bus_faults.pop(address, None)
        elif fault in ("nack", "timeout", "disconnect"):
            self.bus_faults[address] = fault
        else:
            raise ValueError(f"unknown bus fault {fault!r}; allowed: nack, timeout, disconnect")

    # -- raw transactions -------------------------------------------------------------------
    def _chip(self, address: int) -> EmulatedChip:
        self.transactions += 1
        fault = self.bus_faults.get(address)
        if fault == "timeout":
            raise OSError(errno.ETIMEDOUT, "Connection timed out")
        chip = self.chips.get(address)
        if chip is None or fault in ("nack", "disconnect"):
            # Linux adapters report an unanswered address as ENXIO or EREMOTEIO; use the latter
            raise OSError(errno.EREMOTEIO, "Remote I/O error")
        return chip

    def write(self, address: int, data: bytes) -> None:
        self._chip(address).i2c_write(bytes(data))

    def read(self, address: int, length: int) -> bytes:
        data = self._chip(address).i2c_read(length)
        if len(data) != length:
            raise OSError(errno.EIO, "short read")
        return data

    # -- the smbus2.SMBus surface -------------------------------------------------------------
    def read_byte(self, i2c_addr: int, force: bool | None = None) -> int:
        return self.read(i2c_addr, 1)[0]

    def write_quick(self, i2c_addr: int, force: bool | None = None) -> None:
        self.write(i2c_addr, b"")

    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        self.write(i2c_addr, bytes([register]))
        return self.read(i2c_addr, 1)[0]

    def read_word_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        self.write(i2c_addr, bytes([register]))
        first, second = self.read(i2c_addr, 2)
        return first | (second << 8)  # SMBus words are little-endian on the wire

    def read_i2c_block_data(
        self, i2c_addr: int, register: int, length: int, force: bool | None = None
    ) -> list[int]:
        self.write(i2c_addr, bytes([register]))
        return list(self.read(i2c_addr, length))

    def write_byte(self, i2c_addr: int, value: int, force: bool | None = None) -> None:
        self.write(i2c_addr, bytes([value]))

    def write_byte_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None:
        self.write(i2c_addr, bytes([register, value]))

    def write_word_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None:
        self.write(i2c_addr, bytes([register, value & 0xFF, value >> 8]))

    def write_i2c_block_data(
        self, i2c_addr: int, register: int, data: list[int], force: bool | None = None
    ) -> None:
        self.write(i2c_addr, bytes([register, *data]))

    def i2c_rdwr(self, *i2c_msgs: Any) -> None:
        """Carry out ``smbus2.i2c_msg`` objects: writes send ``buf``, reads fill it."""
        for msg in i2c_msgs:
            if msg.flags & I2C_M_RD:
                data = self.read(msg.addr, msg.len)
                ctypes.memmove(msg.buf, data, msg.len)
            else:
                self.write(msg.addr, ctypes.string_at(msg.buf, msg.len))

    def close(self) -> None:
        pass

    def __enter__(self) -> EmulatedBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
