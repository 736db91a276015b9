"""Edge ↔ cloud over a real mosquitto, with the edge and the cloud as real processes.

Every scenario ends with the same check: the cloud holds each of the edge's events exactly once
(seq 1..N, no gap, no repeat) and the edge's outbox is empty.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kgpu.lab.broker import Mosquitto, mosquitto_binary
from kgpu.lab.processes import wait_for
from shared.mqtt import MqttLink, parse_broker_url
from shared.policy import PowerPolicy
from shared.protocol import CommandBody, DecisionBody, Kind, PolicyBody, StatusBody, make_envelope
from shared.topics import cloud_topic, edge_topic
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import BUSY_POLICY, EdgeProcess, edge_seqs, outbox_depth
from tests.helpers.postgres import create_database, pg_url  # noqa: F401  (pg_url: fixture)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (scripts/test.sh installs it)")]

def churn(edge: EdgeProcess, rounds: int, gpus: int = 2) -> None:
    for _ in range(rounds):
        for gpu in range(gpus):
            edge.inject(gpu, utilization=random.choice([0, 100]))
        time.sleep(random.uniform(0.3, 0.8))


def assert_exactly_once(edge: EdgeProcess, cloud: CloudProcess, timeout: float = 40) -> int:
    """Wait until the cloud holds seq 1..last_seq of the edge and the edge's outbox is empty."""
    def settled() -> bool:
        last = edge_seqs(edge)
        return last > 0 and cloud.event_seqs(edge.node) == list(range(1, last + 1)) and outbox_depth(edge) == 0

    wait_for(settled, timeout=timeout, what=f"cloud to hold every event of {edge.node} once and acks to empty the outbox")
    return edge_seqs(edge)


@pytest.fixture
def stack(tmp_path: Path, broker: Mosquitto) -> Iterator[dict[str, Any]]:
    parts: dict[str, Any] = {"broker": broker}
    cloud = CloudProcess(tmp_path / "cloud", broker.url).start()
    parts["cloud"] = cloud
    edges: list[EdgeProcess] = []

    def edge(node: str = "edge-a", **kw: Any) -> EdgeProcess:
        workdir = tmp_path / node
        workdir.mkdir(exist_ok=True)
        config = {**BUSY_POLICY, **kw.pop("config", {})}
        process = EdgeProcess(workdir, node=node, mqtt=broker.url, config=config, **kw)
        edges.append(process)
        return process.start()

    parts["edge"] = edge
    yield parts
    for process in [*edges, cloud]:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


def test_events_status_and_telemetry_reach_the_cloud(stack: dict[str, Any]) -> None:
    cloud: CloudProcess = stack["cloud"]
    edge: EdgeProcess = stack["edge"]()
    edge.inject(1, xid=79)
    churn(edge, 3)
    assert_exactly_once(edge, cloud)
    node = wait_for(lambda: (n := cloud.node_state("edge-a")) and n["online"] and len(n["gpus"]) == 2 and n,
                    what="node online with two GPUs")
    assert node["outbox_epoch"] and node["daemon_version"] == "0.1.0"
    wait_for(lambda: any(g["health"] == "unhealthy" for g in cloud.node_state("edge-a")["gpus"]),
             what="GPU health from the status")
    kinds = {e["kind"] for e in cloud.get("/api/v1/events?node=edge-a&limit=1000")["events"]}
    assert {"xid", "health", "migration_request", "decision"} <= kinds
    xids = cloud.get("/api/v1/events?node=edge-a&kind=xid")["events"]
    assert len(xids) == 1 and xids[0]["body"]["xid"] == 79
    assert cloud.get("/api/v1/decisions?node=edge-a")["decisions"]
    assert wait_for(lambda: cloud.get("/api/v1/nodes/edge-a/samples")["samples"], what="sample history")
    assert cloud.metric("kgpu_ingest_messages_total", kind="telemetry") > 0

    def metrics_settled() -> bool:  # the edge may decide again meanwhile: look until both agree
        metrics = edge.get("/metrics")
        return ("kgpu_outbox_depth 0.0" in metrics and "kgpu_mqtt_connected 1.0" in metrics
                and f"kgpu_outbox_acked_seq {float(edge_seqs(edge))}" in metrics)

    wait_for(metrics_settled, what="the edge's metrics: outbox empty, acked up to its last seq")


