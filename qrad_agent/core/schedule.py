"""The weekly comfort schedule, folded into sorted minute-of-week intervals.

Pure: the caller passes the local wall time; nothing here reads a clock. Periods have minute
resolution, start inclusive and end exclusive, so a time with seconds is judged by its minute.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from datetime import datetime, timedelta

from qrad_agent.config import ComfortPeriod

MINUTES_PER_DAY = 24 * 60
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY


def _minute_of_week(local: datetime) -> int:
    return local.weekday() * MINUTES_PER_DAY + local.hour * 60 + local.minute


class WeeklySchedule:
    """When the comfort periods are in force, Monday 00:00 = minute 0 of the week.

    A period whose end is before its start runs past midnight into the next day (and from
    Sunday into Monday). A period whose end equals its start lasts a full 24 hours: the
    config allows it, and reading it as "empty" would silently drop a period somebody wrote.
    Overlapping or touching periods merge, so no boundary is reported where nothing changes.
    """

    __slots__ = ("_change_points", "_ends", "_start_points", "_starts")

    def __init__(self, periods: Iterable[ComfortPeriod]) -> None:
        spans: list[tuple[int, int]] = []
        for period in periods:
            start, end = period.minutes()
            length = end - start if end > start else end + MINUTES_PER_DAY - start
            for day in period.weekdays():
                a = day * MINUTES_PER_DAY + start
                if a >= MINUTES_PER_WEEK:  # "24:00" as a start on Sunday is Monday 00:00
                    a -= MINUTES_PER_WEEK
                b = a + length
                if b <= MINUTES_PER_WEEK:
                    spans.append((a, b))
                else:
                    spans.append((a, MINUTES_PER_WEEK))
                    spans.append((0, b - MINUTES_PER_WEEK))
        spans.sort()
        merged: list[list[int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])

        self._starts = [a for a, _ in merged]
        self._ends = [b for _, b in merged]

        # An interval ending at the week's end that meets one starting at minute 0 is one
        # period seen through the fold: neither its seam is a real start nor a real end.
        joined = bool(merged) and merged[0][0] == 0 and merged[-1][1] == MINUTES_PER_WEEK
        starts = self._starts[1:] if joined else list(self._starts)
        ends = [b % MINUTES_PER_WEEK for b in (self._ends[:-1] if joined else self._ends)]
        self._start_points = sorted(starts)
        self._change_points = sorted(set(starts) | set(ends))

    def is_comfort(self, local: datetime) -> bool:
        """True when ``local`` (naive local wall time) falls inside a comfort period."""
        m = _minute_of_week(local)
        i = bisect_right(self._starts, m) - 1
        return i >= 0 and m < self._ends[i]

    def next_comfort_start(self, local: datetime) -> datetime | None:
        """The first comfort start strictly after ``local``: when in comfort now, the next one.

        None when there is no start at all: no periods, or comfort around the clock.
        """
        return self._next(self._start_points, local)

    def next_change(self, local: datetime) -> datetime | None:
        """The first moment strictly after ``local`` when comfort begins or ends, or None."""
        return self._next(self._change_points, local)

    @staticmethod
    def _next(points: list[int], local: datetime) -> datetime | None:
        if not points:
            return None
        m = _minute_of_week(local)
        i = bisect_right(points, m)
        delta = points[i] - m if i < len(points) else points[0] + MINUTES_PER_WEEK - m
        return local.replace(second=0, microsecond=0) + timedelta(minutes=delta)
