"""`GET /metrics/fleet`: every node's latest GPU sample as dcgm-exporter's and Kepler's series.

For sites whose Prometheus cannot reach the edges. The series are the edge's own DCGM series
(`shared/dcgm.py`) and Kepler node-level GPU series (`kepler_node_gpu_*`, `shared/kepler.py`):
the builders both sides use, with `Hostname` (and Kepler's `node_name`) = the node. A GPU is left
out when its node is offline (its offline status or last will) or its latest sample is older
than `fleet_metrics_max_age` (cloud clock: the sample's ts less the node's clock skew), so a
dead node's last figures do not stand in Prometheus as if live.

What the cloud knows of a GPU: its latest sample as the edge sent it (every figure of
`GpuSample`), its name, index, PCI bus id and driver version from the node's status
(`GpuSummary`; an edge older than the exporter sends no PCI bus id or driver version, and those
labels are then empty), and its last XID from the stored XID events (the edge's
`DCGM_FI_DEV_XID_ERRORS` is the last XID since the daemon started; the cloud's, the last one it
stored: 0 when none). Kepler's figures are the edge's idle/active split as the sample carries it
(`idle_power_w`, `idle_joules`, `active_joules`; a sample from an older edge has none, and its GPU
no Kepler series). Pod labels and Kepler's pod, container and process families are not served
from the cloud: the sample does not carry the pod mapping. Beside them, `kgpu_gpu_health` from
the health of the node's last status, so that `KgpuGpuUnhealthy` works from this source too.

Vendors (issue 16): dcgm-exporter's names are NVIDIA's, so the `DCGM_FI_*` series are served for
NVIDIA GPUs only (Jetson included: vendor nvidia, or no vendor from an edge older than the device
layer); every vendor's figures are the `kgpu_gpu_*` families the edge serves (edge/metrics.py:
utilisation, power, temperature, memory, clock, energy; a figure the sample lacks has no series)
and Kepler's, each with a `vendor` label.

Every replica reads the shared store and serves the whole fleet, so any replica answers alike:
scrape one of them through the Service, not every pod (docs/metrics.md, "Fleet exporter"). A
large fleet can be split into parts scraped as separate targets (`?shard=I&shards=N`, a node
always in the same part). The store read and the rendering run in a thread, never on the event
loop; scrapes that arrive while one is being rendered share its result.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from cloud.store import FleetStore
from shared.dcgm import DcgmGpu, dcgm_families, exposition
from shared.gpu import GpuInventory, GpuSample, Health
from shared.gpu_metrics import figure_families
from shared.http import bad_query, int_query
from shared.kepler import NODE_FAMILIES, KeplerGpu, kepler_families
from shared.logs import get_logger

log = get_logger(__name__)

FLEET_METRICS_PATH = "/metrics/fleet"
HEALTH_STATES = tuple(str(h) for h in Health)
MAX_SHARDS = 1024


@dataclass(frozen=True)
class FleetExposition:
    """One rendering: the text, and what is in it."""

    body: bytes
    nodes: int
    gpus: int
    series: int
    read_seconds: float
    render_seconds: float


def vendor_of(row: Mapping[str, Any]) -> str:
    """A GPU row's vendor; an edge older than the device layer runs NVIDIA GPUs on NVML."""
    return str(row.get("vendor") or "nvidia")


def health_family(node: str, rows: Iterable[Mapping[str, Any]]) -> GaugeMetricFamily:
    """`kgpu_gpu_health{gpu,uuid,Hostname,vendor,state}` as the edge serves it (edge/metrics.py),
    from the health the node's last status reported: what `KgpuGpuUnhealthy` reads. A GPU whose
    health the cloud has not been told yet (telemetry only) has no series."""
    family = GaugeMetricFamily("kgpu_gpu_health", "1 for the GPU's current health state.",
                               labels=["gpu", "uuid", "Hostname", "vendor", "state"])
    for row in rows:
        if row.get("health") in HEALTH_STATES:
            for state in HEALTH_STATES:
                family.add_metric([str(row["index"]), str(row["uuid"]), node, vendor_of(row), state],
                                  1.0 if row["health"] == state else 0.0)
    return family


