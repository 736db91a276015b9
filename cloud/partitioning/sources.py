"""The Kubernetes side of partitioning: the `GPUPartitioning` objects (kgpu.io/v1alpha1,
cluster-scoped), the nodes' labels, and the objects' status subresource, through
cloud/custom_resources.py (the same access as GPUPowerPolicy's)."""

from __future__ import annotations

from typing import Any

from cloud import custom_resources
from cloud.custom_resources import ClusterResource, Warn
from cloud.kube import Kube
from cloud.partitioning.resolution import PartitioningSource

GROUP, VERSION, PLURAL, KIND = "kgpu.io", "v1alpha1", "gpupartitionings", "GPUPartitioning"
RESOURCE = ClusterResource(GROUP, VERSION, PLURAL, KIND)
list_node_labels = custom_resources.list_node_labels


async def list_objects(kube: Kube, warn: Warn) -> list[PartitioningSource] | None:
    """Every GPUPartitioning; None when the API failed (keep the last known), [] when the CRD is
    not installed."""
    listed = await custom_resources.list_objects(kube, RESOURCE, warn, none_means="no partitioning")
    if listed is None:
        return None
    out: list[PartitioningSource] = []
    for obj in listed:
        generation = obj.metadata.get("generation")
        out.append(PartitioningSource(obj.name, obj.part("spec"),
                                      generation if isinstance(generation, int) and generation > 0 else 1,
                                      obj.part("status")))
    return out


async def write_status(kube: Kube, name: str, status: dict[str, Any], warn: Warn) -> bool:
    """Patch one GPUPartitioning's status subresource; False if it could not be written."""
    return await custom_resources.write_status(kube, RESOURCE, name, status, warn)
