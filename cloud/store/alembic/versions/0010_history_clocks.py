"""Sample history with the memory controller's load and the clocks (issue 15: the dashboard charts
utilisation, memory and clocks): three nullable columns on `samples`, and their sums and counts on
`sample_rollups` (older rows have none: the charts start where the figures start).

Written by hand; it must stay equal to the tables in cloud/store/schema.py (tests/test_fleet_store.py
compares the migrated schema with `metadata`).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (("memory_util_pct", sa.Float), ("sm_clock_mhz", sa.Integer), ("memory_clock_mhz", sa.Integer))


def upgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        for name, kind in COLUMNS:
            batch.add_column(sa.Column(name, kind))
    with op.batch_alter_table("sample_rollups") as batch:
        for name, _kind in COLUMNS:
            batch.add_column(sa.Column(f"{name}_sum", sa.Float))
        for name, _kind in COLUMNS:
            batch.add_column(sa.Column(f"{name}_n", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("sample_rollups") as batch:
        for name, _kind in COLUMNS:
            batch.drop_column(f"{name}_n")
            batch.drop_column(f"{name}_sum")
    with op.batch_alter_table("samples") as batch:
        for name, _kind in COLUMNS:
            batch.drop_column(name)