def kepler_gpu(gpu: DcgmGpu) -> KeplerGpu | None:
    """Kepler's node-level figures of one GPU, as the edge's `/metrics` serves them
    (edge/kepler_metrics.py), from its stored sample: None for a sample without the split (an
    edge older than the exporter). Watts only with a power reading and the idle power in force
    at it (none for a lost GPU); the counters are the edge's since its daemon started."""
    s = gpu.sample
    if s is None or s.idle_joules is None or s.active_joules is None:
        return None
    watts = idle = active = None
    if not s.lost and s.power_w is not None and s.idle_power_w is not None:
        watts, idle = s.power_w, s.idle_power_w
        active = max(watts - idle, 0.0)
    inv = gpu.inventory
    return KeplerGpu(index=inv.index, uuid=inv.uuid, name=inv.name, joules=s.idle_joules + s.active_joules,
                     idle_joules=s.idle_joules, active_joules=s.active_joules,
                     watts=watts, idle_watts=idle, active_watts=active, vendor=inv.vendor)


def node_families(node: str, gpus: Sequence[DcgmGpu], rows: Sequence[Mapping[str, Any]]) -> list[Metric]:
    """Every family the exporter serves for one node: dcgm-exporter's (NVIDIA GPUs only),
    `kgpu_gpu_health` and the `kgpu_gpu_*` figures (every vendor), then Kepler's node-level GPU
    families (every vendor; with `Hostname` too, as an edge scrape adds it)."""
    kepler = [k for k in map(kepler_gpu, gpus) if k is not None]
    nvidia = [g for g in gpus if g.inventory.vendor == "nvidia"]
    return [*dcgm_families(node, nvidia), health_family(node, rows), *figure_families(node, gpus),
            *kepler_families(node, kepler, hostname=True, only=NODE_FAMILIES)]


def _gpu(row: Mapping[str, Any]) -> DcgmGpu:
    sample = GpuSample.model_validate(row["sample"])
    inventory = GpuInventory(index=row["index"], uuid=row["uuid"], name=row["name"] or "",
                             pci_bus_id=row["pci_bus_id"] or "", memory_total_bytes=0,
                             driver_version=row["driver_version"] or "", vendor=vendor_of(row))
    return DcgmGpu(inventory, sample, row.get("last_xid"))


class _Writer:
    """The Prometheus text of the node families, node after node, family by family.

    Byte for byte what `shared.dcgm.exposition` writes for the same families (a test checks it),
    written faster for a whole fleet: each family's `# HELP`/`# TYPE` lines are
    `exposition()`'s own, and a GPU's label text, the same on each of its ~27 series, is made
    once per label set (by prometheus_client, through `exposition()`), not once per series. Only
    the text is kept, not the fleet's sample objects."""

    def __init__(self) -> None:
        empty = node_families("", [], [])
        self.headers = [exposition([family]) for family in empty]
        self.chunks: list[list[str]] = [[] for _ in empty]
        self._labels: dict[tuple[tuple[str, str], ...], str] = {}

    def label_text(self, labels: Mapping[str, str]) -> str:
        key = tuple(labels.items())
        text = self._labels.get(key)
        if text is None:
            probe = Metric("x", "", "gauge")
            probe.add_sample("x", dict(labels), 0.0)
            line = exposition([probe]).decode().splitlines()[-1]  # x{...} 0.0
            text = self._labels[key] = line[1:line.rindex(" ")]
        return text

    def add(self, families: Sequence[Metric]) -> None:
        for chunk, family in zip(self.chunks, families, strict=True):
            for s in family.samples:
                chunk.append(f"{s.name}{self.label_text(s.labels)} {floatToGoString(s.value)}\n")

    def body(self) -> bytes:
        return b"".join(header + "".join(chunk).encode() for header, chunk in zip(self.headers, self.chunks,
                                                                                   strict=True))


