"""The fleet store's cost per telemetry message in a steady fleet (issue 17), with the history an
hour-old fleet has.

`nodes` simulated nodes (the fleet simulator's payloads, 8 GPUs each) send one telemetry message a
second in turn; `history` seconds of samples of every GPU are stored first (as the ingest stores
them: one `sample_messages` row per node and second, its GPUs' samples as JSON), then every message
goes through the controller's real `Ingestor.admit` and `FleetStore.ingest` (SQLite), `batch`
messages a transaction. One process, one thread: CPU and wall time per message of the admission
(validation, budgets) and of the store's write, and the size the WAL grew to (what a batch
dirtied); `--latest-every` is the controller's `latest_sample_every` (0: every latest sample
written). Before schema revision 0013 (one raw row per GPU sample) it also compared the orders of
that table's unique index (docs/benchmarks.md keeps the figures); one row a message has one order.

    python -m bench.store_steady [--nodes 2500] [--batch 250] [--messages 12500] [--history 600]
                                 [--latest-every 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import machine
from cloud.ingest import Ingestor
from cloud.store import FleetStore
from cloud.store.schema import RAW_FIGURES
from kgpu.lab.fleetsim.node import SimNode, envelope_json, telemetry_body
from shared.mqtt import Received
from shared.protocol import Kind

# a stored sample's figures after uuid and ts, in the order of RAW_FIGURES
HISTORY_FIGURES = {"temperature_c": 50.0, "power_w": 250.0, "power_limit_w": 700.0, "utilization_pct": 30.0,
                   "memory_used_bytes": 1 << 34, "memory_util_pct": 20.0, "sm_clock_mhz": 1980, "memory_clock_mhz": 2619}
assert tuple(HISTORY_FIGURES) == RAW_FIGURES[2:]


@dataclass
class Figures:
    admit_us: float
    store_us: float
    cpu_us: float
    wal_mib: float


def messages(nodes: int, count: int, start: float) -> tuple[list[SimNode], list[Received]]:
    rng = random.Random(3)
    fleet = [SimNode(i, f"node-{i:05d}", 8, rng) for i in range(nodes)]
    out: list[Received] = []
    second = 0
    while len(out) < count:
        for node in fleet:
            ts = start + second
            out.append(Received(node.topics["telemetry"],
                                envelope_json(node.name, Kind.TELEMETRY, telemetry_body(node, rng, ts), ts=ts), False))
        second += 1
    return fleet, out[:count]


def run(nodes: int, batch: int, count: int, history: int, latest_every: float) -> Figures:
    start = time.time() - count // nodes - 2
    fleet, flow = messages(nodes, count + nodes, start)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fleet.db"
        store = FleetStore(f"sqlite:///{path}", latest_sample_every=latest_every)
        ingestor = Ingestor(store, lambda *_a, **_k: None)
        first = [q.incoming for q in (ingestor.admit(m) for m in flow[:nodes]) if q is not None]
        store.ingest(first)  # the nodes and their GPUs
        db = sqlite3.connect(path)
        figures = tuple(HISTORY_FIGURES.values())
        for second in range(history):  # an hour-old fleet's raw tier, one message a second per node
            ts = start - history + second
            db.executemany("INSERT INTO sample_messages (node, ts, figures) VALUES (?, ?, ?)",
                           [(node.name, ts, json.dumps([[uuid, ts, *figures] for uuid in node.uuids]))
                            for node in fleet])
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        gc.freeze()
        admit = write = cpu = 0.0
        for i in range(nodes, len(flow), batch):
            chunk = flow[i:i + batch]
            began, cpu_began = time.perf_counter(), time.process_time()
            queued = [q for q in (ingestor.admit(m) for m in chunk) if q is not None]
            admitted = time.perf_counter()
            store.ingest([q.incoming for q in queued])
            admit += admitted - began
            write += time.perf_counter() - admitted
            cpu += time.process_time() - cpu_began
            ingestor.release(q.node for q in queued)
        gc.unfreeze()
        wal = os.path.getsize(f"{path}-wal") / 2**20
        store.close()
    n = len(flow) - nodes
    return Figures(admit / n * 1e6, write / n * 1e6, cpu / n * 1e6, wal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=250, help="messages a transaction (the steady state's)")
    parser.add_argument("--messages", type=int, default=12500)
    parser.add_argument("--history", type=int, default=600, help="seconds of history stored first")
    parser.add_argument("--latest-every", type=float, default=2.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"steady fleet store, {args.nodes} nodes x 8 GPUs, 1 message a second each, {args.history} s of history, "
          f"{args.batch} messages a transaction, latest_sample_every {args.latest_every:g} s")
    f = run(args.nodes, args.batch, args.messages, args.history, args.latest_every)
    print(f"  admit {f.admit_us:6.1f} µs/msg  store {f.store_us:6.1f} µs/msg  CPU {f.cpu_us:6.1f} µs/msg  "
          f"WAL {f.wal_mib:5.1f} MiB")


if __name__ == "__main__":
    main()
