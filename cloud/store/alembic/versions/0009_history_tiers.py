"""Sample history in tiers (issue 15): every sample for the last hour in `samples`, now unique per
(node, uuid, ts) so that a telemetry message delivered twice is stored once; the coarser tiers in
`sample_rollups` (sums and counts per bucket); the roll-up's progress in `history_rollup_state`.

Written by hand; it must stay equal to the tables in cloud/store/schema.py (tests/test_fleet_store.py
compares the migrated schema with `metadata`).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FIGURES = ("temperature_c", "power_w", "power_limit_w", "utilization_pct", "memory_used_bytes")


def upgrade() -> None:
    # rows stored twice before the index was unique: keep the first of each
    op.execute("DELETE FROM samples WHERE id NOT IN (SELECT min(id) FROM samples GROUP BY node, uuid, ts)")
    op.drop_index("ix_samples_node_uuid_ts", table_name="samples")
    op.create_index("ix_samples_node_uuid_ts", "samples", ["node", "uuid", "ts"], unique=True)
    op.create_table(
        "sample_rollups",
        sa.Column("node", sa.String(253), primary_key=True),
        sa.Column("resolution_s", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("uuid", sa.String, primary_key=True),
        sa.Column("bucket_ts", sa.Float, primary_key=True, autoincrement=False),
        sa.Column("n", sa.Integer, nullable=False),
        *[sa.Column(f"{name}_sum", sa.Float) for name in FIGURES],
        *[sa.Column(f"{name}_n", sa.Integer) for name in FIGURES],
        sa.ForeignKeyConstraint(["node"], ["nodes.name"], name="fk_sample_rollups_node", ondelete="CASCADE"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_sample_rollups_resolution_bucket", "sample_rollups", ["resolution_s", "bucket_ts"])
    op.create_table(
        "history_rollup_state",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("rolled_id", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("history_rollup_state")
    op.drop_index("ix_sample_rollups_resolution_bucket", table_name="sample_rollups")
    op.drop_table("sample_rollups")
    op.drop_index("ix_samples_node_uuid_ts", table_name="samples")
    op.create_index("ix_samples_node_uuid_ts", "samples", ["node", "uuid", "ts"])
