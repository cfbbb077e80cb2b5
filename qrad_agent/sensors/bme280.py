"""Bosch BME280: temperature, pressure and humidity, read in forced mode.

Raw readings are meaningless without the chip's own trimming coefficients, read once from
its non-volatile memory. The compensation is Bosch's integer arithmetic from the datasheet
(§4.2.3 and §8.2): 32-bit for temperature (producing ``t_fine``, which both other channels
need), 64-bit for pressure, 32-bit for humidity. Python integers do not overflow, and the
formulas only shift and truncate where the C code does, so results match the C reference.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from qrad_agent.sensors.base import I2CBus, Measurement, NotReady, SensorError, WrongChip

REG_CALIB_A = 0x88  # 0x88..0xA1: 26 bytes
REG_CHIP_ID = 0xD0
REG_CALIB_B = 0xE1  # 0xE1..0xE7: 7 bytes
REG_CTRL_HUM = 0xF2
REG_STATUS = 0xF3
REG_CTRL_MEAS = 0xF4
REG_CONFIG = 0xF5
REG_DATA = 0xF7  # 0xF7..0xFE: press msb lsb xlsb, temp msb lsb xlsb, hum msb lsb

CHIP_ID = 0x60
OTHER_CHIPS = {
    0x56: "a BMP280 engineering sample (temperature and pressure only)",
    0x57: "a BMP280 engineering sample (temperature and pressure only)",
    0x58: "a BMP280 (temperature and pressure only, no humidity)",
    0x61: "a BME680 (gas sensor, different register map)",
}

STATUS_MEASURING = 0x08
STATUS_IM_UPDATE = 0x01  # NVM being copied to the calibration registers
OVERSAMPLING_X1 = 0b001
MODE_FORCED = 0b01
CTRL_HUM_X1 = OVERSAMPLING_X1
CTRL_MEAS_FORCED_X1 = (OVERSAMPLING_X1 << 5) | (OVERSAMPLING_X1 << 2) | MODE_FORCED

SKIPPED_20BIT = 0x80000  # reset value of the pressure and temperature registers
SKIPPED_16BIT = 0x8000  # reset value of the humidity register


def max_measurement_s(osrs_t: int = 1, osrs_p: int = 1, osrs_h: int = 1) -> float:
    """Datasheet appendix B: the longest a forced measurement takes, for oversampling factors
    (1, 2, 4, 8, 16; 0 = channel skipped)."""
    ms = 1.25 + 2.3 * osrs_t
    if osrs_p:
        ms += 2.3 * osrs_p + 0.575
    if osrs_h:
        ms += 2.3 * osrs_h + 0.575
    return ms / 1000.0


MEASURE_S = max_measurement_s()
POLL_S = 0.002
POLLS = 5
NVM_COPY_S = 0.002


@dataclass(frozen=True, slots=True)
class Calibration:
    """The trimming coefficients (``dig_*`` in the datasheet), as signed/unsigned integers."""

    t1: int
    t2: int
    t3: int
    p1: int
    p2: int
    p3: int
    p4: int
    p5: int
    p6: int
    p7: int
    p8: int
    p9: int
    h1: int = 0
    h2: int = 0
    h3: int = 0
    h4: int = 0
    h5: int = 0
    h6: int = 0

    @classmethod
    def from_registers(cls, block_a: bytes, block_b: bytes) -> Calibration:
        """Decode 0x88..0xA1 (26 bytes) and 0xE1..0xE7 (7 bytes)."""
        if len(block_a) != 26 or len(block_b) != 7:
            raise ValueError(
                f"calibration blocks must be 26 and 7 bytes, got {len(block_a)} and {len(block_b)}"
            )
        t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, h1 = struct.unpack(
            "<HhhHhhhhhhhhxB", block_a
        )
        h2, h3, e4, e5, e6, h6 = struct.unpack("<hBbBbb", block_b)
        # dig_H4 and dig_H5 are 12-bit signed values sharing the nibbles of 0xE5; the sign
        # comes from the full bytes 0xE4 and 0xE6, hence the signed unpack of those two.
        h4 = e4 * 16 | (e5 & 0x0F)
        h5 = e6 * 16 | (e5 >> 4)
        return cls(t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, h1, h2, h3, h4, h5, h6)


def _div_trunc(a: int, b: int) -> int:
    """C integer division (truncates toward zero; Python's // floors)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def compensate_temperature(adc_t: int, cal: Calibration) -> tuple[int, int]:
    """Return (temperature in 0.01 °C, t_fine)."""
    var1 = (((adc_t >> 3) - (cal.t1 << 1)) * cal.t2) >> 11
    d = (adc_t >> 4) - cal.t1
    var2 = (((d * d) >> 12) * cal.t3) >> 14
    t_fine = var1 + var2
    return (t_fine * 5 + 128) >> 8, t_fine


def compensate_pressure(adc_p: int, cal: Calibration, t_fine: int) -> int:
    """Return pressure in Pa as unsigned Q24.8 (divide by 256); 0 if the calibration is void."""
    var1 = t_fine - 128000
    var2 = var1 * var1 * cal.p6
    var2 += (var1 * cal.p5) << 17
    var2 += cal.p4 << 35
    var1 = ((var1 * var1 * cal.p3) >> 8) + ((var1 * cal.p2) << 12)
    var1 = (((1 << 47) + var1) * cal.p1) >> 33
    if var1 == 0:
        return 0  # the datasheet's guard against dividing by zero
    p = 1048576 - adc_p
    p = _div_trunc(((p << 31) - var2) * 3125, var1)
    var1 = (cal.p9 * (p >> 13) * (p >> 13)) >> 25
    var2 = (cal.p8 * p) >> 19
    return ((p + var1 + var2) >> 8) + (cal.p7 << 4)


def compensate_humidity(adc_h: int, cal: Calibration, t_fine: int) -> int:
    """Return relative humidity in % as unsigned Q22.10 (divide by 1024), clamped to 0..100."""
    x = t_fine - 76800
    offset = (((adc_h << 14) - (cal.h4 << 20) - (cal.h5 * x)) + 16384) >> 15
    gain = (((((x * cal.h6) >> 10) * (((x * cal.h3) >> 11) + 32768)) >> 10) + 2097152) * cal.h2
    x = offset * ((gain + 8192) >> 14)
    x -= ((((x >> 15) * (x >> 15)) >> 7) * cal.h1) >> 4
    x = max(0, min(419430400, x))
    return x >> 12


class BME280:
    kind: ClassVar[str] = "bme280"
    addresses: ClassVar[tuple[int, ...]] = (0x76, 0x77)
    temperature_range_c: ClassVar[tuple[float, float]] = (-40.0, 85.0)
    dithers: ClassVar[bool] = True

    def __init__(
        self, bus: I2CBus, address: int = 0x76, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.bus = bus
        self.address = address
        self.sleep = sleep
        self.calibration: Calibration | None = None

    def identify(self) -> str:
        chip_id = self.bus.read_byte_data(self.address, REG_CHIP_ID)
        if chip_id != CHIP_ID:
            what = OTHER_CHIPS.get(chip_id, "not a Bosch sensor this driver knows")
            raise WrongChip(
                f"chip id 0x{chip_id:02x} at 0x{self.address:02x} is {what}; "
                f"a BME280 reads 0x{CHIP_ID:02x} in register 0xD0"
            )
        return f"BME280 (chip id 0x{chip_id:02x})"

    def read(self) -> Measurement:
        cal = self.calibration or self._load_calibration()
        # ctrl_hum only takes effect on the following write to ctrl_meas
        self.bus.write_byte_data(self.address, REG_CTRL_HUM, CTRL_HUM_X1)
        self.bus.write_byte_data(self.address, REG_CTRL_MEAS, CTRL_MEAS_FORCED_X1)
        self.sleep(MEASURE_S)
        for _ in range(POLLS + 1):
            status = self.bus.read_byte_data(self.address, REG_STATUS)
            if not status & STATUS_MEASURING:
                break
            self.sleep(POLL_S)
        else:
            waited_ms = (MEASURE_S + POLLS * POLL_S) * 1000
            raise NotReady(
                f"BME280 at 0x{self.address:02x} still measuring (status 0x{status:02x}) "
                f"{waited_ms:.1f} ms after a forced measurement was started"
            )
        d = self.bus.read_i2c_block_data(self.address, REG_DATA, 8)
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
        adc_h = (d[6] << 8) | d[7]
        # One channel at its reset value can be a genuine reading; all three cannot.
        if (adc_p, adc_t, adc_h) == (SKIPPED_20BIT, SKIPPED_20BIT, SKIPPED_16BIT):
            raise NotReady(
                f"BME280 at 0x{self.address:02x}: data registers hold their reset values, "
                f"no measurement has run"
            )
        centi_c, t_fine = compensate_temperature(adc_t, cal)
        return Measurement(
            temperature_c=centi_c / 100.0,
            pressure_pa=compensate_pressure(adc_p, cal, t_fine) / 256.0,
            humidity_pct=compensate_humidity(adc_h, cal, t_fine) / 1024.0,
            raw=adc_t,
        )

    def _load_calibration(self) -> Calibration:
        self.identify()  # a BMP280's calibration would give nonsense humidity
        for _ in range(POLLS):
            if not self.bus.read_byte_data(self.address, REG_STATUS) & STATUS_IM_UPDATE:
                break
            self.sleep(NVM_COPY_S)
        else:
            raise NotReady(
                f"BME280 at 0x{self.address:02x} is still copying its calibration from NVM"
            )
        block_a = bytes(self.bus.read_i2c_block_data(self.address, REG_CALIB_A, 26))
        block_b = bytes(self.bus.read_i2c_block_data(self.address, REG_CALIB_B, 7))
        cal = Calibration.from_registers(block_a, block_b)
        if cal.t1 == 0 or cal.p1 == 0:
            raise SensorError(
                f"BME280 at 0x{self.address:02x}: calibration reads dig_T1={cal.t1}, "
                f"dig_P1={cal.p1}; both must be non-zero (bytes {block_a.hex(' ')})"
            )
        # Filter off and no standby: each forced measurement stands alone. config is only
        # written reliably in sleep mode, which a chip between forced measurements is in.
        self.bus.write_byte_data(self.address, REG_CONFIG, 0x00)
        self.calibration = cal
        return cal
