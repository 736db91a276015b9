"""Size and scrape time of the controller's fleet exporter, `GET /metrics/fleet`.

Fills a fleet store (SQLite, or PostgreSQL with `--db postgresql`) with `nodes × gpus` simulated
H100s through the real ingest (`FleetStore.ingest`: each node's status, then a telemetry sample
with every figure an H100 gives, GPM included), then starts a real `kgpu cloud run` on that store
and scrapes `/metrics/fleet` over HTTP, plain and gzip (as Prometheus asks), several times, and
with `--shards N` once more in N parts (`?shard=I&shards=N`, each a target of its own). It
also times the store read and the rendering in-process (`cloud/http/fleet_metrics.render`, what
the route runs in a thread), to tell which part costs what.

    python -m bench.fleet_exporter [--nodes 2000 8000] [--gpus 8] [--scrapes 3] [--db sqlite|postgresql]
                                   [--shards 4]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.common import Row, machine, start_postgres_server, tree_rss_mib
from cloud.http.fleet_metrics import render
from cloud.store import FleetStore, Incoming
from kgpu.lab.broker import Mosquitto
from shared.gpu import GpuSample, Health
from shared.protocol import GpuSummary, Kind, StatusBody, TelemetryBody, make_envelope
from shared.wire import WireModel
from tests.helpers.cloud_process import CloudProcess

MODEL = "NVIDIA H100 80GB HBM3"
GIB = 1 << 30


def _incoming(node: str, body: WireModel, kind: Kind, ts: float) -> Incoming:
    envelope = make_envelope(node, body, kind).model_copy(update={"ts": ts})
    return Incoming(envelope=envelope, body=envelope.parsed_body(), received_at=ts)


def uuid(n: int, i: int) -> str:
    return f"GPU-{n:08x}-{i:04x}-4a2b-8c3d-{n * 8 + i:012x}"


def h100_sample(n: int, i: int, ts: float) -> GpuSample:
    """Every figure a simulated H100 reports, with values that vary by node and GPU."""
    k = (n * 7 + i * 13) % 100
    return GpuSample(
        index=i, uuid=uuid(n, i), ts=ts, utilization_pct=float(k), memory_util_pct=k / 2,
        memory_used_bytes=(10 + k % 60) * GIB, memory_free_bytes=(70 - k % 60) * GIB, temperature_c=40.0 + k / 3,
        power_w=120.0 + 5.5 * k, power_limit_w=700.0, sm_clock_mhz=1410 + k, memory_clock_mhz=2619,
        throttle_reasons=0, energy_mj=1_000_000_000 + n * 1000 + i, ecc_sbe_volatile=0, ecc_dbe_volatile=0,
        remapped_rows_correctable=0, remapped_rows_uncorrectable=0, remap_pending=False, remap_failure=False,
        memory_temperature_c=45.0 + k / 4, memory_reserved_bytes=512 * 1024 * 1024, pcie_replays=0,
        encoder_util_pct=0.0, decoder_util_pct=0.0, nvlink_kib=123_456_789 + k, vgpu_license_status=0,
        gr_engine_active=k / 100, tensor_active=k / 200, dram_active=k / 150, pcie_tx_bytes_per_s=1.5e9 + k,
        pcie_rx_bytes_per_s=2.5e9 + k, idle_power_w=120.0, idle_joules=3_600_000.0 + k, active_joules=9_000_000.0 + k,
    )


def populate(store: FleetStore, nodes: int, gpus: int, ts: float, batch_nodes: int = 250) -> float:
    """Every node's status and one telemetry message through the real ingest; returns seconds."""
    started = time.perf_counter()
    for first in range(0, nodes, batch_nodes):
        batch: list[Incoming] = []
        for n in range(first, min(nodes, first + batch_nodes)):
            node = f"edge-{n:05d}"
            summaries = [GpuSummary(index=i, uuid=uuid(n, i), name=MODEL, health=Health.HEALTHY, power_limit_w=700.0,
                                    pci_bus_id=f"00000000:{0x18 + i * 0x10:02X}:00.0", driver_version="550.54.15")
                         for i in range(gpus)]
            batch.append(_incoming(node, StatusBody(state="online", version="0.1.0", gpus=summaries,
                                                    outbox_epoch=f"epoch-{n}"), Kind.STATUS, ts))
            batch.append(_incoming(node, TelemetryBody(samples=[h100_sample(n, i, ts) for i in range(gpus)]),
                                   Kind.TELEMETRY, ts))
        store.ingest(batch)
    return time.perf_counter() - started


@dataclass
class FleetExporterRun:
    nodes: int
    gpus: int
    db: str
    populate_s: float
    series: int
    body_bytes: int
    gzip_bytes: int
    read_s: float  # in-process: the store read
    render_s: float  # in-process: building and writing the exposition
    scrape_s: float  # over HTTP from a real controller, median
    scrape_gzip_s: float
    controller_rss_mib: float
    shards: int = 1
    shard_scrape_max_s: float = float("nan")  # the slowest part, plain, with ?shard=I&shards=N
    shard_bytes_max: int = 0

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus


def _scrape(base: str, gzipped: bool, query: str = "") -> tuple[float, int]:
    headers = {"Accept-Encoding": "gzip"} if gzipped else {}
    started = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(f"{base}/metrics/fleet{query}", headers=headers),
                                timeout=600) as response:
        size = len(response.read())
    return time.perf_counter() - started, size


