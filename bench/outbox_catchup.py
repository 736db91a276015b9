"""Outbox catch-up after an outage: a fleet cut off from the broker keeps deciding, then sends
its whole backlog when the link returns.

A real mosquitto, a real `kgpu cloud run` (SQLite) and the fleet simulator (kgpu/lab/fleetsim/):
`nodes` edges make events at `event_every` seconds each; every connection is then dropped without
DISCONNECT (the broker publishes the last wills) for `outage` seconds while the outboxes fill;
then the links return (at the simulator's connect rate) and the clock runs until the cloud has
acked, on every node, every event made before the links came back. Events keep being made during
the catch-up, as a real edge would. At the end the cloud's stored count must equal the events
made: nothing lost, nothing stored twice (duplicates are re-sends the store refused).

    python -m bench.outbox_catchup --nodes 500 --outage 30 --event-every 1

With `--backlog N`, one real edge daemon instead (`kgpu edge run`, its real SQLite store and
sync) starts with N events already waiting in its outbox, as after a long outage, and the clock
runs until the cloud has acked them all: the drain rate of the edge's own outbox and store. Below
a million, the time for a million is also printed, as a projection from the measured rate.

    python -m bench.outbox_catchup --backlog 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import Row, metric_sum, wait_connected
from edge.store import EdgeStore
from kgpu.lab.broker import Mosquitto
from kgpu.lab.fleetsim import FleetOptions, FleetSim, raise_fd_limit
from kgpu.lab.processes import wait_for
from shared.protocol import ActionOutcome, DecisionBody, Kind
from shared.wire import WireModel
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess

MILLION = 1_000_000


@dataclass
class CatchupResult:
    nodes: int
    outage_s: float
    backlog: int  # events waiting in the outboxes when the links came back
    reconnect_s: float  # until every connection was up again
    catchup_s: float  # until every event made before the links came back was acked
    events_made: int
    events_stored: float
    duplicates: float

    @property
    def rate(self) -> float:
        return self.backlog / self.catchup_s if self.catchup_s > 0 else float("nan")

    @property
    def lost(self) -> float:
        return self.events_made - self.events_stored


async def run(nodes: int = 500, outage_s: float = 30.0, event_every_s: float = 1.0, gpus: int = 8,
              interval_s: float = 10.0) -> CatchupResult:
    options = FleetOptions(mqtt="mqtt://127.0.0.1:1", nodes=nodes, gpus=gpus, interval_s=interval_s,
                           event_every_s=event_every_s, prefix="catchup")
    raise_fd_limit(options.connections + 512)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker").start()
        cloud = CloudProcess(work / "cloud", broker.url, env={"KGPU_LOG_LEVEL": "warning"})
        try:
            cloud.start()
            wait_connected(cloud, timeout=30)
            sim = FleetSim(FleetOptions(**{**options.__dict__, "mqtt": broker.url}))
            await sim.start()
            try:
                if not await sim.wait_connected(60):
                    raise SystemExit("the simulated fleet did not connect")
                await asyncio.sleep(3)
                sim.cut_links()
                await asyncio.sleep(outage_s)
                marks = sim.seq_marks()
                backlog = sim.outbox_depth()
                started = time.monotonic()
                await sim.restore_links()
                reconnect_s = float("nan")
                deadline = started + max(300.0, outage_s * 10)
                while not sim.all_acked(marks) and time.monotonic() < deadline:
                    if math.isnan(reconnect_s) and all(c.up for c in sim.connections):
                        reconnect_s = time.monotonic() - started
                    await asyncio.sleep(0.05)
                catchup_s = time.monotonic() - started
                if not sim.all_acked(marks):
                    raise SystemExit(f"backlog not acked after {catchup_s:.0f} s")
                if math.isnan(reconnect_s):
                    reconnect_s = catchup_s
                await sim.quiesce()
                await sim.wait_drained(120)
            finally:
                await sim.stop()
            await asyncio.to_thread(wait_for, lambda: metric_sum(cloud.base, "kgpu_ingest_queue_depth") == 0,
                                    60, 0.2, "controller queue empty")
            stored = metric_sum(cloud.base, "kgpu_ingest_events_stored_total")
            duplicates = metric_sum(cloud.base, "kgpu_ingest_duplicates_total")
        finally:
            if cloud.proc is not None and cloud.proc.poll() is None:
                cloud.stop()
            broker.stop()
    return CatchupResult(nodes=nodes, outage_s=outage_s, backlog=backlog, reconnect_s=reconnect_s,
                         catchup_s=catchup_s, events_made=sim.counters.events_created, events_stored=stored,
                         duplicates=duplicates)


def describe(r: CatchupResult) -> str:
    return "\n".join([
        f"outbox catch-up: {r.nodes} nodes cut off for {r.outage_s:g} s",
        f"  backlog when the links came back   {r.backlog} events",
        f"  all connections up again after      {r.reconnect_s:.1f} s",
        f"  backlog stored and acked after      {r.catchup_s:.1f} s  ({r.rate:,.0f} events/s)",
        f"  events made / stored / lost         {r.events_made} / {r.events_stored:.0f} / {r.lost:.0f}",
        f"  re-sent copies refused as duplicates {r.duplicates:.0f}",
    ])


def rows(r: CatchupResult, command: str) -> list[Row]:
    label = f"outbox catch-up ({r.nodes} nodes, {r.outage_s:g} s outage)"
    return [
        Row(label, f"backlog of {r.backlog} events stored+acked", r.catchup_s, "s", f"{r.rate:,.0f} events/s", command),
        Row(label, "events lost", r.lost, "events", "0", command),
    ]


# ---- one edge with a big backlog ----------------------------------------------------------


@dataclass
class BacklogResult:
    backlog: int
    db_mib: float  # the edge database holding the backlog
    fill_s: float  # writing the backlog (not part of the catch-up)
    startup_s: float  # edge process start -> HTTP up (integrity check, counters)
    drain_s: float  # edge start -> every backlog event acked by the cloud
    events_stored: float

    @property
    def rate(self) -> float:
        return self.backlog / self.drain_s if self.drain_s > 0 else float("nan")


def _decision(i: int) -> tuple[Kind, WireModel]:
    """A decision as the power policy writes it (about the size of a real one)."""
    return Kind.DECISION, DecisionBody(
        gpu_index=i % 8, gpu_uuid=f"GPU-{i % 8:08d}-0000-0000-0000-000000000000", rule="power_saving",
        action="set_power_limit", value=420.0, outcome=ActionOutcome.APPLIED,
        reason=f"GPU {i % 8} utilisation 3.0 % below 50.0 % for 60 s (sustainPeriod 60 s): power limit 700 W -> "
               "420 W (60 % of the default 700 W)",
        inputs={"utilization_pct": 3.0, "power_limit_w": 700.0, "threshold_pct": 50.0, "cap_percent": 60},
        policy_version=3)


def fill_backlog(db: Path, node: str, events: int, batch: int = 10_000) -> None:
    store = EdgeStore(db, node)
    try:
        for start in range(0, events, batch):
            store.record([_decision(i) for i in range(start, min(events, start + batch))])
    finally:
        store.close()


def run_backlog(events: int = 100_000, node: str = "catchup-edge", window: int | None = None) -> BacklogResult:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        edge = EdgeProcess(work / "edge", node=node, gpus=2)
        started = time.monotonic()
        fill_backlog(edge.db, node, events)
        fill_s = time.monotonic() - started
        db_mib = sum(p.stat().st_size for p in edge.db.parent.glob("edge.db*")) / 2**20
        broker = Mosquitto(work / "broker").start()
        # the controller's per-node budgets (cloud/budget.py) would pace one node's catch-up past its
        # burst: off here, so that the figure is the edge's and the ingest's, not the budget's
        cloud = CloudProcess(work / "cloud", broker.url, env={
            "KGPU_LOG_LEVEL": "warning", "KGPU_NODE_MAX_EVENTS_PER_MINUTE": "0", "KGPU_NODE_MAX_BYTES_PER_SECOND": "0",
            "KGPU_NODE_MAX_MESSAGES_PER_SECOND": "0",
            # an edge with a larger window sends further past its ack: as the setting's description says
            **({"KGPU_NODE_MAX_EVENTS_AHEAD": str(2 * window)} if window is not None and window > 1000 else {})})
        edge.args += ["--mqtt", broker.url]
        edge.env["KGPU_LOG_LEVEL"] = "warning"
        if window is not None:
            edge.env["KGPU_OUTBOX_WINDOW"] = str(window)
        try:
            cloud.start()
            wait_connected(cloud, timeout=30)
            started = time.monotonic()
            edge.start(timeout=600)
            startup_s = time.monotonic() - started
            wait_for(lambda: metric_sum(edge.base, "kgpu_outbox_acked_seq") >= events, timeout=3600, interval=0.2,
                     what="the backlog acked")
            drain_s = time.monotonic() - started
            stored = metric_sum(cloud.base, "kgpu_ingest_events_stored_total")
        finally:
            for process in (edge, cloud):
                if process.proc is not None and process.proc.poll() is None:
                    process.stop(timeout=60)
            broker.stop()
    return BacklogResult(events, db_mib, fill_s, startup_s, drain_s, stored)


def describe_backlog(r: BacklogResult) -> str:
    lines = [
        f"outbox catch-up, one edge: {r.backlog:,} events waiting ({r.db_mib:,.0f} MiB of edge database)",
        f"  edge start-up (integrity check, counters)  {r.startup_s:.1f} s",
        f"  backlog stored and acked after             {r.drain_s:.1f} s  ({r.rate:,.0f} events/s)",
        f"  events stored by the cloud                 {r.events_stored:,.0f}",
    ]
    if r.backlog < MILLION:
        lines.append(f"  PROJECTION (not measured): a million at this rate {MILLION / r.rate:,.0f} s "
                     f"({MILLION / r.rate / 60:.1f} min)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--outage", type=float, default=30.0)
    parser.add_argument("--event-every", type=float, default=1.0, help="mean seconds between events of one node")
    parser.add_argument("--backlog", type=int, default=0,
                        help="one real edge daemon starting with this many events in its outbox, instead of a fleet")
    parser.add_argument("--window", type=int, default=None, help="--backlog: the edge's outbox_window (default: its own)")
    args = parser.parse_args()
    if args.backlog:
        print(describe_backlog(run_backlog(args.backlog, window=args.window)))
        return
    print(describe(asyncio.run(run(args.nodes, args.outage, args.event_every))))


if __name__ == "__main__":
    main()
