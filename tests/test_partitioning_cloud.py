"""The cloud side of GPU partitioning: `GPUPartitioning` objects on a Kubernetes API server (kmock,
the real kubernetes client over HTTP) -> `PartitioningManager` -> retained MQTT messages on a real
mosquitto, one per node; fit problems and applied counts in the objects' status.

Also: the CRD manifest's schema agrees with shared/partitioning.py's models, and the pure
resolution rules (priority, name, invalid specs, layouts that cannot be made)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cloud.kube import Kube
from cloud.partitioning import GROUP, KIND, PLURAL, VERSION, PartitioningManager
from cloud.partitioning.resolution import NodeView, PartitioningSource, resolve, statuses
from cloud.services import BatchBus
from cloud.store import FleetStore, Incoming
from kgpu.lab.broker import Mosquitto, mosquitto_binary
from kgpu.lab.kube import KubeEmulator
from shared.mqtt import MqttLink, Received, parse_broker_url
from shared.partitioning import MAX_REPLICAS, TimeSlicing
from shared.protocol import Envelope, GpuSummary, Health, Kind, PartitioningBody, StatusBody, make_envelope
from shared.topics import cloud_topic

CRD_PATH = Path(__file__).resolve().parent.parent / "deploy" / "crds" / "gpupartitioning.yaml"
A100 = "NVIDIA A100-SXM4-40GB"
needs_broker = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
T = TypeVar("T")


# ---- the CRD manifest against the models ----------------------------------------------------


def test_crd_schema_agrees_with_the_partitioning_models() -> None:
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert (crd["spec"]["group"], crd["spec"]["scope"], crd["spec"]["names"]["kind"],
            crd["spec"]["names"]["plural"]) == (GROUP, "Cluster", KIND, PLURAL)
    [version] = crd["spec"]["versions"]
    assert version["name"] == VERSION and version["subresources"] == {"status": {}}
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert set(spec) == {"nodeSelector", "priority", "models"}
    model = spec["models"]["additionalProperties"]["properties"]
    assert set(model) == {"mig", "timeSlicing"}
    assert model["mig"]["x-kubernetes-preserve-unknown-fields"] is True  # a string or {mixed: {...}}
    slicing = model["timeSlicing"]["properties"]
    fields = {info.alias or name: info for name, info in TimeSlicing.model_fields.items()}
    assert set(slicing) == {"replicas", "resourceName", "memoryEnforcement"} == {
        "".join([n.split("_")[0]] + [w.title() for w in n.split("_")[1:]]) for n in fields}
    assert (slicing["replicas"]["minimum"], slicing["replicas"]["maximum"], slicing["replicas"]["default"]) == (
        1, MAX_REPLICAS, TimeSlicing().replicas)
    assert slicing["resourceName"]["default"] == TimeSlicing().resource_name
    assert slicing["memoryEnforcement"]["enum"] == ["event", "evict"]
    assert slicing["memoryEnforcement"]["default"] == TimeSlicing().memory_enforcement
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"observedGeneration", "nodesMatched", "applied", "pending", "problems", "conditions"} <= set(status)


# ---- the pure rules -------------------------------------------------------------------------


def test_resolution_priority_validity_and_fit() -> None:
    objects = [
        PartitioningSource("a100-mig", {"nodeSelector": {"gpu": "a100"}, "priority": 1,
                                        "models": {A100: {"mig": "all-1g.5gb"}}}, generation=3),
        PartitioningSource("b-same-priority", {"nodeSelector": {"gpu": "a100"}, "priority": 1,
                                               "models": {"*": {"timeSlicing": {"replicas": 4}}}}),
        PartitioningSource("west", {"nodeSelector": {"zone": "west"}, "priority": 5,
                                    "models": {A100: {"mig": {"mixed": {"3g.20gb": 3}}}, "*": {"mig": "all-1g.10gb"}}}),
        PartitioningSource("broken", {"models": {"*": {"mig": "half"}}, "nodeSelector": {}}),
    ]
    nodes = [NodeView("a", {"gpu": "a100"}, (A100,)), NodeView("b", {"gpu": "a100", "zone": "west"}, (A100, "Tesla T4")),
             NodeView("c", {}, ("Tesla T4",))]
    res = resolve(objects, nodes)
    assert sorted(res.valid) == ["a100-mig", "b-same-priority", "west"] and list(res.invalid) == ["broken"]
    assert "half" in res.invalid["broken"].reason
    a, b, c = res.nodes["a"], res.nodes["b"], res.nodes["c"]
    assert (a.partitioning.name, a.partitioning.version, a.shadowed) == ("a100-mig", 3, ("b-same-priority",))
    assert a.partitioning.for_model(A100).mig.label() == "all-1g.5gb" and a.problems == ()  # type: ignore[union-attr]
    assert (b.partitioning.name, b.partitioning.version) == ("west", 1)  # no generation listed: 1
    assert sorted((p.model, "at most 2" in p.reason or "no MIG" in p.reason) for p in b.problems) == [
        (A100, True), ("Tesla T4", True)]
    assert (c.partitioning.name, c.partitioning.models, c.problems) == ("", {}, ())  # nothing selects c

    out = statuses(res, {}, "2026-01-01T00:00:00Z")
    west = {c["type"]: c for c in out["west"]["conditions"]}
    assert west["Valid"]["status"] == "True" and west["Fits"]["status"] == "False"
    assert "node b" in west["Fits"]["message"] and out["west"]["problems"][0]["node"] == "b"
    assert {c["type"]: c["status"] for c in out["broken"]["conditions"]} == {
        "Valid": "False", "Fits": "False", "Applied": "False"}
    assert (out["a100-mig"]["nodesMatched"], out["a100-mig"]["pending"], out["b-same-priority"]["nodesShadowed"]) == (
        1, 1, 2)  # it selects a and b; a100-mig wins a by name, west wins b by priority
    # lastTransitionTime moves only when a condition flips
    again = statuses(res, out, "2026-01-02T00:00:00Z")
    assert again["west"]["conditions"] == out["west"]["conditions"]


# ---- end to end: kmock + mosquitto ----------------------------------------------------------


def _status(node: str, models: list[str], applied: tuple[str, int] | None = None) -> Incoming:
    gpus = [GpuSummary(index=i, uuid=f"GPU-{node}-{i}", name=name, health=Health.HEALTHY) for i, name in enumerate(models)]
    body = StatusBody(state="online", gpus=gpus, outbox_epoch="e1",
                      partitioning_name=applied[0] if applied else None,
                      partitioning_version=applied[1] if applied else None)
    return Incoming(envelope=make_envelope(node, body, Kind.STATUS), body=body, received_at=time.time())


def _create(kube: KubeEmulator, name: str, spec: dict[str, Any], generation: int = 1) -> None:
    kube.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name, "generation": generation},
        "spec": spec})


def _status_of(kube: KubeEmulator, name: str) -> dict[str, Any]:
    return kube.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name).get("status") or {}


async def _until(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Probe:
    """An MQTT subscriber to every node's partitioning topic: the latest message per node."""

    def __init__(self, broker: Mosquitto, client_id: str, nodes: str = "+") -> None:
        self.latest: dict[str, PartitioningBody | None] = {}
        self.link = MqttLink(parse_broker_url(broker.url), client_id, clean_session=True,
                             subscriptions=[(cloud_topic(nodes, "partitioning"), 1)], on_message=self._on)
        self.link.start()

    def _on(self, message: Received) -> None:
        node = message.topic.split("/")[3]
        if not message.payload:
            self.latest[node] = None
            return
        envelope = Envelope.model_validate(json.loads(message.payload))
        assert envelope.kind == Kind.PARTITIONING and envelope.node == node
        self.latest[node] = PartitioningBody.model_validate(envelope.body)

    def has(self, node: str, name: str, version: int) -> bool:
        body = self.latest.get(node)
        return body is not None and (body.partitioning.name, body.partitioning.version) == (name, version)


