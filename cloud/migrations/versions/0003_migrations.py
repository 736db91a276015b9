"""Tables for task migrations: one row per migration with its steps and outcomes.

Placeholder in the revision chain, filled in by the migrations work (issue 4). Each revision owns the
tables of one subsystem; keep it equal to the tables that subsystem's module defines.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
