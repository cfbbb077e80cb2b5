"""Autotuning: a relay experiment on the room, a first-order-plus-dead-time model fitted to
it, and PI(D) gains from that model. Pure: the experiment is a state machine fed ``now``
and the room temperature; it returns the demand to apply and never reads a clock.

The experiment (Åström and Hägglund's relay feedback): the demand switches between
``bias + d`` and ``bias - d`` whenever the room leaves ``setpoint ± hysteresis``. The room
then oscillates around the setpoint at about its ultimate period, gently (a few tenths of a
kelvin), and every cycle says how fast the room answers the heat.

- The hysteresis keeps sensor noise from switching the relay back and forth.
- A room usually heats faster than it cools, or the other way round; with a fixed bias the
  two half-cycles differ and the oscillation is lopsided. After each cycle the bias moves by
  ``d * (t_high - t_low) / period``, towards the demand that holds the setpoint, until both
  halves are equally long; ``d`` shrinks where the bias comes near 0 or 1.
- A half-cycle that does not end (the bias was far off: the room settles on one side of
  the band, as after an airing or when the sun comes out) nudges the bias by ``d / 2``
  towards the other side after twice the usual cycle length, and again every half of that;
  so does a room that drifts half of ``max_excursion_k`` past the setpoint (at most every
  ten minutes), before it comes near the abort limit. A nudged cycle does not count as a
  measurement.
- Once ``cycles`` cycles after the ``discard_cycles`` first agree in period, amplitude and
  symmetry within ``tolerance``, the relay stays high until the room is ``step_rise_k``
  above the setpoint (at most ``step_max_s``): short cycles show how fast the room warms,
  but not how far it would go; the longer step separates the gain from the time constant.
  A step that turns cold under full heat (a window opened) ends there, and only what came
  before its peak is fitted. Then it is done. It aborts on over-temperature (setpoint +
  ``max_excursion_k``, or the room limit), on ``max_s``, on a safety trip reported by the
  caller, or when no room temperature came for ``sensor_gap_s``.

The model (``fit_fopdt``): ``tau dy/dt = -y + K u(t - theta) + const`` fitted to the measured
cycles by output error (the model is simulated from the recorded demand and compared with
the recorded temperature, which is robust to sensor noise), over a grid of ``tau`` and
``theta``, with the model's state started on its periodic steady state.

The gains (``simc_pi``, ``simc_pid``): Skogestad's SIMC rules on the model, with the loop's
known extra lags (the controller's input filter, half a control period) added to the dead
time; Ziegler-Nichols from the ultimate gain and period for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from qrad_agent.safety_settings import AutotuneConfig

Phase = Literal["running", "step", "done", "aborted"]


@dataclass(frozen=True, slots=True)
class Fopdt:
    """Room temperature per unit of heat demand: gain ``gain_k`` (K), time constant ``tau_s``,
    dead time ``dead_time_s``."""

    gain_k: float
    tau_s: float
    dead_time_s: float

    @property
    def slope_k_per_h(self) -> float:
        """Initial warming rate after a full (0 -> 1) demand step, K/h."""
        return self.gain_k / self.tau_s * 3600.0


@dataclass(frozen=True, slots=True)
class PidGains:
    """Parallel-form gains in the agent's units: demand per K, per K·s, per K/s."""

    rule: str
    kp: float
    ki: float
    kd: float = 0.0

    @property
    def ti_s(self) -> float:
        return self.kp / self.ki if self.ki > 0 else math.inf

    @property
    def td_s(self) -> float:
        return self.kd / self.kp if self.kp > 0 else 0.0


@dataclass(frozen=True, slots=True)
class RelayCycle:
    """One full relay cycle, from a switch to high to the next."""

    start: float
    period_s: float
    high_s: float  # time at bias + d
    low_s: float  # time at bias - d
    amplitude_k: float  # half the peak-to-peak temperature swing
    bias: float
    d: float
    nudged: bool = False  # the bias was nudged within the cycle: not a clean measurement

    @property
    def asymmetry(self) -> float:
        return abs(self.high_s - self.low_s) / self.period_s


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    temperature_c: float
    demand: float


