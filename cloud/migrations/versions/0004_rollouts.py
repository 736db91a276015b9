"""Tables for edge-aware DaemonSet rollouts and every node's state in them.

Placeholder in the revision chain, filled in by the rollouts work (issue 4). Each revision owns the
tables of one subsystem; keep it equal to the tables that subsystem's module defines.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
