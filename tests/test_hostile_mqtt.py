"""Hostile payloads over a real mosquitto at a real controller and a real edge daemon: oversized,
deeply nested, not UTF-8, the wrong schema version, numbers no column can hold. Each is refused
under its own counted reason, both processes keep running, and the real traffic around the
garbage is stored exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kgpu.lab.broker import Mosquitto, mosquitto_binary
from kgpu.lab.processes import wait_for
from shared.mqtt import MqttLink, parse_broker_url
from shared.protocol import MAX_PAYLOAD_BYTES, CommandBody, Kind, make_envelope
from shared.topics import cloud_topic, edge_topic
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess, edge_seqs, outbox_depth

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (scripts/test.sh installs it)")]


def ack_like(**override: object) -> dict[str, object]:
    return {"v": 1, "node": "edge-a", "id": "x1", "ts": time.time(), "kind": "ack", "body": {"upto": 1}, **override}


# (what it is, payload, the reason it must be counted under)
HOSTILE: list[tuple[str, bytes, str]] = [
    ("over the size limit", b'{"v": 1, "pad": "' + b"x" * (MAX_PAYLOAD_BYTES + 10) + b'"}', "oversize"),
    ("nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, "not_json"),
    ("nested objects", b'{"a":' * 20_000 + b"1" + b"}" * 20_000, "not_json"),
    ("not UTF-8", b'{"v": 1, "node": "\xc3\x28"}', "not_json"),
    ("binary", bytes(range(256)), "not_json"),
    ("wrong version", json.dumps(ack_like(v=2)).encode(), "version"),
    ("a version string", json.dumps(ack_like(v="1")).encode(), "version"),
    ("a seq no column holds", json.dumps(ack_like(seq=2**64)).encode(), "schema"),
    ("NaN", json.dumps(ack_like(ts=float("nan"))).encode(), "schema"),
    ("an array", b"[1, 2, 3]", "schema"),
]


def settled(edge: EdgeProcess, cloud: CloudProcess) -> bool:
    """Every event the edge wrote is stored once in the cloud, and its outbox is empty (all acked)."""
    return outbox_depth(edge) == 0 and cloud.event_seqs(edge.node) == list(range(1, edge_seqs(edge) + 1))


@contextmanager
def edge_a_cloud_and(tmp_path: Path, broker: Mosquitto,
                     client_id: str) -> Iterator[tuple[CloudProcess, EdgeProcess, MqttLink]]:
    """A real controller, a real edge `edge-a` online at it, and a raw MQTT client `client_id`."""
    cloud = CloudProcess(tmp_path / "cloud", broker.url)
    edge = EdgeProcess(tmp_path / "edge-a", node="edge-a", gpus=1, mqtt=broker.url,
                       config={"ack_timeout": 2, "status_interval": 2})
    client = MqttLink(parse_broker_url(broker.url), client_id, backoff_min_s=0.1, backoff_max_s=0.5)
    try:
        cloud.start()
        edge.start()
        client.start()
        wait_for(client.connected.is_set, what=f"{client_id} connected")
        wait_for(lambda: (n := cloud.node_state("edge-a")) and n["online"], timeout=30, what="edge-a online")
        yield cloud, edge, client
    finally:
        client.stop()
        for process in (edge, cloud):
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()


def test_hostile_payloads_at_both_processes(tmp_path: Path, broker: Mosquitto) -> None:
    with edge_a_cloud_and(tmp_path, broker, "attacker") as (cloud, edge, attacker):
        edge.inject(0, xid=79)
        wait_for(lambda: cloud.event_seqs("edge-a"), timeout=30, what="edge-a's first events stored")

        expected: dict[str, int] = {}
        for _, payload, reason in HOSTILE:
            expected[reason] = expected.get(reason, 0) + 1
            # at the controller, as edge-a (which is real and busy), and at the edge, as the cloud
            assert attacker.publish(edge_topic("edge-a", "events"), payload, qos=1)
            assert attacker.publish(cloud_topic("edge-a", "commands"), payload, qos=1)
        assert attacker.flush(timeout_s=20)

        def counted(process: CloudProcess | EdgeProcess, metric: str) -> dict[str, float]:
            return {reason: process.metric(metric, reason=reason) for reason in expected}

        wait_for(lambda: counted(cloud, "kgpu_ingest_rejected_total") == expected, timeout=20,
                 what=f"the controller to count {expected}")
        wait_for(lambda: counted(edge, "kgpu_sync_rejected_total") == expected, timeout=20,
                 what=f"the edge to count {expected}")

        # both keep working: the edge's next decisions reach the cloud exactly once
        edge.inject(0, reset=True)
        edge.inject(0, xid=48)

        wait_for(lambda: settled(edge, cloud), timeout=40, what="every edge-a event stored once, the outbox empty")
        assert cloud.request("GET", "/healthz")[0] == 200 and edge.request("GET", "/healthz")[0] == 200
        assert cloud.proc.poll() is None and edge.proc.poll() is None


@pytest.fixture
def limited_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """mosquitto with the shipped conf's message_size_limit: it drops anything bigger."""
    server = Mosquitto(tmp_path / "broker", message_size_limit=MAX_PAYLOAD_BYTES).start()
    yield server
    server.stop()


def test_an_answer_too_big_for_the_broker_arrives_cut_and_holds_nothing_back(tmp_path: Path,
                                                                               limited_broker: Mosquitto) -> None:
    """A command naming a GPU by a 256 KiB "uuid" just fits the broker's message_size_limit (the
    shipped mosquitto.conf sets it to MAX_PAYLOAD_BYTES); the edge's answer, which quotes the
    uuid, would not, and the broker would drop it: the cloud would never ack past it and every
    later event would wait. The edge cuts the answer to fit instead."""
    with edge_a_cloud_and(tmp_path, limited_broker, "commander") as (cloud, edge, commander):
        empty = make_envelope("edge-a", CommandBody(command="drain", gpu_uuid=""), Kind.COMMAND)
        pad = "G" * (MAX_PAYLOAD_BYTES - len(empty.to_json()))  # same id and ts: exactly the limit
        command = empty.model_copy(update={"body": {**empty.body, "gpu_uuid": pad}})
        assert len(command.to_json()) == MAX_PAYLOAD_BYTES
        assert commander.publish(cloud_topic("edge-a", "commands"), command.to_json(), qos=1)
        wait_for(lambda: edge_seqs(edge) == 1, timeout=20, what="the answer written to the outbox")
        edge.inject(0, xid=48)  # later events, which must not wait behind it
        wait_for(lambda: settled(edge, cloud) and edge_seqs(edge) >= 2, timeout=40,
                 what="every edge-a event stored once, the outbox empty")
        (answer,) = cloud.get("/api/v1/events?node=edge-a&kind=command_result")["events"]
        assert answer["body"]["command_id"] == command.id
        assert answer["body"]["ok"] is False and answer["body"]["detail"].endswith("characters cut]")
        assert edge.metric("kgpu_events_truncated_total") == 1
        assert cloud.metric("kgpu_ingest_rejected_total", reason="oversize") == 0