@dataclass(frozen=True, slots=True)
class StepResponse:
    """The fitted model under the proposed gains, for a setpoint step: what to expect."""

    step_k: float
    overshoot_k: float
    settle_s: float  # until the error stays within 10 % of the step
    rise_s: float  # until 90 % of the step is first reached
    peak_demand_change: float  # the largest demand change the step causes


@dataclass(frozen=True, slots=True)
class TuneResult:
    model: Fopdt
    fit_rms_k: float
    ultimate_gain: float  # demand per K
    ultimate_period_s: float
    bias: float
    amplitude: float
    cycles: tuple[RelayCycle, ...]
    simc_pi: PidGains
    simc_pid: PidGains
    zn_pi: PidGains
    zn_pid: PidGains
    tau_c_s: float
    extra_lag_s: float  # input filter and sampling, added to the model's dead time for gains

    @property
    def recommended(self) -> PidGains:
        """SIMC PI: a room's dead time is small next to its time constant, where derivative
        action buys little and amplifies the sensor's quantisation."""
        return self.simc_pi


@dataclass(slots=True)
class _Progress:
    phase: Phase = "running"
    reason: str = ""
    high: bool = False
    switched_at: float = 0.0
    cycle_start: float | None = None
    high_s: float = 0.0
    t_min: float = math.inf
    t_max: float = -math.inf
    last_temp_at: float = 0.0
    nudge_at: float = math.inf
    nudged_at: float = -math.inf
    nudged: bool = False
    step_peak: float = -math.inf
    step_peak_at: float = 0.0
    cycles: list[RelayCycle] = field(default_factory=list)


