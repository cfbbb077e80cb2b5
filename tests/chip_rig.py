"""Rig for chip-driver tests. Simulated time: a chip emulator reads it as its clock, and
the driver's injected ``sleep`` advances it, so conversion delays pass without sleeping."""

from __future__ import annotations

from qrad_agent.sim.chips.bus import EmulatedChip


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


class FixedAnswer(EmulatedChip):
    """Accepts any command and answers with the given bytes: for words no model makes."""

    def __init__(self, answer: bytes) -> None:
        super().__init__()
        self.answer = answer

    def i2c_write(self, data: bytes) -> None:
        pass

    def i2c_read(self, length: int) -> bytes:
        return self.answer[:length]
