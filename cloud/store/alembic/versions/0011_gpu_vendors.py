"""The device layer (issue 16): each GPU's vendor, backend, platform, the extended resource its
device plugin advertises and its capabilities, as the node's status reports them, on `gpus`
(NULL from an edge older than the device layer: an NVIDIA GPU read through NVML).

Written by hand; it must stay equal to the tables in cloud/store/schema.py (tests/test_fleet_store.py
compares the migrated schema with `metadata`).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("gpus") as batch:
        batch.add_column(sa.Column("vendor", sa.String(16)))
        batch.add_column(sa.Column("backend", sa.String(16)))
        batch.add_column(sa.Column("platform", sa.String(64)))
        batch.add_column(sa.Column("resource_name", sa.String(253)))
        batch.add_column(sa.Column("capabilities", JsonType))


def downgrade() -> None:
    with op.batch_alter_table("gpus") as batch:
        for name in ("capabilities", "resource_name", "platform", "backend", "vendor"):
            batch.drop_column(name)
