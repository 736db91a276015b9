"""CPU of one pass of the controller's periodic whole-fleet scans (issue 17): the migration scan
and the policy reconcile, on a fleet store of `nodes × gpus` (SQLite, or PostgreSQL with
`--db postgresql`), filled through the real ingest (`FleetStore.ingest`).

Between two passes the bench ingests what a fleet sends in one scan interval (5 s): statuses
from a sixth of the nodes (every 30 s each) and telemetry from half of them (every 10 s), a few
of the statuses changing a GPU's health. Each round then times, in CPU ms of this process (all
threads: the scans read in a thread):

- the migration scan as it runs (re-reading the GPU rows of the nodes whose status moved), and
  its peer, the same scan after `forget()` (every GPU row re-read: the full pass kept as the
  safety net, and what every pass cost before issue 17);
- the policy reconcile (`PolicyManager.reconcile`, no cluster: two policies, one for every
  node and one for a tenth of them by label);

and, for reference, one read of a node as `GET /api/v1/nodes/{node}` makes it (what the fleet
simulator's telemetry-lag probes poll, at most every 0.25 s) and one `/metrics/fleet` scrape (read and
render).

    python -m bench.fleet_scans [--nodes 5000] [--gpus 8] [--rounds 5] [--db sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import Row, machine, start_postgres_server
from bench.fleet_exporter import MODEL, _incoming, h100_sample, populate, uuid
from cloud.commands import EdgeCommands
from cloud.config import CloudSettings
from cloud.http.fleet_metrics import render
from cloud.migration.fleet_view import FULL_READ_EVERY_S
from cloud.migration.manager import MigrationManager
from cloud.policies.manager import PolicyManager
from cloud.services import BatchBus
from cloud.store import FleetStore, Incoming
from shared.gpu import Health
from shared.protocol import GpuSummary, Kind, StatusBody, TelemetryBody

SCAN_INTERVAL_S = 5.0  # the migration scan's interval (migration_grace / 2, at most 5 s)
STATUS_EVERY_S = 30.0  # the edge's status_interval
TELEMETRY_EVERY_S = 10.0


@dataclass
class ScanFigures:
    nodes: int
    gpus: int
    migration_ms: list[float]  # the scan as it runs (incremental)
    migration_full_ms: list[float]  # its peer: every GPU row re-read
    policy_ms: list[float]
    nodes_reread: float  # per incremental migration pass
    probe_ms: float = 0.0  # one GET /api/v1/nodes/{node} read (the fleet simulator's lag probe)
    exporter_ms: float = 0.0  # one /metrics/fleet scrape's read and render


def _published(topic: str, payload: bytes, *, retain: bool = False) -> bool:
    return True  # no broker: the bench times the scans, not MQTT


def _traffic(nodes: int, gpus: int, round_no: int, ts: float) -> list[Incoming]:
    """One scan interval of a fleet's messages: statuses from a sixth of the nodes, telemetry from
    half of them; in each round one node reports GPU 0 unhealthy, the previous round's healthy."""
    batch: list[Incoming] = []
    share = max(1, int(nodes * SCAN_INTERVAL_S / STATUS_EVERY_S))
    sick = (round_no * share) % nodes
    recovered = ((round_no - 1) * share) % nodes  # the previous round's sick node, healthy again
    for n in [recovered, *((round_no * share + k) % nodes for k in range(share))]:
        health = [Health.UNHEALTHY if n == sick and i == 0 else Health.HEALTHY for i in range(gpus)]
        summaries = [GpuSummary(index=i, uuid=uuid(n, i), name=MODEL, health=health[i], power_limit_w=700.0)
                     for i in range(gpus)]
        batch.append(_incoming(f"edge-{n:05d}", StatusBody(state="online", version="0.1.0", gpus=summaries,
                                                           outbox_epoch=f"epoch-{n}"), Kind.STATUS, ts))
    share = max(1, int(nodes * SCAN_INTERVAL_S / TELEMETRY_EVERY_S))
    for k in range(share):
        n = (round_no * share + k) % nodes
        batch.append(_incoming(f"edge-{n:05d}", TelemetryBody(samples=[h100_sample(n, i, ts) for i in range(gpus)]),
                               Kind.TELEMETRY, ts))
    return batch


async def _cpu_ms(step: Callable[[], Awaitable[object]]) -> float:
    started = time.process_time()
    await step()
    return (time.process_time() - started) * 1000


