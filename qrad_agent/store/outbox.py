"""Store-and-forward: every message the fleet must not miss is committed here before it is
published, and deleted only when the broker's PUBACK says it has it.

Bounds, so an outage of any length fits on the board:
- ``max_bytes`` over all rows: when over, the oldest *telemetry* goes first (down to 90 % of
  the bound, so a full outbox does not pay a delete on every insert);
- ``max_age_s`` for telemetry: older samples are of no use to anyone.
Events, command results and job reports are never dropped by either bound.

A full disk (or any write error) degrades telemetry, never control: a telemetry row that
cannot be written is counted and dropped, and the oldest telemetry is deleted to make room.
A row that must not be dropped is held in memory, in order, and written as soon as the
database takes writes again; rows of that kind that come later queue behind it so the order
is kept. Nothing here raises into the control loop.

Row ids come from AUTOINCREMENT, so they never go backwards: the order of ids is the order
in which the agent produced the messages, which is what keeps telemetry in order per boot.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from qrad_agent.store.db import Database, StoreError, is_disk_full

log = logging.getLogger("qrad_agent.store")

MIGRATIONS = [
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        created REAL NOT NULL,
        boot INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        correlation BLOB,
        bytes INTEGER NOT NULL
    );
    CREATE INDEX outbox_kind_id ON outbox (kind, id)
    """,
]

ROW_OVERHEAD = 64  # bytes a row costs beyond its topic and payload (ids, index entries)
FREE_TO = 0.9  # when over max_bytes, free down to this share of it
AGE_CHECK_S = 300.0  # look for telemetry past max_age_s at most this often
MAX_HELD = 10_000  # never-drop rows kept in memory while the disk refuses writes


class Kind(StrEnum):
    TELEMETRY = "telemetry"
    EVENT = "event"
    RESULT = "result"
    JOB = "job"


DROPPABLE = frozenset({Kind.TELEMETRY})


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    kind: Kind
    topic: str
    payload: bytes
    created: float  # wall-clock seconds when the message was produced
    boot: int
    seq: int
    correlation: bytes | None = None


@dataclass
class OutboxStats:
    rows: int = 0
    bytes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    dropped_over_bytes: int = 0
    dropped_over_age: int = 0
    dropped_write_failed: int = 0
    held_in_memory: int = 0


@dataclass(frozen=True, slots=True)
class _Unwritten:
    kind: Kind
    topic: str
    payload: bytes
    created: float
    boot: int
    seq: int
    correlation: bytes | None

    @property
    def size(self) -> int:
        return len(self.payload) + len(self.topic.encode()) + ROW_OVERHEAD


