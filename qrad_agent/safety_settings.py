"""Configuration of the safety supervisor (``[safety]``) and of autotuning (``[autotune]``).

Every threshold has a safe default, so a config without these sections gets full protection.
Bounds refuse values that would switch a protection off by accident (a room limit of 80 °C,
a hold of a week); the supervisor's documentation (docs/safety.md) gives each threshold's
meaning, its detection bound and the reaction.

Until ``AgentConfig`` carries these sections, build them with their defaults:
``SafetyConfig()``, ``AutotuneConfig()``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from qrad_agent.section import Section as _Section


class CpuSafetyConfig(_Section):
    """CPU temperature: reduce heat, then stop all compute, relative to the critical limit."""

    # used only when neither hwmon (temp*_crit) nor a thermal zone names a critical limit
    critical_c: Annotated[float, Field(ge=60, le=130)] = 100.0
    # the heat cap starts to fall this far below critical …
    reduce_margin_k: Annotated[float, Field(ge=5, le=40)] = 15.0
    # … and every worker stops this far below it
    stop_margin_k: Annotated[float, Field(ge=1, le=30)] = 5.0
    # after a stop, compute resumes once the CPU is this far below the reduce threshold
    resume_hysteresis_k: Annotated[float, Field(ge=2, le=40)] = 10.0
    # how fast the cap falls while above the reduce threshold, and rises once well below it
    # (demand share per second: 0.01 = the whole range in 100 s)
    reduce_rate_per_s: Annotated[float, Field(gt=0, le=1)] = 0.01
    recover_rate_per_s: Annotated[float, Field(gt=0, le=1)] = 0.002
    # the cap compute resumes at after a stop (it then rises at recover_rate_per_s)
    resume_cap: Annotated[float, Field(ge=0.05, le=1)] = 0.5
    # a configured CPU sensor that gives no value this long caps the heat at sensor_lost_cap:
    # the kernel's own thermal trip still protects the silicon, but nobody watches the margin
    sensor_lost_s: Annotated[float, Field(ge=10, le=3600)] = 60.0
    sensor_lost_cap: Annotated[float, Field(ge=0, le=1)] = 0.5
    # this many stops within latch_window_s latch the stop until a person resets it
    latch_after_stops: Annotated[int, Field(ge=1, le=100)] = 3
    latch_window_s: Annotated[float, Field(ge=60, le=86400)] = 3600.0

    @model_validator(mode="after")
    def _ordered(self) -> CpuSafetyConfig:
        if self.stop_margin_k >= self.reduce_margin_k:
            raise ValueError(
                f"stop_margin_k ({self.stop_margin_k}) must be below reduce_margin_k "
                f"({self.reduce_margin_k}): the cap falls first, the stop comes closer to "
                "critical"
            )
        return self


class RoomSafetyConfig(_Section):
    """Over-temperature of the room and, where one is fitted, the exhaust/surface sensor."""

    max_c: Annotated[float, Field(ge=20, le=35)] = 28.0
    hysteresis_k: Annotated[float, Field(gt=0, le=5)] = 1.0
    exhaust_max_c: Annotated[float, Field(ge=30, le=90)] = 60.0
    exhaust_hysteresis_k: Annotated[float, Field(gt=0, le=20)] = 5.0


class FrostConfig(_Section):
    """Frost protection: heat below ``frost_c`` in every mode, ``off`` included."""

    enabled: bool = True
    frost_c: Annotated[float, Field(ge=3, le=12)] = 7.0
    hysteresis_k: Annotated[float, Field(gt=0, le=5)] = 1.0
    demand: Annotated[float, Field(gt=0, le=1)] = 1.0


class FailsafeConfig(_Section):
    """The ladder taken when room sensors fail: the other room sensors, then a bounded hold
    of the demand the room needed, then ``safe_demand`` with frost protection from the
    board's own temperature."""

    # the room sensor whose loss is the first step down; unset = the first room sensor
    primary: str | None = None
    # a sensor must be healthy this long before the ladder steps back up (no event flapping)
    recover_s: Annotated[float, Field(ge=0, le=3600)] = 60.0
    # the hold: the mean demand of the last hold_basis_s with a room sensor, at most
    # hold_max_demand, for at most hold_s after the last room sensor was lost
    hold_s: Annotated[float, Field(ge=0, le=6 * 3600)] = 3600.0
    hold_basis_s: Annotated[float, Field(ge=60, le=6 * 3600)] = 1800.0
    hold_max_demand: Annotated[float, Field(ge=0, le=1)] = 0.7
    # after the hold: this demand (0 = none), with frost protection from the board
    safe_demand: Annotated[float, Field(ge=0, le=0.5)] = 0.0
    # the CPU idles this far above the room; learned while a room sensor works
    board_idle_offset_k: Annotated[float, Field(ge=0, le=40)] = 8.0
    # a board-judged frost burst lasts this long, then the CPU idles this long to measure again
    board_frost_burst_s: Annotated[float, Field(ge=60, le=7200)] = 900.0
    board_settle_s: Annotated[float, Field(ge=60, le=7200)] = 600.0


