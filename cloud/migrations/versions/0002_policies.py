"""Tables for GPU power policies (GPUPowerPolicy CRD or REST), their resolution per node and what each node applied.

Placeholder in the revision chain, filled in by the policies work (issue 4). Each revision owns the
tables of one subsystem; keep it equal to the tables that subsystem's module defines.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
