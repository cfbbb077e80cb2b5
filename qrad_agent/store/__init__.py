"""Local state in one SQLite database (WAL): outbox, command sequence numbers, config overlay,
boot counter. Only the control loop touches it; the MQTT network thread never does."""

from qrad_agent.store.db import Database, StoreError, open_store
from qrad_agent.store.kv import KeyValue
from qrad_agent.store.outbox import Kind, Outbox, OutboxRow, OutboxStats

__all__ = [
    "Database",
    "KeyValue",
    "Kind",
    "Outbox",
    "OutboxRow",
    "OutboxStats",
    "StoreError",
    "open_store",
]
