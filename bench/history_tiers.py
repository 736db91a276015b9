"""Cost per node of the sample history in tiers (cloud/store/history.py) at fleet scale.

A direct store writer (no broker: the cost measured is the store's) plays `nodes` x `gpus` GPUs
sampled every `interval` s through `FleetStore.ingest`, in batches of 500 telemetry messages (the
controller's `batch_size`), one message per node per interval, for `rounds` intervals after a
warm-up round that creates the node rows. Measured:

- ingest CPU per round (this process, plus the PostgreSQL server's backends with `--db postgresql`),
  with every sample kept raw, and again with `history_resolution` 60 s (one row per GPU per minute,
  the history before the tiers, which reads each batch's nodes' newest rows first);
- the retention pass (`maintain_history`): rolling the raw samples up into the 1-minute and 10-minute
  tiers, CPU and wall time per raw sample;
- bytes on disk per sample of the raw tier (one row per message: `sample_messages`) and per row of
  each roll-up tier (SQLite's dbstat, PostgreSQL's pg_total_relation_size after VACUUM FULL: table and
  indexes), and from them the steady state per node: samples or rows each tier holds with the default
  retentions (raw 1 h, 1-minute means 1 day, 10-minute means 30 days) times bytes per sample or row.

    python -m bench.history_tiers [--nodes 8000] [--gpus 8] [--interval 10] [--rounds 6] [--db sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from bench.common import Row, machine, start_postgres_server, tree_cpu_seconds
from cloud.store import FleetStore, HistoryTiers, Incoming
from shared.gpu import GpuSample
from shared.protocol import Kind, TelemetryBody, make_envelope

BATCH = 500  # the controller's default batch_size
RAW_TABLE = "sample_messages"  # one row per telemetry message, its samples as JSON


@dataclass
class HistoryRun:
    nodes: int
    gpus: int
    interval_s: float
    rounds: int
    db: str
    ingest_cpu_s: float  # per round, every sample kept
    ingest_wall_s: float
    ingest_cpu_60s_s: float  # per round, history_resolution 60 s (before tiers)
    rollup_rows: int  # raw samples rolled up
    rollup_cpu_s: float
    rollup_wall_s: float
    bytes_per_row: dict[str, float] = field(default_factory=dict)  # raw (per sample), 60s, 600s
    steady_rows: dict[str, float] = field(default_factory=dict)  # per node (raw: samples)

    @property
    def steady_bytes(self) -> dict[str, float]:
        return {k: self.steady_rows[k] * self.bytes_per_row[k] for k in self.steady_rows}


def messages(nodes: int, gpus: int, ts: float) -> list[Incoming]:
    """One telemetry message per node at `ts`, each with every GPU's sample (the fleet simulator's
    figures' shape)."""
    out = []
    for n in range(nodes):
        node = f"edge-{n:05d}"
        samples = [GpuSample(index=i, uuid=f"GPU-{n:05d}-{i}", ts=ts, temperature_c=50.0 + (n + i) % 30,
                             power_w=250.0 + (n * 7 + i) % 300, power_limit_w=700.0,
                             utilization_pct=float((n + 3 * i) % 100), memory_used_bytes=(n % 80) << 30)
                   for i in range(gpus)]
        envelope = make_envelope(node, TelemetryBody(samples=samples), Kind.TELEMETRY)
        out.append(Incoming(envelope=envelope, body=envelope.parsed_body(), received_at=ts))
    return out


def _ingest_round(store: FleetStore, batch: list[Incoming], cpu: Callable[[], float]) -> tuple[float, float]:
    before_cpu, before_wall = cpu(), time.perf_counter()
    for start in range(0, len(batch), BATCH):
        store.ingest(batch[start:start + BATCH])
    return cpu() - before_cpu, time.perf_counter() - before_wall


