"""The power policy: the same model in the edge's config file, on the MQTT `policy` topic and in
the `GPUPowerPolicy` CRD's spec (camelCase there, snake_case in Python).

Durations accept seconds (`120`) or a short string (`"90s"`, `"2m"`, `"1h"`).
"""

import re
from enum import StrEnum
from typing import Annotated

from pydantic import BeforeValidator, Field, model_validator

from shared.wire import CamelModel

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> object:
    """Turn "2m" into 120.0; leave numbers (and anything else, for pydantic to reject) alone."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"not a duration: {value!r} (use seconds or e.g. '90s', '2m', '1h')")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0, le=7 * 24 * 3600)]

# As NVIDIA's k8s-device-plugin: XIDs that are application errors, not GPU faults.
DEFAULT_IGNORED_XIDS: tuple[int, ...] = (13, 31, 43, 45, 68, 109)


class XidAction(StrEnum):
    RECORD = "record"  # log it as an event, health unchanged
    MARK_UNHEALTHY = "mark_unhealthy"
    REQUEST_MIGRATION = "request_migration"  # mark unhealthy and ask the cloud to move work off


class PowerSaving(CamelModel):
    """Sustained low utilisation lowers the power limit to a share of the default."""

    enabled: bool = False
    utilization_threshold: float = Field(10.0, ge=0, le=100)  # percent
    cap_percent: float = Field(70.0, gt=0, le=100)  # percent of the default limit
    sustain_period: Seconds = 60.0  # utilisation must stay below the threshold this long


class ThermalThrottling(CamelModel):
    """Step the power limit down while hot; restore step by step after a cool-down."""

    enabled: bool = True
    max_temp_c: float = Field(83.0, gt=0, le=150)
    critical_temp_c: float = Field(90.0, gt=0, le=150)
    cool_down_period: Seconds = 120.0
    hysteresis_c: float = Field(5.0, ge=0, le=50)
    step_percent: float = Field(10.0, gt=0, le=50)  # of the default limit, per step
    step_interval: Seconds = 10.0  # at least this long between two steps (no flapping)

    @model_validator(mode="after")
    def _critical_above_max(self) -> "ThermalThrottling":
        if self.critical_temp_c <= self.max_temp_c:
            raise ValueError(
                f"criticalTempC ({self.critical_temp_c}) must be above maxTempC ({self.max_temp_c})"
            )
        return self


class XidPolicyConfig(CamelModel):
    ignored: list[int] = Field(default_factory=lambda: list(DEFAULT_IGNORED_XIDS))
    default_action: XidAction = XidAction.MARK_UNHEALTHY
    # Per-XID overrides. 48 (DBE), 79 (fell off the bus), 94/95 (contained/uncontained ECC)
    # mean the work on that GPU is at risk: ask for it to be moved.
    actions: dict[int, XidAction] = Field(
        default_factory=lambda: {
            48: XidAction.REQUEST_MIGRATION,
            79: XidAction.REQUEST_MIGRATION,
            94: XidAction.MARK_UNHEALTHY,
            95: XidAction.REQUEST_MIGRATION,
        }
    )

    def action_for(self, xid: int) -> XidAction | None:
        """None means the XID is ignored entirely."""
        if xid in self.ignored:
            return None
        return self.actions.get(xid, self.default_action)


class PowerPolicy(CamelModel):
    """A resolved policy for one node. `version` only grows; an older one is never applied."""

    name: str = Field("default", min_length=1, max_length=253)
    version: int = Field(0, ge=0)
    power_saving: PowerSaving = Field(default_factory=PowerSaving)
    thermal_throttling: ThermalThrottling = Field(default_factory=ThermalThrottling)
    power_cap_watts: float | None = Field(None, gt=0, le=5000)
    xid_policy: XidPolicyConfig = Field(default_factory=XidPolicyConfig)
