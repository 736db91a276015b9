"""The cloud's fleet store: every node's state, its GPUs, telemetry history, events and decisions,
and the tables of the controller's parts.

The package is split by role: `schema` (every table, on one metadata), `base` (engine, write lock,
error translation, Alembic), `ingest` (the exactly-once ingest core), `raw_history` (the sample
history's raw tier: one row per telemetry message), `history` (its tiers), `queries` (reads), and
`alembic/` (the schema's revisions). `FleetStore` puts them together; parts receive it from the
composition root (cloud/app.py) and use its methods, never its engine.
"""

from __future__ import annotations

from cloud.store.base import DEFAULT_BUSY_TIMEOUT_MS, DEFAULT_HISTORY_RESOLUTION_S, FleetStoreError
from cloud.store.history import HistoryAnswer, HistoryMixin, HistoryResult
from cloud.store.ingest import UNKNOWN_EPOCH, Incoming, IngestCore, IngestResult, epoch_key
from cloud.store.queries import DecodedLabels, FleetQueries
from cloud.store.retention import RetentionMixin, RetentionPolicy, RetentionResult
from cloud.store.schema import (
    JsonType,
    RowId,
    decisions_table,
    events_table,
    gpus_table,
    metadata,
    nodes_table,
    sample_messages_table,
    sample_point_table,
    sample_rollups_table,
)
from cloud.store.tiers import HistoryTiers, Tier


class FleetStore(IngestCore, FleetQueries, RetentionMixin, HistoryMixin):
    """The controller's database: ingest core, reads, retention and the tiered sample history over
    one engine (see the modules)."""


__all__ = [
    "DEFAULT_BUSY_TIMEOUT_MS",
    "DEFAULT_HISTORY_RESOLUTION_S",
    "UNKNOWN_EPOCH",
    "DecodedLabels",
    "FleetStore",
    "FleetStoreError",
    "HistoryAnswer",
    "HistoryResult",
    "HistoryTiers",
    "Incoming",
    "IngestResult",
    "RetentionPolicy",
    "RetentionResult",
    "JsonType",
    "RowId",
    "decisions_table",
    "epoch_key",
    "events_table",
    "gpus_table",
    "metadata",
    "nodes_table",
    "sample_messages_table",
    "sample_point_table",
    "sample_rollups_table",
    "Tier",
]