async def _measure(store: FleetStore, settings: CloudSettings, nodes: int, gpus: int, rounds: int) -> ScanFigures:
    batches = BatchBus()
    commands = EdgeCommands(settings=settings, store=store, publish=_published, batches=batches)
    migration = MigrationManager(settings=settings, store=store, kube=None, commands=commands, batches=batches)
    policies = PolicyManager(store=store, kube=None, publish=_published, batches=batches)
    now = time.time()
    policies.tables.put_policy("fleet-default", {"thermalThrottling": {"maxTempC": 83}}, "api", now)
    policies.tables.put_policy("hot-racks", {"nodeSelector": {"rack": "hot"}, "priority": 10,
                                                 "thermalThrottling": {"maxTempC": 78}},
                               "api", now)
    await policies.reconcile()  # adopt the fleet's nodes
    for n in range(0, nodes, 10):
        policies.tables.set_labels(f"edge-{n:05d}", {"rack": "hot"}, now)
    first = await policies.reconcile()  # resolve and publish every node once
    assert len(first.valid) == 2 and all(r.policy_name for r in first.nodes.values())
    migration.periodic()  # as a new leader does: the first scan reads everything
    await migration.tick()
    view = getattr(migration.repo, "view", None)  # None: a controller from before issue 17
    reread_before = view.counts.nodes_reread if view is not None else 0
    out = ScanFigures(nodes, gpus, [], [], [], 0.0)
    for round_no in range(1, rounds + 1):
        traffic = _traffic(nodes, gpus, round_no, time.time())
        store.ingest(traffic)
        await batches.deliver(traffic)
        out.migration_ms.append(await _cpu_ms(migration.tick))
        if view is not None:
            view.forget()
        out.migration_full_ms.append(await _cpu_ms(migration.tick))
        out.policy_ms.append(await _cpu_ms(policies.reconcile))
    if view is not None:
        out.nodes_reread = (view.counts.nodes_reread - reread_before) / rounds
    started = time.process_time()
    for n in range(0, nodes, max(1, nodes // 100)):
        store.node(f"edge-{n:05d}")
    out.probe_ms = (time.process_time() - started) * 1000 / len(range(0, nodes, max(1, nodes // 100)))
    started = time.process_time()
    render(store, max_age=3600.0)
    out.exporter_ms = (time.process_time() - started) * 1000
    return out


def measure(nodes: int, gpus: int, rounds: int, db: str) -> ScanFigures:
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'fleet.db'}"
        if db == "postgresql":
            from tests.helpers.postgres import create_database

            server = start_postgres_server()
            url = create_database(server.admin_url, "kgpu_scans")
        try:
            settings = CloudSettings(db=url, no_kube=True)
            store = FleetStore(url, history_resolution_s=settings.history_resolution)
            try:
                populate(store, nodes, gpus, time.time())
                return asyncio.run(_measure(store, settings, nodes, gpus, rounds))
            finally:
                store.close()
        finally:
            if server is not None:
                server.stop()


def describe(f: ScanFigures) -> str:
    med = statistics.median
    return (f"{f.nodes} nodes x {f.gpus} GPUs, CPU ms per pass (median of {len(f.migration_ms)}):\n"
            f"  migration scan   {med(f.migration_ms):8.1f}   (re-read {f.nodes_reread:.1f} of {f.nodes} nodes a pass)\n"
            f"    peer: full     {med(f.migration_full_ms):8.1f}   "
            f"({med(f.migration_full_ms) / max(med(f.migration_ms), 1e-9):.1f}x)\n"
            f"  policy reconcile {med(f.policy_ms):8.1f}\n"
            f"  for reference: one node read (GET /api/v1/nodes/{{node}}, the fleet simulator's lag probe, "
            f"at most every 0.25 s each) {f.probe_ms:.1f}; one /metrics/fleet scrape {f.exporter_ms:.0f}\n"
            f"  share of one core: migration {_migration_share(f):.1f} % (every 5 s, with the full pass every "
            f"{FULL_READ_EVERY_S:g} s), policies {med(f.policy_ms) / 2.0 / 10:.1f} % (every 2 s)")


def _migration_share(f: ScanFigures) -> float:
    """Per cent of one core: incremental passes every 5 s, and a full one every FULL_READ_EVERY_S."""
    passes = FULL_READ_EVERY_S / SCAN_INTERVAL_S
    per_pass = ((passes - 1) * statistics.median(f.migration_ms) + statistics.median(f.migration_full_ms)) / passes
    return per_pass / SCAN_INTERVAL_S / 10


def rows(f: ScanFigures, command: str) -> list[Row]:
    med = statistics.median
    label = f"fleet scans {f.nodes}x{f.gpus}"
    return [
        Row(label, "migration scan, CPU per pass", med(f.migration_ms), "ms",
            f"{med(f.migration_full_ms) / max(med(f.migration_ms), 1e-9):.1f}x less than a full pass", command),
        Row(label, "migration scan, full pass (peer)", med(f.migration_full_ms), "ms", "every GPU row re-read", command),
        Row(label, "policy reconcile, CPU per pass", med(f.policy_ms), "ms", "every 2 s", command),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(describe(measure(args.nodes, args.gpus, args.rounds, args.db)), flush=True)


if __name__ == "__main__":
    main()
