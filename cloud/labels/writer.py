"""`NodeLabeler`: writes each vendor's GPU labels (cloud/labels/vendors.py: GPU Feature Discovery's
for NVIDIA and Jetson, AMD's node labeller's, Intel's NFD rules') on each Kubernetes Node from its
edge's status, when they change.

Every replica follows the statuses (they reach every replica: the status subscription is not
shared) and keeps each node's wanted labels in memory; only the leader writes. A node's labels are
patched when what its status implies differs from what the Node carries, and only then.

kgpu owns the GPU labels it wrote (`nvidia.com/`, `amd.com/`, `gpu.intel.com/`, ...), and only
those: their keys are kept in the Node's annotation `kgpu.io/gfd-labels`, and a label kgpu wrote
before and no longer wants (a MIG profile gone, GPUs gone) is removed with a null in a merge patch;
any other label, of those prefixes or not, is never touched. A Node carrying
`nvidia.com/gfd.timestamp` is labelled by GFD itself: kgpu leaves it alone (two writers would flap).
Every API call runs in a worker thread (`Kube.call`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from cloud.kube import Kube, KubeError
from cloud.labels.vendors import LABEL_PREFIXES, node_labels
from cloud.services import BatchBus, Periodic
from cloud.store import Incoming
from shared.logs import get_logger
from shared.protocol import Kind, StatusBody

log = get_logger(__name__)

OWNED_ANNOTATION = "kgpu.io/gfd-labels"  # comma-separated keys of the labels kgpu wrote
GFD_MARKER = "nvidia.com/gfd.timestamp"  # written by GFD itself
RETRY_S = 10.0  # a node whose patch failed is tried again after this (or at the next change)
WARN_EVERY_S = 60.0


def label_patch(current_labels: Mapping[str, str], current_annotations: Mapping[str, str],
                wanted: Mapping[str, str]) -> dict[str, Any] | None:
    """The merge patch that makes a Node carry `wanted` and drop the labels kgpu wrote before and
    no longer wants; None when it already does. Pure."""
    owned_before = {k for k in (current_annotations.get(OWNED_ANNOTATION) or "").split(",") if k}
    labels: dict[str, str | None] = {k: v for k, v in wanted.items() if current_labels.get(k) != v}
    for key in sorted(owned_before - set(wanted)):
        if key in current_labels and key.startswith(LABEL_PREFIXES):
            labels[key] = None
    owned = ",".join(sorted(wanted))
    annotation_changed = (current_annotations.get(OWNED_ANNOTATION) or "") != owned
    if not labels and not annotation_changed:
        return None
    metadata: dict[str, Any] = {"annotations": {OWNED_ANNOTATION: owned if wanted else None}}
    if labels:
        metadata["labels"] = labels
    return {"metadata": metadata}


class NodeLabeler:
    """Keeps the GFD labels of every Node in step with its edge's status (leader only)."""

    name = "node-labels"

    def __init__(self, *, kube: Kube | None, batches: BatchBus, retry_after: float = RETRY_S) -> None:
        self.kube = kube
        self.retry_after = retry_after
        self._wanted: dict[str, dict[str, str]] = {}  # node -> labels its last status implies
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._warned: dict[str, float] = {}
        self.patched = 0  # Node patches written (for tests and logs)
        if kube is not None:
            batches.subscribe(self._on_batch, kinds=[Kind.STATUS])

    def periodic(self) -> Sequence[Periodic]:
        if self.kube is None:
            return []
        self._pending |= set(self._wanted)  # a new leader checks every node it knows once
        return [Periodic("node labels", self.step, self.retry_after, wake=self._wake)]

    def add_routes(self, app: web.Application) -> None:
        """No routes: the labels are on the Nodes (`kubectl get node -L nvidia.com/gpu.product`)."""

    async def _on_batch(self, batch: list[Incoming]) -> None:
        for item in batch:
            body = item.body
            if not isinstance(body, StatusBody) or body.state != "online":
                continue  # offline: the GPUs are still there, keep their labels
            if not body.gpus and body.degraded:
                continue  # an edge that cannot read its GPUs now says nothing about them
            wanted = node_labels(body.gpus)
            node = item.envelope.node
            if self._wanted.get(node) != wanted:
                self._wanted[node] = wanted
                self._pending.add(node)
                self._wake.set()

    async def step(self) -> None:
        """Patch every node whose wanted labels moved (or whose last patch failed)."""
        kube = self.kube
        if kube is None or not self._pending:
            return
        nodes, self._pending = sorted(self._pending), set()
        for node in nodes:
            wanted = self._wanted.get(node)
            if wanted is not None and not await self._apply(kube, node, wanted):
                self._pending.add(node)  # tried again after retry_after

    async def _apply(self, kube: Kube, node: str, wanted: Mapping[str, str]) -> bool:
        """Bring one Node's labels in step; True when done (or nothing to do), False to retry."""
        try:
            current = await kube.call(kube.core.read_node, node)
        except KubeError as exc:
            if exc.not_found:
                return True  # not a Kubernetes node (yet): its next status tries again
            self._warn(f"read-{node}", f"cannot read node {node} for its GPU labels: {exc}")
            return False
        meta = current.metadata
        labels = dict((meta.labels if meta else None) or {})
        annotations = dict((meta.annotations if meta else None) or {})
        if GFD_MARKER in labels:
            self._warn(f"gfd-{node}", f"node {node} is labelled by GPU Feature Discovery ({GFD_MARKER}); "
                                      "kgpu does not write its GPU labels")
            return True
        patch = label_patch(labels, annotations, wanted)
        if patch is None:
            return True
        try:
            await kube.call(kube.core.patch_node, node, patch)
        except KubeError as exc:
            if exc.not_found:
                return True
            self._warn(f"patch-{node}", f"cannot write the GPU labels of node {node}: {exc}")
            return False
        self.patched += 1
        changed = patch["metadata"].get("labels") or {}
        log.info("node GPU labels written: %d set, %d removed",
                 sum(v is not None for v in changed.values()), sum(v is None for v in changed.values()),
                 extra={"node": node})
        return True

    def _warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[key] = now
            log.warning(message)


__all__ = ["GFD_MARKER", "OWNED_ANNOTATION", "NodeLabeler", "label_patch"]
