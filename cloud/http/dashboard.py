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
  for a few seconds (`_Shared`): a poll never serialises the whole fleet.

Files are read once and served from memory with an ETag and `Cache-Control: no-cache` (the browser
revalidates, so an upgraded controller never serves a stale app), plus a strict
Content-Security-Policy: the app needs nothing but its own origin.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from cloud.store import FleetQueries
from shared.http import ReadPool, bad_query, encode_cursor, int_query, json_bytes, json_response, page_query

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
SHARE_TTL_S = 2.0  # the fleet's figures, and a page, are computed at most this often, whatever the tabs open
SHARE_OF_THREAD = 0.1  # ... and take at most this share of one read thread's time

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


def add_dashboard_routes(app: web.Application, directory: Path = STATIC_DIR, *,
                         store: FleetQueries | None = None, reads: ReadPool | None = None,
                         over_budget: Callable[[], Mapping[str, str]] = dict) -> None:
    """The app's files, and with `store` (and `reads`, the pool its reads run in) the fleet call;
    `over_budget` gives node -> the budget it is over right now (cloud/budget.py)."""
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

        async def answer() -> bytes:
            summary = await shared.get(("summary",), figures)
            flags = dict(over_budget())  # a copy: read in a thread below

            def page() -> bytes:  # the read and its JSON, in a read thread: the event loop is the ingest's too
                rows, last = store.nodes_page(after, limit, gpu_limit=gpu_limit, compact=True)
                return json_bytes({
                    "generated_at": time.time(),
                    "summary": {**summary, "over_budget": len(flags)},
                    "nodes": [{**row, "over_budget": flags.get(row["name"])} for row in rows],
                    "next_cursor": encode_cursor("fleet", last) if last is not None else None,
                })

            return await pool.run(page)

        return json_response(await shared.get(("page", after, limit, gpu_limit), answer))

    app.router.add_get("/api/v1/dashboard/fleet", fleet)


__all__ = ["STATIC_DIR", "add_dashboard_routes"]
