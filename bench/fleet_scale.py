"""Fleet scale: how large a fleet one controller (or two replicas on PostgreSQL) keeps up with.

Per step: a fresh real mosquitto, a real `kgpu cloud run` (SQLite; or PostgreSQL with `--replicas 2`
sharing `$share/kgpu/...`), and the fleet simulator (kgpu/lab/fleetsim/) in this process with
`nodes` × `gpus` at `interval`. After a warm-up, ingest lag is measured over the window:

- events: first publish of a seq → the cumulative ack covering it (the cloud acks after the commit);
- telemetry: probe nodes poll `GET /api/v1/nodes/{node}` until the sample they published is stored.

Then the simulator stops making events, waits for every outbox to empty, stops, and the cloud's
counters are compared with what was sent: events stored must equal events made, telemetry
accepted must equal telemetry published. A step keeps up when the worst lag in the window stays
under `--lag-limit` and nothing was dropped.

    python -m bench.fleet_scale --nodes 2000 --gpus 8 --interval 10 --seconds 60
    python -m bench.fleet_scale --ramp 1000,2000,4000,6000,8000          # until it falls behind
    python -m bench.fleet_scale --nodes 2000 --db postgresql --replicas 2
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Row, cpu_seconds, machine, metric_sum, start_postgres_server, tree_cpu_seconds, wait_connected
from kgpu.lab.broker import Mosquitto
from kgpu.lab.fleetsim import FleetOptions, FleetSim, lag_summary, raise_fd_limit
from kgpu.lab.processes import wait_for
from tests.helpers.cloud_process import CloudProcess


@dataclass
class StepResult:
    nodes: int
    gpus: int
    interval_s: float
    replicas: int
    db: str
    connections: int
    window_s: float
    telemetry_rate: float  # messages/s published in the window
    event_rate: float
    event_lag: dict[str, float]
    telemetry_lag: dict[str, float]
    events_made: int
    events_stored: float
    telemetry_published: int
    telemetry_accepted: float
    drain_s: float  # after events stopped: until every outbox was empty
    cloud_cpu: list[float]  # share of one core per replica (with its sample writer process), over the window
    ingest_rate: float  # messages the controller(s) ingested a second over the window
    sample_process: bool  # telemetry written by the controller's sample writer process
    broker_cpu: float
    sim_cpu: float
    db_cpu: float  # PostgreSQL server processes (nan on SQLite: it runs inside the controller)
    queue_depth_max: float
    notes: list[str] = field(default_factory=list)

    @property
    def worst_lag(self) -> float:
        values = [v for v in (self.event_lag["max"], self.telemetry_lag["max"]) if not math.isnan(v)]
        return max(values) if values else float("nan")

    @property
    def dropped(self) -> float:
        return (self.events_made - self.events_stored) + (self.telemetry_published - self.telemetry_accepted)

    def keeps_up(self, limit_s: float) -> bool:
        return not math.isnan(self.worst_lag) and self.worst_lag < limit_s and self.dropped == 0


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_step(nodes: int, *, gpus: int = 8, interval_s: float = 10.0, seconds: float = 60.0,
                   warmup_s: float | None = None, event_every_s: float = 60.0, db: str = "sqlite",
                   replicas: int = 1, nodes_per_connection: int = 1, probes: int = 10,
                   workdir: Path | None = None, sample_process: bool = True) -> StepResult:
    """One fleet size against fresh processes; see the module docstring."""
    warmup_s = max(15.0, 1.5 * interval_s) if warmup_s is None else warmup_s
    options = FleetOptions(mqtt="mqtt://127.0.0.1:1", nodes=nodes, gpus=gpus, interval_s=interval_s,
                           event_every_s=event_every_s, nodes_per_connection=nodes_per_connection, probes=probes)
    raise_fd_limit(options.connections + 512)  # before the broker starts: it inherits the limit
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=workdir)))
        broker = Mosquitto(tmp / "broker").start()
        stack.callback(broker.stop)
        db_url = None
        db_pid: int | None = None
        if db == "postgresql":
            from tests.helpers.postgres import create_database

            server = start_postgres_server()
            stack.callback(server.stop)
            db_pid = server.process.pid
            db_url = create_database(server.admin_url)
        elif replicas > 1:
            raise SystemExit("two replicas share one database: use --db postgresql")
        extra = ["--shared-subscription", "kgpu"] if replicas > 1 else []
        clouds = [CloudProcess(tmp / f"cloud{i}", broker.url, db=db_url, extra_args=extra,
                               env={"KGPU_LOG_LEVEL": "warning", "KGPU_SAMPLE_PROCESS": str(sample_process).lower()})
                  for i in range(replicas)]
        for cloud in clouds:
            cloud.start()
            stack.callback(cloud.stop)  # a no-op for a process that has ended already
        for cloud in clouds:
            wait_connected(cloud, timeout=30)

        def summed(name: str, **labels: str) -> float:
            """`name` (with these labels) added up over every controller's /metrics."""
            return sum(metric_sum(c.base, name, **labels) for c in clouds)
        options = FleetOptions(**{**options.__dict__, "mqtt": broker.url, "cloud": clouds[0].base})
        sim = FleetSim(options)
        await sim.start()
        try:
            if not await sim.wait_connected(timeout_s=max(60.0, nodes / 50)):
                raise SystemExit(f"only {sum(c.up for c in sim.connections)}/{len(sim.connections)} connections up")
            await asyncio.sleep(warmup_s)
            assert broker.proc is not None
            pids = [c.proc.pid for c in clouds if c.proc is not None]
            cpu0 = [tree_cpu_seconds(pid) for pid in pids]  # with each controller's sample writer process
            ingested0 = await asyncio.to_thread(summed, "kgpu_ingest_messages_total")
            broker0, sim0 = cpu_seconds(broker.proc.pid), _self_cpu()
            db0 = tree_cpu_seconds(db_pid) if db_pid else 0.0
            published0 = dict(sim.counters.published)
            start = time.monotonic()
            depth_max = 0.0
            while time.monotonic() - start < seconds:
                await asyncio.sleep(min(5.0, seconds - (time.monotonic() - start)))
                depth = await asyncio.to_thread(summed, "kgpu_ingest_queue_depth")
                depth_max = max(depth_max, depth)
            end = time.monotonic()
            window = end - start
            cloud_cpu = [(tree_cpu_seconds(pid) - c0) / window for pid, c0 in zip(pids, cpu0, strict=True)]
            ingest_rate = (await asyncio.to_thread(summed, "kgpu_ingest_messages_total") - ingested0) / window
            broker_cpu = (cpu_seconds(broker.proc.pid) - broker0) / window
            sim_cpu = (_self_cpu() - sim0) / window
            db_cpu = (tree_cpu_seconds(db_pid) - db0) / window if db_pid else float("nan")
            published = sim.counters.published
            telemetry_rate = (published["telemetry"] - published0["telemetry"]) / window
            event_rate = (published["events"] - published0["events"]) / window
            event_lag = lag_summary(sim.event_lag.window(start, end))
            telemetry_lag = lag_summary(sim.telemetry_lag.window(start, end))
            # no new events; every outbox must empty (everything stored and acked)
            drain_start = time.monotonic()
            await sim.quiesce()
            drained = await sim.wait_drained(timeout_s=120)
            drain_s = time.monotonic() - drain_start
        finally:
            await sim.stop()
        telemetry_published = sim.counters.published["telemetry"]

        def settled() -> bool:
            return summed("kgpu_ingest_queue_depth") == 0

        await asyncio.to_thread(wait_for, settled, 120, 0.2, "controller queue empty")
        await asyncio.sleep(0.5)
        stored = summed("kgpu_ingest_events_stored_total")
        accepted = summed("kgpu_ingest_messages_total", kind="telemetry")
        notes = [] if drained else [f"{sim.outbox_depth()} events still unacked after 120 s"]
        if sim.counters.schedule_late_max_s > 1.0:
            notes.append(f"the simulator itself fell {sim.counters.schedule_late_max_s:.1f} s behind its schedule")
        return StepResult(
            nodes=nodes, gpus=gpus, interval_s=interval_s, replicas=replicas, db=db, connections=len(sim.connections),
            window_s=window, telemetry_rate=telemetry_rate, event_rate=event_rate, event_lag=event_lag,
            telemetry_lag=telemetry_lag, events_made=sim.counters.events_created, events_stored=stored,
            telemetry_published=telemetry_published, telemetry_accepted=accepted, drain_s=drain_s,
            cloud_cpu=cloud_cpu, ingest_rate=ingest_rate, sample_process=sample_process, broker_cpu=broker_cpu,
            sim_cpu=sim_cpu, db_cpu=db_cpu, queue_depth_max=depth_max,
            notes=notes,
        )