class RelayAutotune:
    def __init__(
        self,
        cfg: AutotuneConfig,
        setpoint_c: float,
        now: float,
        bias: float | None = None,
        room_max_c: float = 28.0,
    ) -> None:
        if not math.isfinite(setpoint_c) or not 5.0 <= setpoint_c <= room_max_c - 1.0:
            raise ValueError(
                f"setpoint {setpoint_c!r} °C cannot be tuned at; allowed: 5 to "
                f"{room_max_c - 1.0:g} °C (1 K below the room limit {room_max_c:g} °C)"
            )
        self.cfg = cfg
        self.setpoint_c = setpoint_c
        self.room_max_c = room_max_c
        self.started = now
        self.bias = min(1.0 - cfg.min_amplitude, max(cfg.min_amplitude,
                                                     0.5 if bias is None else bias))
        self.d = self._amplitude(self.bias)
        self.samples: list[Sample] = []
        self.result: TuneResult | None = None
        self._p = _Progress(last_temp_at=now)

    # -- state -----------------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        return self._p.phase

    @property
    def reason(self) -> str:
        """Why the experiment aborted (or how it ended)."""
        return self._p.reason

    @property
    def cycles(self) -> list[RelayCycle]:
        return list(self._p.cycles)

    @property
    def running(self) -> bool:
        return self._p.phase in ("running", "step")

    @property
    def demand(self) -> float:
        if self._p.phase == "step":
            return 1.0
        if self._p.phase != "running":
            return 0.0
        return self.bias + self.d if self._p.high else self.bias - self.d

    def measured(self) -> list[RelayCycle]:
        return self._p.cycles[self.cfg.discard_cycles:]

    def progress(self, now: float) -> str:
        """One line for people watching the experiment."""
        p = self._p
        elapsed = now - self.started
        n = len(self.measured())
        last = p.cycles[-1] if p.cycles else None
        cyc = (f", last cycle {last.period_s / 60:.1f} min ±{last.amplitude_k:.2f} K"
               if last else "")
        if p.phase == "step":
            return (f"step: {elapsed / 3600:.2f} h, full demand until the room is "
                    f"{self.cfg.step_rise_k:g} K above the setpoint "
                    f"({(now - p.switched_at) / 60:.0f} of at most "
                    f"{self.cfg.step_max_s / 60:.0f} min), {len(p.cycles)} cycles measured")
        return (f"{p.phase}: {elapsed / 3600:.2f} h, relay {'high' if p.high else 'low'} "
                f"({self.demand:.0%}), bias {self.bias:.2f} ± {self.d:.2f}, "
                f"{len(p.cycles)} cycles ({n}/{self.cfg.cycles} measured){cyc}")

    def abort(self, now: float, reason: str) -> None:
        if self.running:
            self._p.phase = "aborted"
            self._p.reason = reason

    # -- the experiment --------------------------------------------------------------------
    def update(self, now: float, temperature_c: float | None, trip: str | None = None) -> float:
        """Feed the room temperature (None when no healthy sensor answered) and any safety
        trip; returns the demand to apply (0 once the experiment has ended)."""
        cfg, p = self.cfg, self._p
        if not self.running:
            return 0.0
        if trip:
            self.abort(now, f"safety trip: {trip}")
            return 0.0
        if now - self.started > cfg.max_s:
            self.abort(now, f"time limit: no {cfg.cycles} agreeing cycles within "
                            f"{cfg.max_s / 3600:g} h ({len(p.cycles)} cycles seen)")
            return 0.0
        if temperature_c is None:
            if now - p.last_temp_at > cfg.sensor_gap_s:
                self.abort(now, f"no room temperature for {now - p.last_temp_at:.0f} s "
                                f"(limit {cfg.sensor_gap_s:g} s)")
            return self.demand
        p.last_temp_at = now
        limit = min(self.setpoint_c + cfg.max_excursion_k, self.room_max_c)
        if temperature_c >= limit:
            self.abort(now, f"over-temperature: room at {temperature_c:.2f} °C reached "
                            f"{limit:.2f} °C (setpoint + {cfg.max_excursion_k:g} K or the "
                            "room limit)")
            return 0.0
        if p.phase == "step":
            self.samples.append(Sample(now, temperature_c, self.demand))
            if temperature_c > p.step_peak:
                p.step_peak, p.step_peak_at = temperature_c, now
            if temperature_c < p.step_peak - 2.0 * cfg.hysteresis_k:
                # colder under full heat: something else happened; keep what came before
                self.samples = [s for s in self.samples if s.at <= p.step_peak_at]
                self._finish(now)
                self._p.reason += "; the final step was disturbed and cut short"
                return 0.0
            if (temperature_c >= self.setpoint_c + cfg.step_rise_k
                    or now - p.switched_at >= cfg.step_max_s):
                self._finish(now)
                return 0.0
            return self.demand
        if not self.samples:
            p.high = temperature_c < self.setpoint_c
            p.switched_at = now
            p.nudge_at = now + self._stuck_after()
        if p.phase == "running":
            far = cfg.max_excursion_k / 2.0
            drifting = (temperature_c < self.setpoint_c - far if p.high
                        else temperature_c > self.setpoint_c + far)
            if now >= p.nudge_at or (drifting and now >= p.nudged_at + 600.0):
                self._nudge(now)
        p.t_min = min(p.t_min, temperature_c)
        p.t_max = max(p.t_max, temperature_c)
        if p.high and temperature_c > self.setpoint_c + cfg.hysteresis_k:
            p.high = False
            p.high_s = now - p.switched_at
            p.switched_at = now
            p.nudge_at = now + self._stuck_after()
        elif not p.high and temperature_c < self.setpoint_c - cfg.hysteresis_k:
            p.high = True
            if p.cycle_start is not None:
                self._close_cycle(now)
                if self._agreed():
                    p.phase = "step"
                    p.switched_at = now
                    p.step_peak, p.step_peak_at = temperature_c, now
                    if cfg.step_max_s <= 0:
                        self._finish(now)
                        return 0.0
                    self.samples.append(Sample(now, temperature_c, self.demand))
                    return self.demand
            p.cycle_start = now
            p.switched_at = now
            p.nudge_at = now + self._stuck_after()
            p.t_min = p.t_max = temperature_c
        self.samples.append(Sample(now, temperature_c, self.demand))
        return self.demand

    def _amplitude(self, bias: float) -> float:
        return max(self.cfg.min_amplitude, min(self.cfg.amplitude, bias, 1.0 - bias))

    def _stuck_after(self) -> float:
        """How long a half-cycle may last before the bias is nudged: twice the last cycle
        (a half is about half a cycle), or ``max_s / 6`` before the first one."""
        cycles = self._p.cycles
        return 2.0 * cycles[-1].period_s if cycles else self.cfg.max_s / 6.0

    def _nudge(self, now: float) -> None:
        p = self._p
        step = self.d / 2.0 if p.high else -self.d / 2.0  # stuck low: more heat, and back
        lo = self.cfg.min_amplitude
        self.bias = min(1.0 - lo, max(lo, self.bias + step))
        self.d = self._amplitude(self.bias)
        p.nudged = True
        p.nudged_at = now
        p.nudge_at = now + self._stuck_after() / 2.0

    def _close_cycle(self, now: float) -> None:
        p = self._p
        assert p.cycle_start is not None
        period = now - p.cycle_start
        low_s = now - p.switched_at
        cycle = RelayCycle(p.cycle_start, period, p.high_s, low_s,
                           (p.t_max - p.t_min) / 2.0, self.bias, self.d, p.nudged)
        p.cycles.append(cycle)
        p.nudged = False
        # the bias moves towards the demand that makes both halves equally long
        shift = self.d * (p.high_s - low_s) / period
        lo = self.cfg.min_amplitude
        self.bias = min(1.0 - lo, max(lo, self.bias + shift))
        self.d = self._amplitude(self.bias)

    def _agreed(self) -> bool:
        cfg = self.cfg
        measured = self.measured()
        if len(measured) < cfg.cycles:
            return False
        last = measured[-cfg.cycles:]
        return (not any(c.nudged for c in last)
                and _spread([c.period_s for c in last]) <= cfg.tolerance
                and _spread([c.amplitude_k for c in last]) <= cfg.tolerance
                and all(c.asymmetry <= cfg.tolerance for c in last))

    def _finish(self, now: float) -> None:
        self._p.phase = "done"
        self._p.reason = f"{len(self.measured())} cycles agreed"

    def analyse(self, input_filter_s: float = 0.0, period_s: float = 0.0) -> TuneResult:
        """Fit the model and compute the gains (once the experiment is ``done``).

        ``input_filter_s`` and ``period_s`` are the controller's input filter time constant
        and control period: lags the relay did not see but the PID will.
        """
        if self._p.phase != "done":
            raise ValueError(f"the relay experiment is {self._p.phase}"
                             + (f" ({self._p.reason})" if self._p.reason else "")
                             + "; gains come only from a completed experiment")
        last = self.measured()[-self.cfg.cycles:]
        start = last[0].start
        model, rms = fit_fopdt(self.samples, start, max(c.period_s for c in last))
        amplitude = sum(c.amplitude_k for c in last) / len(last)
        d = sum(c.d for c in last) / len(last)
        pu = sum(c.period_s for c in last) / len(last)
        ku = 4.0 * d / (math.pi * max(amplitude, 1e-6))
        extra = input_filter_s + period_s / 2.0
        tau_c = max(model.dead_time_s + extra, self.cfg.tau_c_s)
        self.result = TuneResult(
            model=model, fit_rms_k=rms, ultimate_gain=ku, ultimate_period_s=pu,
            bias=self.bias, amplitude=d, cycles=tuple(last),
            simc_pi=simc_pi(model, tau_c, extra), simc_pid=simc_pid(model, tau_c, extra),
            zn_pi=PidGains("ziegler-nichols-pi", 0.45 * ku, 0.45 * ku / (pu / 1.2)),
            zn_pid=PidGains("ziegler-nichols-pid", 0.6 * ku, 0.6 * ku / (pu / 2.0),
                            0.6 * ku * pu / 8.0),
            tau_c_s=tau_c, extra_lag_s=extra,
        )
        return self.result