def _bytes_per_row(store: FleetStore, db: str) -> dict[str, float]:
    """Bytes on disk (table and its indexes) per raw sample and per row of each roll-up tier."""
    out: dict[str, float] = {}
    if db == "postgresql":  # the roll-up's upserts leave dead row versions until (auto)vacuum
        with store.engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(sa.text(f"VACUUM FULL {RAW_TABLE}"))
            conn.execute(sa.text("VACUUM FULL sample_rollups"))
    with store.reading("bench sizes") as conn:
        if db == "sqlite":
            sizes: dict[str, int] = {str(name): int(size) for name, size in conn.execute(
                sa.text("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"))}
            raw_bytes = sum(v for k, v in sizes.items() if k == RAW_TABLE or k.startswith(f"ix_{RAW_TABLE}"))
            rollup_bytes = sum(v for k, v in sizes.items() if "sample_rollups" in k)
        else:
            raw_bytes = conn.execute(sa.text(f"SELECT pg_total_relation_size('{RAW_TABLE}')")).scalar_one()
            rollup_bytes = conn.execute(sa.text("SELECT pg_total_relation_size('sample_rollups')")).scalar_one()
        length = "json_array_length(figures::json)" if db == "postgresql" else "json_array_length(figures)"
        raw_samples = conn.execute(sa.text(f"SELECT coalesce(sum({length}), 0) FROM {RAW_TABLE}")).scalar_one()
        rollup_rows = conn.execute(sa.text("SELECT count(*) FROM sample_rollups")).scalar_one()
    out["raw"] = raw_bytes / max(1, raw_samples)
    per_rollup = rollup_bytes / max(1, rollup_rows)  # the same row shape in every roll-up tier
    for tier in HistoryTiers().tiers[1:]:
        out[tier.name] = per_rollup
    return out


def measure(nodes: int = 8000, gpus: int = 8, interval: float = 10.0, rounds: int = 6,
            db: str = "sqlite") -> HistoryRun:
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        urls = [f"sqlite:///{Path(tmp) / 'tiers.db'}", f"sqlite:///{Path(tmp) / 'before.db'}"]
        cpu: Callable[[], float] = time.process_time
        if db == "postgresql":
            from tests.helpers.postgres import create_database

            server = start_postgres_server()
            urls = [create_database(server.admin_url), create_database(server.admin_url)]
            pg = server

            def cpu() -> float:
                return time.process_time() + tree_cpu_seconds(pg.process.pid)
        try:
            start = time.time() - (rounds + 1) * interval
            start -= start % 600  # the rounds fall in the same 10-minute bucket: one row per GPU per tier
            results: dict[str, tuple[float, float]] = {}
            for label, url, resolution in (("tiers", urls[0], 0.0), ("before", urls[1], 60.0)):
                with FleetStore(url, history_resolution_s=resolution) as store:
                    _ingest_round(store, messages(nodes, gpus, start), cpu)  # warm-up: creates the nodes
                    spent_cpu = spent_wall = 0.0
                    for r in range(1, rounds + 1):
                        batch = messages(nodes, gpus, start + r * interval)
                        c, w = _ingest_round(store, batch, cpu)
                        spent_cpu, spent_wall = spent_cpu + c, spent_wall + w
                        print(f"  {label}: round {r}/{rounds}: {c:.2f} s CPU, {w:.2f} s", file=sys.stderr)
                    results[label] = (spent_cpu / rounds, spent_wall / rounds)
                    if label == "tiers":
                        before_cpu, before_wall = cpu(), time.perf_counter()
                        done = store.maintain_history(now=start + (rounds + 1) * interval)
                        rollup_cpu, rollup_wall = cpu() - before_cpu, time.perf_counter() - before_wall
                        bytes_per_row = _bytes_per_row(store, db)
        finally:
            if server is not None:
                server.stop()
    tiers = HistoryTiers()
    steady = {t.name: gpus * t.retention_s / (interval if t.raw else t.resolution_s) for t in tiers.tiers}
    return HistoryRun(nodes=nodes, gpus=gpus, interval_s=interval, rounds=rounds, db=db,
                      ingest_cpu_s=results["tiers"][0], ingest_wall_s=results["tiers"][1],
                      ingest_cpu_60s_s=results["before"][0], rollup_rows=done.rolled_up,
                      rollup_cpu_s=rollup_cpu, rollup_wall_s=rollup_wall, bytes_per_row=bytes_per_row,
                      steady_rows=steady)