def fleet_families(rows: Iterable[Mapping[str, Any]]) -> Iterator[tuple[str, list[Metric], int]]:
    """(node, its families (`node_families`), GPUs) for every node of the GPU rows
    (`FleetQueries.fleet_latest_samples`, ordered by node). A row whose stored sample no longer
    validates is left out (and logged) rather than failing the scrape."""
    for node, node_rows in groupby(rows, key=lambda r: str(r["node"])):
        built, kept = [], []
        for row in node_rows:
            try:
                built.append(_gpu(row))
                kept.append(row)
            except ValueError as exc:
                log.warning("fleet exporter: GPU %s of %s left out: %s", row.get("uuid"), node, exc)
        if built:
            yield node, node_families(node, built, kept), len(built)


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count` of the fleet: the nodes whose CRC-32 of the name is `index` modulo
    `count` (stable across replicas and restarts, so a node is always in the same part)."""

    index: int = 0
    count: int = 1

    def __contains__(self, node: str) -> bool:
        return self.count == 1 or zlib.crc32(node.encode()) % self.count == self.index


def render(store: FleetStore, max_age: float, now: Callable[[], float] = time.time,
           shard: Shard = Shard()) -> FleetExposition:
    """Read the store and render the exposition of `shard`'s nodes (blocking: run it in a thread)."""
    started = time.perf_counter()
    rows = store.fleet_latest_samples(now() - max_age, None if shard.count == 1 else shard.__contains__)
    read = time.perf_counter()
    writer = _Writer()
    nodes = gpus = series = 0
    for _, families, count in fleet_families(rows):
        writer.add(families)
        nodes, gpus, series = nodes + 1, gpus + count, series + sum(len(f.samples) for f in families)
    body = writer.body()
    done = time.perf_counter()
    return FleetExposition(body=body, nodes=nodes, gpus=gpus, series=series,
                           read_seconds=read - started, render_seconds=done - read)


class FleetExporter:
    """The route's state: the store, the age limit, and the rendering in flight (shared)."""

    def __init__(self, store: FleetStore, max_age: float, now: Callable[[], float] = time.time) -> None:
        self.store = store
        self.max_age = max_age
        self.now = now
        self._rendering: dict[Shard, asyncio.Future[FleetExposition]] = {}

    async def exposition(self, shard: Shard = Shard()) -> FleetExposition:
        """A fresh rendering; one of the same shard started by a concurrent scrape is shared."""
        rendering = self._rendering.get(shard)
        if rendering is None:
            rendering = asyncio.ensure_future(asyncio.to_thread(render, self.store, self.max_age, self.now, shard))
            self._rendering[shard] = rendering
            rendering.add_done_callback(lambda _: self._rendering.pop(shard, None))
        return await asyncio.shield(rendering)

    async def handle(self, request: web.Request) -> web.Response:
        count = int_query(request, "shards", 1, lo=1, hi=MAX_SHARDS) or 1
        index = int_query(request, "shard", 0, lo=0, hi=MAX_SHARDS - 1) or 0
        if index >= count:
            raise bad_query("query parameter 'shard' must be below 'shards'", index)
        result = await self.exposition(Shard(index, count))
        headers = {"Content-Type": CONTENT_TYPE_LATEST}
        body = result.body
        if "gzip" in request.headers.get("Accept-Encoding", "").lower():
            body = await asyncio.to_thread(gzip.compress, body, 1)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)


def add_fleet_metrics_route(app: web.Application, *, store: FleetStore, max_age: float) -> FleetExporter:
    exporter = FleetExporter(store, max_age)
    app.router.add_get(FLEET_METRICS_PATH, exporter.handle)
    return exporter


__all__: Sequence[str] = ("FLEET_METRICS_PATH", "FleetExporter", "FleetExposition", "Shard",
                          "add_fleet_metrics_route", "fleet_families", "render")
