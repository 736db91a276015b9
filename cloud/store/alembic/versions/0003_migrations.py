"""Tables for task migrations: one row per migration with its steps and outcomes.

`migrations` holds each migration (its node, the GPUs it covers, its state, what was done to
every pod and the steps as they happened); `migration_triggers` remembers which
`migration_request` events were consumed, so a restarted controller does not act on one twice.
Kept equal to the tables in cloud/store/schema.py (tests/test_fleet_store.py compares them).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types: a migration must not change when the module does.
JSON = sa.JSON().with_variant(JSONB(), "postgresql")
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: INTEGER PRIMARY KEY
NODE = sa.String(253)


def upgrade() -> None:
    op.create_table(
        "migrations",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("node", NODE, nullable=False),
        sa.Column("gpu_uuid", sa.String),
        sa.Column("subjects", JSON, nullable=False),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("next_attempt_at", sa.Float),
        sa.Column("pods", JSON, nullable=False),
        sa.Column("steps", JSON, nullable=False),
    )
    op.create_index("ix_migrations_node_created", "migrations", ["node", "created_at"])
    op.create_index("ix_migrations_state", "migrations", ["state"])
    op.create_table(
        "migration_triggers",
        sa.Column("event_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column(
            "migration_id",
            ROW_ID,
            sa.ForeignKey("migrations.id", name="fk_migration_triggers_migration", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("migration_triggers")
    op.drop_table("migrations")