def describe(r: HistoryRun) -> str:
    samples = r.nodes * r.gpus
    per_hour = 3600 / r.interval_s
    roll_per_row = r.rollup_cpu_s / max(1, r.rollup_rows)
    lines = [
        f"history tiers: {r.nodes} nodes x {r.gpus} GPUs every {r.interval_s:g} s ({samples / r.interval_s:,.0f} "
        f"samples/s), database {r.db}, {r.rounds} rounds after a warm-up",
        f"  ingest, every sample kept   {r.ingest_cpu_s:.2f} s CPU per round ({r.ingest_cpu_s / r.interval_s:.0%} "
        f"of a core), {r.ingest_wall_s:.2f} s wall; {r.ingest_cpu_s / r.nodes * 1e3:.3f} ms per node per round",
        f"  ingest, one per minute      {r.ingest_cpu_60s_s:.2f} s CPU per round (history_resolution 60 s, "
        f"before the tiers): x{r.ingest_cpu_s / r.ingest_cpu_60s_s:.2f}",
        f"  roll-up pass                {r.rollup_rows:,} raw samples in {r.rollup_cpu_s:.2f} s CPU, "
        f"{r.rollup_wall_s:.2f} s wall ({roll_per_row * 1e6:.1f} us per raw sample: "
        f"{roll_per_row * samples / r.interval_s:.1%} of a core for the fleet)",
        "  steady state per node (default retentions):",
    ]
    total_rows = total_bytes = 0.0
    for name, rows in r.steady_rows.items():
        size = r.steady_bytes[name]
        total_rows, total_bytes = total_rows + rows, total_bytes + size
        what = "samples" if name == "raw" else "rows"
        lines.append(f"    {name:>5}: {rows:>8,.0f} {what:<7} x {r.bytes_per_row[name]:5.1f} B = {size / 2**20:6.2f} MiB")
    lines.append(f"    total: {total_rows:>8,.0f} samples and rows, {total_bytes / 2**20:.2f} MiB per node, "
                 f"{total_bytes * r.nodes / 2**30:,.1f} GiB for {r.nodes} nodes; "
                 f"ingest {r.ingest_cpu_s / r.nodes * per_hour * 1e3:.0f} ms CPU per node per hour")
    return "\n".join(lines)


def table_rows(r: HistoryRun, command: str) -> list[Row]:
    label = f"history tiers ({r.nodes} nodes x {r.gpus} GPUs @ {r.interval_s:g} s, {r.db})"
    per_node = sum(r.steady_bytes.values())
    return [
        Row(label, "disk per node, steady state", per_node / 2**20, "MiB",
            f"{sum(r.steady_rows.values()):,.0f} samples and rows", command),
        Row(label, "ingest CPU per round", r.ingest_cpu_s, "s", f"x{r.ingest_cpu_s / r.ingest_cpu_60s_s:.2f} of "
            "one row a minute", command),
        Row(label, "roll-up CPU per raw sample", r.rollup_cpu_s / max(1, r.rollup_rows) * 1e6, "us",
            f"{r.rollup_rows:,} samples", command),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8000)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    print(f"machine: {machine()}", file=sys.stderr)
    run = measure(args.nodes, args.gpus, args.interval, args.rounds, args.db)
    print(describe(run))
    print(f"(pid {os.getpid()})", file=sys.stderr)


if __name__ == "__main__":
    main()
