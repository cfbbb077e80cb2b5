"""The power model as a power source, and fitting it to measurements (``calibrate``).

The model (``core/power.py``) estimates the board's watts from the plan in force:

    watts = idle_w + slots * slot_w * (freq / max_freq) ** freq_exponent * quota

As a source it is always there and always "ok", and its readings say they are an estimate.
It is told the plan that is in force (``observe``): the one the levers took, read back.

Fitting: for a fixed exponent the model is a straight line in
``x = slots * (freq / max_freq) ** e * quota``, so ``idle_w`` and ``slot_w`` follow by
ordinary least squares; the exponent is found by a scan over its allowed range (0.5 to 3,
as the config allows) refined by golden-section search on the residual. Measurements at a
single frequency cannot tell the exponent; then the given one is kept.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qrad_agent.atomic import write_json
from qrad_agent.core.models import Plan, Quality
from qrad_agent.core.power import PowerModel
from qrad_agent.metering import MODEL, PowerReading

log = logging.getLogger(__name__)

FITTED_FILE = "power_model.json"
EXPONENT_RANGE = (0.5, 3.0)
_FORMAT = 1


class ModelPowerSource:
    name = MODEL

    def __init__(self, model: PowerModel, fitted: bool = False) -> None:
        self.model = model
        self.fitted = fitted
        self.plan: Plan | None = None

    def observe(self, plan: Plan) -> None:
        self.plan = plan

    def read(self, now: float) -> PowerReading:
        kind = "fitted" if self.fitted else "configured"
        if self.plan is None:
            return PowerReading(self.name, now, self.model.idle_w, Quality.OK,
                                f"estimate ({kind} model): idle, no plan applied yet")
        return PowerReading(self.name, now, self.model.watts(self.plan), Quality.OK,
                            f"estimate ({kind} model) for {self.plan.describe()}")

    def describe(self) -> dict[str, Any]:
        m = self.model
        return {"idle_w": m.idle_w, "slot_w": m.slot_w, "freq_exponent": m.freq_exponent,
                "max_freq_khz": m.max_freq_khz, "fitted": self.fitted}


@dataclass(frozen=True)
class CalPoint:
    """One calibration step: what ran, and the watts measured meanwhile."""

    slots: int
    freq_khz: int
    quota: float
    watts: float


@dataclass(frozen=True)
class FittedModel:
    idle_w: float
    slot_w: float
    freq_exponent: float
    max_freq_khz: int
    rms_w: float  # root mean square of the residuals
    points: int
    exponent_fitted: bool  # False: one frequency only, the exponent was given

    def model(self) -> PowerModel:
        return PowerModel(self.idle_w, self.slot_w, self.freq_exponent, self.max_freq_khz)


def fit_power_model(
    points: list[CalPoint], max_freq_khz: int, exponent: float = 1.5
) -> FittedModel:
    """Least-squares fit of idle_w, slot_w and (if the points span frequencies) the exponent.

    Raises ValueError when the points cannot determine the model: fewer than two different
    loads, or a fit that gives negative watts.
    """
    if max_freq_khz <= 0:
        raise ValueError(f"max_freq_khz must be positive, got {max_freq_khz}")
    loads = {(p.slots * p.quota, p.freq_khz) for p in points}
    if len({p.slots * p.quota for p in points}) < 2:
        raise ValueError(
            "calibration needs measurements at two or more loads (slot counts or quotas); "
            f"got {len(points)} point(s) at {len(loads)} setting(s)"
        )
    freqs = {p.freq_khz for p in points if p.slots > 0 and p.quota > 0}
    if len(freqs) >= 2:
        e, exponent_fitted = _best_exponent(points, max_freq_khz), True
    else:
        e, exponent_fitted = exponent, False
    idle, slot, sse = _line(points, max_freq_khz, e)
    if slot <= 0:
        raise ValueError(
            f"the measured power does not rise with the load (slot_w = {slot:.2f} W): is the "
            "meter measuring this board, and did the workers run?"
        )
    if idle < 0:
        log.warning("fitted idle power %.2f W is negative; clamped to 0", idle)
        idle = 0.0
    return FittedModel(
        idle_w=idle, slot_w=slot, freq_exponent=e, max_freq_khz=max_freq_khz,
        rms_w=math.sqrt(sse / len(points)), points=len(points), exponent_fitted=exponent_fitted,
    )


def _line(points: list[CalPoint], fmax: int, e: float) -> tuple[float, float, float]:
    """(intercept, slope, squared error) of watts against the load at exponent ``e``."""
    xs = [p.slots * (p.freq_khz / fmax) ** e * p.quota for p in points]
    ws = [p.watts for p in points]
    n = len(points)
    mx, mw = sum(xs) / n, sum(ws) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return mw, 0.0, sum((w - mw) ** 2 for w in ws)
    slope = sum((x - mx) * (w - mw) for x, w in zip(xs, ws, strict=True)) / sxx
    icpt = mw - slope * mx
    sse = sum((icpt + slope * x - w) ** 2 for x, w in zip(xs, ws, strict=True))
    return icpt, slope, sse


def _best_exponent(points: list[CalPoint], fmax: int) -> float:
    lo, hi = EXPONENT_RANGE
    steps = 50
    grid = [lo + (hi - lo) * i / steps for i in range(steps + 1)]
    best = min(grid, key=lambda e: _line(points, fmax, e)[2])
    a, b = max(lo, best - (hi - lo) / steps), min(hi, best + (hi - lo) / steps)
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):  # golden section: the bracket shrinks to ~1e-9 of the grid step
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if _line(points, fmax, c)[2] <= _line(points, fmax, d)[2]:
            b = d
        else:
            a = c
    return (a + b) / 2


# -- storage ---------------------------------------------------------------------------------


def save_fitted(state_dir: Path, fitted: FittedModel, source: str,
                points: list[CalPoint]) -> Path:
    """Write the fitted model to ``state_dir/power_model.json`` atomically; returns the path."""
    path = Path(state_dir) / FITTED_FILE
    doc = {
        "format": _FORMAT,
        **asdict(fitted),
        "source": source,
        "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "measurements": [asdict(p) for p in points],
    }
    write_json(path, doc, indent=1)
    return path


def load_fitted(state_dir: Path, max_freq_khz: int | None = None) -> PowerModel | None:
    """The model ``calibrate`` stored, or None if there is none or it cannot be used.

    With ``max_freq_khz``, a model fitted against another maximum frequency (a different
    board, or a changed BIOS setting) is refused.
    """
    path = Path(state_dir) / FITTED_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the fitted power model %s: %s", path, exc)
        return None
    try:
        if doc.get("format") != _FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {_FORMAT}")
        model = PowerModel(float(doc["idle_w"]), float(doc["slot_w"]),
                           float(doc["freq_exponent"]), int(doc["max_freq_khz"]))
        lo, hi = EXPONENT_RANGE
        if not (0 <= model.idle_w <= 2000 and 0 < model.slot_w <= 1000
                and lo <= model.freq_exponent <= hi and model.max_freq_khz > 0):
            raise ValueError("values outside the config's limits")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("ignoring the fitted power model %s: %s", path, exc)
        return None
    if max_freq_khz is not None and model.max_freq_khz != max_freq_khz:
        log.warning("ignoring the fitted power model %s: fitted at max %d kHz, the board now "
                    "has %d kHz; run qrad-agent calibrate again", path, model.max_freq_khz,
                    max_freq_khz)
        return None
    return model
