"""Tables for edge-aware DaemonSet rollouts and every node's state in them.

Written by hand; it must stay equal to the tables in cloud/store/schema.py (tests/test_fleet_store.py
compares the migrated schema with `metadata`). `rollouts.active` is 1 for the one running or
rolling-back rollout and NULL otherwise: its UNIQUE constraint lets the database itself refuse a
second active rollout, even from two replicas at once.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types: a migration must not change when cloud/store/schema.py does.
JSON = sa.JSON().with_variant(JSONB(), "postgresql")
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: INTEGER PRIMARY KEY
NODE = sa.String(253)  # a Kubernetes node name


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("active", sa.Integer),
        sa.Column("target_version", sa.String(128), nullable=False),
        sa.Column("image", sa.String(512)),
        sa.Column("container", sa.String(253)),
        sa.Column("template_patch", JSON),
        sa.Column("request", JSON, nullable=False),
        sa.Column("max_unavailable", sa.Integer, nullable=False),
        sa.Column("failure_threshold", sa.Integer, nullable=False),
        sa.Column("health_timeout", sa.Float, nullable=False),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("wave_count", sa.Integer, nullable=False),
        sa.Column("previous_template", JSON, nullable=False),
        sa.Column("new_template", JSON, nullable=False),
        sa.Column("template_applied", sa.String(16)),
        sa.Column("rollback_requested", sa.Boolean, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
        sa.UniqueConstraint("active", name="uq_rollouts_active"),
    )
    op.create_table(
        "rollout_nodes",
        sa.Column(
            "rollout_id",
            ROW_ID,
            sa.ForeignKey("rollouts.id", name="fk_rollout_nodes_rollout", ondelete="CASCADE"),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column("node", NODE, primary_key=True),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("canary", sa.Boolean, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("since", sa.Float, nullable=False),
        sa.Column("marked_pod", sa.String(253)),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("reverting", sa.Boolean, nullable=False),
        sa.Column("from_version", sa.String(128)),
        sa.Column("reason", sa.Text),
    )
    op.create_index("ix_rollout_nodes_rollout_state", "rollout_nodes", ["rollout_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_rollout_nodes_rollout_state", table_name="rollout_nodes")
    op.drop_table("rollout_nodes")
    op.drop_table("rollouts")