def test_broker_restarts_in_the_middle_of_a_stream(stack: dict[str, Any]) -> None:
    broker: Mosquitto = stack["broker"]
    edge: EdgeProcess = stack["edge"]()
    for _ in range(3):
        churn(edge, 3)
        broker.restart()
    churn(edge, 2)
    total = assert_exactly_once(edge, stack["cloud"], timeout=60)
    assert total >= 4  # the stream really flowed across the restarts


def test_broker_down_for_a_while_edge_keeps_deciding_then_replays(stack: dict[str, Any]) -> None:
    broker: Mosquitto = stack["broker"]
    cloud: CloudProcess = stack["cloud"]
    edge: EdgeProcess = stack["edge"]()
    churn(edge, 2)
    assert_exactly_once(edge, cloud)
    before = edge_seqs(edge)
    broker.stop()
    churn(edge, 6)  # decisions go on with no broker
    edge.inject(0, xid=48)
    wait_for(lambda: edge_seqs(edge) > before + 3, what="decisions while offline")
    assert outbox_depth(edge) > 0
    broker.start()
    assert_exactly_once(edge, cloud, timeout=60)
    summaries = cloud.get("/api/v1/events?node=edge-a&kind=offline_summary")["events"]
    assert summaries, "the link came back: one summary of what happened meanwhile"
    gpu0 = summaries[0]["body"]["gpus"][0]
    assert gpu0["samples"] >= 2 and gpu0["temperature_c"][0] <= gpu0["temperature_c"][1]


def test_partition_sigstop_then_heal(stack: dict[str, Any]) -> None:
    broker: Mosquitto = stack["broker"]
    edge: EdgeProcess = stack["edge"]()
    churn(edge, 2)
    broker.pause()
    churn(edge, 4)
    broker.resume()
    churn(edge, 2)
    assert_exactly_once(edge, stack["cloud"], timeout=60)


def test_edge_kill_9_with_events_in_flight(stack: dict[str, Any]) -> None:
    edge: EdgeProcess = stack["edge"]()
    for _ in range(3):
        churn(edge, 2)
        edge.kill9()
        edge.start()
    churn(edge, 2)
    assert_exactly_once(edge, stack["cloud"], timeout=60)


def test_cloud_kill_9_replays_as_no_ops(stack: dict[str, Any], tmp_path: Path) -> None:
    cloud: CloudProcess = stack["cloud"]
    edge: EdgeProcess = stack["edge"]()
    for _ in range(3):
        churn(edge, 2)
        cloud.kill9()  # wherever it is: between commit and ack, or mid-batch
        churn(edge, 1)
        cloud.start()
    churn(edge, 2)
    assert_exactly_once(edge, cloud, timeout=60)
    # Gaps may be counted here: a killed controller had PUBACKed events it never committed; the
    # edge re-sends them (ack_timeout) and the hole closes. Exactly-once above is what matters.


def test_last_will_marks_a_killed_edge_offline(stack: dict[str, Any]) -> None:
    cloud: CloudProcess = stack["cloud"]
    edge: EdgeProcess = stack["edge"](config={"status_interval": 1})
    wait_for(lambda: (n := cloud.node_state("edge-a")) and n["online"], what="online")
    edge.kill9()
    wait_for(lambda: cloud.node_state("edge-a")["online"] is False, timeout=90, what="offline after the last will")
    edge.start()
    wait_for(lambda: cloud.node_state("edge-a")["online"] is True, what="online again")


def raw_link(broker: Mosquitto, client_id: str) -> MqttLink:
    link = MqttLink(parse_broker_url(broker.url), client_id, backoff_min_s=0.1, backoff_max_s=0.5)
    link.start()
    wait_for(link.connected.is_set, what="raw client connected")
    return link


