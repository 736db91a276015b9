"""The edge store's schema: every table on one metadata, the `meta` keys, and the two helpers
that read and write them. Apart from the store's code (edge/store/) so that the schema can be read
in one place, and so that the HTTP API can describe its rows (edge/openapi.yaml) from the tables.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

STORE_SCHEMA_VERSION = 1
"""Bump when a table changes; an older kgpu refuses to open a newer file (it would misread it)."""

DEFAULT_EVENTS_RETENTION = 100_000
DEFAULT_SAMPLES_RETENTION = 500_000  # rows; ~3.6 days of 8 GPUs sampled every 5 s
DEFAULT_BUSY_TIMEOUT_MS = 5_000

META_SCHEMA = "schema_version"
META_LAST_SEQ = "last_seq"
META_NODE = "node"
META_EPOCH = "outbox_epoch"
META_WRITE_CHECK = "write_check_ts"
META_DRAINING = "draining"  # JSON list of the GPU uuids the cloud asked to drain

metadata = sa.MetaData()

meta_table = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.String, nullable=False),
)

outbox_table = sa.Table(
    "outbox",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("id", sa.String, nullable=False),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # the envelope, exactly as it will be sent
)

decisions_table = sa.Table(
    "decisions",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("id", sa.String, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("gpu_uuid", sa.String),
    sa.Column("gpu_index", sa.Integer),
    sa.Column("rule", sa.String, nullable=False),
    sa.Column("action", sa.String, nullable=False),
    sa.Column("value", sa.Float),
    sa.Column("outcome", sa.String, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("inputs", sa.JSON, nullable=False),
    sa.Column("policy_version", sa.Integer),
    sa.Index("ix_decisions_gpu_uuid_seq", "gpu_uuid", "seq"),
    sa.Index("ix_decisions_rule_seq", "rule", "seq"),
)

# `n` is a local row number: retention only ever deletes the oldest rows, so "keep the newest N"
# is a cheap primary-key range delete (`n <= max(n) - N`) instead of a count or an OFFSET scan.
events_table = sa.Table(
    "events_log",
    metadata,
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("seq", sa.Integer, nullable=False, unique=True),
    sa.Column("id", sa.String, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("body", sa.JSON, nullable=False),
    sa.Index("ix_events_log_kind_n", "kind", "n"),
)

policy_table = sa.Table(
    "policy_cache",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("policy", sa.Text, nullable=False),
    sa.Column("cached_at", sa.Float, nullable=False),
    sa.CheckConstraint("id = 1", name="policy_cache_single_row"),
)

commands_table = sa.Table(
    "applied_commands",
    metadata,
    sa.Column("command_id", sa.String, primary_key=True),
    sa.Column("command", sa.String, nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
)

inventory_table = sa.Table(
    "inventory",
    metadata,
    sa.Column("gpu_index", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("uuid", sa.String, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
)

samples_table = sa.Table(
    "samples",
    metadata,
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("gpu_uuid", sa.String, nullable=False),
    sa.Column("gpu_index", sa.Integer, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_samples_ts", "ts"),
    sa.Index("ix_samples_gpu_uuid_ts", "gpu_uuid", "ts"),
)


# ---- meta ---------------------------------------------------------------------------------


def meta_get(conn: Connection, key: str) -> str | None:
    return conn.execute(
        sa.select(meta_table.c.value).where(meta_table.c.key == key)
    ).scalar_one_or_none()


def meta_set(conn: Connection, key: str, value: str) -> None:
    stmt = sqlite_insert(meta_table).values(key=key, value=value)
    conn.execute(
        stmt.on_conflict_do_update(index_elements=[meta_table.c.key], set_={"value": value})
    )
