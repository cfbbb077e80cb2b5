"""PID on the room temperature, producing a heat demand in [0, 1].

- Derivative on the measurement, low-pass filtered: a setpoint change moves only the
  proportional term, and sensor quantisation noise does not shake the output.
- Anti-windup twice over: the integral stops growing while the output is saturated in the
  direction the error pushes (conditional integration), and it is clamped to the output range.
- Bumpless: changing gains keeps the output where it was; disengaging (mode off, an open
  window) freezes the integral, and re-engaging restarts the derivative filter from the
  current measurement so there is no kick from stale state.
- The integral is exported so it can be stored and survive a restart: after a power cut the
  room gets the heat it needed before, not a slow re-learn from zero.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PidTerms:
    p: float
    i: float
    d: float
    ff: float
    output: float


class PID:
    def __init__(
        self,
        kp: float,
        ki: float,
        kd: float = 0.0,
        d_filter_s: float = 0.0,
        out_min: float = 0.0,
        out_max: float = 1.0,
    ) -> None:
        if out_min >= out_max:
            raise ValueError(f"out_min ({out_min}) must be below out_max ({out_max})")
        self.kp, self.ki, self.kd, self.d_filter_s = kp, ki, kd, d_filter_s
        self.out_min, self.out_max = out_min, out_max
        self.integral = 0.0  # in output units (already multiplied by ki)
        self._last_at: float | None = None
        self._last_meas: float | None = None
        self._d_rate = 0.0  # filtered d(measurement)/dt, K/s
        self._last_error = 0.0
        self.terms = PidTerms(0.0, 0.0, 0.0, 0.0, 0.0)

    @property
    def output(self) -> float:
        return self.terms.output

    def update(self, now: float, setpoint: float, measurement: float, ff: float = 0.0) -> float:
        """One step; ``ff`` is a feed-forward in output units added before clamping."""
        error = setpoint - measurement
        dt = 0.0 if self._last_at is None else max(0.0, now - self._last_at)
        if dt > 0 and self._last_meas is not None:
            raw_rate = (measurement - self._last_meas) / dt
            alpha = dt / (self.d_filter_s + dt)  # first-order low-pass, exact for alpha=1 at 0
            self._d_rate += alpha * (raw_rate - self._d_rate)
        p = self.kp * error
        d = -self.kd * self._d_rate
        step = self.ki * error * dt
        trial = p + self.integral + step + d + ff
        winding_up = trial > self.out_max and error > 0
        winding_down = trial < self.out_min and error < 0
        if not (winding_up or winding_down):
            self.integral += step
        self.integral = min(self.out_max, max(self.out_min - ff, self.integral))
        out = min(self.out_max, max(self.out_min, p + self.integral + d + ff))
        self.terms = PidTerms(p, self.integral, d, ff, out)
        self._last_at, self._last_meas, self._last_error = now, measurement, error
        return out

    def disengage(self) -> None:
        """Stop regulating (heating off, window open): keep the integral, forget the slope."""
        self._last_at = None
        self._last_meas = None
        self._d_rate = 0.0
        self.terms = PidTerms(0.0, self.integral, 0.0, 0.0, 0.0)

    def set_gains(self, kp: float, ki: float, kd: float, d_filter_s: float) -> None:
        """New gains without a jump in the output: the changes of the P and D terms at the
        present error and slope are moved into the integral."""
        shift = (self.kp - kp) * self._last_error + (kd - self.kd) * self._d_rate
        self.integral = min(self.out_max, max(self.out_min, self.integral + shift))
        self.kp, self.ki, self.kd, self.d_filter_s = kp, ki, kd, d_filter_s

    def export_state(self) -> dict[str, float]:
        return {"integral": self.integral}

    def import_state(self, state: dict[str, float]) -> None:
        value = float(state.get("integral", 0.0))
        self.integral = min(self.out_max, max(self.out_min, value))
