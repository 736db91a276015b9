"""The edge daemon's durable store: SQLite through SQLAlchemy 2 (Core).

The edge keeps deciding while the cloud is unreachable, so everything it decides is written here
before it is sent: the outbox is the queue towards the cloud (rows leave it only when the cloud
acks them), the decision log is kept for good, and a bounded copy of the other events, the
telemetry history, the last policy and the applied command ids let the daemon restart without
losing or repeating anything.

The API is synchronous; the daemon calls it through `asyncio.to_thread`, so it is safe to call
from several threads: one Engine (a pool of connections), short transactions, `BEGIN IMMEDIATE`
for every write (so two writers never read the same `last_seq`) and an in-process write lock (so
threads queue on a cheap mutex instead of SQLite's sleeping busy handler).

Every database or disk error reaches the caller as a `StoreError` with a readable reason
("database or disk is full", "attempt to write a readonly database", "database is locked"); the
store stays usable once the condition clears.

Split by role, so that the exactly-once outbox reads apart from the caches: schema.py (tables,
meta keys), base.py (engine, transactions, errors, opening), outbox.py (outbox, decision and
event logs, applied commands), local.py (policy cache, inventory, telemetry history), epoch.py
(a new outbox epoch when the database went back in time), maintenance.py (the outbox bound, log
pruning), generation.py (the generation sidecar file) and recovery.py (opening a broken or
unopenable file without stopping enforcement). `EdgeStore` puts them together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge.store.base import StoreBase, StoreCorrupt, StoreError, StoreSchemaError
from edge.store.epoch import EpochStore
from edge.store.local import LocalStateStore
from edge.store.maintenance import MaintenanceStore
from edge.store.outbox import OutboxStore
from edge.store.recovery import Recovery, open_store
from edge.store.schema import (
    DEFAULT_BUSY_TIMEOUT_MS,
    DEFAULT_EVENTS_RETENTION,
    DEFAULT_SAMPLES_RETENTION,
    STORE_SCHEMA_VERSION,
    decisions_table,
    events_table,
    metadata,
)

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_MS",
    "DEFAULT_EVENTS_RETENTION",
    "DEFAULT_SAMPLES_RETENTION",
    "STORE_SCHEMA_VERSION",
    "EdgeStore",
    "Recovery",
    "StoreBase",
    "StoreCorrupt",
    "StoreError",
    "StoreSchemaError",
    "decisions_table",
    "events_table",
    "metadata",
    "open_edge_store",
]


class EdgeStore(EpochStore, MaintenanceStore, OutboxStore, LocalStateStore):
    """The edge daemon's SQLite database. One instance per process; share it between threads."""


def open_edge_store(path: str | Path, node: str, **options: Any) -> tuple[EdgeStore, Recovery | None]:
    """The daemon's way in: an EdgeStore on `path`, or, when that file is broken, a fresh one (the
    broken file moved aside), or a temporary one when nothing can be opened there; with what
    had to be done (edge/store/recovery.py)."""
    store, recovery = open_store(EdgeStore, Path(path), node, **options)
    assert isinstance(store, EdgeStore)
    return store, recovery
