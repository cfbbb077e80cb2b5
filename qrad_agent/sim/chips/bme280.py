"""BME280 emulator: the register map of datasheet §5, forced and normal mode, conversion time.

The emulator holds physical values (``temperature_c``, ``pressure_pa``, ``humidity_pct``) and
must produce the raw ADC codes a real chip with its calibration would. It finds them by
bisection against the same integer compensation the driver uses, so the driver reads back
the nearest value the chip's resolution allows. Resolution follows the oversampling setting
(16 bit at x1, up to 20 bit at x16), as on the chip.

Protocol details kept: reads auto-increment through the map; a write is pairs of
(register, value); ``ctrl_hum`` only takes effect at the next ``ctrl_meas`` write; a forced
measurement sets status bit 3 until its data are in 0xF7..0xFE and returns the chip to sleep
mode; a skipped channel reads its reset value (0x80000, 0x8000); 0xB6 to 0xE0 resets.

Faults (``self.fault``): ``wrong_id`` (answers 0x58 like a BMP280), ``stuck`` (data registers
stop changing), ``busy`` (the measuring bit never clears). The BME280's I2C protocol has no
CRC, so there is no ``bad_crc``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import ClassVar

from qrad_agent.sensors.bme280 import (
    Calibration,
    compensate_humidity,
    compensate_pressure,
    compensate_temperature,
)
from qrad_agent.sim.chips.bus import RegisterChip

# A realistic part: the temperature and pressure trimming of the BMP280 datasheet's worked
# example, humidity trimming typical of BME280s in the field.
DEFAULT_CALIBRATION = Calibration(
    t1=27504, t2=26435, t3=-1000,
    p1=36477, p2=-10685, p3=3024, p4=2855, p5=140, p6=-7, p7=15500, p8=-14600, p9=6000,
    h1=75, h2=370, h3=0, h4=309, h5=50, h6=30,
)  # fmt: skip

OVERSAMPLING = {0: 0, 1: 1, 2: 2, 3: 4, 4: 8}  # register field -> factor; 5..7 also mean 16
WRITABLE = (0xE0, 0xF2, 0xF4, 0xF5)
TIME_EPS = 1e-9  # simulated clocks add floats; a wait of exactly the conversion time suffices


def _factor(field: int) -> int:
    return OVERSAMPLING.get(field, 16)


def typical_measurement_s(osrs_t: int, osrs_p: int, osrs_h: int) -> float:
    """Datasheet appendix B, typical time of one measurement for oversampling factors."""
    ms = 1.0 + 2.0 * osrs_t
    if osrs_p:
        ms += 2.0 * osrs_p + 0.5
    if osrs_h:
        ms += 2.0 * osrs_h + 0.5
    return ms / 1000.0


def pack_calibration(cal: Calibration) -> tuple[bytes, bytes]:
    """The inverse of ``Calibration.from_registers``: bytes for 0x88..0xA1 and 0xE1..0xE7."""
    for name, value in (("h4", cal.h4), ("h5", cal.h5)):
        if not -2048 <= value <= 2047:
            raise ValueError(
                f"dig_{name.upper()} is a 12-bit signed value: -2048..2047, got {value}"
            )
    block_a = struct.pack(
        "<HhhHhhhhhhhhBB",
        cal.t1, cal.t2, cal.t3, cal.p1, cal.p2, cal.p3, cal.p4, cal.p5, cal.p6, cal.p7, cal.p8,
        cal.p9, 0, cal.h1,
    )  # fmt: skip
    e4 = (cal.h4 >> 4) & 0xFF
    e5 = ((cal.h5 & 0x0F) << 4) | (cal.h4 & 0x0F)
    e6 = (cal.h5 >> 4) & 0xFF
    block_b = struct.pack("<hBBBBb", cal.h2, cal.h3, e4, e5, e6, cal.h6)
    return block_a, block_b


def _nearest_code(value_of: Callable[[int], float], target: float, codes: int) -> int:
    """The code in 0..codes-1 whose value is nearest ``target``, for a monotonic ``value_of``."""
    increasing = value_of(codes - 1) >= value_of(0)
    lo, hi = 0, codes - 1
    while lo < hi:  # first code whose value reaches the target (in the direction of travel)
        mid = (lo + hi) // 2
        v = value_of(mid)
        if (v >= target) if increasing else (v <= target):
            hi = mid
        else:
            lo = mid + 1
    candidates = [c for c in (lo - 1, lo) if 0 <= c < codes]
    return min(candidates, key=lambda c: abs(value_of(c) - target))


class BME280Chip(RegisterChip):
    FAULTS: ClassVar[frozenset[str]] = frozenset({"stuck", "wrong_id", "busy"})

    def __init__(
        self,
        temperature_c: float = 21.0,
        humidity_pct: float = 45.0,
        pressure_pa: float = 101325.0,
        clock: Callable[[], float] | None = None,
        calibration: Calibration = DEFAULT_CALIBRATION,
        chip_id: int = 0x60,
    ) -> None:
        super().__init__(clock)
        self.temperature_c = temperature_c
        self.humidity_pct = humidity_pct
        self.pressure_pa = pressure_pa
        self.calibration = calibration
        self.chip_id = chip_id
        self.memory = bytearray(256)
        block_a, block_b = pack_calibration(calibration)
        self.memory[0x88 : 0x88 + 26] = block_a
        self.memory[0xE1 : 0xE1 + 7] = block_b
        self.measuring_until: float | None = None
        self.normal_since: float | None = None
        self.measurements = 0
        self._ctrl_hum_latched = 0  # ctrl_hum as of the last ctrl_meas write
        self._reset()


    # -- wire -----------------------------------------------------------------------------
    def i2c_write(self, data: bytes) -> None:
        if not data:
            return
        self.pointer = data[0]
        # after the first register, a write continues as (register, value) pairs
        pairs = [(data[0], data[1])] if len(data) > 1 else []
        rest = data[2:]
        pairs += [(rest[i], rest[i + 1]) for i in range(0, len(rest) - 1, 2)]
        for register, value in pairs:
            self.write_register(register, bytes([value]))

    def i2c_read(self, length: int) -> bytes:
        self.refresh()
        start = self.pointer
        out = bytes(self.memory[(start + i) & 0xFF] for i in range(length))
        self.pointer = (start + length) & 0xFF
        return out

    def write_register(self, register: int, data: bytes) -> None:
        value = data[0]
        if register not in WRITABLE:
            return  # the chip acknowledges and ignores writes to read-only registers
        if register == 0xE0:
            if value == 0xB6:
                self._reset()
            return
        self.refresh()
        if register == 0xF2:
            self.memory[0xF2] = value & 0x07
        elif register == 0xF5:
            self.memory[0xF5] = value & 0xFD
        elif register == 0xF4:
            self.memory[0xF4] = value
            self._ctrl_hum_latched = self.memory[0xF2]
            mode = value & 0x03
            now = self.clock()
            if mode in (0b01, 0b10):
                self.measuring_until = now + self._measurement_s()
                self.normal_since = None
            elif mode == 0b11:
                self.normal_since = now
                self.measuring_until = None
            else:
                self.normal_since = None

    # -- model ----------------------------------------------------------------------------
    def refresh(self) -> None:
        now = self.clock()
        measuring = False
        if self.measuring_until is not None:
            if now >= self.measuring_until - TIME_EPS and self.fault != "busy":
                self.measuring_until = None
                self._store_conversion()
                self.memory[0xF4] &= 0xFC  # forced mode ends in sleep mode
            else:
                measuring = True
        elif self.normal_since is not None:
            if self.fault == "busy":
                measuring = True
            elif now - self.normal_since >= self._measurement_s() - TIME_EPS:
                self._store_conversion()
        self.memory[0xD0] = 0x58 if self.fault == "wrong_id" else self.chip_id
        self.memory[0xF3] = 0x08 if measuring else 0x00

    def raw_codes(self) -> tuple[int, int, int]:
        """(adc_P, adc_T, adc_H) for the present values at the present oversampling."""
        cal = self.calibration
        ctrl = self.memory[0xF4]
        osrs_t, osrs_p = _factor(ctrl >> 5), _factor((ctrl >> 2) & 0x07)
        osrs_h = _factor(self._ctrl_hum_latched & 0x07)
        if not osrs_t:
            return 0x80000, 0x80000, 0x8000  # every channel needs t_fine from temperature
        t_bits = 15 + osrs_t.bit_length()  # x1 -> 16 bit ... x16 -> 20 bit
        t_shift = 20 - t_bits
        t_code = _nearest_code(
            lambda c: compensate_temperature(c << t_shift, cal)[1] / 5120.0,
            self.temperature_c,
            1 << t_bits,
        )
        adc_t = t_code << t_shift
        t_fine = compensate_temperature(adc_t, cal)[1]
        adc_p = 0x80000
        if osrs_p:
            p_bits = 15 + osrs_p.bit_length()
            p_shift = 20 - p_bits
            p_code = _nearest_code(
                lambda c: compensate_pressure(c << p_shift, cal, t_fine) / 256.0,
                self.pressure_pa,
                1 << p_bits,
            )
            adc_p = p_code << p_shift
        adc_h = 0x8000
        if osrs_h:
            adc_h = _nearest_code(
                lambda c: compensate_humidity(c, cal, t_fine) / 1024.0, self.humidity_pct, 1 << 16
            )
        return adc_p, adc_t, adc_h

    def _store_conversion(self) -> None:
        self.measurements += 1
        if self.fault == "stuck":
            return  # the data registers keep what they had
        adc_p, adc_t, adc_h = self.raw_codes()
        data = bytes(
            [
                adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0x0F) << 4,
                adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0x0F) << 4,
                adc_h >> 8, adc_h & 0xFF,
            ]
        )  # fmt: skip
        self.memory[0xF7:0xFF] = data

    def _measurement_s(self) -> float:
        ctrl = self.memory[0xF4]
        return typical_measurement_s(
            _factor(ctrl >> 5), _factor((ctrl >> 2) & 0x07), _factor(self._ctrl_hum_latched)
        )

    def _reset(self) -> None:
        for register in (0xF2, 0xF3, 0xF4, 0xF5):
            self.memory[register] = 0x00
        self.memory[0xF7:0xFF] = bytes([0x80, 0x00, 0x00, 0x80, 0x00, 0x00, 0x80, 0x00])
        self._ctrl_hum_latched = 0
        self.measuring_until = None
        self.normal_since = None
        self.memory[0xD0] = self.chip_id
