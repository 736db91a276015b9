"""What to do with one GPU's partitioning, decided without I/O.

The cloud sends a node its `NodePartitioning` (retained, versioned); for each GPU the edge picks
the entry for its model and compares the MIG layout asked for with what the GPU has:

- nothing asked, or the GPU already has it: nothing to do;
- a layout the GPU cannot hold (no MIG on the model, too many slices, an unknown profile):
  refused with the reason, nothing touched;
- otherwise the GPU is fenced first (its devices are advertised unhealthy so the kubelet gives it
  no new pods) and the layout is applied once no compute process is left on it: changing MIG
  mode or destroying instances under running work is refused by the driver, and would kill it.

Time-slicing needs no driver change: it is only how many devices each GPU is advertised as.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass

from shared.mig import ImpossibleLayout, place
from shared.partitioning import MigLayout, NodePartitioning, TimeSlicing

DEFAULT_RESOURCE = "nvidia.com/gpu"


class Step(enum.StrEnum):
    NONE = "none"  # nothing asked, or already in place
    REFUSE = "refuse"  # impossible: reason says why
    WAIT_DRAIN = "wait_drain"  # fenced; work still runs on the GPU
    APPLY = "apply"  # fenced and idle: apply `layout` now


@dataclass(frozen=True)
class GpuMigFacts:
    """What the edge knows about one GPU's MIG side."""

    name: str  # the product name, as NVML says it
    supported: bool
    enabled: bool
    profiles: tuple[str, ...]  # the profile of each MIG device it has now
    processes: int  # compute processes on the GPU now


@dataclass(frozen=True)
class GpuPlan:
    step: Step
    reason: str
    layout: MigLayout | None = None


def wanted_layout(partitioning: NodePartitioning | None, gpu_name: str) -> MigLayout | None:
    """The MIG layout the cloud asks for a GPU of this model, None when it asks nothing."""
    if partitioning is None:
        return None
    entry = partitioning.for_model(gpu_name)
    return entry.mig if entry is not None else None


def has_layout(facts: GpuMigFacts, layout: MigLayout) -> bool:
    """True when the GPU already holds exactly `layout` (the same profiles, as many of each).
    Raises ImpossibleLayout when the layout cannot be made on this model at all."""
    if layout.mode == "disabled":
        return not facts.enabled
    wanted = Counter(p.profile.name for p in place(facts.name, layout))
    return facts.enabled and Counter(facts.profiles) == wanted


def plan_gpu(facts: GpuMigFacts, layout: MigLayout | None) -> GpuPlan:
    if layout is None:
        return GpuPlan(Step.NONE, "no MIG layout asked for this model")
    if not facts.supported:
        if layout.mode == "disabled":
            return GpuPlan(Step.NONE, f"{facts.name} has no MIG: nothing to disable")
        return GpuPlan(Step.REFUSE, f"{facts.name} does not support MIG; layout {layout.label()} refused")
    try:
        if has_layout(facts, layout):
            return GpuPlan(Step.NONE, f"layout {layout.label()} in place")
    except ImpossibleLayout as exc:
        return GpuPlan(Step.REFUSE, f"layout {layout.label()} cannot be made on {facts.name}: {exc}")
    if facts.processes:
        return GpuPlan(Step.WAIT_DRAIN, f"layout {layout.label()} waits for {facts.processes} compute process(es) "
                                        "to leave the GPU (fenced: no new pods)", layout)
    return GpuPlan(Step.APPLY, f"applying layout {layout.label()}", layout)


@dataclass(frozen=True)
class Sharing:
    """How one GPU is advertised when it is not split by MIG."""

    replicas: int
    resource: str
    memory_enforcement: str  # event | evict


def sharing_for(partitioning: NodePartitioning | None, gpu_name: str, default_resource: str) -> Sharing:
    """Time-slicing for a GPU of this model: `replicas` devices under its resource name."""
    entry = partitioning.for_model(gpu_name) if partitioning is not None else None
    slicing: TimeSlicing | None = entry.time_slicing if entry is not None else None
    if slicing is None or slicing.replicas <= 1:
        return Sharing(1, default_resource, "event")
    resource = slicing.resource_name if slicing.resource_name else default_resource
    if resource == DEFAULT_RESOURCE:  # the CRD's default: the GPU's own resource (amd.com/gpu on an AMD node)
        resource = default_resource
    return Sharing(slicing.replicas, resource, slicing.memory_enforcement)
