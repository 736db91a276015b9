"""Cloud ingest rate against the bare rate of a paho subscriber on the same broker.

Starts a real mosquitto, publishes `nodes × events` decision events (QoS 1, in seq order per node)
and measures (1) how fast a bare paho subscriber receives them, (2) how fast `kgpu cloud run`
validates, stores (exactly once, batched transactions) and acks them — from the first publish to the
last event committed. The publisher is the same for both runs.

    python -m bench.ingest_rate [--nodes 20] [--events 1000] [--db sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from shared.mqtt import MqttLink, parse_broker_url
from shared.protocol import DecisionBody, Kind, make_envelope
from shared.topics import EDGE_WILDCARD, edge_topic
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.mosquitto import Mosquitto


def payloads(nodes: int, events: int, prefix: str) -> list[tuple[str, bytes]]:
    body = DecisionBody(gpu_index=0, gpu_uuid="GPU-bench", rule="thermal_step_down", action="set_power_limit",
                        value=630.0, outcome="applied", reason="GPU 0 at 88.0 °C >= maxTempC 83.0",
                        inputs={"temperature_c": 88.0, "power_limit_w": 700.0})
    out = []
    for seq in range(1, events + 1):
        for n in range(nodes):
            node = f"{prefix}-{n}"
            out.append((edge_topic(node, "events"), make_envelope(node, body, Kind.DECISION, seq=seq).to_json()))
    return out


def publish_all(url: str, messages: list[tuple[str, bytes]]) -> None:
    link = MqttLink(parse_broker_url(url), f"bench-pub-{time.monotonic_ns()}", max_inflight=1000)
    link.start()
    link.connected.wait(10)
    for topic, payload in messages:
        while not link.publish(topic, payload, qos=1):
            time.sleep(0.01)
    if not link.flush(120):
        raise SystemExit("the broker did not acknowledge every message")
    link.stop()


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
    match = re.search(r"^kgpu_ingest_events_stored_total (\S+)$", text, re.M)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker").start()
        server = None
        db = None
        try:
            if args.db == "postgresql":
                from tests.helpers.postgres import create_database, find_server_binaries, start_postgres

                binaries = find_server_binaries()
                if binaries is None:
                    raise SystemExit("PostgreSQL server binaries not installed")
                server = start_postgres(*binaries)
                db = create_database(server.admin_url)
            total = args.nodes * args.events
            bare = bare_rate(broker.url, payloads(args.nodes, args.events, "bare"))
            rate, got = cloud_rate(broker.url, payloads(args.nodes, args.events, "node"), work, db)
        finally:
            broker.stop()
            if server is not None:
                server.stop()
    print("cloud ingest rate")
    print(f"  events                    {total} ({args.nodes} nodes x {args.events}), QoS 1, database {args.db}")
    print(f"  bare paho subscriber      {bare:,.0f} msg/s")
    print(f"  kgpu cloud run (stored)   {rate:,.0f} events/s  ({got:.0f} stored)")
    print(f"  ratio cloud / bare        {rate / bare:.2f}")


if __name__ == "__main__":
    main()
