"""Pods over their memory share on a time-sliced GPU, evicted when the partitioning says so.

The edge reports a pod that uses more GPU memory than its share (edge/partitioning/sharing.py) as
a decision, rule `memory_share`; action `evict_pod` when its `GPUPartitioning` says
`memoryEnforcement: evict` (the edge carries no Kubernetes client). The leader evicts that pod
through the eviction API (so PodDisruptionBudgets hold), after checking that it still runs on
that node. Each is logged with the node; a pod already gone is fine; a refused eviction (429) is
logged, and the edge reports the pod again if it goes over again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from cloud.kube import Kube, KubeError
from cloud.migration.manifests import eviction_body
from cloud.services import BatchBus, Periodic
from cloud.store import Incoming
from shared.logs import get_logger
from shared.protocol import DecisionBody, Kind

log = get_logger(__name__)


class MemoryShareEnforcer:
    name = "memory-share"

    def __init__(self, *, kube: Kube | None, batches: BatchBus, leading: asyncio.Event) -> None:
        self.kube = kube
        self.leading = leading
        self.evicted = 0
        self.refused = 0
        batches.subscribe(self._on_batch, kinds=[Kind.DECISION])

    def add_routes(self, app: web.Application) -> None:
        return None

    def periodic(self) -> Sequence[Periodic]:
        return ()

    async def _on_batch(self, batch: list[Incoming]) -> None:
        if self.kube is None or not self.leading.is_set():
            return
        for item in batch:
            body = item.body
            if isinstance(body, DecisionBody) and body.rule == "memory_share" and body.action == "evict_pod":
                await self.evict(item.envelope.node, body.inputs, item.envelope.id)

    async def evict(self, node: str, inputs: dict[str, Any], msg_id: str) -> bool:
        kube = self.kube
        namespace, name = str(inputs.get("namespace") or ""), str(inputs.get("pod") or "")
        if kube is None or not namespace or not name:
            return False
        extra = {"node": node, "msg_id": msg_id, "pod": f"{namespace}/{name}"}
        try:
            pod = await kube.call(kube.core.read_namespaced_pod, name, namespace)
            if (pod.spec.node_name if pod.spec else None) != node:
                log.info("pod over its GPU memory share no longer runs on the node: not evicted", extra=extra)
                return False
            await kube.call(kube.core.create_namespaced_pod_eviction, name, namespace, eviction_body(name, namespace))
        except KubeError as exc:
            if exc.not_found:
                return False
            self.refused += 1
            log.warning("eviction of a pod over its GPU memory share refused: %s", exc, extra=extra)
            return False
        self.evicted += 1
        log.warning("evicted a pod over its GPU memory share (%s of %s bytes)", inputs.get("used_bytes"),
                    inputs.get("share_bytes"), extra=extra)
        return True
