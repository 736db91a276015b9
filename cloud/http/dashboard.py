"""The web dashboard: a single-page app (plain JS, no build step, no CDN) served at `/`.

`add_dashboard_routes(app)` adds:

- `GET /` — index.html;
- `GET /static/{name}` — one of the files shipped in cloud/http/dashboard_static. Only names found in
  that directory at start-up are served (no sub-directories), so `..`, absolute paths and
  encoded separators can never reach another file: anything else is a 404;
- `GET /api/v1/dashboard/fleet` (given the fleet store) — what the overview polls: the fleet in
  figures (`summary`, aggregated by the database) and one page of nodes (`limit`, `cursor`,
  `next_cursor`) with their first GPUs and the figures of their latest samples that the overview
  shows (`FleetQueries.COMPACT_SAMPLE`), read with a fixed number of queries
  (`FleetQueries.nodes_page`, `fleet_summary`) whatever the fleet's size, and shared by every tab
  for a few seconds (`_Shared`): a poll never serialises the whole fleet;
- `GET /api/v1/dashboard/stream` (given the fleet store) — server push (Server-Sent Events): a
  `snapshot` event with what the overview shows (the fleet's figures, a trend of them, the hottest
  GPUs, those that need attention, the throttled ones, the first `STREAM_NODES` nodes) and the
  controller's own health (its broker link and database, from what /healthz knows). One snapshot is
  computed for every open page together (`_FleetStream`), every `STREAM_INTERVAL_S` while pages
  watch (less often when it is costly), never one query per page per node. A stream ends before
  the request timeout (`http_request_timeout` less 5 s) and the page reconnects at once; a client
  that does not send `Accept: text/event-stream` gets one snapshot and the end.

Files are read once and served from memory with an ETag and `Cache-Control: no-cache` (the browser
revalidates, so an upgraded controller never serves a stale app), plus a strict
Content-Security-Policy: the app needs nothing but its own origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiohttp import web

from cloud.store import FleetQueries, FleetStoreError
from cloud.store.schema import gpus_table, nodes_table
from shared.gpu import Health
from shared.http import (
    DEFAULT_REQUEST_TIMEOUT_S,
    REQUEST_TIMEOUT,
    ReadPool,
    bad_query,
    encode_cursor,
    int_query,
    json_bytes,
    json_response,
    page_query,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("dashboard_static")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}

FLEET_PAGE = (100, 500)  # (default, maximum) nodes a page of the dashboard's fleet call
FLEET_GPUS = (16, 64)  # (default, maximum) GPUs listed per node in it
SEARCH_MAX = 200  # characters of the fleet call's `q` (a search over the whole fleet)
SHARE_TTL_S = 2.0  # the fleet's figures, and a page, are computed at most this often, whatever the tabs open
SHARE_OF_THREAD = 0.1  # ... and take at most this share of one read thread's time

STREAM_INTERVAL_S = 2.0  # a snapshot at most this often while a page watches
STREAM_IDLE_INTERVAL_S = 15.0  # ... and this often with no page open (the trend keeps going)
STREAM_NODES = 500  # nodes a snapshot lists (the overview filters, sorts and searches these)
STREAM_TOP = 8  # GPUs in the hottest and needs-attention lists
STREAM_THROTTLED = 500  # throttled GPUs listed at most
TREND_STEP_S = 5.0  # one point of the fleet's trend per this many seconds ...
TREND_POINTS = 720  # ... kept for this many points (an hour), in memory
STREAM_HEARTBEAT_S = 10.0  # a comment line this often, so that proxies keep the stream open
# NVML clocks-event reasons that mean the GPU runs slower than asked: software power cap, hardware
# slowdown, software and hardware thermal slowdown, power brake (idle and app clocks are not).
THROTTLE_MASK = 0x4 | 0x8 | 0x20 | 0x40 | 0x80

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class _File:
    __slots__ = ("body", "content_type", "etag")

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _load(directory: Path) -> dict[str, _File]:
    files: dict[str, _File] = {}
    if not directory.is_dir():
        return files
    for path in sorted(directory.iterdir()):
        content_type = CONTENT_TYPES.get(path.suffix.lower())
        if path.is_file() and not path.is_symlink() and content_type is not None:
            files[path.name] = _File(path.read_bytes(), content_type)
    return files


def _serve(request: web.Request, file: _File) -> web.Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": file.etag}
    if file.etag in {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}:
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = file.content_type
    return web.Response(body=file.body, headers=headers)


def _not_found(name: str) -> web.Response:
    return web.json_response({"error": "no such file", "detail": name}, status=404,
                             headers={"X-Content-Type-Options": "nosniff"})


class _Shared:
    """Answers shared by every dashboard tab: the same one (the fleet's figures, a page) is computed
    at most once per SHARE_TTL_S, and never more often than SHARE_OF_THREAD allows (the figures
    scan every GPU row: about a second at 20,000 nodes, so at most a tenth of one read thread goes
    to them), however many tabs poll; one computation of a key at a time, the others wait for it
    and take its result. So ten tabs on the overview cost about what one does."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[Any, ...], tuple[float, float, Any]] = OrderedDict()
        self._locks: dict[tuple[Any, ...], asyncio.Lock] = {}

    async def get(self, key: tuple[Any, ...], compute: Callable[[], Awaitable[Any]]) -> Any:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            found = self._entries.get(key)
            if found is not None and time.monotonic() - found[0] < max(SHARE_TTL_S, found[1] / SHARE_OF_THREAD):
                return found[2]
            started = time.monotonic()
            value = await compute()
            now = time.monotonic()
            self._entries[key] = (now, now - started, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                old, _ = self._entries.popitem(last=False)
                self._locks.pop(old, None)
            return value


def _gpu_rows(store: FleetQueries, *, order: str, limit: int) -> list[dict[str, Any]]:
    """GPUs across the whole fleet with the figures the overview's lists show, read by the database
    (no sample decoded): `order` "hottest" (online nodes, by temperature), "attention" (unhealthy
    or lost first) or "throttled" (a slowdown reason set in the latest sample)."""
    g, n = gpus_table, nodes_table
    temp = g.c.sample["temperature_c"].as_float()
    reasons = g.c.sample["throttle_reasons"].as_integer()
    query = sa.select(g.c.node, g.c.uuid, g.c.index, g.c.name, g.c.health, n.c.online,
                      temp.label("temperature_c"), g.c.sample["power_w"].as_float().label("power_w"),
                      g.c.sample["power_limit_w"].as_float().label("power_limit_w"),
                      g.c.sample["utilization_pct"].as_float().label("utilization_pct"),
                      reasons.label("throttle_reasons")).select_from(g.join(n, n.c.name == g.c.node))
    if order == "hottest":
        query = query.where(n.c.online.is_(True), temp.is_not(None)).order_by(temp.desc(), g.c.node, g.c.index)
    elif order == "attention":
        query = query.where(g.c.health.in_([str(Health.UNHEALTHY), str(Health.LOST)])).order_by(g.c.node, g.c.index)
    else:
        query = query.where(n.c.online.is_(True), reasons.op("&")(THROTTLE_MASK) != 0).order_by(g.c.node, g.c.index)
    with store.reading(f"dashboard {order}") as conn:
        return [dict(row._mapping) for row in conn.execute(query.limit(limit))]


def link_state(health: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The controller's own state as the banner shows it, from /healthz's body (`reasons`):
    whether the broker link and the database are up, and every reason. None: not known here."""
    if health is None:
        return None
    reasons = [str(r) for r in health.get("reasons") or []]
    return {"ok": not reasons, "reasons": reasons,
            "broker": not any(r.startswith("MQTT") or "broker" in r or "$share" in r for r in reasons),
            "database": not any("store" in r or "database" in r for r in reasons)}


class _FleetStream:
    """The server-push side of the overview: one snapshot for every open page. A background task,
    started by the first page (a controller nobody watches reads nothing for it), computes it every
    STREAM_INTERVAL_S while pages watch (STREAM_IDLE_INTERVAL_S otherwise, so the fleet's trend
    has no holes), spaced further when it is costly (SHARE_OF_THREAD), and hands
    the same bytes to every page; a slow page only ever misses intermediate snapshots."""

    def __init__(self, store: FleetQueries, pool: ReadPool, over_budget: Callable[[], Mapping[str, str]],
                 health: Callable[[], Mapping[str, Any]] | None) -> None:
        self.store, self.pool, self.over_budget, self.health = store, pool, over_budget, health
        self.latest: bytes | None = None
        self.trend: deque[list[float | None]] = deque(maxlen=TREND_POINTS)
        self.pages: set[asyncio.Queue[bytes]] = set()
        self.wake = asyncio.Event()
        self.closing = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def _read(self) -> dict[str, Any]:  # in a read thread
        summary = self.store.fleet_summary()
        nodes, last = self.store.nodes_page(None, STREAM_NODES, gpu_limit=FLEET_GPUS[1], compact=True)
        return {"summary": summary, "nodes": nodes, "nodes_truncated": last is not None,
                "hottest": _gpu_rows(self.store, order="hottest", limit=STREAM_TOP),
                "attention": _gpu_rows(self.store, order="attention", limit=STREAM_TOP),
                "throttled": _gpu_rows(self.store, order="throttled", limit=STREAM_THROTTLED)}

    async def snapshot(self) -> bytes:
        now = time.time()
        health = link_state(self.health()) if self.health is not None else None
        flags = dict(self.over_budget())
        try:
            body = await self.pool.run(self._read)
        except (FleetStoreError, sa.exc.SQLAlchemyError) as exc:  # the page says so and keeps its figures
            log.warning("dashboard snapshot failed: %s", exc)
            reason = f"fleet store not readable: {str(exc)[:200]}"
            health = {"ok": False, "broker": health["broker"] if health else True, "database": False,
                      "reasons": [*(health["reasons"] if health else []), reason]}
            return json_bytes({"generated_at": now, "health": health, "stale": True})
        summary = body["summary"]
        summary["over_budget"] = len(flags)
        summary["throttled"] = len(body["throttled"])
        hottest = body["hottest"][0]["temperature_c"] if body["hottest"] else None
        if not self.trend or now - (self.trend[-1][0] or 0) >= TREND_STEP_S:
            self.trend.append([round(now, 1), summary["online"], summary["nodes"] - summary["online"],
                               summary["unhealthy_gpus"], summary["power_w"], hottest, summary["throttled"]])
        for row in body["nodes"]:
            row["over_budget"] = flags.get(row["name"])
        return json_bytes({"generated_at": now, "health": health, **body, "summary": summary,
                           "trend": {"fields": ["ts", "online", "offline", "unhealthy_gpus", "power_w",
                                                "hottest_c", "throttled"], "points": list(self.trend)}})

    async def run(self) -> None:
        while not self.closing.is_set():
            started = time.monotonic()
            try:
                self.latest = await self.snapshot()
            except Exception:  # never let the stream die: the next round tries again
                log.exception("dashboard snapshot failed")
            cost = time.monotonic() - started
            for page in list(self.pages):
                if page.full():
                    page.get_nowait()  # a slow page skips to the newest
                page.put_nowait(self.latest or b"{}")
            interval = STREAM_INTERVAL_S if self.pages else STREAM_IDLE_INTERVAL_S
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(interval, cost / SHARE_OF_THREAD) - cost)

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run(), name="dashboard-stream")

    async def stop(self) -> None:
        self.closing.set()
        for page in list(self.pages):  # wake every open stream so that it ends now
            if page.full():
                page.get_nowait()
            page.put_nowait(b"")
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """One page's stream: the latest snapshot at once, then each new one, for a bounded time.
        A client that does not ask for `text/event-stream` (curl, a script) gets one snapshot."""
        self.start()
        once = "text/event-stream" not in request.headers.get("Accept", "")
        lifetime = max(2.0, request.app.get(REQUEST_TIMEOUT, DEFAULT_REQUEST_TIMEOUT_S) - 5.0)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff"})
        await response.prepare(request)
        page: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)
        if self.latest is not None:
            page.put_nowait(self.latest)
        else:
            self.wake.set()
        self.pages.add(page)
        if len(self.pages) == 1:
            self.wake.set()  # the first page: go to the fast interval now
        ends = time.monotonic() + lifetime
        try:
            await response.write(f"retry: 1000\n: stream for {lifetime:g} s\n\n".encode())
            while not self.closing.is_set() and (left := ends - time.monotonic()) > 0:
                try:
                    data = await asyncio.wait_for(page.get(), min(left, STREAM_HEARTBEAT_S))
                except TimeoutError:
                    await response.write(b": heartbeat\n\n")
                    continue
                if not data:
                    break
                await response.write(b"event: snapshot\ndata: " + data + b"\n\n")
                if once:
                    break
        finally:
            self.pages.discard(page)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response


def add_dashboard_routes(app: web.Application, directory: Path = STATIC_DIR, *,
                         store: FleetQueries | None = None, reads: ReadPool | None = None,
                         over_budget: Callable[[], Mapping[str, str]] = dict,
                         health: Callable[[], Mapping[str, Any]] | None = None) -> None:
    """The app's files, and with `store` (and `reads`, the pool its reads run in) the fleet call
    and its stream; `over_budget` gives node -> the budget it is over right now (cloud/budget.py);
    `health` gives /healthz's body (its `reasons`), for the banner that says when the controller's
    broker link or database is down (without it the banner only knows what the stream's own reads
    tell)."""
    files = _load(directory)

    async def index(request: web.Request) -> web.StreamResponse:
        file = files.get("index.html")
        return _serve(request, file) if file is not None else _not_found("index.html")

    async def static(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        file = files.get(name)  # an exact name from the directory listing, nothing else
        return _serve(request, file) if file is not None else _not_found(name)

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    if store is None:
        return
    pool = reads if reads is not None else ReadPool(2, "dashboard-read")
    shared = _Shared()

    async def figures() -> dict[str, Any]:
        return {**await pool.run(store.fleet_summary), "as_of": time.time()}

    async def fleet(request: web.Request) -> web.Response:
        limit, cursor = page_query(request, "fleet", default=FLEET_PAGE[0], maximum=FLEET_PAGE[1])
        gpu_limit = int_query(request, "gpu_limit", FLEET_GPUS[0], lo=0, hi=FLEET_GPUS[1]) or 0
        if cursor is not None and (len(cursor) != 1 or not isinstance(cursor[0], str)):
            raise bad_query("not a valid cursor", "pass the next_cursor of the previous page unchanged")
        after = cursor[0] if cursor else None
        search = request.query.get("q", "").strip() or None
        if search is not None and len(search) > SEARCH_MAX:
            raise bad_query(f"q is longer than {SEARCH_MAX} characters", len(search))

        async def answer() -> bytes:
            summary = await shared.get(("summary",), figures)
            flags = dict(over_budget())  # a copy: read in a thread below

            def page() -> bytes:  # the read and its JSON, in a read thread: the event loop is the ingest's too
                rows, last = store.nodes_page(after, limit, gpu_limit=gpu_limit, compact=True, search=search)
                return json_bytes({
                    "generated_at": time.time(),
                    "summary": {**summary, "over_budget": len(flags)},
                    "nodes": [{**row, "over_budget": flags.get(row["name"])} for row in rows],
                    "next_cursor": encode_cursor("fleet", last) if last is not None else None,
                })

            return await pool.run(page)

        return json_response(await shared.get(("page", after, limit, gpu_limit, search), answer))

    app.router.add_get("/api/v1/dashboard/fleet", fleet)

    stream = _FleetStream(store, pool, over_budget, health)

    async def stop_stream(_: web.Application) -> None:
        await stream.stop()

    app.on_shutdown.append(stop_stream)
    app.router.add_get("/api/v1/dashboard/stream", stream.serve)


__all__ = ["STATIC_DIR", "add_dashboard_routes"]