def measure(nodes: int, gpus: int = 8, scrapes: int = 3, db: str = "sqlite", shards: int = 1) -> FleetExporterRun:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = None
        db_url = f"sqlite:///{work / 'fleet.db'}"
        if db == "postgresql":
            from tests.helpers.postgres import create_database

            server = start_postgres_server()
            db_url = create_database(server.admin_url)
        broker = Mosquitto(work / "broker").start()
        try:
            now = time.time()
            store = FleetStore(db_url)
            try:
                filled = populate(store, nodes, gpus, now)
                out = render(store, max_age=3600.0)
                assert out.gpus == nodes * gpus, (out.gpus, nodes * gpus)
                gzipped = len(gzip.compress(out.body, 1))
            finally:
                store.close()
            cloud = CloudProcess(work / "cloud", broker.url, db=db_url,
                                 env={"KGPU_LOG_LEVEL": "warning", "KGPU_FLEET_METRICS_MAX_AGE": "1h"}).start()
            try:
                plain = [_scrape(cloud.base, False) for _ in range(scrapes)]
                zipped = [_scrape(cloud.base, True) for _ in range(scrapes)]
                parts = [_scrape(cloud.base, False, f"?shard={i}&shards={shards}") for i in range(shards)] \
                    if shards > 1 else []
                assert cloud.proc is not None
                rss = tree_rss_mib(cloud.proc.pid)  # with its sample writer process
            finally:
                cloud.stop()
            assert plain[0][1] == len(out.body), (plain[0][1], len(out.body))
        finally:
            broker.stop()
            if server is not None:
                server.stop()
    return FleetExporterRun(
        nodes=nodes, gpus=gpus, db=db, populate_s=filled, series=out.series, body_bytes=len(out.body),
        gzip_bytes=gzipped, read_s=out.read_seconds, render_s=out.render_seconds,
        scrape_s=statistics.median(t for t, _ in plain), scrape_gzip_s=statistics.median(t for t, _ in zipped),
        controller_rss_mib=rss, shards=shards, shard_scrape_max_s=max((t for t, _ in parts), default=float("nan")),
        shard_bytes_max=max((n for _, n in parts), default=0))


def describe(r: FleetExporterRun) -> str:
    return "\n".join([
        f"fleet exporter: {r.nodes} nodes x {r.gpus} GPUs ({r.total_gpus} GPUs), database {r.db}",
        f"  store filled through FleetStore.ingest in {r.populate_s:.1f} s",
        f"  /metrics/fleet            {r.series:,} series, {r.body_bytes / 1e6:,.1f} MB "
        f"({r.body_bytes / r.total_gpus:,.0f} B per GPU, {r.body_bytes / r.series:.0f} B per series)",
        f"  gzip (level 1)            {r.gzip_bytes / 1e6:,.1f} MB ({r.body_bytes / r.gzip_bytes:.1f}x smaller)",
        f"  in-process: store read    {r.read_s:.2f} s",
        f"  in-process: render        {r.render_s:.2f} s ({r.render_s / r.series * 1e6:.1f} us per series)",
        f"  scrape over HTTP          {r.scrape_s:.2f} s plain, {r.scrape_gzip_s:.2f} s gzip (median)",
        f"  controller RSS after      {r.controller_rss_mib:,.0f} MiB",
        *([f"  in {r.shards} parts          slowest part {r.shard_scrape_max_s:.2f} s plain, largest "
           f"{r.shard_bytes_max / 1e6:,.1f} MB"] if r.shards > 1 else []),
    ])


def table_rows(r: FleetExporterRun, command: str) -> list[Row]:
    label = f"fleet exporter ({r.nodes} nodes x {r.gpus} GPUs, {r.db})"
    return [
        Row(label, "series in /metrics/fleet", r.series, "series", f"{r.series / r.total_gpus:.0f} per GPU", command),
        Row(label, "size, plain", r.body_bytes / 1e6, "MB", f"{r.body_bytes / r.total_gpus:,.0f} B per GPU", command),
        Row(label, "size, gzip", r.gzip_bytes / 1e6, "MB", f"{r.body_bytes / r.gzip_bytes:.1f}x smaller", command),
        Row(label, "scrape, plain", r.scrape_s, "s", f"{r.scrape_s / r.total_gpus * 1e6:.0f} us per GPU", command),
        Row(label, "scrape, gzip", r.scrape_gzip_s, "s", f"{r.scrape_gzip_s / r.scrape_s:.2f} of plain", command),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--scrapes", type=int, default=3)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--shards", type=int, default=1, help="also scrape the fleet in this many parts")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    runs = []
    for nodes in args.nodes:
        run = measure(nodes, args.gpus, args.scrapes, args.db, args.shards)
        runs.append(run)
        print(describe(run), flush=True)
    if len(runs) > 1:
        a, b = runs[0], runs[-1]
        print(f"ratios {b.nodes} / {a.nodes} nodes: size {b.body_bytes / a.body_bytes:.2f}, "
              f"scrape {b.scrape_s / a.scrape_s:.2f} plain, {b.scrape_gzip_s / a.scrape_gzip_s:.2f} gzip, "
              f"render {b.render_s / a.render_s:.2f}")


if __name__ == "__main__":
    main()
