import asyncio

import pytest

from cloud.kube import Kube, KubeError


def test_emulator_roundtrip(kube):
    kube.add_node("n1", {"gpu": "h100"})
    kube.add_pod("p1", "n1")
    k = Kube.connect(kube.kubeconfig, False)
    async def go():
        nodes = await k.call(k.core.list_node)
        pods = await k.call(k.core.list_pod_for_all_namespaces)
        try:
            await k.call(k.core.read_node, "nope")
        except KubeError as e:
            return nodes, pods, e
    nodes, pods, err = asyncio.run(go())
    assert [n.metadata.name for n in nodes.items] == ["n1"] and pods.items[0].spec.node_name == "n1"
    assert err.not_found
    kube.react("post /api/v1/namespaces/default/pods/p1/eviction", 429, {"kind": "Status", "reason": "TooManyRequests"})
    with pytest.raises(KubeError) as caught:
        asyncio.run(k.call(k.core.create_namespaced_pod_eviction, "p1", "default", {"metadata": {"name": "p1"}}))
    assert caught.value.too_many_requests