class RoomModelConfig(_Section):
    """The room as first order plus dead time around its working point: ``gain_k`` kelvin per
    unit of demand, time constant ``tau_s``, dead time ``dead_time_s``. Defaults suit the
    shipped rooms; ``qrad-agent tune --apply`` stores the fitted ones."""

    gain_k: Annotated[float, Field(gt=0, le=100)] = 5.0
    tau_s: Annotated[float, Field(ge=60, le=86400)] = 4500.0
    dead_time_s: Annotated[float, Field(ge=0, le=7200)] = 120.0


class HeatingCheckConfig(_Section):
    """Heater-not-heating and sensor-misplaced detection (see docs/safety.md)."""

    enabled: bool = True
    # demand at or above this counts as heating hard
    high_demand: Annotated[float, Field(ge=0.5, le=1)] = 0.9
    # deficits within band_k of the target are a radiator at its capacity, not a fault
    band_k: Annotated[float, Field(ge=0.5, le=10)] = 2.0
    # while heating hard below target - band_k the room must gain gain_k within gain_time_s
    # (unset: from the room model, see docs/safety.md) …
    gain_k: Annotated[float, Field(ge=0.1, le=5)] = 0.5
    gain_time_s: Annotated[float, Field(ge=300, le=4 * 3600)] | None = None
    # … and once it stops gaining, the deficit beyond the band may add up to max_error_kh
    max_error_kh: Annotated[float, Field(gt=0, le=48)] = 1.0
    # the cap after a trip: the demand that held the room, plus this share, within bounds
    cap_margin: Annotated[float, Field(ge=0, le=1)] = 0.1
    min_cap: Annotated[float, Field(ge=0, le=1)] = 0.2
    max_cap: Annotated[float, Field(ge=0, le=1)] = 0.7
    # warming the radiator cannot explain: over window_s, a rise this far above twice the
    # room model's fastest warming at the most demand applied in the window
    window_s: Annotated[float, Field(ge=300, le=4 * 3600)] = 1800.0
    unexplained_rise_k: Annotated[float, Field(ge=0.3, le=10)] = 1.0
    # with three or more room sensors: one this far from the others' median this long
    outlier_k: Annotated[float, Field(ge=0.5, le=20)] = 3.0
    outlier_s: Annotated[float, Field(ge=60, le=86400)] = 1800.0
    # a distrusted sensor is trusted again after agreeing with the others this well this long
    agree_k: Annotated[float, Field(ge=0.1, le=5)] = 0.5
    agree_s: Annotated[float, Field(ge=60, le=86400)] = 1800.0

    @model_validator(mode="after")
    def _caps(self) -> HeatingCheckConfig:
        if self.min_cap > self.max_cap:
            raise ValueError(f"min_cap ({self.min_cap}) must not exceed max_cap ({self.max_cap})")
        return self


