"""GPU partitioning: MIG layouts and time-slicing, the same models in the `GPUPartitioning` CRD's
spec (camelCase), on the MQTT `partitioning` topic (retained per node, like the power policy) and
in the edge's store (re-applied after a reboot).

A layout is written as an operator writes it in the CRD (NVIDIA's mig-parted names): `disabled`,
`all-1g.10gb` (as many of one profile as fit), or `{"mixed": {"1g.10gb": 3, "2g.20gb": 2}}`.
Whether a layout fits a GPU is decided by `shared.mig.place` from NVIDIA's profile tables.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from shared.wire import CamelModel, WireModel

PROFILE_NAME_RE = re.compile(r"^[1-8]g\.\d+gb(\+me)?$")  # 1g.10gb, 1g.10gb+me, 7g.80gb
MAX_REPLICAS = 64


class MigLayout(WireModel):
    """A MIG layout for one GPU. `mode`: disabled (MIG off), all (as many `profile` as fit),
    mixed (`counts` of each profile). Accepts the CRD's short forms (see the module doc)."""

    mode: Literal["disabled", "all", "mixed"]
    profile: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text == "disabled":
                return {"mode": "disabled"}
            if text.startswith("all-"):
                return {"mode": "all", "profile": text[4:]}
            raise ValueError(f"a MIG layout is 'disabled', 'all-<profile>' or {{'mixed': {{...}}}}, not {value!r}")
        if isinstance(value, dict) and set(value) == {"mixed"}:
            return {"mode": "mixed", "counts": value["mixed"]}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MigLayout:
        if self.mode == "all":
            if not self.profile or not PROFILE_NAME_RE.match(self.profile):
                raise ValueError(f"'all-<profile>' needs a MIG profile name such as 1g.10gb, got {self.profile!r}")
            if self.counts:
                raise ValueError("'all-<profile>' takes no counts")
        elif self.mode == "mixed":
            if not self.counts:
                raise ValueError("a mixed layout needs at least one profile count")
            for name, count in self.counts.items():
                if not PROFILE_NAME_RE.match(name):
                    raise ValueError(f"not a MIG profile name: {name!r} (e.g. 1g.10gb, 3g.40gb)")
                if not 0 <= count <= 7:
                    raise ValueError(f"{name}: a GPU holds at most 7 MIG devices, got {count}")
            if self.profile is not None:
                raise ValueError("a mixed layout names its profiles in counts")
        elif self.profile is not None or self.counts:
            raise ValueError("'disabled' takes no profile or counts")
        return self

    def spec(self) -> str | dict[str, dict[str, int]]:
        """The short form, as written in the CRD and shown to operators."""
        if self.mode == "disabled":
            return "disabled"
        if self.mode == "all":
            return f"all-{self.profile}"
        return {"mixed": dict(sorted(self.counts.items()))}

    def label(self) -> str:
        """One line for logs and decisions: `disabled`, `all-1g.10gb`, `mixed 1g.10gb=3,2g.20gb=2`."""
        spec = self.spec()
        if isinstance(spec, str):
            return spec
        return "mixed " + ",".join(f"{name}={count}" for name, count in spec["mixed"].items())

    @model_serializer(mode="plain")
    def _as_spec(self) -> str | dict[str, dict[str, int]]:
        return self.spec()


class TimeSlicing(CamelModel):
    """Several pods on one GPU: each GPU advertised as `replicas` devices `<UUID>::<n>`."""

    replicas: int = Field(1, ge=1, le=MAX_REPLICAS)  # 1: no sharing
    # the resource the replicas are advertised as: nvidia.com/gpu (NVIDIA's default) or a
    # separate one (nvidia.com/gpu.shared, NVIDIA's renameByDefault) so pods opt in
    resource_name: str = Field("nvidia.com/gpu", pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$", max_length=253)
    # a pod using more than its share of the GPU's memory (total / replicas): an event only, or
    # an event and the pod evicted
    memory_enforcement: Literal["event", "evict"] = "event"


class ModelPartitioning(CamelModel):
    """What one GPU model gets on the selected nodes; None leaves that side as it is."""

    mig: MigLayout | None = None
    time_slicing: TimeSlicing | None = None

    @model_validator(mode="after")
    def _not_both(self) -> ModelPartitioning:
        if self.mig is not None and self.mig.mode != "disabled" and self.time_slicing is not None \
                and self.time_slicing.replicas > 1:
            raise ValueError("time-slicing of MIG devices is not supported: use a MIG layout or replicas, not both")
        return self


ANY_MODEL = "*"  # the key of `models` that applies to GPU models not named


class PartitioningSpec(CamelModel):
    """The `GPUPartitioning` CRD's spec. `models` is keyed by the GPU's product name as NVML
    reports it (`NVIDIA A100-SXM4-40GB`) or `*` for any other model. Of the objects selecting a
    node, the highest `priority` wins (then the oldest name, alphabetically)."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    priority: int = 0
    models: dict[str, ModelPartitioning] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _some(cls, models: dict[str, ModelPartitioning]) -> dict[str, ModelPartitioning]:
        for key in models:
            if not key.strip():
                raise ValueError("a GPU model name may not be empty (use '*' for any model)")
        return models

    def for_model(self, gpu_name: str) -> ModelPartitioning | None:
        """This spec's partitioning for a GPU of product `gpu_name` (exact, then `*`)."""
        return self.models.get(gpu_name) or self.models.get(ANY_MODEL)


class NodePartitioning(CamelModel):
    """What the cloud publishes, retained, to one node: the winning object's spec for that node
    (`name` empty and no models when none selects it: the node then leaves its GPUs as they are)."""

    name: str = ""
    version: int = Field(0, ge=0)  # the object's metadata.generation: the edge applies each once
    models: dict[str, ModelPartitioning] = Field(default_factory=dict)

    def for_model(self, gpu_name: str) -> ModelPartitioning | None:
        return self.models.get(gpu_name) or self.models.get(ANY_MODEL)
