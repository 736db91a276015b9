"""The body of `POST /api/v1/rollouts`, validated (pure: no I/O)."""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import Field, StrictInt, field_validator, model_validator

from cloud.rollout.plan import parse_amount, version_from_image
from shared.policy import Seconds
from shared.topics import NODE_NAME_RE
from shared.wire import CamelModel


def _amount(value: int | str) -> int | str:
    parse_amount(value)  # raises ValueError with the reason
    return value


class Waves(CamelModel):
    """Canary nodes first (wave 0), then cumulative percentages of the other nodes (by name)."""

    canary: list[str] = Field(default_factory=list, max_length=1000)
    percentages: list[float] = Field(default_factory=lambda: [10.0, 50.0, 100.0], min_length=1, max_length=100)

    @field_validator("canary")
    @classmethod
    def _nodes(cls, names: list[str]) -> list[str]:
        bad = [n for n in names if not NODE_NAME_RE.match(n)]
        if bad:
            raise ValueError(f"not node names: {bad[:5]}")
        if len(set(names)) != len(names):
            raise ValueError("a canary node is named twice")
        return names

    @field_validator("percentages")
    @classmethod
    def _percentages(cls, values: list[float]) -> list[float]:
        if any(not 0 < p <= 100 for p in values):
            raise ValueError("percentages must be within (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(values)):
            raise ValueError("percentages must increase (they are cumulative)")
        return values if values[-1] == 100 else [*values, 100.0]  # the last wave takes the rest


class RolloutRequest(CamelModel):
    """`POST /api/v1/rollouts`. Exactly one of `image` and `templatePatch`."""

    image: str | None = Field(None, min_length=1, max_length=512)
    container: str | None = Field(None, min_length=1, max_length=253)  # for `image`; default: the first
    template_patch: dict[str, Any] | None = None  # JSON merge patch (RFC 7386) on the pod template
    version: str | None = Field(None, min_length=1, max_length=128)
    max_unavailable: StrictInt | str = "10%"
    waves: Waves = Field(default_factory=Waves)
    health_timeout: Seconds = 300.0
    failure_threshold: StrictInt | str = "5%"

    @field_validator("max_unavailable")
    @classmethod
    def _max_unavailable(cls, value: int | str) -> int | str:
        number, _ = parse_amount(value)
        if number <= 0:
            raise ValueError("must allow at least one node (a count >= 1 or a percentage > 0)")
        return value

    @field_validator("failure_threshold")
    @classmethod
    def _failure_threshold(cls, value: int | str) -> int | str:
        return _amount(value)

    @field_validator("health_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be longer than 0 s")
        return value

    @model_validator(mode="after")
    def _one_change(self) -> RolloutRequest:
        if (self.image is None) == (self.template_patch is None):
            raise ValueError("give exactly one of image and templatePatch")
        if self.template_patch is not None and self.container is not None:
            raise ValueError("container goes with image, not with templatePatch")
        if self.version is None:
            if self.template_patch is not None:
                raise ValueError("templatePatch needs version: the daemon version the new pods will report")
            assert self.image is not None
            self.version = version_from_image(self.image)
            if self.version is None:
                raise ValueError("image has no tag to take the version from: give version")
        return self
