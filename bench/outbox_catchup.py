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
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import Row, metric_sum
from kgpu.lab.broker import Mosquitto
from kgpu.lab.fleetsim import FleetOptions, FleetSim, raise_fd_limit
from kgpu.lab.processes import wait_for
from tests.helpers.cloud_process import CloudProcess


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
            wait_for(lambda: metric_sum(cloud.base, "kgpu_mqtt_connected") == 1.0, timeout=30,
                     what="controller connected")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--outage", type=float, default=30.0)
    parser.add_argument("--event-every", type=float, default=1.0, help="mean seconds between events of one node")
    args = parser.parse_args()
    print(describe(asyncio.run(run(args.nodes, args.outage, args.event_every))))


if __name__ == "__main__":
    main()