def wait_ingesting(cloud: CloudProcess, link: MqttLink) -> None:
    """Until the controller takes messages from the broker. Its HTTP answers before its MQTT
    subscription is in place, and a message published before that is not delivered to it: a
    retained status of a throwaway node, published until the node shows, proves the subscription."""
    status = make_envelope("probe", StatusBody(state="online", outbox_epoch="p1"), Kind.STATUS).to_json()

    def seen() -> bool:
        link.publish(edge_topic("probe", "status"), status, retain=True)
        return cloud.node_state("probe") is not None

    wait_for(seen, timeout=60, interval=1.0, what="the controller ingesting from the broker")


def decision(seq: int, node: str = "fake-1") -> bytes:
    body = DecisionBody(rule="test", action="record", outcome="recorded", reason=f"event {seq}")
    # a re-send is the same envelope (its id): another id under a stored seq is a conflict
    return make_envelope(node, body, Kind.DECISION, seq=seq).model_copy(update={"id": f"{node}-{seq}"}).to_json()


def test_duplicates_out_of_order_and_gaps_from_a_raw_publisher(stack: dict[str, Any]) -> None:
    cloud: CloudProcess = stack["cloud"]
    fake = raw_link(stack["broker"], "fake-1")
    wait_ingesting(cloud, fake)
    acks: list[int] = []
    listener = MqttLink(parse_broker_url(stack["broker"].url), "fake-1-acks", subscriptions=[(cloud_topic("fake-1", "ack"), 1)],
                        on_message=lambda m: acks.append(json.loads(m.payload)["body"]["upto"]))
    listener.start()
    try:
        wait_for(listener.connected.is_set, what="ack listener")
        status = make_envelope("fake-1", StatusBody(state="online", outbox_epoch="e1"), Kind.STATUS)
        fake.publish(edge_topic("fake-1", "status"), status.to_json(), retain=True)
        for seq in (1, 2, 2, 4, 1):
            fake.publish(edge_topic("fake-1", "events"), decision(seq))
        wait_for(lambda: cloud.event_seqs("fake-1") == [1, 2, 4], what="1, 2, 4 stored once")
        wait_for(lambda: acks and max(acks) == 2, what="ack stops at the gap")
        assert cloud.metric("kgpu_ingest_seq_gaps_total") >= 1
        assert cloud.metric("kgpu_ingest_duplicates_total") >= 2
        fake.publish(edge_topic("fake-1", "events"), decision(3))
        wait_for(lambda: cloud.event_seqs("fake-1") == [1, 2, 3, 4], what="the hole filled")
        wait_for(lambda: max(acks) == 4, what="ack covers everything once the hole is filled")
    finally:
        fake.stop(), listener.stop()


def test_a_node_cannot_speak_for_another_and_garbage_is_counted(stack: dict[str, Any]) -> None:
    cloud: CloudProcess = stack["cloud"]
    fake = raw_link(stack["broker"], "intruder")
    try:
        wait_ingesting(cloud, fake)
        fake.publish(edge_topic("victim", "events"), decision(1, node="intruder"))
        fake.publish(edge_topic("victim", "events"), b"\xff not json")
        fake.publish(edge_topic("victim", "events"), json.dumps({"v": 9}).encode())
        fake.publish(edge_topic("victim", "telemetry"), decision(1, node="victim"))  # wrong kind for topic
        fake.publish("kgpu/v1/edge/victim/secrets", b"{}")
        wait_for(lambda: cloud.metric("kgpu_ingest_rejected_total", reason="node_mismatch") == 1
                 and cloud.metric("kgpu_ingest_rejected_total", reason="not_json") == 1
                 and cloud.metric("kgpu_ingest_rejected_total", reason="version") == 1
                 and cloud.metric("kgpu_ingest_rejected_total", reason="kind_mismatch") == 1
                 and cloud.metric("kgpu_ingest_rejected_total", reason="bad_topic") == 1,
                 what="each bad message counted under its reason")
        assert cloud.node_state("victim") is None
        assert cloud.request("GET", "/healthz")[0] == 200
    finally:
        fake.stop()