def describe(r: StepResult, limit_s: float) -> str:
    cloud = " + ".join(f"{100 * c:.0f} %" for c in r.cloud_cpu)
    lines = [
        (f"fleet {r.nodes} nodes x {r.gpus} GPUs @ {r.interval_s:g} s, {r.replicas} controller(s) on {r.db}, "
        f"{r.connections} MQTT connections{'' if r.sample_process else ', no sample writer process'}: {'KEEPS UP' if r.keeps_up(limit_s) else 'FALLS BEHIND'} "
        f"(limit {limit_s:g} s)"),
        (f"  window                 {r.window_s:.0f} s: telemetry {r.telemetry_rate:.0f} msg/s "
        f"({r.telemetry_rate * r.gpus:.0f} GPU samples/s), events {r.event_rate:.1f}/s; "
        f"the controller ingested {r.ingest_rate:.0f} msg/s"),
        (f"  event lag (stored+ack) p50 {r.event_lag['p50']:.2f} s  p99 {r.event_lag['p99']:.2f} s  "
        f"max {r.event_lag['max']:.2f} s  ({r.event_lag['count']:.0f} events)"),
        (f"  telemetry lag (probes) p50 {r.telemetry_lag['p50']:.2f} s  max {r.telemetry_lag['max']:.2f} s  "
        f"({r.telemetry_lag['count']:.0f} probes)"),
        (f"  dropped                events {r.events_made - r.events_stored:.0f} of {r.events_made}, "
        f"telemetry {r.telemetry_published - r.telemetry_accepted:.0f} of {r.telemetry_published}"),
        (f"  CPU (share of a core)  controller {cloud}, mosquitto {100 * r.broker_cpu:.0f} %, "
        f"simulator {100 * r.sim_cpu:.0f} %"
         + ("" if math.isnan(r.db_cpu) else f", PostgreSQL {100 * r.db_cpu:.0f} %")
         + f"; controller queue max {r.queue_depth_max:.0f}"),
        f"  outboxes empty after   {r.drain_s:.1f} s once events stopped",
    ]
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)


