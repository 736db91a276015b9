"""What the edge's decision functions (policy, health) ask for. The daemon carries them out
through the driver and records each one, with its outcome, as a decision."""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ActionKind(StrEnum):
    SET_POWER_LIMIT = "set_power_limit"  # value: watts
    LOCK_CLOCKS = "lock_clocks"  # value: max SM clock in MHz (min is the lowest supported)
    RESET_CLOCKS = "reset_clocks"
    MARK_UNHEALTHY = "mark_unhealthy"
    MARK_HEALTHY = "mark_healthy"
    MARK_LOST = "mark_lost"
    REQUEST_MIGRATION = "request_migration"
    RECORD = "record"  # nothing to do but keep it in the decision log (e.g. an XID set to record)


DRIVER_ACTIONS = frozenset({ActionKind.SET_POWER_LIMIT, ActionKind.LOCK_CLOCKS, ActionKind.RESET_CLOCKS})


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    gpu_index: int | None
    gpu_uuid: str | None
    rule: str  # which rule decided: thermal_step_down, thermal_restore, power_saving, xid, ...
    reason: str  # a sentence for a person: why, with the figures that triggered it
    value: float | None = None
    inputs: dict[str, Any] = field(default_factory=dict)  # the figures the rule looked at