def test_policy_from_the_cloud_applies_caches_and_survives_restart_offline(stack: dict[str, Any]) -> None:
    broker: Mosquitto = stack["broker"]
    edge: EdgeProcess = stack["edge"](gpus=1, config={"policy": {"version": 1}})
    publisher = raw_link(broker, "kgpu-controller-policy")
    try:
        policy = PowerPolicy(name="site-cap", version=5, power_cap_watts=400)
        publisher.publish(cloud_topic("edge-a", "policy"),
                          make_envelope("edge-a", PolicyBody(policy=policy), Kind.POLICY).to_json(), retain=True)
        wait_for(lambda: edge.get("/api/v1/policy")["policy"]["version"] == 5, what="policy v5 applied")
        assert edge.get("/api/v1/policy")["source"] == "cloud"
        wait_for(lambda: edge.gpu(0)["sample"]["power_limit_w"] == 400, what="the cap enforced")
        older = PowerPolicy(name="site-cap", version=4, power_cap_watts=300)
        publisher.publish(cloud_topic("edge-a", "policy"),
                          make_envelope("edge-a", PolicyBody(policy=older), Kind.POLICY).to_json())
        time.sleep(2)
        assert edge.get("/api/v1/policy")["policy"]["version"] == 5, "an older policy is ignored"
        # offline restart: the cached policy keeps applying with no broker at all
        edge.stop()
        broker.stop()
        edge.start()
        body = edge.get("/api/v1/policy")
        assert (body["policy"]["version"], body["source"]) == (5, "cache")
    finally:
        publisher.stop()


def test_commands_apply_at_most_once_and_report_back(stack: dict[str, Any]) -> None:
    cloud: CloudProcess = stack["cloud"]
    edge: EdgeProcess = stack["edge"]()
    uuid = edge.gpu(1)["inventory"]["uuid"]
    publisher = raw_link(stack["broker"], "kgpu-controller-commands")
    # the edge subscribes as it connects, then says it is online: a command sent before is not for it
    wait_for(lambda: (n := cloud.node_state("edge-a")) and n["online"], what="edge-a online")
    try:
        command = make_envelope("edge-a", CommandBody(command="drain", gpu_uuid=uuid), Kind.COMMAND)
        for _ in range(3):  # the same id, three times
            publisher.publish(cloud_topic("edge-a", "commands"), command.to_json())
        wait_for(lambda: edge.gpu(1)["draining"], what="GPU 1 draining")
        assert not edge.gpu(0)["draining"]
        results = wait_for(lambda: cloud.get("/api/v1/events?node=edge-a&kind=command_result")["events"],
                           what="the result at the cloud")
        time.sleep(2)
        results = cloud.get("/api/v1/events?node=edge-a&kind=command_result")["events"]
        assert len(results) == 1 and results[0]["body"]["ok"] and results[0]["body"]["command_id"] == command.id
        check = make_envelope("edge-a", CommandBody(command="restart_check"), Kind.COMMAND)
        publisher.publish(cloud_topic("edge-a", "commands"), check.to_json())
        wait_for(lambda: len(cloud.get("/api/v1/events?node=edge-a&kind=command_result")["events"]) == 2,
                 what="restart_check result")
        # a command addressed to this node but claiming another node in the payload is refused
        forged = make_envelope("edge-b", CommandBody(command="drain"), Kind.COMMAND)
        publisher.publish(cloud_topic("edge-a", "commands"), forged.to_json())
        time.sleep(1.5)
        assert not edge.gpu(0)["draining"]
        # a drain lasts until undrain, across a restart of the daemon
        edge.stop()
        edge.start()
        assert edge.gpu(1)["draining"] and not edge.gpu(0)["draining"]
        undrain = make_envelope("edge-a", CommandBody(command="undrain", gpu_uuid=uuid), Kind.COMMAND)
        # QoS 1 into the edge's persistent session: delivered even if it is still reconnecting
        assert publisher.publish(cloud_topic("edge-a", "commands"), undrain.to_json(), qos=1)
        wait_for(lambda: not edge.gpu(1)["draining"], what="GPU 1 undrained")
        edge.stop()
        edge.start()
        assert not edge.gpu(1)["draining"] and not edge.gpu(0)["draining"]
    finally:
        publisher.stop()


