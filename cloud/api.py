"""The controller's HTTP API. Store reads run in a thread; errors are JSON."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cloud.auth import AUTH, ApiAuth, auth_middleware
from cloud.metrics import make_registry
from shared import __version__
from shared.http import (
    HANDLER_ARGS,
    MAX_BODY_BYTES,
    RejectionCollector,
    bad_query,
    error_middleware,
    float_query,
    int_query,
    json_error,
    track_rejections,
)
from shared.openapi import add_spec_route, load
from shared.topics import NODE_NAME_RE

if TYPE_CHECKING:
    from cloud.controller import Controller

CONTROLLER: web.AppKey[Controller] = web.AppKey("controller")


OPENAPI_FILE = Path(__file__).with_name("openapi.yaml")


def make_app(controller: Controller) -> web.Application:
    """The API, the dashboard and /metrics. Changes need the bearer token (cloud.auth); the
    description of every route is cloud/openapi.yaml, served at /api/v1/openapi.json."""
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=MAX_BODY_BYTES,
                          handler_args=HANDLER_ARGS)
    app[CONTROLLER] = controller
    app[AUTH] = auth = ApiAuth.from_settings(controller.settings, controller.kube)
    registry = make_registry(controller)
    registry.register(RejectionCollector(track_rejections(app)))
    add_spec_route(app, load(OPENAPI_FILE))

    async def announce_auth(_: web.Application) -> None:
        await auth.log_start()

    app.on_startup.append(announce_auth)

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


def _node_query(request: web.Request) -> str | None:
    value = request.query.get("node") or None
    if value is not None and not NODE_NAME_RE.match(value):
        raise bad_query("not a valid node name", value[:300])
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


def _with_clock(c: Controller, row: dict[str, Any]) -> dict[str, Any]:
    """A node row plus its clock skew as this replica's ingest measures it: the node's clock
    minus ours (0 when in step, null before its first telemetry; cloud/clock_skew.py)."""
    return {**row, "clockSkewSeconds": c.ingestor.clock.skew.get(row["name"])}


async def nodes(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    rows = await asyncio.to_thread(c.store.nodes)
    return web.json_response({"nodes": [_with_clock(c, row) for row in rows]})


async def node(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    name = request.match_info["node"]
    found = await asyncio.to_thread(c.store.node, name) if NODE_NAME_RE.match(name) else None
    if found is None:
        return json_error(404, "no such node", name)
    return web.json_response(_with_clock(c, found))


async def samples(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    name = request.match_info["node"]
    if not NODE_NAME_RE.match(name):
        return json_error(404, "no such node", name)
    since = float_query(request, "since")
    limit = int_query(request, "limit", 2000, lo=1, hi=100_000) or 2000
    uuid = request.query.get("gpu") or None
    rows = await asyncio.to_thread(c.store.samples, name, uuid, since, limit)
    return web.json_response({"node": name, "samples": rows})


async def events(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    limit = int_query(request, "limit", 100, lo=1, hi=10_000) or 100
    rows = await asyncio.to_thread(
        c.store.events, _node_query(request), request.query.get("kind") or None, float_query(request, "since"), limit
    )
    return web.json_response({"events": rows})


async def decisions(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    limit = int_query(request, "limit", 100, lo=1, hi=10_000) or 100
    rows = await asyncio.to_thread(c.store.decisions, _node_query(request), float_query(request, "since"), limit)
    return web.json_response({"decisions": rows})
