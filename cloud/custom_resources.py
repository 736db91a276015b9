"""kgpu's cluster-scoped custom resources (GPUPowerPolicy, GPUPartitioning) and the nodes' labels,
read and written one way for the parts that own them (cloud/policies/, cloud/partitioning/): every
call through `Kube.call` (a worker thread), every failure one throttled warning, never an exception.
Each part parses its own objects' specs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloud.kube import Kube, KubeError
from shared.topics import NODE_NAME_RE

Warn = Callable[[str, str], None]  # (key, message): a throttled warning


@dataclass(frozen=True)
class ClusterResource:
    """A cluster-scoped custom resource: its API coordinates and its kind (for messages)."""

    group: str
    version: str
    plural: str
    kind: str


@dataclass(frozen=True)
class ListedObject:
    name: str
    metadata: dict[str, Any]
    item: dict[str, Any]

    def part(self, key: str) -> dict[str, Any]:
        """`spec` or `status` of the object, {} when missing or not an object."""
        value = self.item.get(key)
        return value if isinstance(value, dict) else {}


async def list_objects(kube: Kube, resource: ClusterResource, warn: Warn, *,
                       none_means: str) -> list[ListedObject] | None:
    """Every object of `resource` that has a name; None when the API failed (keep the last known),
    [] when the CRD is not installed (`none_means` says what that leaves, for the warning)."""
    try:
        listed = await kube.call(kube.custom.list_cluster_custom_object, resource.group, resource.version,
                                 resource.plural)
        items = list((listed if isinstance(listed, dict) else {}).get("items") or [])
    except KubeError as exc:
        if not exc.not_found:
            warn("list", f"cannot list {resource.kind} objects (keeping the last known): {exc}")
            return None
        warn("no-crd", f"{resource.kind} is not served by the API server (CRD not installed?): {none_means}")
        items = []
    objects: list[ListedObject] = []
    for item in items:
        meta = item.get("metadata") or {}
        name = meta.get("name")
        if isinstance(name, str):
            objects.append(ListedObject(name, meta, item))
    return objects


async def list_node_labels(kube: Kube, warn: Warn) -> dict[str, dict[str, str]] | None:
    """node -> its labels; None when the API failed (keep the last known labels)."""
    try:
        nodes = await kube.call(kube.core.list_node)
    except KubeError as exc:
        warn("list-nodes", f"cannot list nodes (keeping the last known labels): {exc}")
        return None
    return {n.metadata.name: dict(n.metadata.labels or {}) for n in nodes.items
            if n.metadata and n.metadata.name and NODE_NAME_RE.match(n.metadata.name)}


async def write_status(kube: Kube, resource: ClusterResource, name: str, status: dict[str, Any],
                       warn: Warn) -> bool:
    """Patch one object's status subresource; False if it could not be written."""
    try:
        await kube.call(kube.custom.patch_cluster_custom_object_status, resource.group, resource.version,
                        resource.plural, name, {"status": status})
    except KubeError as exc:
        if not exc.not_found:  # deleted meanwhile: the next pass drops it
            warn(f"status-{name}", f"cannot write the status of {resource.kind} {name}: {exc}")
        return False
    return True