def rows(r: StepResult, limit_s: float, command: str) -> list[Row]:
    label = f"fleet {r.nodes}x{r.gpus}@{r.interval_s:g}s" + (f", {r.replicas} replicas {r.db}" if r.replicas > 1 else "")
    verdict = "met" if r.keeps_up(limit_s) else "MISSED"
    return [
        Row(label, "ingest lag, worst (events and telemetry)", r.worst_lag, "s", f"< {limit_s:g} s: {verdict}", command),
        Row(label, "event lag p99 (publish -> stored+acked)", r.event_lag["p99"], "s", "", command),
        Row(label, "messages dropped", r.dropped, "msgs", "0", command),
        Row(label, "controller CPU", 100 * sum(r.cloud_cpu), "% core", "", command),
    ]


def steady_rows(r: StepResult, limit_s: float, command: str) -> list[Row]:
    """A steady fleet's figures as `python -m bench` tabulates them: whether the controller keeps
    up, what it ingested against what was sent, its CPU (with its sample writer process)."""
    label = (f"steady {r.nodes * r.gpus / r.interval_s:,.0f} GPU samples/s ({r.nodes}x{r.gpus}@{r.interval_s:g}s)"
             + ("" if r.sample_process else ", one process"))
    verdict = "met" if r.keeps_up(limit_s) else "MISSED"
    return [
        Row(label, "ingest lag, worst (events and telemetry)", r.worst_lag, "s", f"< {limit_s:g} s: {verdict}", command),
        Row(label, "messages ingested a second", r.ingest_rate, "msg/s",
            f"sent: {r.telemetry_rate:,.0f} telemetry, {r.event_rate:,.0f} events, and statuses", command),
        Row(label, "controller CPU (with its sample writer)", 100 * sum(r.cloud_cpu), "% core", "", command),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--ramp", help="comma-separated node counts; stops after the first step that falls behind")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--event-every", type=float, default=60.0, help="mean seconds between events of one node")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window per step")
    parser.add_argument("--warmup", type=float, default=None)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--nodes-per-connection", type=int, default=1)
    parser.add_argument("--lag-limit", type=float, default=5.0)
    parser.add_argument("--sample-process", action=argparse.BooleanOptionalAction, default=True,
                        help="the controller's telemetry written by its sample writer process (its default); "
                             "--no-sample-process: one process, as before 2026-12-04")
    args = parser.parse_args()
    steps = [int(n) for n in args.ramp.split(",")] if args.ramp else [args.nodes]
    print(f"machine: {machine()}")
    largest = None
    for nodes in steps:
        result = asyncio.run(run_step(
            nodes, gpus=args.gpus, interval_s=args.interval, seconds=args.seconds, warmup_s=args.warmup,
            event_every_s=args.event_every, db=args.db, replicas=args.replicas,
            nodes_per_connection=args.nodes_per_connection, sample_process=args.sample_process))
        print(describe(result, args.lag_limit), flush=True)
        if not result.keeps_up(args.lag_limit):
            break
        largest = nodes
    if args.ramp:
        print(f"largest fleet kept up with: {largest if largest is not None else 'none of the steps'} nodes "
              f"x {args.gpus} GPUs @ {args.interval:g} s ({args.replicas} controller(s), {args.db})")


if __name__ == "__main__":
    os.environ.setdefault("KGPU_LOG_LEVEL", "warning")
    main()
