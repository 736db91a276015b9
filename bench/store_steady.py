"""The fleet store's cost per telemetry message in a steady fleet (issue 17), with the history an
hour-old fleet has, for each order of the raw history's unique index.

`nodes` simulated nodes (the fleet simulator's payloads, 8 GPUs each) send one telemetry message a
second in turn; `history` seconds of samples of every GPU are stored first (as the ingest stores
them), then every message goes through the controller's real `Ingestor.admit` and
`FleetStore.ingest` (SQLite), `batch` messages a transaction. One process, one thread: CPU and
wall time per message of the admission (validation, budgets) and of the store's write, and the
size the WAL grew to (what a batch dirtied). Run twice in one go: with the index as alembic 0012
orders it, (node, ts, uuid), and, as its peer, with the order before it, (node, uuid, ts); and
with `--latest-every` as the controller's `latest_sample_every` (0: every latest sample written).

    python -m bench.store_steady [--nodes 2500] [--batch 250] [--messages 12500] [--history 600]
                                 [--latest-every 2]
"""

from __future__ import annotations

import argparse
import gc
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
from kgpu.lab.fleetsim.node import SimNode, envelope_json, telemetry_body
from shared.mqtt import Received
from shared.protocol import Kind

ORDERS = {"node, ts, uuid (now)": ("node", "ts", "uuid"), "node, uuid, ts (before)": ("node", "uuid", "ts")}
HISTORY_COLUMNS = ("node, uuid, ts, temperature_c, power_w, power_limit_w, utilization_pct, memory_used_bytes, "
                   "memory_util_pct, sm_clock_mhz, memory_clock_mhz")


@dataclass
class Figures:
    order: str
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


def run(order: tuple[str, ...], label: str, nodes: int, batch: int, count: int, history: int,
        latest_every: float) -> Figures:
    start = time.time() - count // nodes - 2
    fleet, flow = messages(nodes, count + nodes, start)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fleet.db"
        store = FleetStore(f"sqlite:///{path}", latest_sample_every=latest_every)
        ingestor = Ingestor(store, lambda *_a, **_k: None)
        first = [q.incoming for q in (ingestor.admit(m) for m in flow[:nodes]) if q is not None]
        store.ingest(first)  # the nodes and their GPUs
        db = sqlite3.connect(path)
        db.execute("DROP INDEX ix_samples_node_ts_uuid")
        db.execute(f"CREATE UNIQUE INDEX ix_samples_node_ts_uuid ON samples ({', '.join(order)})")
        gpus = [(node.name, uuid) for node in fleet for uuid in node.uuids]
        for second in range(history):  # an hour-old fleet's raw tier, one sample a second per GPU
            ts = start - history + second
            db.executemany(f"INSERT INTO samples ({HISTORY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                           [(n, u, ts, 50.0, 250.0, 700.0, 30.0, 1 << 34, 20.0, 1980, 2619) for n, u in gpus])
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
    return Figures(label, admit / n * 1e6, write / n * 1e6, cpu / n * 1e6, wal)


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
    results = [run(order, label, args.nodes, args.batch, args.messages, args.history, args.latest_every)
               for label, order in ORDERS.items()]
    for f in results:
        print(f"  index ({f.order:24s}) admit {f.admit_us:6.1f} µs/msg  store {f.store_us:6.1f} µs/msg  "
              f"CPU {f.cpu_us:6.1f} µs/msg  WAL {f.wal_mib:5.1f} MiB")
    now, before = results
    print(f"  store time, now / before: {now.store_us / before.store_us:.2f}")


if __name__ == "__main__":
    main()
