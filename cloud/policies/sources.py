"""Where policies and node labels come from, and where policy status goes, with a cluster: the
`GPUPowerPolicy` objects (kgpu.io/v1alpha1, cluster-scoped) and the Kubernetes nodes' labels,
through cloud/custom_resources.py (the same access as GPUPartitioning's). Without one (--no-kube)
they come from the REST API (cloud/policies/http.py)."""

from __future__ import annotations

from typing import Any

from cloud import custom_resources
from cloud.custom_resources import ClusterResource, Warn
from cloud.kube import Kube

GROUP, VERSION, PLURAL = "kgpu.io", "v1alpha1", "gpupowerpolicies"
RESOURCE = ClusterResource(GROUP, VERSION, PLURAL, "GPUPowerPolicy")
SOURCE_KUBERNETES, SOURCE_API = "kubernetes", "api"
list_node_labels = custom_resources.list_node_labels


def source(kube: Kube | None) -> str:
    return SOURCE_KUBERNETES if kube is not None else SOURCE_API


async def list_policies(kube: Kube, warn: Warn) -> list[tuple[str, dict[str, Any], int | None]] | None:
    """(name, spec, generation) of every GPUPowerPolicy; None when the API failed (keep the
    stored ones), [] when the CRD is not installed."""
    listed = await custom_resources.list_objects(kube, RESOURCE, warn, none_means="no policies")
    if listed is None:
        return None
    policies: list[tuple[str, dict[str, Any], int | None]] = []
    for obj in listed:
        generation = obj.metadata.get("generation")
        policies.append((obj.name, obj.part("spec"), generation if isinstance(generation, int) else None))
    return policies


async def write_status(kube: Kube, name: str, status: dict[str, Any], warn: Warn) -> bool:
    """Write one GPUPowerPolicy's status subresource; False if it could not be written."""
    return await custom_resources.write_status(kube, RESOURCE, name, status, warn)
