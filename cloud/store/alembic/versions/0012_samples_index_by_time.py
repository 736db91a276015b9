"""The raw history's unique index ordered (node, ts, uuid) instead of (node, uuid, ts): the same
uniqueness (a telemetry message delivered twice is stored once), but the eight samples of one
message are neighbours in it, so storing them writes one index page instead of one per GPU. With
an hour of history per GPU, (node, uuid, ts) put each GPU's newest entry on a page of its own:
the steady ingest wrote 1.7x the pages and spent 1.7x the time (docs/benchmarks.md, issue 17).
Reads of one GPU's history scan its node's entries in the range (eight GPUs' worth) instead of
its own; reads of a whole node read them in index order.

Written by hand; it must stay equal to the tables in cloud/store/schema.py (tests/test_fleet_store.py
compares the migrated schema with `metadata`).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_samples_node_ts_uuid", "samples", ["node", "ts", "uuid"], unique=True)
    op.drop_index("ix_samples_node_uuid_ts", table_name="samples")


def downgrade() -> None:
    op.create_index("ix_samples_node_uuid_ts", "samples", ["node", "uuid", "ts"], unique=True)
    op.drop_index("ix_samples_node_ts_uuid", table_name="samples")
