"""`python -m bench`: every benchmark small enough for one machine, then ONE table.

Each benchmark runs against real processes (mosquitto, `kgpu cloud run`, `kgpu edge run`, the
Kubernetes emulator, PostgreSQL where installed) with the sizes below, prints its own report on
stderr as it goes, and hands back rows; the table on stdout has one line per figure with the
command that reproduces it. The full run takes about 20 minutes on 2 cores; `--quick` runs the same
code with tiny sizes (a smoke test, about a minute: its figures mean nothing).

    python -m bench                       # full sizes, about 20 minutes
    python -m bench --quick               # smoke run
    python -m bench --only fleet,catchup  # some of them
    python -m bench --json out.json       # the rows as JSON too
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass

from bench.common import Row, machine

PY = "python -m"


@dataclass(frozen=True)
class Sizes:
    edge_seconds: float
    edge_warmup: float
    ingest_nodes: int
    ingest_events: int
    fault_rounds: int
    fleet_nodes: int
    fleet_gpus: int
    fleet_interval: float
    fleet_seconds: float
    fleet_warmup: float | None
    fleet_event_every: float
    replica_seconds: float
    catchup_nodes: int
    catchup_outage: float
    catchup_event_every: float
    rollout_nodes: int
    rollout_offline: float
    exporter_nodes: int
    exporter_gpus: int
    backlog_nodes: int = 500  # telemetry backlog drained by mosquitto_sub, bare paho and the controller
    backlog_per_node: int = 40


FULL = Sizes(edge_seconds=30, edge_warmup=5, ingest_nodes=20, ingest_events=500, fault_rounds=3,
             fleet_nodes=2000, fleet_gpus=8, fleet_interval=10, fleet_seconds=60, fleet_warmup=None,
             fleet_event_every=60, replica_seconds=30, catchup_nodes=500, catchup_outage=30,
             catchup_event_every=0.25, rollout_nodes=500, rollout_offline=0.1, exporter_nodes=2000,
             exporter_gpus=8)
QUICK = Sizes(edge_seconds=2, edge_warmup=1, ingest_nodes=5, ingest_events=40, fault_rounds=1,
              fleet_nodes=20, fleet_gpus=2, fleet_interval=1, fleet_seconds=4, fleet_warmup=2,
              fleet_event_every=2, replica_seconds=4, catchup_nodes=10, catchup_outage=2,
              catchup_event_every=0.5, rollout_nodes=20, rollout_offline=0.2, exporter_nodes=20,
              exporter_gpus=2, backlog_nodes=20, backlog_per_node=5)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def edge(s: Sizes) -> list[Row]:
    from bench import edge_overhead

    result = edge_overhead.measure(s.edge_seconds, 8, s.edge_warmup)
    say(edge_overhead.describe(result))
    return edge_overhead.table_rows(
        result, f"{PY} bench.edge_overhead --seconds {s.edge_seconds:g} --warmup {s.edge_warmup:g}")


def ingest(s: Sizes) -> list[Row]:
    from bench import ingest_rate

    result = ingest_rate.measure(s.ingest_nodes, s.ingest_events, "sqlite")
    say(ingest_rate.describe(result))
    return ingest_rate.table_rows(
        result, f"{PY} bench.ingest_rate --nodes {s.ingest_nodes} --events {s.ingest_events}")


def backlog(s: Sizes) -> list[Row]:
    from bench import ingest_backlog

    result = ingest_backlog.measure(s.backlog_nodes, s.backlog_per_node)
    say(ingest_backlog.describe(result))
    return ingest_backlog.table_rows(
        result, f"{PY} bench.ingest_backlog --nodes {s.backlog_nodes} --per-node {s.backlog_per_node}")


def fault(s: Sizes) -> list[Row]:
    from bench import fault_to_eviction

    totals, stored = fault_to_eviction.measure(s.fault_rounds)
    say(fault_to_eviction.describe(totals, stored))
    return fault_to_eviction.table_rows(totals, stored, f"{PY} bench.fault_to_eviction --rounds {s.fault_rounds}")


def _fleet_command(s: Sizes, seconds: float, extra: str = "") -> str:
    warmup = f" --warmup {s.fleet_warmup:g}" if s.fleet_warmup is not None else ""
    return (f"{PY} bench.fleet_scale --nodes {s.fleet_nodes} --gpus {s.fleet_gpus} --interval {s.fleet_interval:g} "
            f"--event-every {s.fleet_event_every:g} --seconds {seconds:g}{warmup}{extra}")


def fleet(s: Sizes) -> list[Row]:
    from bench import fleet_scale

    result = asyncio.run(fleet_scale.run_step(
        s.fleet_nodes, gpus=s.fleet_gpus, interval_s=s.fleet_interval, seconds=s.fleet_seconds,
        warmup_s=s.fleet_warmup, event_every_s=s.fleet_event_every))
    say(fleet_scale.describe(result, 5.0))
    return fleet_scale.rows(result, 5.0, _fleet_command(s, s.fleet_seconds))


def steady(s: Sizes) -> list[Row]:
    """The steady 20,000 GPU samples a second (2,500 nodes x 8 GPUs @ 1 s), beside the same
    fleet against the controller in one process (`--no-sample-process`), in the same run."""
    from bench import fleet_scale

    nodes, gpus, seconds, per_connection = (2500, 8, 40.0, 10) if s is FULL else (20, 2, 4.0, 2)
    command = (f"{PY} bench.fleet_scale --nodes {nodes} --gpus {gpus} --interval 1 --seconds {seconds:g} "
               f"--nodes-per-connection {per_connection}")
    rows: list[Row] = []
    for sample_process in (True, False):
        result = asyncio.run(fleet_scale.run_step(
            nodes, gpus=gpus, interval_s=1.0, seconds=seconds, nodes_per_connection=per_connection,
            sample_process=sample_process))
        say(fleet_scale.describe(result, 5.0))
        rows += fleet_scale.steady_rows(result, 5.0, command + ("" if sample_process else " --no-sample-process"))
    return rows


def replicas(s: Sizes) -> list[Row]:
    from bench import fleet_scale
    from tests.helpers.postgres import find_server_binaries

    command = _fleet_command(s, s.replica_seconds, " --db postgresql --replicas 2")
    if find_server_binaries() is None:
        return [Row("fleet, 2 replicas on PostgreSQL", "skipped: PostgreSQL server binaries not installed",
                    float("nan"), "", "", command)]
    result = asyncio.run(fleet_scale.run_step(
        s.fleet_nodes, gpus=s.fleet_gpus, interval_s=s.fleet_interval, seconds=s.replica_seconds,
        warmup_s=s.fleet_warmup, event_every_s=s.fleet_event_every, db="postgresql", replicas=2))
    say(fleet_scale.describe(result, 5.0))
    return fleet_scale.rows(result, 5.0, command)


def scaleout(s: Sizes) -> list[Row]:
    from bench import replicas as scale_out
    from tests.helpers.postgres import find_server_binaries

    command = f"{PY} bench.replicas --nodes {s.backlog_nodes} --per-node {s.backlog_per_node} --replicas 1,2"
    if find_server_binaries() is None:
        return [Row("replicas on a backlog", "skipped: PostgreSQL server binaries not installed",
                    float("nan"), "", "", command)]
    result = scale_out.measure(s.backlog_nodes, s.backlog_per_node, counts=(1, 2), say=say)
    say(scale_out.describe(result))
    return scale_out.table_rows(result, command)


def catchup(s: Sizes) -> list[Row]:
    from bench import outbox_catchup

    result = asyncio.run(outbox_catchup.run(s.catchup_nodes, s.catchup_outage, s.catchup_event_every))
    say(outbox_catchup.describe(result))
    return outbox_catchup.rows(result, f"{PY} bench.outbox_catchup --nodes {s.catchup_nodes} "
                                       f"--outage {s.catchup_outage:g} --event-every {s.catchup_event_every:g}")


def rollout(s: Sizes) -> list[Row]:
    from bench import rollout_fleet

    result = asyncio.run(rollout_fleet.run(s.rollout_nodes, s.rollout_offline))
    say(rollout_fleet.describe(result))
    return rollout_fleet.rows(result, f"{PY} bench.rollout_fleet --nodes {s.rollout_nodes} "
                                      f"--offline {s.rollout_offline:g}")


def exporter(s: Sizes) -> list[Row]:
    from bench import fleet_exporter

    result = fleet_exporter.measure(s.exporter_nodes, s.exporter_gpus, scrapes=3)
    say(fleet_exporter.describe(result))
    return fleet_exporter.table_rows(
        result, f"{PY} bench.fleet_exporter --nodes {s.exporter_nodes} --gpus {s.exporter_gpus}")


def flood(s: Sizes) -> list[Row]:
    from bench import flood as flood_bench

    seconds = 30.0 if s is FULL else 3.0
    rows: list[Row] = []
    for mode in flood_bench.MODES:
        result = asyncio.run(flood_bench.run(mode, seconds))
        say(flood_bench.describe(result))
        rows += flood_bench.rows(result, f"{PY} bench.flood --mode {mode} --seconds {seconds:g}")
    return rows


def reads(s: Sizes) -> list[Row]:
    from bench import reads_vs_ingest

    if s is FULL:
        nodes, live, gpus, interval, event_every, seconds, warmup = 20_000, 2000, 8, 10.0, 60.0, 20.0, 15.0
    else:
        nodes, live, gpus, interval, event_every, seconds, warmup = 200, 20, 2, 1.0, 2.0, 3.0, 2.0
    result = asyncio.run(reads_vs_ingest.run(nodes, live, gpus=gpus, interval_s=interval, event_every_s=event_every,
                                             seconds=seconds, warmup_s=warmup))
    say(reads_vs_ingest.describe(result))
    return reads_vs_ingest.rows(result, f"{PY} bench.reads_vs_ingest --nodes {nodes} --live {live} --gpus {gpus} "
                                        f"--interval {interval:g} --event-every {event_every:g} "
                                        f"--seconds {seconds:g} --warmup {warmup:g}")


def overload(s: Sizes) -> list[Row]:
    from bench import overload as overload_bench

    if s is FULL:
        nodes, rate, seconds, warmup = 1000, 12000.0, 60.0, 15.0  # 6,000/s was kept up with since 2026-12-04
    else:
        nodes, rate, seconds, warmup = 50, 2000.0, 4.0, 4.0
    result = asyncio.run(overload_bench.run(nodes=nodes, surge_rate=rate, surge_seconds=seconds, warmup_s=warmup))
    say(overload_bench.describe(result))
    return overload_bench.rows(result, f"{PY} bench.overload --nodes {nodes} --surge-rate {rate:g} "
                                       f"--surge-seconds {seconds:g} --warmup {warmup:g}")


def remediation(s: Sizes) -> list[Row]:
    from bench import remediation as ladder

    classes = ["xid-reset"] if s is QUICK else list(ladder.FAULTS)
    outcomes = ladder.measure(classes)
    say(ladder.describe(outcomes))
    return ladder.table_rows(outcomes, f"{PY} bench.remediation --classes {','.join(classes)}")


BENCHMARKS: dict[str, Callable[[Sizes], list[Row]]] = {
    "edge": edge,
    "ingest": ingest,
    "backlog": backlog,
    "fault": fault,
    "fleet": fleet,
    "steady": steady,
    "replicas": replicas,
    "scaleout": scaleout,
    "catchup": catchup,
    "rollout": rollout,
    "exporter": exporter,
    "reads": reads,
    "flood": flood,
    "overload": overload,
    "remediation": remediation,
}


def table(rows: list[Row]) -> str:
    """One plain-text table (also valid Markdown)."""
    header = ("benchmark", "figure", "value", "unit", "ratio / target", "reproduce")
    cells = [header] + [(r.benchmark, r.figure, r.value_text(), r.unit, r.compare, r.command) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, figures mean nothing")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    os.environ.setdefault("KGPU_LOG_LEVEL", "warning")
    sizes = QUICK if args.quick else FULL
    about = machine()
    say(f"machine: {about}")
    started = time.monotonic()
    rows: list[Row] = []
    failed = 0
    for name in names:
        say(f"== {name}")
        began = time.monotonic()
        try:
            rows += BENCHMARKS[name](sizes)
        except (Exception, SystemExit) as exc:
            failed += 1
            traceback.print_exc(file=sys.stderr)
            rows.append(Row(name, f"FAILED: {exc}"[:120], float("nan"), "", "", f"{PY} bench --only {name}"))
        say(f"   ({time.monotonic() - began:.0f} s)")
    elapsed = time.monotonic() - started
    print(f"kgpu benchmarks{' (--quick: smoke sizes, not figures)' if args.quick else ''} on {about}; "
          f"{elapsed / 60:.1f} min")
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"machine": about, "quick": args.quick, "elapsed_s": elapsed,
                       "rows": [asdict(r) for r in rows]}, out, indent=2, allow_nan=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
