"""Fill a real fleet store with simulated nodes through the real ingest core: each node's status
(its GPUs), one telemetry sample of every GPU and, if asked, outbox events. For the read tests
(tests/test_pagination.py, tests/test_http_bounds.py) and bench/reads_vs_ingest.py.

The envelopes are the fleet simulator's (kgpu/lab/fleetsim), validated as the controller
validates them (`cloud.ingest.validate`) and written with `FleetStore.ingest`, in batches."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator

from cloud.ingest import validate
from cloud.store import FleetStore, Incoming
from kgpu.lab.fleetsim.node import SimNode, envelope_json, status_body, telemetry_body
from shared.protocol import Kind, XidBody

BATCH = 500


def sim_nodes(count: int, gpus: int, *, prefix: str = "node", seed: int = 1) -> list[SimNode]:
    rng = random.Random(seed)
    return [SimNode(i, f"{prefix}-{i:05d}", gpus, rng) for i in range(count)]


def node_messages(node: SimNode, *, events: int = 0, epoch: str | None = None, first_seq: int = 1,
                  rng: random.Random | None = None) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) of one node's status, telemetry and `events` XID events (seq first_seq..)."""
    if epoch is not None:
        node.epoch = epoch
    yield node.topics["status"], envelope_json(node.name, Kind.STATUS, status_body(node, "0.1.0"))
    yield node.topics["telemetry"], envelope_json(node.name, Kind.TELEMETRY,
                                                  telemetry_body(node, rng or random.Random(0), time.time()))
    for seq in range(first_seq, first_seq + events):
        body = XidBody(gpu_index=0, gpu_uuid=node.uuids[0] if node.uuids else "GPU-none", xid=31, action="ignored")
        yield node.topics["events"], envelope_json(node.name, Kind.XID, body, seq=seq, ts=time.time() - 1000 + seq)


def ingest(store: FleetStore, messages: Iterable[tuple[str, bytes]]) -> int:
    """Write every message with the ingest core, BATCH at a time; returns how many."""
    batch: list[Incoming] = []
    written = 0
    for topic, payload in messages:
        batch.append(validate(topic, payload, time.time()))
        if len(batch) >= BATCH:
            store.ingest(batch)
            written += len(batch)
            batch = []
    if batch:
        store.ingest(batch)
        written += len(batch)
    return written


def fill(store: FleetStore, count: int, gpus: int, *, prefix: str = "node", events: int = 0) -> list[SimNode]:
    """`count` nodes of `gpus` GPUs each (and `events` events each), written to `store`."""
    nodes = sim_nodes(count, gpus, prefix=prefix)
    ingest(store, (m for node in nodes for m in node_messages(node, events=events)))
    return nodes
