"""The controller's HTTP API. Store reads run in a thread; errors are JSON."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cloud.metrics import make_registry
from shared import __version__
from shared.http import error_middleware, int_query, json_error
from shared.topics import NODE_NAME_RE

if TYPE_CHECKING:
    from cloud.controller import Controller

CONTROLLER: web.AppKey[Controller] = web.AppKey("controller")


def make_app(controller: Controller) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=64 * 1024)
    app[CONTROLLER] = controller
    registry = make_registry(controller)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/nodes", nodes)
    app.router.add_get("/api/v1/nodes/{node}", node)
    app.router.add_get("/api/v1/nodes/{node}/samples", samples)
    app.router.add_get("/api/v1/events", events)
    app.router.add_get("/api/v1/decisions", decisions)
    for subsystem in controller.subsystems:
        subsystem.add_routes(app)
    from cloud.dashboard import add_dashboard_routes

    add_dashboard_routes(app)
    return app


def require_token(request: web.Request) -> None:
    """Changes (PUT, POST, DELETE) need `Authorization: Bearer <token>` when --api-token-file is
    set; reads stay open. Raises 401 with a JSON error otherwise."""
    import hmac

    c = request.app[CONTROLLER]
    path = c.settings.api_token_file
    if path is None:
        return
    try:
        expected = path.read_text().strip()
    except OSError:
        raise web.HTTPServiceUnavailable(text='{"error": "API token file unreadable", "detail": null}',
                                         content_type="application/json") from None
    given = request.headers.get("Authorization", "")
    if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].strip(), expected):
        raise web.HTTPUnauthorized(text='{"error": "a valid bearer token is required for changes", "detail": null}',
                                   content_type="application/json", headers={"WWW-Authenticate": "Bearer"})


def _float_query(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        raise web.HTTPBadRequest(text=f'{{"error": "query parameter {name!r} must be a number (unix seconds)", '
                                      f'"detail": null}}', content_type="application/json") from None


def _node_query(request: web.Request) -> str | None:
    value = request.query.get("node") or None
    if value is not None and not NODE_NAME_RE.match(value):
        raise web.HTTPBadRequest(text='{"error": "not a valid node name", "detail": null}', content_type="application/json")
    return value


async def healthz(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    reasons = []
    if c.mqtt is None or not c.mqtt.connected:
        reasons.append("MQTT link down" + (f": {c.mqtt.link.last_error}" if c.mqtt and c.mqtt.link.last_error else ""))
    if c.ingestor.failing:
        reasons.append("fleet store not writable (retrying)")
    body = {"status": "ok" if not reasons else "unhealthy", "version": __version__, "reasons": reasons}
    return web.json_response(body, status=200 if not reasons else 503)


async def nodes(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    return web.json_response({"nodes": await asyncio.to_thread(c.store.nodes)})


async def node(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    name = request.match_info["node"]
    found = await asyncio.to_thread(c.store.node, name) if NODE_NAME_RE.match(name) else None
    if found is None:
        return json_error(404, "no such node", name)
    return web.json_response(found)


async def samples(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    name = request.match_info["node"]
    if not NODE_NAME_RE.match(name):
        return json_error(404, "no such node", name)
    since = _float_query(request, "since")
    limit = int_query(request, "limit", 2000, lo=1, hi=100_000) or 2000
    uuid = request.query.get("gpu") or None
    rows = await asyncio.to_thread(c.store.samples, name, uuid, since, limit)
    return web.json_response({"node": name, "samples": rows})


async def events(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    limit = int_query(request, "limit", 100, lo=1, hi=10_000) or 100
    rows = await asyncio.to_thread(
        c.store.events, _node_query(request), request.query.get("kind") or None, _float_query(request, "since"), limit
    )
    return web.json_response({"events": rows})


async def decisions(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    limit = int_query(request, "limit", 100, lo=1, hi=10_000) or 100
    rows = await asyncio.to_thread(c.store.decisions, _node_query(request), _float_query(request, "since"), limit)
    return web.json_response({"decisions": rows})
