"""Which pod uses which GPU, and the edge's remediation stage, as the newest status says (issue 14):
`gpus.pods`, `gpus.remediation`, `nodes.pod_map_source`. The migration part moves only the pods of
the failing GPU when the source is known, and recovery waits for the remediation ladder.

Written by hand; it must stay equal to the tables in cloud/store/schema.py (tests/test_fleet_store.py
compares the migrated schema with `metadata`).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("pod_map_source", sa.String(16)))
    with op.batch_alter_table("gpus") as batch:
        batch.add_column(sa.Column("pods", JsonType))
        batch.add_column(sa.Column("remediation", sa.String(200)))


def downgrade() -> None:
    with op.batch_alter_table("gpus") as batch:
        batch.drop_column("remediation")
        batch.drop_column("pods")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("pod_map_source")
