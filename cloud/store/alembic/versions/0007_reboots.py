"""Node reboots the edges' remediation ladders ask for, and the circuit breaker's verdicts.

Written by hand; it must stay equal to the table in cloud/store/schema.py (tests/test_fleet_store.py
compares the migrated schema with `metadata`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reboots",
        sa.Column("event_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("node", sa.String(253), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("gpu_index", sa.Integer),
        sa.Column("gpu_uuid", sa.String),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("requested_at", sa.Float, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("site", sa.String(253), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("why", sa.Text, nullable=False),
        sa.Column("decided_at", sa.Float, nullable=False),
        sa.Column("granted_at", sa.Float),
        sa.Column("command_id", sa.String(64)),
        sa.Column("down_at", sa.Float),
        sa.Column("ended_at", sa.Float),
        sa.Column("ended", sa.String(16)),
    )
    op.create_index("ix_reboots_verdict", "reboots", ["verdict"])
    op.create_index("ix_reboots_granted_at", "reboots", ["granted_at"])


def downgrade() -> None:
    op.drop_index("ix_reboots_granted_at", table_name="reboots")
    op.drop_index("ix_reboots_verdict", table_name="reboots")
    op.drop_table("reboots")
