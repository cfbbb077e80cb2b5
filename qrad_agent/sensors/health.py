"""Judges every poll of a sensor: turns a driver's result or error into a ``Reading`` with a
quality. Bad readings are never passed on as values.

One ``SensorMonitor`` per configured sensor. Each ``poll(now)``:

1. reads the chip (checking its identity first, and again after it was lost), retrying
   within the poll on I2C errors (``OSError``: NACK, timeout, remote I/O);
2. classifies a failure: ``io_error`` (or ``missing`` if the chip has never answered),
   ``crc_error``, ``wrong_chip``, ``out_of_range``; a chip with no new measurement yet
   (``NotReady``) stands in with its last good value for ``hold_last_good_s``, and is
   ``stale`` after that;
3. judges a value: ``out_of_range`` outside the chip's physical range (humidity outside
   0..100 %, CO2 outside 0..40000 ppm); ``stuck`` when a chip that normally dithers repeats
   one raw value for ``stuck_after_s`` and at least ``STUCK_MIN_REPEATS`` reads;
   ``implausible_rate`` when the temperature moved away from the last accepted one faster
   than the role allows.

The rate check compares with the last *accepted* value, with an allowance that grows with
the time since it was taken (plus a margin for noise and resolution). A refused value never
becomes the reference, so a spike (a flipped bit on a chip without CRC) is refused and the
next normal value passes. But a refusal must not last for ever when the change is real: a
sensor moved to a warmer spot, or a first value read before the chip's first conversion
(a TMP102 reads 0 °C then) that made a wrong reference. So a new level is accepted when
either the allowance has grown to cover it, or the refused values have agreed with each
other (each within the rate of the one before) for ``step_confirm_s``.

``now`` is monotonic seconds supplied by the caller: the monitor reads no clock.
"""

from __future__ import annotations

import errno
import math
from dataclasses import dataclass, field
from typing import Any

from qrad_agent.config import SensorConfig, SensorHealthConfig
from qrad_agent.core.models import Quality, Reading, Role
from qrad_agent.sensors.base import Measurement, NotReady, SensorDriver, SensorError

# Fastest believable temperature change by role when the config does not say (K/min). A room
# with a heater in it moves well under 1 K/min; air at the radiator's intake follows the room
# but sees draughts; its exhaust follows the CPUs' power within a minute; a CPU die moves tens
# of kelvin in a second, so board temperatures get no rate check.
ROLE_RATE_K_PER_MIN: dict[Role, float | None] = {
    Role.ROOM: 2.0,
    Role.INTAKE: 5.0,
    Role.EXHAUST: 30.0,
    Role.BOARD: None,
}
HUMIDITY_RANGE_PCT = (0.0, 100.0)
CO2_RANGE_PPM = (0.0, 40000.0)  # the widest range of the supported CO2 sensors (SCD41)


# Stuck needs this many repeats as well as the time: a dithering chip read rarely (a board
# polling once a minute) can repeat its last bit for a quarter of an hour in a steady room;
# thirty reads without a flip is what dithering does not do.
STUCK_MIN_REPEATS = 30


@dataclass
class SensorCounters:
    """Per-sensor totals since the monitor started, for status and telemetry."""

    reads: int = 0  # polls
    good: int = 0  # polls that produced a fresh ok value
    held: int = 0  # polls answered with the last good value while the chip was not ready
    retries: int = 0  # extra attempts after I2C errors, within polls
    errors: dict[str, int] = field(default_factory=dict)  # quality -> polls
    last_good_at: float | None = None
    last_good: Measurement | None = None