def _spread(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return (max(values) - min(values)) / mean if mean > 0 else math.inf


# -- the model -----------------------------------------------------------------------------
def _resample(samples: Sequence[Sample], step_s: float) -> tuple[list[float], list[float]]:
    """Bin means of temperature and demand on a regular grid: the fit then weighs every
    stretch of time alike, however irregular the ticks were, and noise averages down."""
    t0 = samples[0].at
    bins = int((samples[-1].at - t0) // step_s) + 1
    sum_y, sum_u, count = [0.0] * bins, [0.0] * bins, [0] * bins
    for s in samples:
        k = int((s.at - t0) // step_s)
        sum_y[k] += s.temperature_c
        sum_u[k] += s.demand
        count[k] += 1
    ys: list[float] = []
    us: list[float] = []
    for k in range(bins):
        if count[k]:
            ys.append(sum_y[k] / count[k])
            us.append(sum_u[k] / count[k])
        else:  # a gap (bin 0 always holds the first sample): carry the last values on
            ys.append(ys[-1])
            us.append(us[-1])
    return ys, us


def fit_fopdt(
    samples: Sequence[Sample], measured_from: float, longest_period_s: float
) -> tuple[Fopdt, float]:
    """Fit ``tau dy/dt = -y + K u(t - theta) + c`` to the samples from ``measured_from`` on.

    Output error over a grid of tau (log-spaced, 2 min to 12 h) and theta (0 to a quarter of
    the longest cycle), then a finer grid around the best; for each pair the model's state
    starts on its periodic steady state over the first cycle, and K, c (with a linear drift)
    come from linear least squares. Returns the model and the RMS of its error (K).
    """
    if len(samples) < 10:
        raise ValueError(f"{len(samples)} samples cannot fit a model; a relay experiment "
                         "records one per control tick")
    spacing = (samples[-1].at - samples[0].at) / (len(samples) - 1)
    step = max(30.0, spacing)
    ys, us = _resample(samples, step)
    first = max(0, int((measured_from - samples[0].at) // step))
    period_bins = max(2, round(longest_period_s / step))
    max_delay = max(0, min(first, period_bins // 4))
    if len(ys) - first < period_bins:
        raise ValueError("too few samples after the discarded cycles to fit a model")

    def sse(tau: float, delay: int) -> tuple[float, float]:
        a = math.exp(-step / tau)
        b = 1.0 - a
        # periodic steady state of the filter over the first measured cycle
        x = 0.0
        for k in range(first, first + period_bins):
            x = a * x + b * us[k - delay]
        x = x / (1.0 - a ** period_bins)
        xs = []
        for k in range(first, len(ys)):
            xs.append(x)
            x = a * x + b * us[k - delay]
        gain, err = _regress(xs, ys[first:])
        return err, gain

    taus = [120.0 * (43200.0 / 120.0) ** (i / 47) for i in range(48)]
    best = (math.inf, 0.0, 1.0, 0)  # sse, gain, tau, delay
    for delay in range(max_delay + 1):
        for tau in taus:
            err, gain = sse(tau, delay)
            if gain > 0 and err < best[0]:
                best = (err, gain, tau, delay)
    _, _, tau0, delay0 = best
    ratio = (43200.0 / 120.0) ** (1 / 47)
    for tau in (tau0 * ratio ** (i / 10) for i in range(-10, 11)):
        err, gain = sse(tau, delay0)
        if gain > 0 and err < best[0]:
            best = (err, gain, tau, delay0)
    err, gain, tau, delay = best
    if not math.isfinite(err):
        raise ValueError("no model fits the experiment (the room did not answer the heat)")
    rms = math.sqrt(err / max(1, len(ys) - first))
    return Fopdt(gain, tau, delay * step), rms


def _regress(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares ``y = c + r t + K x`` (t = sample index): the gain ``K`` and the sum of
    squared errors. The drift ``r`` takes up what the first-order model cannot: walls still
    warming or cooling, the weather, over an experiment of hours."""
    n = len(xs)
    # centred time keeps the normal equations well conditioned
    mid = (n - 1) / 2.0
    s_t = s_x = s_y = s_tt = s_tx = s_xx = s_ty = s_xy = 0.0
    for i in range(n):
        t = i - mid
        x, y = xs[i], ys[i]
        s_t += t
        s_x += x
        s_y += y
        s_tt += t * t
        s_tx += t * x
        s_xx += x * x
        s_ty += t * y
        s_xy += x * y
    m = [[float(n), s_t, s_x, s_y], [s_t, s_tt, s_tx, s_ty], [s_x, s_tx, s_xx, s_xy]]
    sol = _solve3(m)
    if sol is None:
        return 0.0, math.inf
    c, r, gain = sol
    err = 0.0
    for i in range(n):
        e = ys[i] - c - r * (i - mid) - gain * xs[i]
        err += e * e
    return gain, err


def _solve3(m: list[list[float]]) -> tuple[float, float, float] | None:
    """Gaussian elimination with partial pivoting on a 3x4 augmented matrix."""
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, 3):
            f = m[r][col] / m[col][col]
            for c in range(col, 4):
                m[r][c] -= f * m[col][c]
    out = [0.0, 0.0, 0.0]
    for r in (2, 1, 0):
        out[r] = (m[r][3] - sum(m[r][c] * out[c] for c in range(r + 1, 3))) / m[r][r]
    return out[0], out[1], out[2]


# -- gains ---------------------------------------------------------------------------------
def simc_pi(model: Fopdt, tau_c_s: float, extra_lag_s: float = 0.0) -> PidGains:
    """Skogestad's SIMC PI: ``Kc = tau / (K (tau_c + theta))``,
    ``Ti = min(tau, 4 (tau_c + theta))`` (the second term keeps disturbances, a door or the
    walls cooling, from lingering in slow rooms)."""
    theta = model.dead_time_s + extra_lag_s
    kc = model.tau_s / (model.gain_k * (tau_c_s + theta))
    ti = min(model.tau_s, 4.0 * (tau_c_s + theta))
    return PidGains("simc-pi", kc, kc / ti)


def simc_pid(model: Fopdt, tau_c_s: float, extra_lag_s: float = 0.0) -> PidGains:
    """SIMC PI with derivative ``Td = theta / 3`` (series form, the improved SIMC rule for
    first order plus dead time), converted to the parallel form the agent's PID uses."""
    theta = model.dead_time_s + extra_lag_s
    pi = simc_pi(model, tau_c_s, extra_lag_s)
    ti, td = pi.ti_s, theta / 3.0
    kp = pi.kp * (1.0 + td / ti)
    ti_p = ti + td
    td_p = ti * td / (ti + td)
    return PidGains("simc-pid", kp, kp / ti_p, kp * td_p)


def step_response(
    model: Fopdt, gains: PidGains, extra_lag_s: float = 0.0, step_k: float = 1.0,
    dt: float = 10.0, horizon_s: float | None = None,
) -> StepResponse:
    """The model in closed loop with ``gains`` (unsaturated) after a setpoint step: the
    expected behaviour shown before gains are applied."""
    theta = model.dead_time_s + extra_lag_s
    delay = round(theta / dt)
    horizon = horizon_s or max(6 * 3600.0, 10 * gains.ti_s if math.isfinite(gains.ti_s)
                               else 6 * 3600.0)
    n = int(horizon / dt)
    a = math.exp(-dt / model.tau_s)
    y, integral = 0.0, 0.0
    pending = [0.0] * (delay + 1)
    last_y = 0.0
    peak, peak_du = 0.0, 0.0
    rise, settle = math.inf, 0.0
    for k in range(n):
        e = step_k - y
        integral += gains.ki * e * dt
        u = gains.kp * e + integral - gains.kd * (y - last_y) / dt
        last_y = y
        peak_du = max(peak_du, abs(u))
        pending.append(u)
        u_eff = pending.pop(0)
        y = a * y + (1.0 - a) * model.gain_k * u_eff
        t = (k + 1) * dt
        peak = max(peak, y)
        if rise == math.inf and y >= 0.9 * step_k:
            rise = t
        if abs(y - step_k) > 0.1 * abs(step_k):
            settle = t
    return StepResponse(step_k, max(0.0, peak - step_k), settle, rise, peak_du)
