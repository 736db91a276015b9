"""The Kubernetes side of partitioning: the `GPUPartitioning` objects (kgpu.io/v1alpha1,
cluster-scoped), the nodes' labels, and the objects' status subresource. Every call through
`Kube.call` (a worker thread): the event loop never waits on the API server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cloud.kube import Kube, KubeError
from cloud.partitioning.resolution import PartitioningSource
from shared.topics import NODE_NAME_RE

GROUP, VERSION, PLURAL, KIND = "kgpu.io", "v1alpha1", "gpupartitionings", "GPUPartitioning"

Warn = Callable[[str, str], None]  # (key, message): a throttled warning


async def list_objects(kube: Kube, warn: Warn) -> list[PartitioningSource] | None:
    """Every GPUPartitioning; None when the API failed (keep the last known), [] when the CRD is
    not installed."""
    try:
        listed = await kube.call(kube.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        items = list((listed if isinstance(listed, dict) else {}).get("items") or [])
    except KubeError as exc:
        if not exc.not_found:
            warn("list", f"cannot list {KIND} objects (keeping the last known): {exc}")
            return None
        warn("no-crd", f"{KIND} is not served by the API server (CRD not installed?): no partitioning")
        items = []
    out: list[PartitioningSource] = []
    for item in items:
        meta = item.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str):
            continue
        spec, status, generation = item.get("spec"), item.get("status"), meta.get("generation")
        out.append(PartitioningSource(name, spec if isinstance(spec, dict) else {},
                                      generation if isinstance(generation, int) and generation > 0 else 1,
                                      status if isinstance(status, dict) else {}))
    return out


async def list_node_labels(kube: Kube, warn: Warn) -> dict[str, dict[str, str]] | None:
    """node -> its labels; None when the API failed (keep the last known labels)."""
    try:
        nodes = await kube.call(kube.core.list_node)
    except KubeError as exc:
        warn("list-nodes", f"cannot list nodes (keeping the last known labels): {exc}")
        return None
    return {n.metadata.name: dict(n.metadata.labels or {}) for n in nodes.items
            if n.metadata and n.metadata.name and NODE_NAME_RE.match(n.metadata.name)}


async def write_status(kube: Kube, name: str, status: dict[str, Any], warn: Warn) -> bool:
    """Patch one object's status subresource; False if it could not be written."""
    try:
        await kube.call(kube.custom.patch_cluster_custom_object_status, GROUP, VERSION, PLURAL, name,
                        {"status": status})
    except KubeError as exc:
        if not exc.not_found:  # deleted meanwhile: the next pass drops it
            warn(f"status-{name}", f"cannot write the status of {KIND} {name}: {exc}")
        return False
    return True