class Outbox:
    def __init__(self, db: Database, max_bytes: int, max_age_s: float) -> None:
        self.db = db
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        db.migrate("outbox", MIGRATIONS)
        rows = db.query("SELECT COALESCE(SUM(bytes), 0) FROM outbox")
        self._bytes = int(rows[0][0])
        self._held: deque[_Unwritten] = deque()
        self._next_age_check = -math.inf
        self.dropped_over_bytes = 0
        self.dropped_over_age = 0
        self.dropped_write_failed = 0

    @property
    def total_bytes(self) -> int:
        return self._bytes

    @property
    def held(self) -> int:
        """Rows waiting in memory for the database to take writes again."""
        return len(self._held)

    # -- writing -----------------------------------------------------------------------------
    def put(
        self,
        kind: Kind,
        topic: str,
        payload: bytes,
        *,
        created: float,
        boot: int = 0,
        seq: int = 0,
        correlation: bytes | None = None,
    ) -> int | None:
        """Commit one message; returns its row id, or None if it is not (yet) on disk.

        For telemetry None means dropped. Any other kind is then held in memory and written
        later (see the module doc).
        """
        row = _Unwritten(Kind(kind), topic, payload, created, boot, seq, correlation)
        if row.kind in DROPPABLE:
            try:
                rid = self._insert(row)
            except StoreError as exc:
                self.dropped_write_failed += 1
                log.warning("telemetry not stored (%s); freeing the oldest telemetry", exc)
                self._free_for_write()
                return None
            self._enforce(created)
            return rid
        if len(self._held) >= MAX_HELD:
            lost = self._held.popleft()
            log.error(
                "the state database has refused writes for %d messages; the oldest (%s on %s) "
                "is lost", MAX_HELD, lost.kind.value, lost.topic,
            )
        self._held.append(row)
        last = self.retry_held()
        self._enforce(created)
        return last if not self._held else None

    def retry_held(self) -> int | None:
        """Write what is held in memory, in order; returns the id of the last row written."""
        last: int | None = None
        freed = False
        while self._held:
            try:
                last = self._insert(self._held[0])
            except StoreError as exc:
                if not freed and is_disk_full(exc.__cause__ or exc) and self._free_for_write():
                    freed = True
                    continue
                log.warning("holding %d message(s) in memory: %s", len(self._held), exc)
                return last
            self._held.popleft()
        return last

    def _insert(self, row: _Unwritten) -> int:
        with self.db.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO outbox (kind, topic, payload, created, boot, seq, correlation, "
                "bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (row.kind.value, row.topic, row.payload, row.created, row.boot, row.seq,
                 row.correlation, row.size),
            )
            rid = cur.lastrowid
        assert rid is not None
        self._bytes += row.size
        return int(rid)

    # -- bounds ------------------------------------------------------------------------------
    def _enforce(self, now: float) -> None:
        try:
            if now >= self._next_age_check:
                self._next_age_check = now + AGE_CHECK_S
                n, _ = self._delete_telemetry("created < ?", (now - self.max_age_s,))
                self.dropped_over_age += n
                if n:
                    log.info("dropped %d telemetry rows older than %.0f s", n, self.max_age_s)
            if self._bytes > self.max_bytes:
                self.dropped_over_bytes += self._drop_oldest_telemetry(
                    self._bytes - int(self.max_bytes * FREE_TO)
                )
        except StoreError as exc:
            log.warning("outbox bounds not enforced this time: %s", exc)

    def _drop_oldest_telemetry(self, to_free: int) -> int:
        """Delete the oldest telemetry rows until ``to_free`` bytes are gone (or none is left)."""
        dropped = 0
        while to_free > 0:
            rows = self.db.query(
                "SELECT id, bytes FROM outbox WHERE kind = ? ORDER BY id LIMIT 512",
                (Kind.TELEMETRY.value,),
            )
            if not rows:
                break
            cutoff, acc = rows[-1][0], 0
            for rid, size in rows:
                acc += int(size)
                if acc >= to_free:
                    cutoff = rid
                    break
            n, freed = self._delete_telemetry("id <= ?", (cutoff,))
            dropped += n
            to_free -= freed
            if n == 0:
                break
        return dropped

    def _free_for_write(self) -> bool:
        """Make room after a failed write: the oldest tenth of the telemetry (at least 64
        rows). Returns whether anything was freed."""
        try:
            rows = self.db.query(
                "SELECT COUNT(*) FROM outbox WHERE kind = ?", (Kind.TELEMETRY.value,)
            )
            count = int(rows[0][0])
            if count == 0:
                return False
            n = max(64, count // 10)
            ids = self.db.query(
                "SELECT id FROM outbox WHERE kind = ? ORDER BY id LIMIT 1 OFFSET ?",
                (Kind.TELEMETRY.value, min(n, count) - 1),
            )
            dropped, _ = self._delete_telemetry("id <= ?", (ids[0][0],))
        except StoreError as exc:
            log.error("cannot free space in the outbox: %s", exc)
            return False
        self.dropped_over_bytes += dropped
        return dropped > 0

    def _delete_telemetry(self, where: str, params: Sequence[object]) -> tuple[int, int]:
        sql = f"DELETE FROM outbox WHERE kind = ? AND {where} RETURNING bytes"
        with self.db.transaction() as conn:
            sizes = [int(r[0]) for r in conn.execute(sql, (Kind.TELEMETRY.value, *params))]
        freed = sum(sizes)
        self._bytes -= freed
        return len(sizes), freed

    # -- reading and acknowledging -----------------------------------------------------------
    def pending(
        self, kinds: Iterable[Kind], after_id: int = 0, limit: int = 100
    ) -> list[OutboxRow]:
        """Rows of ``kinds`` with an id above ``after_id``, oldest first."""
        names = [Kind(k).value for k in kinds]
        marks = ",".join("?" * len(names))
        rows = self.db.query(
            f"SELECT id, kind, topic, payload, created, boot, seq, correlation FROM outbox "
            f"WHERE kind IN ({marks}) AND id > ? ORDER BY id LIMIT ?",
            (*names, after_id, limit),
        )
        return [
            OutboxRow(int(r[0]), Kind(r[1]), str(r[2]), bytes(r[3]), float(r[4]), int(r[5]),
                      int(r[6]), None if r[7] is None else bytes(r[7]))
            for r in rows
        ]

    def delete(self, ids: Iterable[int]) -> None:
        """Forget rows the broker has acknowledged. Ids already gone are ignored."""
        id_list = list(ids)
        for i in range(0, len(id_list), 500):
            chunk = id_list[i:i + 500]
            marks = ",".join("?" * len(chunk))
            with self.db.transaction() as conn:
                sizes = conn.execute(
                    f"DELETE FROM outbox WHERE id IN ({marks}) RETURNING bytes", chunk
                ).fetchall()
            self._bytes -= sum(int(s[0]) for s in sizes)

    def max_id(self) -> int:
        """The highest id ever given (0 for none): later rows will have higher ones."""
        rows = self.db.query("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")
        return int(rows[0][0]) if rows else 0

    def stats(self) -> OutboxStats:
        by_kind = {
            str(k): int(n)
            for k, n in self.db.query("SELECT kind, COUNT(*) FROM outbox GROUP BY kind")
        }
        return OutboxStats(
            rows=sum(by_kind.values()),
            bytes=self._bytes,
            by_kind=by_kind,
            dropped_over_bytes=self.dropped_over_bytes,
            dropped_over_age=self.dropped_over_age,
            dropped_write_failed=self.dropped_write_failed,
            held_in_memory=len(self._held),
        )
