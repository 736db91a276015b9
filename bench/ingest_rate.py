"""Cloud ingest rate against the bare rate of a paho subscriber on the same broker.

Starts a real mosquitto, publishes `nodes × events` decision events (QoS 1, in seq order per node)
and measures (1) how fast a bare paho subscriber receives them, (2) how fast `kgpu cloud run`
validates, stores (exactly once, batched transactions) and acks them — from the first publish to the
last event committed. The publisher is the same for both runs, so once the controller keeps pace
with it, both figures are the publisher's rate; (3) therefore also times the controller draining
the same number of events that the broker queued in its durable session while it was stopped.

    python -m bench.ingest_rate [--nodes 20] [--events 1000] [--db sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.common import Row, publish_all, start_postgres_server, wait_connected
from kgpu.lab.broker import Mosquitto
from shared.mqtt import MqttLink, parse_broker_url
from shared.protocol import ActionOutcome, DecisionBody, Kind, make_envelope
from shared.topics import EDGE_WILDCARD, edge_topic
from tests.helpers.cloud_process import CloudProcess


def payloads(nodes: int, events: int, prefix: str) -> list[tuple[str, bytes]]:
    body = DecisionBody(gpu_index=0, gpu_uuid="GPU-bench", rule="thermal_step_down", action="set_power_limit",
                        value=630.0, outcome=ActionOutcome.APPLIED, reason="GPU 0 at 88.0 °C >= maxTempC 83.0",
                        inputs={"temperature_c": 88.0, "power_limit_w": 700.0})
    out = []
    for seq in range(1, events + 1):
        for n in range(nodes):
            node = f"{prefix}-{n}"
            out.append((edge_topic(node, "events"), make_envelope(node, body, Kind.DECISION, seq=seq).to_json()))
    return out


def bare_rate(url: str, messages: list[tuple[str, bytes]]) -> float:
    received = 0
    done = threading.Event()

    def count(_message: object) -> None:
        nonlocal received
        received += 1
        if received == len(messages):
            done.set()

    sub = MqttLink(parse_broker_url(url), "bench-bare", subscriptions=[(EDGE_WILDCARD, 1)], clean_session=True,
                   on_message=count)
    sub.start()
    sub.connected.wait(10)
    time.sleep(0.3)
    started = time.perf_counter()
    publish_all(url, messages)
    done.wait(120)
    elapsed = time.perf_counter() - started
    sub.stop()
    return received / elapsed


def stored(cloud: CloudProcess) -> float:
    text = urllib.request.urlopen(f"{cloud.base}/metrics", timeout=5).read().decode()
    match = re.search(r"^kgpu_ingest_events_stored_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def cloud_rate(url: str, messages: list[tuple[str, bytes]], workdir: Path, db: str | None) -> tuple[float, float]:
    cloud = CloudProcess(workdir / "cloud", url, db=db, env={"KGPU_LOG_LEVEL": "warning"}).start()
    try:
        time.sleep(0.5)
        started = time.perf_counter()
        publish_all(url, messages)
        deadline = time.monotonic() + 300
        while stored(cloud) < len(messages) and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        total = stored(cloud)
    finally:
        cloud.stop()
    return total / elapsed, total


def backlog_rate(url: str, messages: list[tuple[str, bytes]], workdir: Path, db: str | None) -> float:
    """Events/s stored when they are all already waiting: published into the controller's durable
    session while it is stopped (the broker queues them), timed from the first stored event seen
    after its restart to the last. Not bound by the publisher, unlike `cloud_rate`."""
    cloud = CloudProcess(workdir / "backlog", url, db=db, env={"KGPU_LOG_LEVEL": "warning"}).start()
    try:
        wait_connected(cloud, timeout=30)
        cloud.stop()
        publish_all(url, messages)
        cloud.start()
        first: tuple[float, float] | None = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            now, count = time.perf_counter(), stored(cloud)
            if first is None and count > 0:
                first = (now, count)
            if count >= len(messages):
                break
            time.sleep(0.02)
        assert first is not None
        return (count - first[1]) / (now - first[0]) if now > first[0] else float("nan")
    finally:
        if cloud.proc is not None and cloud.proc.poll() is None:
            cloud.stop()


@dataclass
class IngestRate:
    nodes: int
    events: int
    db: str
    bare_rate: float  # msg/s a bare paho subscriber receives
    cloud_rate: float  # events/s kgpu cloud run stores and acks
    stored: float
    backlog_rate: float  # events/s stored from a backlog queued at the broker

    @property
    def total(self) -> int:
        return self.nodes * self.events


def measure(nodes: int = 20, events: int = 1000, db: str = "sqlite") -> IngestRate:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker").start()
        server = None
        db_url = None
        try:
            if db == "postgresql":
                from tests.helpers.postgres import create_database

                server = start_postgres_server()
                db_url = create_database(server.admin_url)
            bare = bare_rate(broker.url, payloads(nodes, events, "bare"))
            rate, got = cloud_rate(broker.url, payloads(nodes, events, "node"), work, db_url)
            drained = backlog_rate(broker.url, payloads(nodes, events, "queued"), work, db_url)
        finally:
            broker.stop()
            if server is not None:
                server.stop()
    return IngestRate(nodes=nodes, events=events, db=db, bare_rate=bare, cloud_rate=rate, stored=got,
                      backlog_rate=drained)


def describe(r: IngestRate) -> str:
    return "\n".join([
        "cloud ingest rate",
        f"  events                    {r.total} ({r.nodes} nodes x {r.events}), QoS 1, database {r.db}",
        f"  bare paho subscriber      {r.bare_rate:,.0f} msg/s",
        f"  kgpu cloud run (stored)   {r.cloud_rate:,.0f} events/s  ({r.stored:.0f} stored)",
        f"  ratio cloud / bare        {r.cloud_rate / r.bare_rate:.2f}",
        f"  backlog queued at broker  {r.backlog_rate:,.0f} events/s stored once the controller is back",
    ])


def table_rows(r: IngestRate, command: str) -> list[Row]:
    label = f"cloud ingest rate ({r.total} events, {r.db})"
    return [
        Row(label, "bare paho subscriber", r.bare_rate, "msg/s", "", command),
        Row(label, "kgpu cloud run, stored + acked", r.cloud_rate, "events/s",
            f"{r.cloud_rate / r.bare_rate:.2f} of bare", command),
        Row(label, "kgpu cloud run, draining a backlog queued at the broker", r.backlog_rate, "events/s",
            "too small to time" if math.isnan(r.backlog_rate) else f"{r.backlog_rate / r.bare_rate:.2f} of bare",
            command),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    print(describe(measure(args.nodes, args.events, args.db)))


if __name__ == "__main__":
    main()
