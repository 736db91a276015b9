"""The web dashboard: a single-page app (plain JS, no build step, no CDN) served at `/`.

`add_dashboard_routes(app)` adds:

- `GET /` — index.html;
- `GET /static/{name}` — one of the files shipped in cloud/http/dashboard_static. Only names found in
  that directory at start-up are served (no sub-directories), so `..`, absolute paths and
  encoded separators can never reach another file: anything else is a 404;
- `GET /api/v1/dashboard/fleet` (given the fleet store) — every node with its GPUs and their
  latest samples in one request (what the overview polls), read with a fixed number of queries
  (`FleetQueries.fleet`), whatever the fleet's size.

Files are read once and served from memory with an ETag and `Cache-Control: no-cache` (the browser
revalidates, so an upgraded controller never serves a stale app), plus a strict
Content-Security-Policy: the app needs nothing but its own origin.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

from aiohttp import web

from cloud.store import FleetQueries

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


def add_dashboard_routes(app: web.Application, directory: Path = STATIC_DIR, *,
                         store: FleetQueries | None = None) -> None:
    files = _load(directory)

    async def index(request: web.Request) -> web.StreamResponse:
        file = files.get("index.html")
        return _serve(request, file) if file is not None else _not_found("index.html")

    async def static(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        file = files.get(name)  # an exact name from the directory listing, nothing else
        return _serve(request, file) if file is not None else _not_found(name)

    async def fleet(_: web.Request) -> web.Response:
        assert store is not None
        nodes = await asyncio.to_thread(store.fleet)
        return web.json_response({"generated_at": time.time(), "nodes": nodes})

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    if store is not None:
        app.router.add_get("/api/v1/dashboard/fleet", fleet)


__all__ = ["STATIC_DIR", "add_dashboard_routes"]
