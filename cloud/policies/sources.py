"""Where policies and node labels come from, and where policy status goes, with a cluster: the
`GPUPowerPolicy` objects (kgpu.io/v1alpha1, cluster-scoped) and the Kubernetes nodes' labels.
Without one (--no-kube) they come from the REST API (cloud/policies/http.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cloud.kube import Kube, KubeError
from shared.topics import NODE_NAME_RE

GROUP, VERSION, PLURAL = "kgpu.io", "v1alpha1", "gpupowerpolicies"
SOURCE_KUBERNETES, SOURCE_API = "kubernetes", "api"

Warn = Callable[[str, str], None]  # (key, message): a throttled warning


def source(kube: Kube | None) -> str:
    return SOURCE_KUBERNETES if kube is not None else SOURCE_API


async def list_policies(kube: Kube, warn: Warn) -> list[tuple[str, dict[str, Any], int | None]] | None:
    """(name, spec, generation) of every GPUPowerPolicy; None when the API failed (keep the
    stored ones), [] when the CRD is not installed."""
    try:
        listed = await kube.call(kube.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        items = list((listed if isinstance(listed, dict) else {}).get("items") or [])
    except KubeError as exc:
        if not exc.not_found:
            warn("list-policies", f"cannot list GPUPowerPolicy objects (keeping the last known): {exc}")
            return None
        warn("no-crd", "GPUPowerPolicy is not served by the API server (CRD not installed?): no policies")
        items = []
    policies: list[tuple[str, dict[str, Any], int | None]] = []
    for item in items:
        meta = item.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str):
            continue
        spec = item.get("spec")
        generation = meta.get("generation")
        policies.append((name, spec if isinstance(spec, dict) else {},
                         generation if isinstance(generation, int) else None))
    return policies


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
    """Write one GPUPowerPolicy's status subresource; False if it could not be written."""
    try:
        await kube.call(kube.custom.patch_cluster_custom_object_status, GROUP, VERSION, PLURAL, name,
                        {"status": status})
    except KubeError as exc:
        if not exc.not_found:  # deleted meanwhile: the next poll drops it
            warn(f"status-{name}", f"cannot write the status of GPUPowerPolicy {name}: {exc}")
        return False
    return True
