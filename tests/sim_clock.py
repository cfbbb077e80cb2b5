"""Simulated time for driver tests: a chip emulator reads it as its clock, and the driver's
injected ``sleep`` advances it, so conversion delays are waited for without real sleeping."""

from __future__ import annotations


class SimClock:
    start = 0.0  # subclasses set where their time begins

    def __init__(self) -> None:
        self.now = self.start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