class StallConfig(_Section):
    """Loop stall: a control tick later than ``factor`` control periods after the last one."""

    factor: Annotated[float, Field(ge=1.5, le=100)] = 3.0
    # on-time ticks in a row before the heat comes back
    recover_ticks: Annotated[int, Field(ge=1, le=100)] = 3


class SafetyConfig(_Section):
    cpu: CpuSafetyConfig = Field(default_factory=CpuSafetyConfig)
    room: RoomSafetyConfig = Field(default_factory=RoomSafetyConfig)
    frost: FrostConfig = Field(default_factory=FrostConfig)
    failsafe: FailsafeConfig = Field(default_factory=FailsafeConfig)
    heating: HeatingCheckConfig = Field(default_factory=HeatingCheckConfig)
    stall: StallConfig = Field(default_factory=StallConfig)
    room_model: RoomModelConfig = Field(default_factory=RoomModelConfig)


class AutotuneConfig(_Section):
    """The relay experiment of ``qrad-agent tune`` (core/autotune.py)."""

    # the relay switches when the room leaves setpoint ± hysteresis_k: above sensor noise and
    # quantisation (a TMP102 count is 0.0625 K), small enough to stay comfortable
    hysteresis_k: Annotated[float, Field(ge=0.02, le=1)] = 0.15
    # the relay's swing around its bias, in demand; the bias adapts so that heating and cooling
    # half-periods match (rooms heat faster than they cool, or the other way round)
    amplitude: Annotated[float, Field(ge=0.1, le=0.5)] = 0.5
    min_amplitude: Annotated[float, Field(ge=0.05, le=0.5)] = 0.15
    # cycles measured after the discarded ones; the experiment ends when they agree
    cycles: Annotated[int, Field(ge=2, le=20)] = 4
    discard_cycles: Annotated[int, Field(ge=0, le=10)] = 1
    # how alike the measured cycles' periods and amplitudes must be (relative spread)
    tolerance: Annotated[float, Field(gt=0, le=1)] = 0.25
    # after the cycles, the relay stays high until the room is step_rise_k above the setpoint
    # (at most step_max_s): the cycles alone show how fast the room warms, the longer step
    # also how far it would go, which separates the room's gain from its time constant
    step_rise_k: Annotated[float, Field(ge=0.2, le=3)] = 1.0
    step_max_s: Annotated[float, Field(ge=0, le=6 * 3600)] = 5400.0
    # abort: the room this far above the setpoint, or above the room safety limit
    max_excursion_k: Annotated[float, Field(ge=0.3, le=5)] = 2.0
    # abort: the experiment takes longer than this (a real room: hours)
    max_s: Annotated[float, Field(ge=600, le=3 * 86400)] = 12 * 3600.0
    # abort: no healthy room temperature for this long
    sensor_gap_s: Annotated[float, Field(ge=10, le=3600)] = 300.0
    # SIMC's closed-loop time constant: its "tight" choice is the dead time, but a room's
    # dead time is a minute or two and a loop that fast chatters on the sensor's last bit and
    # the slot hysteresis; so never below this (larger is gentler, see docs/safety.md)
    tau_c_s: Annotated[float, Field(ge=60, le=4 * 3600)] = 900.0

    @model_validator(mode="after")
    def _amplitudes(self) -> AutotuneConfig:
        if self.step_rise_k >= self.max_excursion_k:
            raise ValueError(
                f"step_rise_k ({self.step_rise_k}) must be below max_excursion_k "
                f"({self.max_excursion_k}): the final step must end before the abort limit"
            )
        if self.min_amplitude > self.amplitude:
            raise ValueError(
                f"min_amplitude ({self.min_amplitude}) must not exceed amplitude "
                f"({self.amplitude})"
            )
        return self
