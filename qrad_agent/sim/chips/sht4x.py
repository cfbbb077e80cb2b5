"""SHT4x emulator: the SHT3x protocol (see sim/chips/sht3x.py) with one-byte commands and
humidity scaled as RH = -6 + 125 * S / 65535.

Commands: 0xFD / 0xF6 / 0xE0 measure at high / medium / low precision (8.3, 4.5, 1.6 ms
maximum), 0x89 serial number, 0x94 soft reset. Faults as for the SHT3x.
"""

from __future__ import annotations

from typing import ClassVar

from qrad_agent.sim.chips.sht3x import SensirionChip


class SHT4xChip(SensirionChip):
    name: ClassVar[str] = "SHT4x"
    command_length: ClassVar[int] = 1
    measure_s: ClassVar[dict[int, float]] = {0xFD: 0.0083, 0xF6: 0.0045, 0xE0: 0.0016}
    serial_command: ClassVar[int] = 0x89
    reset_command: ClassVar[int] = 0x94
    rh_offset: ClassVar[float] = -6.0
    rh_span: ClassVar[float] = 125.0