class SensorMonitor:
    """One configured sensor: its driver, its role and its health."""

    def __init__(
        self,
        name: str,
        role: Role,
        driver: SensorDriver,
        settings: SensorHealthConfig | None = None,
    ) -> None:
        self.name = name
        self.role = role
        self.driver = driver
        self.settings = settings or SensorHealthConfig()
        self.counters = SensorCounters()
        self.identity: str | None = None  # set once identify() passed; cleared when lost
        self.last: Reading | None = None
        self.bad_in_a_row = 0
        configured = self.settings.max_rate_k_per_min
        rate = ROLE_RATE_K_PER_MIN[role] if configured is None else configured
        self._rate_k_per_s = rate / 60.0 if rate else None  # None or 0: no rate check
        self._answered = False  # whether the chip has ever answered at all
        self._ref: tuple[float, float] | None = None  # last accepted (temperature, at)
        # refused values that agree with each other: (first refused at, last value, its time)
        self._step: tuple[float, float, float] | None = None
        self._raw: int | None = None
        self._raw_since = 0.0
        self._raw_repeats = 0  # polls since the raw value last changed

    @classmethod
    def from_config(cls, cfg: SensorConfig, driver: SensorDriver) -> SensorMonitor:
        return cls(cfg.name, cfg.role, driver, cfg.health)

    @property
    def healthy(self) -> bool:
        return self.last is not None and self.last.ok

    # -- one poll ---------------------------------------------------------------------------
    def poll(self, now: float) -> Reading:
        self.counters.reads += 1
        try:
            m = self._read_with_retries()
        except NotReady as exc:
            self._answered = True
            reading = self._not_ready(now, str(exc))
        except SensorError as exc:
            if exc.quality is not Quality.IO_ERROR:
                self._answered = True
            reading = self._failed(now, exc.quality, str(exc))
        except OSError as exc:
            reading = self._failed(now, Quality.IO_ERROR, self._describe_os_error(exc))
        else:
            self._answered = True
            reading = self._judge(now, m)
        self.last = reading
        return reading

    def _read_with_retries(self) -> Measurement:
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            try:
                if self.identity is None:
                    self.identity = self.driver.identify()
                return self.driver.read()
            except OSError:
                if attempt + 1 == attempts:
                    raise
                self.counters.retries += 1
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _describe_os_error(self, exc: OSError) -> str:
        code = errno.errorcode.get(exc.errno or 0, "")
        what = exc.strerror or str(exc) or type(exc).__name__
        tries = self.settings.retries + 1
        return f"bus error on {tries} attempt(s): {what}" + (f" ({code})" if code else "")

    def _judge(self, now: float, m: Measurement) -> Reading:
        t = m.temperature_c
        if t is not None:
            lo, hi = self.driver.temperature_range_c
            if not lo <= t <= hi:  # NaN fails both comparisons, so it lands here too
                return self._failed(
                    now, Quality.OUT_OF_RANGE,
                    f"{t:.2f} °C is outside the chip's range {lo:g}..{hi:g} °C",
                )
        rh = m.humidity_pct
        if rh is not None and not HUMIDITY_RANGE_PCT[0] <= rh <= HUMIDITY_RANGE_PCT[1]:
            return self._failed(now, Quality.OUT_OF_RANGE, f"humidity {rh:.1f} % outside 0..100")
        co2 = m.co2_ppm
        if co2 is not None and not CO2_RANGE_PPM[0] <= co2 <= CO2_RANGE_PPM[1]:
            return self._failed(
                now, Quality.OUT_OF_RANGE, f"CO2 {co2:.0f} ppm outside 0..{CO2_RANGE_PPM[1]:.0f}"
            )
        if m.raw is not None and self.driver.dithers:
            if m.raw != self._raw:
                self._raw, self._raw_since, self._raw_repeats = m.raw, now, 0
            else:
                self._raw_repeats += 1
            if self._raw_repeats >= STUCK_MIN_REPEATS \
                    and now - self._raw_since > self.settings.stuck_after_s:
                return self._failed(
                    now, Quality.STUCK,
                    f"raw value 0x{m.raw:04x} unchanged for {now - self._raw_since:.0f} s; "
                    f"this chip normally dithers (limit {self.settings.stuck_after_s:g} s)",
                )
        if t is not None and self._rate_k_per_s is not None and self._ref is not None:
            refused = self._check_rate(now, t)
            if refused is not None:
                return self._failed(now, Quality.IMPLAUSIBLE_RATE, refused)
        if t is not None:
            self._ref = (t, now)
        c = self.counters
        c.good += 1
        c.last_good_at = now
        c.last_good = m
        self.bad_in_a_row = 0
        return Reading(
            self.name, self.role, Quality.OK, now, t, rh, m.pressure_pa, co2,
        )

    def _check_rate(self, now: float, t: float) -> str | None:
        """Why ``t`` is refused as too fast a change, or None to accept it."""
        assert self._ref is not None and self._rate_k_per_s is not None
        rate, margin = self._rate_k_per_s, self.settings.rate_margin_k
        ref_t, ref_at = self._ref
        elapsed = max(0.0, now - ref_at)
        allowed = rate * elapsed + margin
        if abs(t - ref_t) <= allowed:
            self._step = None
            return None
        step = self._step
        if step is not None and abs(t - step[1]) <= rate * max(0.0, now - step[2]) + margin:
            held_s = now - step[0]
            if held_s >= self.settings.step_confirm_s:
                self._step = None
                return None  # a level that holds is real: it becomes the reference
            self._step = (step[0], t, now)
        else:
            held_s = 0.0
            self._step = (now, t, now)
        return (
            f"{t:.2f} °C is {t - ref_t:+.2f} K from the last accepted {ref_t:.2f} °C "
            f"{elapsed:.0f} s ago; at most ±{allowed:.2f} K believable ({rate * 60:g} K/min "
            f"+ {margin:g} K); accepted if the new level holds "
            f"{self.settings.step_confirm_s:g} s (held {held_s:.0f} s)"
        )

    def _not_ready(self, now: float, why: str) -> Reading:
        c = self.counters
        if c.last_good is not None and c.last_good_at is not None:
            age = now - c.last_good_at
            if age <= self.settings.hold_last_good_s:
                # the chip is fine, it only has nothing newer (SCD4x: one sample per 5 s)
                c.held += 1
                g = c.last_good
                return Reading(
                    self.name, self.role, Quality.OK, now, g.temperature_c, g.humidity_pct,
                    g.pressure_pa, g.co2_ppm, detail=f"last good value, {age:.1f} s old: {why}",
                )
            why = f"{why}; last good value {age:.0f} s old (held at most " \
                f"{self.settings.hold_last_good_s:g} s)"
        return self._failed(now, Quality.STALE, why)

    def _failed(self, now: float, quality: Quality, detail: str) -> Reading:
        if quality is Quality.IO_ERROR:
            # the chip went away: whatever answers next at its address is identified again
            self.identity = None
            if not self._answered:
                quality = Quality.MISSING
                detail = f"never answered: {detail}"
        errors = self.counters.errors
        errors[quality.value] = errors.get(quality.value, 0) + 1
        self.bad_in_a_row += 1
        return Reading(self.name, self.role, quality, now, detail=detail)

    # -- for status and telemetry -----------------------------------------------------------
    def counters_dict(self) -> dict[str, Any]:
        """JSON-ready counters: totals, errors by quality, the last good time and value."""
        c = self.counters
        g = c.last_good
        last_good = None
        if g is not None:
            values = {
                "temperature_c": g.temperature_c, "humidity_pct": g.humidity_pct,
                "pressure_pa": g.pressure_pa, "co2_ppm": g.co2_ppm,
            }
            last_good = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
        return {
            "identity": self.identity,
            "quality": self.last.quality.value if self.last else None,
            "reads": c.reads,
            "good": c.good,
            "held": c.held,
            "retries": c.retries,
            "errors": dict(sorted(c.errors.items())),
            "errors_total": sum(c.errors.values()),
            "bad_in_a_row": self.bad_in_a_row,
            "last_good_at": c.last_good_at,
            "last_good": last_good,
        }
