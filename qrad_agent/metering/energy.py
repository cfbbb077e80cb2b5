"""The radiator's energy in Wh, kept across restarts, and per source of the figures.

Each good reading adds ``watts * (at - previous at)``: exact for RAPL (its watts are the
average over that very interval), an approximation for a meter's instantaneous sample, and
right for the model when it is read before the tick's new plan is applied (its plan was the
one in force over the interval). Gaps longer than ``max_gap_s`` are not integrated: nobody
knows what the board drew while the agent did not look.

The totals are written atomically (temp file, fsync, rename, fsync of the directory) every
``save_every_s`` and by ``close()``; a crash loses at most that much. After a restart the
first reading only sets the baseline, since monotonic time does not carry across processes.
A file that cannot be parsed is moved aside (``.corrupt``) and counting starts from zero.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qrad_agent.atomic import write_json
from qrad_agent.metering import PowerReading

log = logging.getLogger(__name__)

_FORMAT = 1


class EnergyAccumulator:
    def __init__(self, path: Path, save_every_s: float = 60.0, max_gap_s: float = 120.0) -> None:
        self.path = Path(path)
        self.save_every_s = save_every_s
        self.max_gap_s = max_gap_s
        self.total_wh = 0.0
        self.by_source: dict[str, float] = {}
        self.gaps = 0  # intervals left out for being longer than max_gap_s
        self._last_at: float | None = None
        self._next_save = -math.inf
        self._dirty = False
        self._load()

    def add(self, reading: PowerReading) -> None:
        if not reading.ok or reading.watts is None:
            return
        at, last = reading.at, self._last_at
        self._last_at = at
        if last is None:
            self._next_save = at + self.save_every_s
            return
        dt = at - last
        if dt <= 0:
            return
        if dt > self.max_gap_s:
            self.gaps += 1
            return
        wh = max(0.0, reading.watts) * dt / 3600.0
        self.total_wh += wh
        self.by_source[reading.source] = self.by_source.get(reading.source, 0.0) + wh
        self._dirty = True
        if at >= self._next_save:
            self._save_logged()
            self._next_save = at + self.save_every_s

    def save(self) -> None:
        """Write the totals now (atomically). Raises OSError if the file cannot be written."""
        doc = {
            "format": _FORMAT,
            "total_wh": self.total_wh,
            "by_source": self.by_source,
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json(self.path, doc)
        self._dirty = False

    def close(self) -> None:
        if self._dirty:
            self._save_logged()

    def as_dict(self) -> dict[str, Any]:
        return {"total_wh": round(self.total_wh, 4),
                "by_source": {k: round(v, 4) for k, v in self.by_source.items()},
                "gaps": self.gaps}

    def _save_logged(self) -> None:
        try:
            self.save()
        except OSError as exc:
            # counting goes on in memory; the next save tries again
            log.error("cannot save the energy total to %s: %s", self.path, exc)

    def _load(self) -> None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read the energy total %s: %s; counting from zero", self.path, exc)
            return
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ValueError(f"expected a JSON object with format {_FORMAT}")
            total = float(doc["total_wh"])
            by_source = {str(k): float(v) for k, v in dict(doc.get("by_source", {})).items()}
            if not math.isfinite(total) or total < 0:
                raise ValueError(f"total_wh {total} is not a non-negative number")
        except (ValueError, TypeError, KeyError) as exc:
            aside = self.path.with_name(self.path.name + ".corrupt")
            log.error("energy total %s is unreadable (%s); moved to %s, counting from zero",
                      self.path, exc, aside)
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            return
        self.total_wh, self.by_source = total, by_source
