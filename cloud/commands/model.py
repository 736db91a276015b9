"""What an operator may ask of an edge, and the state of a stored command (pure)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from shared.wire import CamelModel


class OperatorCommand(CamelModel):
    """`POST /api/v1/nodes/{node}/commands` body. `migrate_away` is the migration part's."""

    command: Literal["drain", "undrain", "restart_check"]
    gpu_uuid: str | None = Field(None, min_length=1, max_length=96)


def command_state(row: dict[str, Any], now: float, ttl_s: float) -> str:
    """pending, done, failed or expired (no result within `ttl_s` of its creation)."""
    if row["result_at"] is not None:
        return "done" if row["ok"] else "failed"
    return "expired" if now - row["created_at"] > ttl_s else "pending"
