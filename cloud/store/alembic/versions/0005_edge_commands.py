"""The command outbox: commands to edge nodes, sent again until the edge's result is stored.

Written by hand; it must stay equal to the table in cloud/store/schema.py (tests/test_fleet_store.py
compares the migrated schema with `metadata`).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "edge_commands",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("node", sa.String(253), nullable=False),
        sa.Column("command", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("sent_at", sa.Float),
        sa.Column("sends", sa.Integer, nullable=False),
        sa.Column("result_at", sa.Float),
        sa.Column("ok", sa.Boolean),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_edge_commands_result_at_created_at", "edge_commands", ["result_at", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_edge_commands_result_at_created_at", table_name="edge_commands")
    op.drop_table("edge_commands")