@needs_broker
def test_objects_reach_the_selected_nodes_retained_with_status(tmp_path: Path, broker: Mosquitto,
                                                               kube: KubeEmulator) -> None:
    kube.add_node("edge-a", {"gpu": "a100"})
    kube.add_node("edge-b", {"gpu": "a100", "zone": "west"})
    kube.add_node("edge-c", {"gpu": "t4"})
    _create(kube, "a100-mig", {"nodeSelector": {"gpu": "a100"}, "priority": 1,
                               "models": {A100: {"mig": "all-1g.5gb"}}})
    _create(kube, "west", {"nodeSelector": {"zone": "west"}, "priority": 5,
                           "models": {A100: {"mig": {"mixed": {"3g.20gb": 3}}}}})
    _create(kube, "broken", {"models": {"*": {"timeSlicing": {"replicas": 0}}}})
    store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    store.ingest([_status("edge-a", [A100]), _status("edge-b", [A100, A100]), _status("edge-c", ["Tesla T4"])])
    client = Kube.connect(kube.kubeconfig, False)
    cloud_link = MqttLink(parse_broker_url(broker.url), "kgpu-cloud-test", clean_session=True)
    cloud_link.start()
    probe: Probe | None = None
    late: Probe | None = None

    async def scenario() -> None:
        nonlocal probe, late
        bus = BatchBus()
        part = PartitioningManager(store=store, kube=client, publish=cloud_link.publish, batches=bus)
        await _until(cloud_link.connected.is_set, "the cloud's MQTT link")
        await part.reconcile()
        probe = Probe(broker, "partitioning-probe")
        await _until(lambda: probe is not None and probe.has("edge-a", "a100-mig", 1) and probe.has("edge-b", "west", 1)
                     and probe.has("edge-c", "", 0), "every node's retained partitioning")
        a = probe.latest["edge-a"]
        assert a is not None and a.partitioning.for_model(A100).mig.label() == "all-1g.5gb"  # type: ignore[union-attr]
        assert probe.latest["edge-c"] is not None and probe.latest["edge-c"].partitioning.models == {}

        # the status subresource: the impossible layout named with its node and model; the invalid spec
        west = _status_of(kube, "west")
        conditions = {c["type"]: c for c in west["conditions"]}
        assert conditions["Fits"]["status"] == "False" and "edge-b" in conditions["Fits"]["message"]
        assert west["problems"] == [{"node": "edge-b", "model": A100, "reason": west["problems"][0]["reason"]}]
        assert "3g.20gb" in west["problems"][0]["reason"]
        assert {c["type"]: c["status"] for c in _status_of(kube, "broken")["conditions"]}["Valid"] == "False"
        assert (_status_of(kube, "a100-mig")["nodesMatched"], _status_of(kube, "a100-mig")["pending"]) == (1, 1)

        # nothing changed: nothing published again
        count = part.published_count
        await part.reconcile()
        assert part.published_count == count

        # edge-a reports it applied: the status counts it
        await bus.deliver([_status("edge-a", [A100], applied=("a100-mig", 1))])
        await part.reconcile()
        status = _status_of(kube, "a100-mig")
        assert (status["applied"], status["pending"]) == (1, 0)
        assert {c["type"]: c["status"] for c in status["conditions"]}["Applied"] == "True"

        # the object changes (a new generation), a node is relabelled, a node joins
        kube.custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "a100-mig", {
            "metadata": {"generation": 2}, "spec": {"models": {A100: {"mig": "all-2g.10gb"}}}})
        kube.core.patch_node("edge-c", {"metadata": {"labels": {"gpu": "a100"}}})
        kube.add_node("edge-d", {})
        await part.reconcile()
        await _until(lambda: probe is not None and probe.has("edge-a", "a100-mig", 2) and probe.has("edge-c", "a100-mig", 2)
                     and probe.has("edge-d", "", 0), "the new generation, the relabelled and the new node")
        assert _status_of(kube, "a100-mig")["pending"] == 2  # edge-a has not applied v2 yet, edge-c neither

        # an online node still reporting another version is sent it again (a broker that lost its
        # retained store); nodes never heard from are not
        part.resend_after = 0.0
        count = part.published_count
        await part.reconcile()
        assert part.published_count == count + 1  # edge-a only: online, still on v1
        part.resend_after = 3600.0

        # GPU models come from the statuses too: edge-d (unknown to the store) joins the west pool
        await bus.deliver([_status("edge-d", [A100])])
        kube.core.patch_node("edge-d", {"metadata": {"labels": {"zone": "west"}}})
        await part.reconcile()
        assert sorted(p["node"] for p in _status_of(kube, "west")["problems"]) == ["edge-b", "edge-d"]
        await _until(lambda: probe is not None and probe.has("edge-d", "west", 1), "edge-d's new partitioning")

        # an edge that was offline all along finds its partitioning retained when it subscribes
        late = Probe(broker, "returning-edge", nodes="edge-a")
        await _until(lambda: late is not None and late.has("edge-a", "a100-mig", 2), "the retained message for edge-a")

        # the read API
        app = web.Application()
        part.add_routes(app)
        async with TestClient(TestServer(app)) as http:
            overview = await (await http.get("/api/v1/partitioning")).json()
            assert [o["name"] for o in overview["objects"]] == ["a100-mig", "broken", "west"]
            assert [n["node"] for n in overview["nodes"]] == ["edge-a", "edge-b", "edge-c", "edge-d"]
            node_b = await (await http.get("/api/v1/nodes/edge-b/partitioning")).json()
            assert node_b["partitioning"]["name"] == "west" and node_b["problems"][0]["model"] == A100
            assert (await http.get("/api/v1/nodes/nowhere/partitioning")).status == 404

    try:
        asyncio.run(scenario())
    finally:
        for link in (probe, late):
            if link is not None:
                link.link.stop()
        cloud_link.stop()
        client.close()
        store.close()
