"""Reads against ingest: do dashboards polling a large fleet stall the controller's ingest?

A fleet store of `nodes` nodes × `gpus` GPUs (filled through the real ingest core, as the fleet
simulator's nodes report), a real mosquitto and a real `kgpu cloud run` over it, and the fleet
simulator (kgpu/lab/fleetsim/) driving `live` of those nodes: telemetry every `interval`, events
(acked after the commit) every `event-every` on average. Three windows of `seconds` each:

- alone: ingest only;
- tabs: plus `tabs` readers, each polling `GET /api/v1/dashboard/fleet` (its first page) every
  2.5 s, as the dashboard did before it followed the server push: a dashboard tab now holds one
  `GET /api/v1/dashboard/stream` whose snapshot the controller builds once for every tab
  (cloud/http/dashboard.py), so this window is an upper bound for `tabs` open dashboards;
- hammer: plus `tabs` readers walking the WHOLE fleet back to back through the fleet call's pages
  (500 nodes a page) and `GET /api/v1/nodes` (2,000 a page): far more than any dashboard.

Each window starts once the controller has no backlog. In each: event-to-ack lag (first publish of a seq → the cumulative ack covering it), the
ingest's batch time (`kgpu_ingest_last_batch_seconds`, sampled every 0.5 s), the ingest backlog age
/healthz reports (`ingest_lag_s`) and whether /healthz stayed 200. Then, on the quiet controller, the
fleet call's time and size (first page, and every page). Ratios are against the window without
readers.

    python -m bench.reads_vs_ingest                                  # 20,000 nodes, 10 tabs
    python -m bench.reads_vs_ingest --nodes 2000 --live 2000 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import Row, machine, metric_sum, wait_connected
from cloud.store import FleetStore
from kgpu.lab.broker import Mosquitto
from kgpu.lab.fleetsim import FleetOptions, FleetSim, lag_summary, raise_fd_limit
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.fleet_fill import fill

POLL_S = 2.5  # the dashboard's poll interval before the server push (issue 15)


@dataclass
class Window:
    name: str
    seconds: float
    event_lag: dict[str, float]
    batch_s: dict[str, float]  # sampled kgpu_ingest_last_batch_seconds: p50, max
    backlog_max_s: float  # the largest ingest_lag_s /healthz reported
    healthz_not_ok: int  # /healthz answers other than 200
    reads: int = 0
    read_s: dict[str, float] = field(default_factory=dict)  # latency of the readers' requests
    read_bytes: float = 0.0  # mean body size
    read_errors: int = 0


@dataclass
class Result:
    nodes: int
    live: int
    gpus: int
    tabs: int
    fill_s: float
    windows: list[Window]
    first_page_s: float  # one fleet call (first page) on the quiet controller
    first_page_bytes: int
    walk_s: float  # every node, through the fleet call's pages of 500
    walk_bytes: int


def _summary(values: list[float]) -> dict[str, float]:
    return lag_summary(values)


async def _sample(session: aiohttp.ClientSession, base: str, stop: asyncio.Event,
                  batches: list[float], backlog: list[float], not_ok: list[int]) -> None:
    while not stop.is_set():
        try:
            async with session.get(base + "/healthz") as response:
                body = await response.json()
                backlog.append(float(body.get("ingest_lag_s", math.nan)))
                if response.status != 200:
                    not_ok.append(response.status)
            batches.append(await asyncio.to_thread(metric_sum, base, "kgpu_ingest_last_batch_seconds"))
        except (aiohttp.ClientError, OSError, ValueError):
            not_ok.append(0)
        await asyncio.sleep(0.5)


async def _tab(session: aiohttp.ClientSession, base: str, stop: asyncio.Event, latencies: list[float],
               sizes: list[int], errors: list[float]) -> None:
    """One dashboard tab: the overview's fleet call every POLL_S."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with session.get(base + "/api/v1/dashboard/fleet?limit=100") as response:
                body = await response.read()
                (latencies if response.status == 200 else errors).append(time.monotonic() - started)
                sizes.append(len(body))
        except (aiohttp.ClientError, OSError):
            errors.append(0)
        await asyncio.sleep(max(0.0, POLL_S - (time.monotonic() - started)))


async def _walk(session: aiohttp.ClientSession, base: str, path: str, limit: int,
                latencies: list[float] | None = None, sizes: list[int] | None = None,
                stop: asyncio.Event | None = None) -> tuple[int, int]:
    """Every page of a listing (until `stop` is set): (pages, bytes)."""
    cursor: str | None = None
    pages = total = 0
    while stop is None or not stop.is_set():
        url = f"{base}{path}?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        started = time.monotonic()
        async with session.get(url) as response:
            raw = await response.read()
            if response.status != 200:
                raise RuntimeError(f"{url}: HTTP {response.status}: {raw[:200]!r}")
        if latencies is not None:
            latencies.append(time.monotonic() - started)
        if sizes is not None:
            sizes.append(len(raw))
        pages, total = pages + 1, total + len(raw)
        cursor = json.loads(raw).get("next_cursor")  # (a controller before pages: one page)
        if cursor is None:
            break
    return pages, total


