"""Hostile payloads over a real mosquitto at a real controller and a real edge daemon: oversized,
deeply nested, not UTF-8, the wrong schema version, numbers no column can hold. Each is refused
under its own counted reason, both processes keep running, and the real traffic around the
garbage is stored exactly once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from shared.mqtt import MqttLink, parse_broker_url
from shared.protocol import MAX_PAYLOAD_BYTES
from shared.topics import cloud_topic, edge_topic
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess, wait_for
from tests.helpers.mosquitto import Mosquitto, mosquitto_binary

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


def test_hostile_payloads_at_both_processes(tmp_path: Path, broker: Mosquitto) -> None:
    cloud = CloudProcess(tmp_path / "cloud", broker.url)
    edge = EdgeProcess(tmp_path / "edge-a", node="edge-a", gpus=1, mqtt=broker.url,
                       config={"ack_timeout": 2, "status_interval": 2})
    attacker = MqttLink(parse_broker_url(broker.url), "attacker", backoff_min_s=0.1, backoff_max_s=0.5)
    try:
        cloud.start()
        edge.start()
        attacker.start()
        wait_for(attacker.connected.is_set, what="attacker connected")
        wait_for(lambda: (n := cloud.node_state("edge-a")) and n["online"], timeout=30, what="edge-a online")
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

        def settled() -> bool:
            with __import__("sqlite3").connect(edge.db) as conn:
                last = int(conn.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()[0])
                depth = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
            return depth == 0 and cloud.event_seqs("edge-a") == list(range(1, last + 1))

        wait_for(settled, timeout=40, what="every edge-a event stored once, the outbox empty")
        assert cloud.request("GET", "/healthz")[0] == 200 and edge.request("GET", "/healthz")[0] == 200
        assert cloud.proc.poll() is None and edge.proc.poll() is None
    finally:
        attacker.stop()
        for process in (edge, cloud):
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()