def test_two_replicas_share_the_subscription_on_postgresql(tmp_path: Path, broker: Mosquitto,
                                                          request: pytest.FixtureRequest) -> None:
    """Two controllers on one PostgreSQL database, one $share group: the load is split and every
    event of several edges is stored exactly once."""
    db = create_database(request.getfixturevalue("pg_url"))  # skips when PostgreSQL is not installed
    replicas = [CloudProcess(tmp_path / f"replica{i}", broker.url, db=db,
                             extra_args=["--shared-subscription", "kgpu"]).start() for i in range(2)]
    edges = [EdgeProcess(tmp_path / f"e{i}", node=f"edge-{i}", mqtt=broker.url, config=BUSY_POLICY) for i in range(3)]
    for edge in edges:
        edge.start()
    try:
        for _ in range(4):
            for edge in edges:
                churn(edge, 1)
        for edge in edges:
            assert_exactly_once(edge, replicas[0], timeout=60)
            assert replicas[1].event_seqs(edge.node) == replicas[0].event_seqs(edge.node)  # one database
        split = [r.metric("kgpu_ingest_messages_total", kind="telemetry") for r in replicas]
        assert all(count > 0 for count in split), f"both replicas took a share: {split}"
    finally:
        for process in [*edges, *replicas]:
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()


def test_a_command_the_broker_lost_is_sent_again_until_the_edge_answers(tmp_path: Path, broker: Mosquitto) -> None:
    """The broker loses the edge's session (restarted without its persistence file) while the
    edge is away: the command published meanwhile reaches no one. The controller sends it again
    once the node is back, and the edge applies it once."""
    cloud = CloudProcess(tmp_path / "cloud", broker.url, env={"KGPU_COMMAND_RESEND_INTERVAL": "2"}).start()
    edge = EdgeProcess(tmp_path / "edge-a", node="edge-a", gpus=2, mqtt=broker.url, config=BUSY_POLICY)
    try:
        edge.start()
        wait_for(lambda: (n := cloud.node_state("edge-a")) and n["online"], what="edge-a online")
        uuid = edge.gpu(1)["inventory"]["uuid"]
        edge.stop()
        wait_for(lambda: not cloud.node_state("edge-a")["online"], what="edge-a offline at the cloud")
        broker.stop()
        (broker.workdir / "mosquitto.db").unlink()  # the edge's session and its queue are gone
        broker.start()
        wait_for(lambda: cloud.metric("kgpu_mqtt_connected") == 1, what="the controller back on the broker")
        status, sent = cloud.request("POST", "/api/v1/nodes/edge-a/commands", {"command": "drain", "gpuUuid": uuid})
        assert status == 202 and sent["state"] == "pending", (status, sent)
        wait_for(lambda: cloud.get("/api/v1/commands")["commands"][0]["sends"] >= 1, what="published once, to no one")
        time.sleep(3)  # offline nodes get no re-sends: the count stays
        first = cloud.get("/api/v1/commands")["commands"][0]
        assert first["state"] == "pending" and first["sends"] == 1
        edge.start()
        done = wait_for(lambda: (c := cloud.get("/api/v1/commands")["commands"][0])["state"] == "done" and c,
                        timeout=30, what="the drain re-sent, applied and answered")
        assert done["sends"] >= 2 and done["ok"] is True
        assert edge.gpu(1)["draining"] and not edge.gpu(0)["draining"]
        results = cloud.get("/api/v1/events?node=edge-a&kind=command_result")["events"]
        assert [r["body"]["command_id"] for r in results] == [sent["id"]], "applied once, answered once"
        assert cloud.metric("kgpu_edge_commands_resent_total") >= 1
    finally:
        for process in (edge, cloud):
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()