async def _hammer(session: aiohttp.ClientSession, base: str, stop: asyncio.Event, latencies: list[float],
                  sizes: list[int], errors: list[float]) -> None:
    while not stop.is_set():
        try:
            await _walk(session, base, "/api/v1/dashboard/fleet", 500, latencies, sizes, stop)
            await _walk(session, base, "/api/v1/nodes", 2000, latencies, sizes, stop)
        except (aiohttp.ClientError, OSError, RuntimeError):
            errors.append(0)
            await asyncio.sleep(0.5)


async def _window(name: str, sim: FleetSim, base: str, seconds: float, readers: int, mode: str) -> Window:
    stop = asyncio.Event()
    batches: list[float] = []
    backlog: list[float] = []
    not_ok: list[int] = []
    latencies: list[float] = []
    sizes: list[int] = []
    errors: list[float] = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(_sample(session, base, stop, batches, backlog, not_ok))]
        worker = _tab if mode == "tabs" else _hammer
        tasks += [asyncio.create_task(worker(session, base, stop, latencies, sizes, errors))
                  for _ in range(readers if mode != "alone" else 0)]
        start = time.monotonic()
        await asyncio.sleep(seconds)
        end = time.monotonic()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    ordered = sorted(batches)
    return Window(name=name, seconds=end - start, event_lag=lag_summary(sim.event_lag.window(start, end)),
                  batch_s={"p50": ordered[len(ordered) // 2] if ordered else math.nan,
                           "max": ordered[-1] if ordered else math.nan},
                  backlog_max_s=max(backlog, default=math.nan), healthz_not_ok=len(not_ok), reads=len(latencies),
                  read_s=_summary(latencies), read_bytes=sum(sizes) / len(sizes) if sizes else math.nan,
                  read_errors=len(errors))


async def run(nodes: int = 20_000, live: int = 2000, *, gpus: int = 8, interval_s: float = 10.0,
              event_every_s: float = 60.0, tabs: int = 10, seconds: float = 30.0, warmup_s: float = 15.0,
              nodes_per_connection: int = 1, workdir: Path | None = None) -> Result:
    live = min(live, nodes)
    options = FleetOptions(mqtt="mqtt://127.0.0.1:1", nodes=live, gpus=gpus, interval_s=interval_s,
                           event_every_s=event_every_s, nodes_per_connection=nodes_per_connection, probes=0)
    raise_fd_limit(options.connections + 512)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=workdir)))
        db = f"sqlite:///{tmp / 'fleet.db'}"
        began = time.monotonic()
        with FleetStore(db) as store:  # the nodes the simulator does not drive: reported once, then quiet
            fill(store, nodes - live, gpus, prefix="idle")
        fill_s = time.monotonic() - began
        broker = Mosquitto(tmp / "broker").start()
        stack.callback(broker.stop)
        cloud = CloudProcess(tmp / "cloud", broker.url, db=db, env={"KGPU_LOG_LEVEL": "warning"}).start()
        stack.callback(_stop, cloud)
        wait_connected(cloud, timeout=60)
        sim = FleetSim(FleetOptions(**{**options.__dict__, "mqtt": broker.url}))
        await sim.start()
        try:
            if not await sim.wait_connected(timeout_s=max(60.0, live / 50)):
                raise SystemExit("the simulated fleet did not connect")
            await asyncio.sleep(warmup_s)
            windows = []
            for name, readers, mode in (("alone", 0, "alone"), (f"{tabs} tabs", tabs, "tabs"),
                                        (f"{tabs} whole-fleet readers", tabs, "hammer")):
                await _settle(cloud.base)
                windows.append(await _window(name, sim, cloud.base, seconds, readers, mode))
                w = windows[-1]
                print(f"  {name}: event->ack p99 {w.event_lag['p99']:.2f} s, batch max {1000 * w.batch_s['max']:.0f} ms, "
                      f"{w.reads} reads p99 {1000 * w.read_s.get('p99', math.nan):.0f} ms", file=sys.stderr, flush=True)
            await _settle(cloud.base)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
                started = time.monotonic()
                async with session.get(cloud.base + "/api/v1/dashboard/fleet") as response:
                    first_bytes = len(await response.read())
                first_s = time.monotonic() - started
                started = time.monotonic()
                _, walk_bytes = await _walk(session, cloud.base, "/api/v1/dashboard/fleet", 500)
                walk_s = time.monotonic() - started
        finally:
            await sim.stop()
    return Result(nodes=nodes, live=live, gpus=gpus, tabs=tabs, fill_s=fill_s, windows=windows,
                  first_page_s=first_s, first_page_bytes=first_bytes, walk_s=walk_s, walk_bytes=walk_bytes)


