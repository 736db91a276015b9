"""GPU inventory the fleet exporter labels its series with: PCI bus id and driver version.

Written by hand; it must stay equal to the table in cloud/store/schema.py (tests/test_fleet_store.py
compares the migrated schema with `metadata`).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("gpus") as batch:
        batch.add_column(sa.Column("pci_bus_id", sa.String(32)))
        batch.add_column(sa.Column("driver_version", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("gpus") as batch:
        batch.drop_column("driver_version")
        batch.drop_column("pci_bus_id")
