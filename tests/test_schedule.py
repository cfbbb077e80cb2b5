from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from qrad_agent.config import ComfortPeriod
from qrad_agent.core.schedule import WeeklySchedule

MON, TUE, WED, THU, FRI, SAT, SUN = range(7)


def at(day: int, hh: int, mm: int = 0, ss: int = 0, week: int = 0) -> datetime:
    # 2024-01-01 was a Monday.
    return datetime(2024, 1, 1, hh, mm, ss) + timedelta(days=day + 7 * week)


def sched(*periods: tuple[str, str, str]) -> WeeklySchedule:
    return WeeklySchedule([ComfortPeriod(days=d, start=s, end=e) for d, s, e in periods])


def test_start_inclusive_end_exclusive() -> None:
    s = sched(("mon-fri", "06:00", "22:00"))
    assert not s.is_comfort(at(MON, 5, 59, 59))
    assert s.is_comfort(at(MON, 6, 0, 0))
    assert s.is_comfort(at(MON, 21, 59, 59))
    assert not s.is_comfort(at(MON, 22, 0, 0))
    assert s.is_comfort(at(FRI, 12))
    assert not s.is_comfort(at(SAT, 12))
    assert not s.is_comfort(at(SUN, 12))


def test_period_across_midnight() -> None:
    s = sched(("daily", "22:00", "06:00"))
    assert s.is_comfort(at(WED, 23, 30))
    assert s.is_comfort(at(THU, 0, 0))
    assert s.is_comfort(at(THU, 5, 59, 59))
    assert not s.is_comfort(at(THU, 6, 0))
    assert not s.is_comfort(at(THU, 21, 59))
    assert s.is_comfort(at(THU, 22, 0))


def test_period_across_the_week_sunday_into_monday() -> None:
    s = sched(("sun", "22:00", "06:00"))
    assert not s.is_comfort(at(SUN, 21, 59))
    assert s.is_comfort(at(SUN, 22, 0))
    assert s.is_comfort(at(SUN, 23, 59, 59))
    assert s.is_comfort(at(MON, 0, 0))
    assert s.is_comfort(at(MON, 5, 59))
    assert not s.is_comfort(at(MON, 6, 0))
    # Only Sunday night: Monday night and Saturday night stay cold.
    assert not s.is_comfort(at(MON, 23, 0))
    assert not s.is_comfort(at(SAT, 23, 0))
    assert not s.is_comfort(at(TUE, 3, 0))


def test_end_of_day_2400() -> None:
    s = sched(("sun", "18:00", "24:00"))
    assert s.is_comfort(at(SUN, 23, 59, 59))
    assert not s.is_comfort(at(MON, 0, 0))
    assert s.next_change(at(SUN, 20)) == at(MON, 0, week=1)


def test_start_equal_to_end_is_a_full_day() -> None:
    s = sched(("wed", "08:00", "08:00"))
    assert not s.is_comfort(at(WED, 7, 59))
    assert s.is_comfort(at(WED, 8, 0))
    assert s.is_comfort(at(THU, 7, 59))
    assert not s.is_comfort(at(THU, 8, 0))


def test_overlapping_and_touching_periods_merge() -> None:
    s = sched(("mon", "06:00", "12:00"), ("mon", "10:00", "14:00"), ("mon", "14:00", "18:00"))
    assert all(s.is_comfort(at(MON, h)) for h in range(6, 18))
    assert not s.is_comfort(at(MON, 18))
    # No boundary inside the merged period.
    assert s.next_change(at(MON, 7)) == at(MON, 18)
    assert s.next_comfort_start(at(MON, 7)) == at(MON, 6, week=1)


def test_periods_meeting_across_the_week_seam_are_one() -> None:
    s = sched(("sun", "18:00", "24:00"), ("mon", "00:00", "06:00"))
    assert s.is_comfort(at(SUN, 23, 59))
    assert s.is_comfort(at(MON, 0, 0))
    # Monday 00:00 is not a start and Sunday 24:00 is not an end.
    assert s.next_comfort_start(at(MON, 3)) == at(SUN, 18)
    assert s.next_change(at(SUN, 20)) == at(MON, 6, week=1)
    assert s.next_comfort_start(at(SUN, 19)) == at(SUN, 18, week=1)


