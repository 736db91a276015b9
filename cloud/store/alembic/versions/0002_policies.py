"""Tables for GPU power policies (GPUPowerPolicy CRD or REST), their resolution per node and what each node applied.

- `policies`: every policy as written (the CRD spec or the REST body), its generation and the
  status last computed for it (the CRD's status subresource, also served by the REST API).
- `policy_nodes`: per node, the labels policies are matched against, the policy resolved for
  it, its version (a counter that only grows), the content hash that decides when to bump it,
  and the version last published (retained) on the node's `policy` topic.

Written by hand; it must stay equal to the tables in cloud/store/schema.py (tests/test_fleet_store.py
compares the migrated database with `cloud.store.metadata`).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types: a migration must not change when cloud/store/schema.py does.
JSON = sa.JSON().with_variant(JSONB(), "postgresql")
NAME = sa.String(253)  # a Kubernetes object (policy) or node name


def upgrade() -> None:
    op.create_table(
        "policies",
        sa.Column("name", NAME, primary_key=True),
        sa.Column("source", sa.String(16), nullable=False),  # "kubernetes" or "api"
        sa.Column("spec", JSON, nullable=False),  # as written: nodeSelector, priority, policy fields
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("status", JSON, nullable=False),  # {} until first resolved
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "policy_nodes",
        sa.Column("node", NAME, primary_key=True),  # no FK: a node may be known before its edge talks
        sa.Column("labels", JSON, nullable=False),
        sa.Column("present", sa.Boolean, nullable=False),  # in the node source (Kubernetes / fleet / REST)
        sa.Column("policy_name", NAME),  # NULL: no policy matches
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("content_hash", sa.String(64)),
        sa.Column("policy", JSON),  # the resolved PowerPolicy, camelCase, with its version
        sa.Column("published_version", sa.Integer),  # retained on the broker; NULL: nothing
        sa.Column("published_at", sa.Float),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_policy_nodes_policy_name", "policy_nodes", ["policy_name"])


def downgrade() -> None:
    op.drop_index("ix_policy_nodes_policy_name", table_name="policy_nodes")
    op.drop_table("policy_nodes")
    op.drop_table("policies")