async def _settle(base: str, timeout_s: float = 180.0) -> None:
    """Until the controller has no backlog (its /healthz `ingest_lag_s` under 1 s), so that each
    window starts from the same state; at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(base + "/healthz") as response:
                if float((await response.json()).get("ingest_lag_s", 0.0)) < 1.0:
                    return
            await asyncio.sleep(1.0)


def _stop(cloud: CloudProcess) -> None:
    if cloud.proc is not None and cloud.proc.poll() is None:
        try:
            cloud.stop(timeout=60)
        except subprocess.TimeoutExpired:
            cloud.proc.kill()
            cloud.proc.wait()


def _ratio(value: float, base: float) -> str:
    return f"x{value / base:.2f}" if base > 0 and not math.isnan(value) and not math.isnan(base) else "-"


def describe(r: Result) -> str:
    alone = r.windows[0]
    lines = [
        (f"reads vs ingest: {r.nodes} nodes x {r.gpus} GPUs in the store ({r.live} live, the others filled in "
         f"{r.fill_s:.0f} s), {r.tabs} readers"),
        (f"  fleet call, first page (100 nodes)  {1000 * r.first_page_s:.0f} ms, {r.first_page_bytes / 1024:.0f} KiB; "
         f"whole fleet in pages of 500: {r.walk_s:.2f} s, {r.walk_bytes / 2**20:.1f} MiB"),
    ]
    for w in r.windows:
        lines.append(
            f"  {w.name:<24} event->ack p50 {w.event_lag['p50']:.2f} s p99 {w.event_lag['p99']:.2f} s "
            f"max {w.event_lag['max']:.2f} s ({w.event_lag['count']:.0f}) [p99 {_ratio(w.event_lag['p99'], alone.event_lag['p99'])}]; "
            f"batch p50 {1000 * w.batch_s['p50']:.0f} ms max {1000 * w.batch_s['max']:.0f} ms "
            f"[max {_ratio(w.batch_s['max'], alone.batch_s['max'])}]; backlog max {w.backlog_max_s:.2f} s; "
            f"/healthz not 200: {w.healthz_not_ok}")
        if w.reads:
            lines.append(f"  {'':<24} {w.reads} reads: p50 {1000 * w.read_s['p50']:.0f} ms p99 "
                         f"{1000 * w.read_s['p99']:.0f} ms, {w.read_bytes / 1024:.0f} KiB each, errors {w.read_errors}")
    return "\n".join(lines)


def rows(r: Result, command: str) -> list[Row]:
    label = f"reads vs ingest {r.nodes}x{r.gpus}, {r.tabs} readers"
    alone, tabs, hammer = r.windows
    return [
        Row(label, "fleet call, first page", 1000 * r.first_page_s, "ms", f"{r.first_page_bytes / 1024:.0f} KiB",
            command),
        Row(label, "event->ack p99, no readers", alone.event_lag["p99"], "s", "", command),
        Row(label, f"event->ack p99, {r.tabs} dashboard tabs", tabs.event_lag["p99"], "s",
            _ratio(tabs.event_lag["p99"], alone.event_lag["p99"]), command),
        Row(label, f"event->ack p99, {r.tabs} whole-fleet readers", hammer.event_lag["p99"], "s",
            _ratio(hammer.event_lag["p99"], alone.event_lag["p99"]), command),
        Row(label, f"ingest batch max, {r.tabs} tabs", 1000 * tabs.batch_s["max"], "ms",
            _ratio(tabs.batch_s["max"], alone.batch_s["max"]), command),
        Row(label, f"dashboard poll p99, {r.tabs} tabs", 1000 * tabs.read_s.get("p99", math.nan), "ms", "", command),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20_000, help="nodes in the fleet store")
    parser.add_argument("--live", type=int, default=2000, help="of which the simulator drives this many")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--event-every", type=float, default=60.0)
    parser.add_argument("--tabs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30.0, help="each window")
    parser.add_argument("--warmup", type=float, default=15.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    result = asyncio.run(run(args.nodes, args.live, gpus=args.gpus, interval_s=args.interval,
                             event_every_s=args.event_every, tabs=args.tabs, seconds=args.seconds,
                             warmup_s=args.warmup))
    print(describe(result))


if __name__ == "__main__":
    os.environ.setdefault("KGPU_LOG_LEVEL", "warning")
    main()
