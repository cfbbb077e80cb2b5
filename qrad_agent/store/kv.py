"""Small durable values: the boot counter, command sequence numbers per fleet key, the fleet's
config overlay with its revision, and a few flags (mode, drain).

Values are JSON. Everything that protects against replays or carries the fleet's intent is
written durably (synced) before the agent acts on it or acknowledges it.
"""

from __future__ import annotations

import json
from typing import Any

from qrad_agent.store.db import Database, StoreError

MIGRATIONS = [
    """
    CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE command_seq (key_id TEXT PRIMARY KEY, seq INTEGER NOT NULL)
    """,
]

BOOT = "boot"
CONFIG_OVERLAY = "config_overlay"


class KeyValue:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("kv", MIGRATIONS)

    def get(self, key: str, default: Any = None) -> Any:
        rows = self.db.query("SELECT value FROM kv WHERE key = ?", (key,))
        if not rows:
            return default
        try:
            return json.loads(rows[0][0])
        except ValueError as exc:
            raise StoreError(f"{self.db.path}: stored value {key!r} is not JSON: {exc}") from exc

    def set(self, key: str, value: Any, durable: bool = True) -> None:
        text = json.dumps(value, sort_keys=True, allow_nan=False)
        with self.db.transaction(durable=durable) as conn:
            conn.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, text),
            )

    def delete(self, key: str) -> None:
        with self.db.transaction(durable=True) as conn:
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))

    # -- boot counter ------------------------------------------------------------------------
    def bump_boot(self) -> int:
        """Count this start of the agent and return its number (1 for the first ever)."""
        with self.db.transaction(durable=True):
            boot = int(self.get(BOOT, 0)) + 1
            self.set(BOOT, boot)
        return boot

    # -- replay protection -------------------------------------------------------------------
    def command_seq(self, key_id: str) -> int:
        rows = self.db.query("SELECT seq FROM command_seq WHERE key_id = ?", (key_id,))
        return int(rows[0][0]) if rows else 0

    def accept_command_seq(self, key_id: str, seq: int) -> int | None:
        """Record ``seq`` for ``key_id`` if it is above the last one; durable before returning.

        Returns None when accepted, else the last accepted sequence number (a replay).
        """
        with self.db.transaction(durable=True) as conn:
            row = conn.execute(
                "SELECT seq FROM command_seq WHERE key_id = ?", (key_id,)
            ).fetchone()
            last = int(row[0]) if row else 0
            if seq <= last:
                return last
            conn.execute(
                "INSERT INTO command_seq (key_id, seq) VALUES (?, ?) "
                "ON CONFLICT(key_id) DO UPDATE SET seq = excluded.seq",
                (key_id, seq),
            )
        return None

    # -- the fleet's config overlay ----------------------------------------------------------
    def config_overlay(self) -> tuple[int, dict[str, Any]]:
        """(revision, overlay); (0, {}) before the fleet ever patched the config."""
        value = self.get(CONFIG_OVERLAY)
        if not isinstance(value, dict):
            return 0, {}
        overlay = value.get("overlay", {})
        return int(value.get("revision", 0)), overlay if isinstance(overlay, dict) else {}

    def set_config_overlay(self, revision: int, overlay: dict[str, Any]) -> None:
        self.set(CONFIG_OVERLAY, {"revision": revision, "overlay": overlay}, durable=True)