def test_next_comfort_start() -> None:
    s = sched(("mon-fri", "06:00", "22:00"))
    assert s.next_comfort_start(at(MON, 3)) == at(MON, 6)
    assert s.next_comfort_start(at(MON, 5, 59, 59)) == at(MON, 6)
    # In comfort now (including exactly at its start): the next start.
    assert s.next_comfort_start(at(MON, 6, 0, 0)) == at(TUE, 6)
    assert s.next_comfort_start(at(MON, 12, 30, 15)) == at(TUE, 6)
    # Friday evening: next is Monday of the following week.
    assert s.next_comfort_start(at(FRI, 22)) == at(MON, 6, week=1)
    assert s.next_comfort_start(at(SAT, 10)) == at(MON, 6, week=1)


def test_next_comfort_start_across_the_week() -> None:
    s = sched(("sun", "22:00", "06:00"))
    assert s.next_comfort_start(at(MON, 1)) == at(SUN, 22)
    assert s.next_comfort_start(at(SUN, 22)) == at(SUN, 22, week=1)
    assert s.next_change(at(SUN, 22, 30)) == at(MON, 6, week=1)
    assert s.next_change(at(MON, 6, 0)) == at(SUN, 22)


def test_single_start_a_week_later() -> None:
    s = sched(("tue", "07:00", "08:00"))
    assert s.next_comfort_start(at(TUE, 7, 0, 1)) == at(TUE, 7, week=1)
    assert s.next_comfort_start(at(TUE, 6, 59)) == at(TUE, 7)


def test_no_periods_and_always_comfort() -> None:
    empty = WeeklySchedule([])
    assert not empty.is_comfort(at(MON, 12))
    assert empty.next_comfort_start(at(MON, 12)) is None
    assert empty.next_change(at(MON, 12)) is None
    always = sched(("daily", "00:00", "24:00"))
    assert always.is_comfort(at(SUN, 23, 59, 59))
    assert always.is_comfort(at(MON, 0, 0))
    assert always.next_comfort_start(at(MON, 12)) is None
    assert always.next_change(at(MON, 12)) is None


def test_next_change_alternates() -> None:
    s = sched(("mon-fri", "06:00", "08:00"), ("mon-fri", "17:00", "22:00"))
    t = at(MON, 0)
    seen = []
    for _ in range(5):
        nxt = s.next_change(t)
        assert nxt is not None and nxt > t
        seen.append(nxt)
        t = nxt
    assert seen == [at(MON, 6), at(MON, 8), at(MON, 17), at(MON, 22), at(TUE, 6)]


def _brute(periods: list[tuple[list[int], int, int]]) -> list[bool]:
    week = 7 * 1440
    grid = [False] * week
    for days, start, end in periods:
        length = end - start if end > start else end + 1440 - start
        for d in days:
            for m in range(d * 1440 + start, d * 1440 + start + length):
                grid[m % week] = True
    return grid


@pytest.mark.parametrize("seed", range(12))
def test_matches_a_minute_grid(seed: int) -> None:
    rng = random.Random(seed)
    names = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    cfgs = []
    for _ in range(rng.randint(1, 4)):
        a, b = rng.randrange(7), rng.randrange(7)
        start = f"{rng.randrange(24):02d}:{rng.choice((0, 15, 30, 59)):02d}"
        end = rng.choice(("24:00", f"{rng.randrange(24):02d}:{rng.choice((0, 30, 45)):02d}"))
        cfgs.append(ComfortPeriod(days=f"{names[a]}-{names[b]}", start=start, end=end))
    s = WeeklySchedule(cfgs)
    grid = _brute([(c.weekdays(), *c.minutes()) for c in cfgs])
    base = at(MON, 0)
    for m in range(0, 7 * 1440, 7):
        assert s.is_comfort(base + timedelta(minutes=m, seconds=30)) is grid[m], m
    # next_comfort_start and next_change against the grid's own transitions.
    week = len(grid)
    changes = [k for k in range(week) if grid[k] != grid[k - 1]]
    starts = [k for k in changes if grid[k]]
    for m in range(0, week, 37):
        t = base + timedelta(minutes=m, seconds=10)
        for got, points in ((s.next_change(t), changes), (s.next_comfort_start(t), starts)):
            if not points:
                assert got is None
                continue
            later = [k for k in points if k > m]
            k = later[0] if later else points[0] + week
            assert got == base + timedelta(minutes=k), (m, got)
