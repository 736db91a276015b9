"""A pod over its memory share of a time-sliced GPU, reported by the edge as a `memory_share`
decision with action `evict_pod`, is evicted by the leader through the real kubernetes client
(kmock over HTTP); one on another node, or a decision that only records, is left alone."""

from __future__ import annotations

import asyncio
from typing import Any

from cloud.kube import Kube
from cloud.memory_share import MemoryShareEnforcer
from cloud.services import BatchBus
from cloud.store import Incoming
from shared.protocol import ActionOutcome, DecisionBody, Kind, make_envelope


def _decision(node: str, pod: str, action: str) -> Incoming:
    body = DecisionBody(gpu_index=0, gpu_uuid="GPU-0", rule="memory_share", action=action, value=30.0 * 2**30,
                        outcome=ActionOutcome.RECORDED, reason="over its share",
                        inputs={"namespace": "default", "pod": pod, "used_bytes": 30 * 2**30, "share_bytes": 20 * 2**30})
    envelope = make_envelope(node, body, Kind.DECISION, seq=1)
    return Incoming(envelope=envelope, body=body, received_at=0.0)


def _evictions(kube: Any) -> list[str]:
    requests = kube.on_loop(lambda: list(kube.emulator))
    return sorted(r.url.path.split("/")[-2] for r in requests if r.method == "POST" and r.url.path.endswith("/eviction"))


def test_only_an_evict_decision_for_a_pod_still_on_that_node_evicts_it(kube: Any) -> None:
    kube.add_node("edge-1")
    kube.add_node("edge-2")
    for pod, node in (("greedy", "edge-1"), ("moved", "edge-2"), ("noted", "edge-1")):
        kube.add_pod(pod, node)
        kube.react(f"post /api/v1/namespaces/default/pods/{pod}/eviction", 201, {"kind": "Status", "status": "Success"})
    client = Kube.connect(kube.kubeconfig, False)

    async def scenario() -> tuple[int, int]:
        bus, leading = BatchBus(), asyncio.Event()
        enforcer = MemoryShareEnforcer(kube=client, batches=bus, leading=leading)
        await bus.deliver([_decision("edge-1", "greedy", "evict_pod")])  # not the leader: nothing
        before = len(_evictions(kube))
        leading.set()
        await bus.deliver([_decision("edge-1", "greedy", "evict_pod"), _decision("edge-1", "moved", "evict_pod"),
                           _decision("edge-1", "noted", "record"), _decision("edge-1", "absent", "evict_pod")])
        return before, enforcer.evicted

    before, evicted = asyncio.run(scenario())
    client.close()
    assert before == 0
    assert evicted == 1 and _evictions(kube) == ["greedy"]
