"""One SQLite database in WAL mode for all of the agent's local state.

WAL lets a reader (a CLI status query, a backup) look while the loop writes, and a commit is
a sequential append, which is kind to SD cards. ``synchronous=NORMAL`` is the default: a
power cut can lose the last commits but never corrupts the file, which is right for
telemetry. Writes that protect something (command sequence numbers, the config overlay) use
:meth:`Database.transaction` with ``durable=True``, which syncs that commit to the disk.

Each component owns its tables and migrates them with :meth:`Database.migrate` under its own
name, so the link, the job ledger and whatever comes next do not share one version number.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

DB_NAME = "qrad-agent.db"


class StoreError(Exception):
    """The local database could not be read or written; the message names the file and why."""


def is_disk_full(exc: BaseException) -> bool:
    """True for SQLite's "database or disk is full" (SQLITE_FULL), however it is raised."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (int(code) & 0xFF) == sqlite3.SQLITE_FULL
    return "full" in str(exc).lower()


class Database:
    """The connection and its lock. Only the control loop should use it; the lock is there so
    a stray second thread (a test, a status socket) waits instead of corrupting a
    transaction."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        try:
            self.conn = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
            _switch_to_wal(self.conn)
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS migrations "
                "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the state database: {exc}") from exc
        self._lock = threading.RLock()
        self._depth = 0

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One atomic write. ``durable`` syncs this commit to the disk before returning.

        Nested use joins the outer transaction. SQLite errors leave as :class:`StoreError`
        with the original attached, after a rollback.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self.conn
                finally:
                    self._depth -= 1
                return
            try:
                if durable:
                    self.conn.execute("PRAGMA synchronous=FULL")
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot start a write: {exc}") from exc
            self._depth = 1
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException as exc:
                with suppress(sqlite3.Error):  # the failed statement may have rolled back
                    self.conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"{self.path}: write failed: {exc}") from exc
                raise
            finally:
                self._depth = 0
                if durable:
                    with suppress(sqlite3.Error):
                        self.conn.execute("PRAGMA synchronous=NORMAL")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self.conn.execute(sql, params).fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: read failed: {exc}") from exc

    def migrate(self, component: str, steps: Sequence[str]) -> int:
        """Bring ``component``'s tables to version ``len(steps)``: run each SQL script not yet
        run, in order, in one transaction. Returns the version. Never edit a released step;
        append a new one."""
        rows = self.query("SELECT version FROM migrations WHERE component = ?", (component,))
        current = int(rows[0][0]) if rows else 0
        if current > len(steps):
            raise StoreError(
                f"{self.path}: {component} tables are at version {current}, newer than this "
                f"agent knows ({len(steps)}); upgrade the agent or move the database away"
            )
        if current == len(steps):
            return current
        with self.transaction(durable=True) as conn:
            # read again under the write lock: another process (the dispatcher and a
            # `qrad-fleet submit` on one queue) may have migrated since the first look
            row = conn.execute(
                "SELECT version FROM migrations WHERE component = ?", (component,)
            ).fetchone()
            current = int(row[0]) if row else 0
            if current >= len(steps):
                return current
            for step in steps[current:]:
                for statement in _statements(step):
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO migrations (component, version) VALUES (?, ?) "
                "ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                (component, len(steps)),
            )
        return len(steps)

    def close(self) -> None:
        with self._lock, suppress(sqlite3.Error):
            self.conn.close()


def _switch_to_wal(conn: sqlite3.Connection, wait_s: float = 5.0) -> None:
    """WAL mode. Switching a new database needs it alone for an instant, and SQLite does not
    wait for that with its busy timeout: two processes opening one new file (the dispatcher
    and `qrad-fleet submit`) would see "database is locked". Retry for a few seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _statements(script: str) -> list[str]:
    # executescript() would commit the open transaction first, so statements run one by one.
    # A ';' inside a trigger body or a literal does not end a statement: pieces are joined
    # until SQLite says the statement is complete.
    out: list[str] = []
    buf = ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \t\n;"):
                out.append(buf.strip())
            buf = ""
    if buf.strip(" \t\n;"):
        out.append(buf.strip())  # the last statement may lack its ';'
    return out


def open_store(state_dir: Path | str) -> Database:
    """The agent's database in ``state_dir`` (created if missing)."""
    d = Path(state_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{d}: cannot create the state directory: {exc.strerror}") from exc
    return Database(d / DB_NAME)
