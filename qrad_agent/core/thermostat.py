"""The thermostat: which room temperature to aim for, now.

Pure: every call takes ``now`` (monotonic seconds) and, for the schedule, the local wall time;
nothing here reads a clock. Precedence, strongest first:

1. mode ``off``: no target at all; nothing below overrides it;
2. an open window: ``frost_c``, for at most ``window.max_off_s``;
3. a local override, until it expires;
4. the mode: ``frost``, ``eco``, ``comfort``, ``boost`` (then back to the previous mode), or
   ``auto``: the weekly schedule, with optimal start ("preheat") ahead of each comfort period.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from qrad_agent.config import ThermostatConfig
from qrad_agent.core.models import Mode
from qrad_agent.core.schedule import WeeklySchedule

MAX_SETPOINT_C = 28.0  # the highest setpoint the config accepts for comfort and boost

# Optimal start. The margin absorbs the PID's slow final approach and the control period.
PREHEAT_MARGIN_S = 600.0

# Learning the warm-up rate from warm-up episodes.
EPISODE_GAP_K = 1.0  # the target must be this far above the room for an episode to begin
EPISODE_SATURATED = 0.95  # demand at or above this counts as heating flat out
EPISODE_DONE_K = 0.2  # the episode is complete this close below the target
EPISODE_MIN_S = 600.0  # shorter episodes are mostly sensor noise and air mixing
# Demand below this while the room is still EPISODE_FAR_K under the target is not the PID's
# approach any more but heat held back for another reason: the episode says nothing then.
EPISODE_LOST_DEMAND = 0.5
EPISODE_FAR_K = 1.0
RATE_WEIGHT = 0.5
# Warm-up is fast while only the air heats and slower once the walls must follow, so small
# rises overstate the rate a large deficit will see; they get a proportionally smaller say.
RATE_FULL_WEIGHT_RISE_K = 2.0
RATE_MIN_K_PER_H = 0.05
RATE_MAX_K_PER_H = 20.0
# After a window event the walls are still warm and the air recovers much faster than a real
# warm-up; episodes starting this soon after one are not learned from.
WINDOW_SETTLE_S = 3600.0

# Window detection.
WINDOW_CLOSED_RISE_K = 0.2  # rise above the lowest value since detection: window closed
WINDOW_MIN_OFF_S = 120.0  # noise must not end a detection at once
# The fall has (nearly) stopped: over this span the room fell less than a third of what the
# detection rate would give. In the morning the walls can be colder than the air, so a closed
# window does not always show as a rise: the air keeps sinking, only much more slowly.
WINDOW_CLOSED_SPAN_S = 120.0
WINDOW_CLOSED_RATE_SHARE = 1.0 / 3.0

_EPS = 1e-9  # so that a drop of exactly drop_k counts despite binary fractions
_TARGET_TOL_K = 0.01


@dataclass(frozen=True, slots=True)
class ThermostatOutput:
    target_c: float | None  # None = do not heat (mode off)
    reason: str  # "off", "frost", "eco", "comfort", "boost", "override", "preheat", "window"
    comfort_now: bool  # the schedule (or mode) says comfort now; false during preheat
    window_open: bool
    preheat_lead_s: float  # current optimal-start lead; 0 when not applicable


class Thermostat:
    """Modes, weekly schedule, local override, timed boost, optimal start, window detection.

    Overrides: :meth:`set_override` sets a temporary target that wins over the mode in every
    mode except ``off`` (``frost``, ``eco``, ``comfort``, ``boost`` and ``auto``) until its
    monotonic expiry. In ``off`` it has no effect. :meth:`set_mode` clears any override: the
    newest explicit request wins, and a boost pressed during an override must be felt.
    An open window still wins over an override, so heat is not poured out of the window.

    Boost runs for ``boost_s`` and then returns to the mode that was active before it
    (pressing boost again restarts the timer and keeps that mode to return to).
    """

    def __init__(self, cfg: ThermostatConfig) -> None:
        self._cfg = cfg
        self._schedule = WeeklySchedule(cfg.schedule)
        self._mode = Mode.AUTO
        self._boost_return = Mode.AUTO
        self._boost_until: float | None = None  # None while in boost: starts at the next update
        self._enter_mode(cfg.mode, None)
        self._override: tuple[float, float] | None = None  # (target_c, expires_at)

        self._rate = cfg.optimal_start.initial_rate_k_per_h
        self._episodes = 0
        self._episode: tuple[float, float, float] | None = None  # (start, room at start, target)
        self._learn_after = -math.inf  # no episode may begin before this (window settling)
        self._preheat_for: datetime | None = None  # the comfort start being preheated for

        # Sliding maximum of the room temperature over window.within_s: times ascending,
        # temperatures strictly descending, so the front is the maximum.
        self._history: deque[tuple[float, float]] = deque()
        self._window_recent: deque[tuple[float, float]] = deque()
        self._window_since: float | None = None
        self._window_low = math.inf

    # ----------------------------------------------------------------- commands

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def warmup_rate_k_per_h(self) -> float:
        return self._rate

    @property
    def override(self) -> tuple[float, float] | None:
        """(target_c, expires_at monotonic seconds) of the override, if one was set."""
        return self._override

    def set_mode(self, mode: Mode, now: float) -> None:
        self._override = None
        self._enter_mode(Mode(mode), now)

    def set_override(self, target_c: float, now: float, duration_s: float) -> None:
        if not math.isfinite(target_c) or not self._cfg.frost_c <= target_c <= MAX_SETPOINT_C:
            raise ValueError(
                f"override target {target_c!r} °C is out of range; allowed: "
                f"{self._cfg.frost_c} (frost_c) to {MAX_SETPOINT_C} °C"
            )
        if not math.isfinite(duration_s) or duration_s <= 0:
            raise ValueError(
                f"override duration {duration_s!r} s is invalid; it must be a positive number "
                "of seconds"
            )
        self._override = (float(target_c), now + duration_s)

    def clear_override(self) -> None:
        self._override = None

    def reconfigure(self, cfg: ThermostatConfig) -> None:
        """Apply a new config at run time, keeping the learned rate and the current mode.

        The mode changes only when the config's own ``mode`` changed: a patch of a setpoint
        must not undo a mode the occupant chose since.
        """
        old = self._cfg
        self._cfg = cfg
        self._schedule = WeeklySchedule(cfg.schedule)
        self._preheat_for = None
        if cfg.mode is not old.mode:
            self._override = None
            self._enter_mode(cfg.mode, None)
        if self._episodes == 0:
            self._rate = cfg.optimal_start.initial_rate_k_per_h
        if not cfg.window.enabled:
            self._end_window()
        ov = self._override
        if ov is not None and ov[0] < cfg.frost_c:
            self._override = (cfg.frost_c, ov[1])

    def export_state(self) -> dict[str, float]:
        return {"warmup_rate_k_per_h": self._rate, "warmup_episodes": float(self._episodes)}

    def import_state(self, d: Mapping[str, object]) -> None:
        """Restore what :meth:`export_state` returned. Missing keys keep their current value;
        unknown keys are ignored so that state written by a newer version still loads."""
        rate = _number(d, "warmup_rate_k_per_h", RATE_MIN_K_PER_H, RATE_MAX_K_PER_H)
        episodes = _number(d, "warmup_episodes", 0.0, 1e9)
        if episodes is not None and episodes != int(episodes):
            raise ValueError(f"warmup_episodes {episodes!r} is invalid; allowed: a whole number")
        if rate is not None:
            self._rate = rate
        if episodes is not None:
            self._episodes = int(episodes)

    # ----------------------------------------------------------------- the tick

    def update(
        self, now: float, local: datetime, room_c: float | None, demand: float
    ) -> ThermostatOutput:
        """The target for this tick.

        ``local`` is the local wall time for the schedule, ``room_c`` the fused room
        temperature (None without a healthy sensor), ``demand`` the controller's heat demand
        of the previous tick (0..1), from which the warm-up rate is learned.
        """
        cfg = self._cfg
        mode = self._mode
        if mode is Mode.BOOST:
            if self._boost_until is None:
                self._boost_until = now + cfg.boost_s
            elif now >= self._boost_until:
                mode = self._mode = self._boost_return
                self._boost_until = None
        ov = self._override
        if ov is not None and now >= ov[1]:
            ov = self._override = None

        window = self._track_window(now, room_c) if cfg.window.enabled else False

        target: float | None
        lead = 0.0
        comfort_now = False
        if mode is Mode.AUTO:
            if self._schedule.is_comfort(local):
                target, reason, comfort_now = cfg.comfort_c, "comfort", True
                self._preheat_for = None
            else:
                target, reason = cfg.eco_c, "eco"
                if cfg.optimal_start.enabled:
                    lead, preheat = self._optimal_start(local, room_c)
                    if preheat:
                        target, reason = cfg.comfort_c, "preheat"
                else:
                    self._preheat_for = None
        else:
            self._preheat_for = None
            if mode is Mode.OFF:
                target, reason = None, "off"
            elif mode is Mode.FROST:
                target, reason = cfg.frost_c, "frost"
            elif mode is Mode.ECO:
                target, reason = cfg.eco_c, "eco"
            elif mode is Mode.COMFORT:
                target, reason, comfort_now = cfg.comfort_c, "comfort", True
            else:
                target, reason, comfort_now = cfg.boost_c, "boost", True

        if mode is not Mode.OFF:
            if ov is not None:
                target, reason = ov[0], "override"
            if window:
                target, reason = cfg.frost_c, "window"

        self._learn(now, room_c, target, demand, window)
        return ThermostatOutput(target, reason, comfort_now, window, lead)

    # ----------------------------------------------------------------- internals

    def _enter_mode(self, mode: Mode, now: float | None) -> None:
        if mode is Mode.BOOST:
            if self._mode is not Mode.BOOST:
                self._boost_return = self._mode
            self._boost_until = None if now is None else now + self._cfg.boost_s
        else:
            self._boost_until = None
        self._mode = mode

    def _optimal_start(self, local: datetime, room_c: float | None) -> tuple[float, bool]:
        """(lead in seconds, whether to preheat now)."""
        start = self._schedule.next_comfort_start(local)
        if start is None:
            self._preheat_for = None
            return 0.0, False
        cfg = self._cfg
        lead = 0.0
        if room_c is not None and room_c < cfg.comfort_c:
            # The room as it is now, every tick: a room cooling overnight needs a longer lead.
            lead = (cfg.comfort_c - room_c) / self._rate * 3600.0 + PREHEAT_MARGIN_S
            lead = min(lead, cfg.optimal_start.max_lead_s)
        if self._preheat_for == start:
            # Once begun, preheat holds until comfort starts: the room warms fastest at first,
            # so the recomputed lead would shrink faster than the time left and switch it off.
            return lead, True
        self._preheat_for = None
        if lead > 0.0 and (start - local).total_seconds() <= lead:
            self._preheat_for = start
            return lead, True
        return lead, False

    def _track_window(self, now: float, room_c: float | None) -> bool:
        wcfg = self._cfg.window
        if self._window_since is not None:
            open_for = now - self._window_since
            if open_for >= wcfg.max_off_s:
                self._end_window()
            else:
                if room_c is not None and self._window_closed(now, open_for, room_c):
                    self._end_window()
                if self._window_since is not None:
                    self._learn_after = now + WINDOW_SETTLE_S
                    return True
            # Just ended: the current sample seeds a fresh history below.
        if room_c is None:
            return False
        hist = self._history
        cutoff = now - wcfg.within_s
        while hist and hist[0][0] < cutoff:
            hist.popleft()
        while hist and hist[-1][1] <= room_c:
            hist.pop()
        hist.append((now, room_c))
        if hist[0][1] - room_c >= wcfg.drop_k - _EPS:
            self._window_since = now
            self._window_low = room_c
            self._window_recent.clear()
            self._learn_after = now + WINDOW_SETTLE_S
            return True
        return False

    def _window_closed(self, now: float, open_for: float, room_c: float) -> bool:
        recent = self._window_recent
        recent.append((now, room_c))
        while recent and recent[0][0] < now - WINDOW_CLOSED_SPAN_S:
            recent.popleft()
        self._window_low = min(self._window_low, room_c)
        if open_for < WINDOW_MIN_OFF_S:
            return False
        if room_c >= self._window_low + WINDOW_CLOSED_RISE_K - _EPS:
            return True
        wcfg = self._cfg.window
        span = now - recent[0][0]
        if span < WINDOW_CLOSED_SPAN_S - _TARGET_TOL_K:
            return False
        fell = recent[0][1] - room_c
        return fell < wcfg.drop_k / wcfg.within_s * span * WINDOW_CLOSED_RATE_SHARE

    def _end_window(self) -> None:
        # The history is left alone while the window is open, so it still holds the drop that
        # was detected; forgetting it keeps the same drop from being detected a second time.
        self._window_since = None
        self._window_low = math.inf
        self._history.clear()

    def _learn(
        self, now: float, room_c: float | None, target: float | None, demand: float, window: bool
    ) -> None:
        ep = self._episode
        if ep is not None:
            start, room0, ep_target = ep
            # (An open window also moves the target to frost_c; named so as not to rely on it.)
            if window or target is None or abs(target - ep_target) > _TARGET_TOL_K:
                self._episode = None
                return
            if room_c is None:
                return  # a sensor gap does not spoil the episode; its end point will come
            if room_c >= ep_target - EPISODE_DONE_K - _EPS:
                self._episode = None
                duration = now - start
                rise = room_c - room0
                if duration >= EPISODE_MIN_S and rise > 0.0:
                    observed = rise / (duration / 3600.0)
                    weight = RATE_WEIGHT * min(1.0, rise / RATE_FULL_WEIGHT_RISE_K)
                    rate = self._rate + weight * (observed - self._rate)
                    self._rate = min(RATE_MAX_K_PER_H, max(RATE_MIN_K_PER_H, rate))
                    self._episodes += 1
                return
            if demand < EPISODE_LOST_DEMAND and room_c < ep_target - EPISODE_FAR_K:
                self._episode = None
            return
        if target is None or room_c is None or window or now < self._learn_after:
            return
        if target - room_c >= EPISODE_GAP_K - _EPS and demand >= EPISODE_SATURATED:
            self._episode = (now, room_c, target)


def _number(d: Mapping[str, object], key: str, low: float, high: float) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{key} {value!r} is invalid; allowed: a number from {low} to {high}")
    return float(value)
