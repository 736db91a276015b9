"""Rollouts end to end: a real `kgpu cloud run` against the Kubernetes emulator and a real mosquitto.

The test plays the DaemonSet controller (the lab's ClusterPlayer, kgpu/lab/cluster.py) and the
edges (`FleetSim`): when the controller deletes a daemon pod, a new pod appears on that node from
the DaemonSet's current template, and the node (if online and responsive) publishes a retained
status with the version of that image's tag, exactly as a restarted edge daemon would. Light
simulated edges, not 200 daemon processes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa

from cloud.rollout import RolloutRequest
from cloud.store.schema import rollout_nodes_table
from kgpu.lab.broker import Mosquitto, mosquitto_binary
from kgpu.lab.cluster import ClusterPlayer, Replaced
from kgpu.lab.kube import KubeEmulator
from kgpu.lab.processes import wait_for
from shared.mqtt import MqttLink, parse_broker_url
from shared.protocol import Kind, StatusBody, make_envelope
from shared.topics import edge_topic
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.fault_report import Tally, record

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (scripts/test.sh installs it)")]

NS, DS = "kgpu", "kgpu-edge"
OLD_IMAGE, NEW_IMAGE = "kgpu/edge:0.1.0", "kgpu/edge:0.2.0"
LABELS = {"app": "kgpu-edge"}
ENV = {"KGPU_NAMESPACE": NS, "KGPU_DAEMONSET": DS}


def node_names(count: int) -> list[str]:
    return [f"gpu-{i:03d}" for i in range(count)]


class FleetSim:
    """The DaemonSet controller (the lab's ClusterPlayer, in its thread) and the edges, for `nodes`;
    `online` and `responsive` are live sets."""

    def __init__(self, kube: KubeEmulator, broker: Mosquitto, nodes: list[str], *, online: set[str] | None = None,
                 report_delay: float = 0.0) -> None:
        self.nodes = nodes
        self.online = set(nodes) if online is None else set(online)
        self.responsive = set(nodes)  # a node whose new daemon reports after a restart
        self.report_delay = report_delay
        self.player = ClusterPlayer(kube, nodes, namespace=NS, daemonset=DS, labels=LABELS, forget_requests=True,
                                    narrate=lambda line: print(f"fleet sim: {line}"))
        self.link = MqttLink(parse_broker_url(broker.url), f"test-edges-{uuid.uuid4().hex[:6]}")
        self.link.start()
        assert self.link.connected.wait(15), "test MQTT link did not connect"

    # -- seeding ---------------------------------------------------------------------------------

    def seed(self) -> FleetSim:
        self.player.seed(OLD_IMAGE, offline=set(self.nodes) - self.online)
        for node in self.nodes:
            self.publish(node, "online" if node in self.online else "offline", "0.1.0")
        assert self.link.flush(20)
        self.player.start(self._restarted, interval=0.2)
        return self

    def publish(self, node: str, state: str, version: str) -> None:
        envelope = make_envelope(node, StatusBody(state=state, version=version), Kind.STATUS)  # type: ignore[arg-type]
        assert self.link.publish(edge_topic(node, "status"), envelope.to_json(), qos=1, retain=True)

    # -- the restarted daemons -------------------------------------------------------------------

    def _restarted(self, replaced: list[Replaced]) -> None:
        """A new daemon pod on each of these nodes: the ones online and responsive report its version."""
        if self.report_delay:
            time.sleep(self.report_delay)
        for r in replaced:
            if r.node in self.online and r.node in self.responsive:
                self.publish(r.node, "online", r.version)

    def deletions(self) -> dict[str, int]:
        return self.player.deletions()

    def stop(self) -> None:
        self.player.stop()
        self.link.stop()


@pytest.fixture
def start_cloud(tmp_path: Path, broker: Mosquitto, kube: KubeEmulator) -> Iterator[Any]:
    started: list[CloudProcess] = []

    def start() -> CloudProcess:
        process = CloudProcess(tmp_path / "cloud", broker.url, kubeconfig=kube.kubeconfig, env=ENV)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


@pytest.fixture
def sims() -> Iterator[list[FleetSim]]:
    made: list[FleetSim] = []
    yield made
    for sim in made:
        sim.stop()


def post_rollout(cloud: CloudProcess, body: dict[str, Any]) -> dict[str, Any]:
    status, created = cloud.request("POST", "/api/v1/rollouts", body)
    assert status == 201, (status, created)
    return created


def rollout(cloud: CloudProcess, rollout_id: int) -> dict[str, Any]:
    return cloud.get(f"/api/v1/rollouts/{rollout_id}")


def template_image(kube: KubeEmulator) -> str:
    return kube.apps.read_namespaced_daemon_set(DS, NS).spec.template.spec.containers[0].image


def wait_rollout(cloud: CloudProcess, rollout_id: int, check: Any, *, timeout: float, what: str,
                 max_unavailable: int | None = None) -> dict[str, Any]:
    """Poll the rollout until `check(r)`; on the way, no more than max_unavailable nodes in flight."""
    def poll() -> Any:
        r = rollout(cloud, rollout_id)
        if max_unavailable is not None:
            in_flight = r["counts"]["pod-deletion-required"] + r["counts"]["validation-required"]
            assert in_flight <= max_unavailable, r["counts"]
        return r if check(r) else None

    return wait_for(poll, timeout=timeout, interval=0.3, what=what)


@pytest.mark.parametrize(("body", "problem"), [
    ({}, "exactly one of image and templatePatch"),
    ({"image": "a:1", "templatePatch": {}}, "exactly one"),
    ({"templatePatch": {"spec": {}}}, "templatePatch needs version"),
    ({"image": "registry:5000/kgpu/edge"}, "no tag"),
    ({"image": "a:1", "maxUnavailable": 0}, "at least one node"),
    ({"image": "a:1", "maxUnavailable": "0%"}, "at least one node"),
    ({"image": "a:1", "maxUnavailable": True}, "maxUnavailable.int"),
    ({"image": "a:1", "failureThreshold": "150%"}, "out of range"),
    ({"image": "a:1", "healthTimeout": "soon"}, "not a duration"),
    ({"image": "a:1", "waves": {"percentages": [50, 10]}}, "must increase"),
    ({"image": "a:1", "waves": {"canary": ["Bad_Node"]}}, "not node names"),
    ({"image": "a:1", "surge": 1}, "Extra inputs"),
])
def test_a_bad_rollout_request_is_refused_with_the_reason(body: dict[str, Any], problem: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=problem):
        RolloutRequest.model_validate(body)


def test_request_defaults_and_the_version_from_the_image_tag() -> None:
    req = RolloutRequest.model_validate({"image": "registry:5000/kgpu/edge:0.2.0", "healthTimeout": "2m",
                                         "waves": {"percentages": [10, 50]}})
    assert req.version == "0.2.0" and req.health_timeout == 120.0
    assert req.waves.percentages == [10, 50, 100] and req.waves.canary == []
    assert (req.max_unavailable, req.failure_threshold) == ("10%", "5%")
    explicit = RolloutRequest.model_validate({"templatePatch": {"spec": {}}, "version": "0.3.0-rc1"})
    assert explicit.version == "0.3.0-rc1"


def test_200_nodes_20_offline_are_deferred_then_upgraded_when_back(
        kube: KubeEmulator, broker: Mosquitto, start_cloud: Any, sims: list[FleetSim]) -> None:
    nodes = node_names(200)
    offline = set(nodes[5::10])  # 20 nodes, spread over the waves
    sim = FleetSim(kube, broker, nodes, online=set(nodes) - offline)
    sims.append(sim)
    sim.seed()
    cloud = start_cloud()
    wait_for(lambda: len(cloud.get("/api/v1/nodes")["nodes"]) == 200, timeout=20, what="200 nodes in the fleet store")

    status, refused = cloud.request("POST", "/api/v1/rollouts", {"templatePatch": {"metadata": {"labels": {"x": "1"}}}})
    assert status == 400 and refused["error"] == "invalid request body", refused  # no version given
    created = post_rollout(cloud, {"image": NEW_IMAGE, "maxUnavailable": "20%", "healthTimeout": "30s",
                                   "failureThreshold": 0, "waves": {"canary": ["gpu-000"], "percentages": [10, 50, 100]}})
    assert created["version"] == "0.2.0" and created["maxUnavailableNodes"] == 40 and created["nodeCount"] == 200
    status, conflict = cloud.request("POST", "/api/v1/rollouts", {"image": NEW_IMAGE})
    assert status == 409 and conflict["detail"]["id"] == created["id"], conflict

    r = wait_rollout(cloud, created["id"], lambda r: r["counts"]["upgrade-done"] == 180, timeout=60,
                     what="the 180 online nodes upgraded", max_unavailable=40)
    assert r["state"] == "running" and r["counts"]["offline-deferred"] == 20, r["counts"]
    assert r["wave"] == r["waveCount"] - 1  # every wave went through despite the offline nodes
    assert {n["node"] for n in r["nodes"] if n["state"] == "offline-deferred"} == offline
    assert template_image(kube) == NEW_IMAGE
    deletions = sim.deletions()
    assert all(deletions[n] == (0 if n in offline else 1) for n in nodes), deletions
    done = [n for n in r["nodes"] if n["state"] == "upgrade-done"]
    assert all(n["daemonVersion"] == "0.2.0" and n["fromVersion"] == "0.1.0" for n in done)
    assert [r2["id"] for r2 in cloud.get("/api/v1/rollouts")["rollouts"]] == [created["id"]]

    for node in sorted(offline):  # they come back, still on the old daemon
        sim.online.add(node)
        sim.publish(node, "online", "0.1.0")
    r = wait_rollout(cloud, created["id"], lambda r: r["state"] == "completed", timeout=40,
                     what="the returning nodes upgraded and the rollout completed", max_unavailable=40)
    assert r["counts"]["upgrade-done"] == 200 and r["finishedAt"], r["counts"]
    assert set(sim.deletions().values()) == {1}  # every node restarted exactly once
    assert all(n["daemonVersion"] == "0.2.0" for n in r["nodes"])


def test_canaries_that_never_report_the_new_version_roll_back(
        kube: KubeEmulator, broker: Mosquitto, start_cloud: Any, sims: list[FleetSim]) -> None:
    nodes = node_names(12)
    sim = FleetSim(kube, broker, nodes)
    sims.append(sim)
    sim.responsive -= {"gpu-003"}  # the new daemon on this canary never reports
    sim.seed()
    cloud = start_cloud()
    wait_for(lambda: len(cloud.get("/api/v1/nodes")["nodes"]) == 12, timeout=20, what="12 nodes in the fleet store")
    created = post_rollout(cloud, {"image": NEW_IMAGE, "maxUnavailable": 2, "healthTimeout": "3s",
                                   "failureThreshold": "50%", "waves": {"canary": ["gpu-003", "gpu-007"]}})
    r = wait_rollout(cloud, created["id"], lambda r: r["state"] == "rolled-back", timeout=40,
                     what="the rollout rolled back", max_unavailable=2)
    assert r["reason"].startswith("canary gpu-003 failed; 2 nodes back on the previous template"), r["reason"]
    assert template_image(kube) == OLD_IMAGE  # the DaemonSet template is the old one again
    by_node = {n["node"]: n for n in r["nodes"]}
    assert by_node["gpu-003"]["reverting"] and by_node["gpu-007"]["reverting"]
    assert all(by_node[n]["state"] == "upgrade-done" for n in ("gpu-003", "gpu-007"))
    deletions = sim.deletions()
    assert deletions["gpu-003"] == deletions["gpu-007"] == 2  # restarted onto the new, then back onto the old
    assert all(deletions[n] == 0 for n in nodes if n not in ("gpu-003", "gpu-007"))  # no other wave started
    assert by_node["gpu-007"]["daemonVersion"] == "0.1.0"
    assert all(by_node[n]["state"] == "upgrade-required" for n in nodes if n not in ("gpu-003", "gpu-007"))
    # a new rollout may start now
    again = post_rollout(cloud, {"image": NEW_IMAGE, "waves": {"canary": ["gpu-007"]}})
    assert again["id"] != created["id"]


def test_a_controller_killed_mid_rollout_resumes_without_deleting_a_pod_twice(
        kube: KubeEmulator, broker: Mosquitto, start_cloud: Any, sims: list[FleetSim]) -> None:
    nodes = node_names(60)
    sim = FleetSim(kube, broker, nodes, report_delay=0.3)
    sims.append(sim)
    sim.seed()
    cloud = start_cloud()
    wait_for(lambda: len(cloud.get("/api/v1/nodes")["nodes"]) == 60, timeout=20, what="60 nodes in the fleet store")
    created = post_rollout(cloud, {"image": NEW_IMAGE, "maxUnavailable": 4, "healthTimeout": "60s",
                                   "waves": {"percentages": [25, 100]}})
    wait_rollout(cloud, created["id"], lambda r: r["counts"]["upgrade-done"] >= 20, timeout=40,
                 what="a third of the rollout done", max_unavailable=4)
    assert cloud.proc is not None
    cloud.proc.kill()  # kill -9, mid-rollout
    cloud.proc.wait()
    before = sum(sim.deletions().values())
    assert before < 60
    engine = sa.create_engine(cloud.db_url)  # what the next leader will resume from
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.select(rollout_nodes_table.c.node, rollout_nodes_table.c.state)).all())
    engine.dispose()
    assert len(stored) == 60 and sum(s == "upgrade-done" for s in stored.values()) >= 20

    cloud = start_cloud()  # same database, same identity: it resumes from the tables
    r = wait_rollout(cloud, created["id"], lambda r: r["state"] == "completed", timeout=60,
                     what="the resumed rollout completed", max_unavailable=4)
    deletions = sim.deletions()
    done = r["counts"]["upgrade-done"]
    record("controller kill -9 mid-rollout", 1,  # the summary table of tests/test_faults.py
           Tally(written=60, received=done, lost=60 - done, duplicated=sum(c - 1 for c in deletions.values() if c > 1)),
           "units: nodes to upgrade; duplicated: pod deletions beyond one per node")
    assert done == 60
    assert set(deletions.values()) == {1}, {n: c for n, c in deletions.items() if c != 1}


def test_template_patch_operator_rollback_and_cancel(
        kube: KubeEmulator, broker: Mosquitto, start_cloud: Any, sims: list[FleetSim]) -> None:
    nodes = node_names(4)
    sim = FleetSim(kube, broker, nodes)
    sims.append(sim)
    sim.responsive -= {"gpu-003"}  # keeps the rollout running until the operator steps in
    sim.seed()
    cloud = start_cloud()
    wait_for(lambda: len(cloud.get("/api/v1/nodes")["nodes"]) == 4, timeout=20, what="4 nodes in the fleet store")
    patch = {"metadata": {"annotations": {"kgpu.io/config": "v3"}},
             "spec": {"containers": [{"name": "edge", "image": "kgpu/edge:0.3.0"}]}}
    created = post_rollout(cloud, {"templatePatch": patch, "version": "0.3.0", "maxUnavailable": 1,
                                   "healthTimeout": "60s", "waves": {"percentages": [100]}})
    wait_rollout(cloud, created["id"], lambda r: r["counts"]["upgrade-done"] == 3, timeout=30,
                 what="three nodes on 0.3.0", max_unavailable=1)
    template = kube.apps.read_namespaced_daemon_set(DS, NS).spec.template
    assert template.metadata.annotations == {"kgpu.io/config": "v3"}

    status, body = cloud.request("POST", f"/api/v1/rollouts/{created['id']}/rollback")
    assert status == 202, body
    r = wait_rollout(cloud, created["id"], lambda r: r["state"] == "rolled-back", timeout=30,
                     what="the operator's rollback", max_unavailable=1)
    assert r["reason"].startswith("rollback requested by an operator"), r["reason"]
    template = kube.apps.read_namespaced_daemon_set(DS, NS).spec.template
    assert not template.metadata.annotations and template.spec.containers[0].image == OLD_IMAGE
    assert all(n["daemonVersion"] == "0.1.0" for n in r["nodes"])
    status, body = cloud.request("POST", f"/api/v1/rollouts/{created['id']}/cancel")
    assert status == 409, body

    second = post_rollout(cloud, {"image": NEW_IMAGE, "waves": {"canary": ["gpu-003"]}, "healthTimeout": "1h"})
    status, body = cloud.request("POST", f"/api/v1/rollouts/{second['id']}/cancel")
    assert status == 200 and body["state"] == "cancelled", body
    assert rollout(cloud, second["id"])["state"] == "cancelled"
    third = post_rollout(cloud, {"image": NEW_IMAGE})  # the slot is free again
    assert [r["id"] for r in cloud.get("/api/v1/rollouts")["rollouts"]] == [third["id"], second["id"], created["id"]]


def test_without_a_cluster_rollouts_are_refused(tmp_path: Path, broker: Mosquitto) -> None:
    cloud = CloudProcess(tmp_path / "nokube", broker.url).start()
    try:
        status, body = cloud.request("POST", "/api/v1/rollouts", {"image": NEW_IMAGE})
        assert status == 409 and body["error"] == "rollouts need a cluster", body
        assert cloud.get("/api/v1/rollouts") == {"rollouts": []}
        status, body = cloud.request("GET", "/api/v1/rollouts/7")
        assert status == 404 and body["error"] == "no such rollout"
    finally:
        assert cloud.proc is not None
        cloud.proc.kill()
        cloud.proc.wait()
