"""The controller's HTTP API over the fleet store, and `make_app`, which puts it together with
the dashboard, /metrics and every part's routes. Store reads run in a thread; errors are JSON."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cloud.auth import AUTH, ApiAuth, auth_middleware
from cloud.commands.model import OperatorCommand
from cloud.http.dashboard import add_dashboard_routes
from cloud.http.fleet_metrics import add_fleet_metrics_route
from cloud.http.metrics import make_registry
from cloud.ingest import Ingestor
from cloud.link import EdgeLink
from cloud.policies.resolution import NodeLabels
from cloud.rollout.plan import NodeState, RolloutState
from cloud.rollout.request import RolloutRequest
from cloud.services import Part, Services
from cloud.store import FleetStore
from cloud.store.schema import (
    decisions_table,
    edge_commands_table,
    events_table,
    gpus_table,
    migrations_table,
    nodes_table,
    samples_table,
)
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
from shared.openapi import OpenApi, add_spec_route, load
from shared.policy import PowerPolicy
from shared.topics import NODE_NAME_RE

STORE: web.AppKey[FleetStore] = web.AppKey("store", FleetStore)
INGESTOR: web.AppKey[Ingestor] = web.AppKey("ingestor", Ingestor)
LINK: web.AppKey[EdgeLink] = web.AppKey("link", EdgeLink)

OPENAPI_FILE = Path(__file__).parent.parent / "openapi.yaml"


def openapi_spec() -> OpenApi:
    """cloud/openapi.yaml completed from the rows, models and enums the API really returns and
    takes (the names its `x-kgpu-*` markers use): the store's tables and the parts' models."""
    return load(OPENAPI_FILE,
                tables={"nodes": nodes_table, "gpus": gpus_table, "samples": samples_table, "events": events_table,
                        "decisions": decisions_table, "edge_commands": edge_commands_table,
                        "migrations": migrations_table},
                models={"NodeLabels": NodeLabels, "PowerPolicy": PowerPolicy, "RolloutRequest": RolloutRequest,
                        "OperatorCommand": OperatorCommand},
                enums={"RolloutState": RolloutState, "NodeState": NodeState})


def make_app(services: Services, *, ingestor: Ingestor, link: EdgeLink, parts: Sequence[Part],
             command_resends: Callable[[], int]) -> web.Application:
    """The API, the dashboard, /metrics and every part's routes. Changes need the bearer token
    (cloud.auth); the description of every route is cloud/openapi.yaml, served at
    /api/v1/openapi.json."""
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=MAX_BODY_BYTES,
                          handler_args=HANDLER_ARGS)
    app[STORE] = services.store
    app[INGESTOR] = ingestor
    app[LINK] = link
    app[AUTH] = auth = ApiAuth.from_settings(services.settings, services.kube)
    registry = make_registry(ingestor=ingestor, link=link, leading=services.leading, command_resends=command_resends)
    registry.register(RejectionCollector(track_rejections(app)))
    add_spec_route(app, openapi_spec())

    async def announce_auth(_: web.Application) -> None:
        await auth.log_start()

    app.on_startup.append(announce_auth)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    add_fleet_metrics_route(app, store=services.store, max_age=services.settings.fleet_metrics_max_age)
    app.router.add_get("/api/v1/nodes", nodes)
    app.router.add_get("/api/v1/nodes/{node}", node)
    app.router.add_get("/api/v1/nodes/{node}/samples", samples)
    app.router.add_get("/api/v1/events", events)
    app.router.add_get("/api/v1/decisions", decisions)
    for part in parts:
        part.add_routes(app)
    add_dashboard_routes(app, store=services.store)
    return app


def _node_query(request: web.Request) -> str | None:
    value = request.query.get("node") or None
    if value is not None and not NODE_NAME_RE.match(value):
        raise bad_query("not a valid node name", value[:300])
    return value


async def healthz(request: web.Request) -> web.Response:
    link = request.app[LINK]
    reasons = []
    if not link.connected:
        reasons.append("MQTT link down" + (f": {link.last_error}" if link.last_error else ""))
    if request.app[INGESTOR].failing:
        reasons.append("fleet store not writable (retrying)")
    body = {"status": "ok" if not reasons else "unhealthy", "version": __version__, "reasons": reasons}
    return web.json_response(body, status=200 if not reasons else 503)


def _with_clock(ingestor: Ingestor, row: dict[str, Any]) -> dict[str, Any]:
    """A node row plus its clock skew as this replica's ingest measures it: the node's clock
    minus ours (0 when in step, null before its first telemetry; cloud/clock_skew.py)."""
    return {**row, "clockSkewSeconds": ingestor.clock.skew.get(row["name"])}


async def nodes(request: web.Request) -> web.Response:
    rows = await asyncio.to_thread(request.app[STORE].nodes)
    ingestor = request.app[INGESTOR]
    return web.json_response({"nodes": [_with_clock(ingestor, row) for row in rows]})


async def node(request: web.Request) -> web.Response:
    name = request.match_info["node"]
    found = await asyncio.to_thread(request.app[STORE].node, name) if NODE_NAME_RE.match(name) else None
    if found is None:
        return json_error(404, "no such node", name)
    return web.json_response(_with_clock(request.app[INGESTOR], found))


async def samples(request: web.Request) -> web.Response:
    name = request.match_info["node"]
    if not NODE_NAME_RE.match(name):
        return json_error(404, "no such node", name)
    since = float_query(request, "since")
    limit = int_query(request, "limit", 2000, lo=1, hi=100_000) or 2000
    uuid = request.query.get("gpu") or None
    rows = await asyncio.to_thread(request.app[STORE].samples, name, uuid, since, limit)
    return web.json_response({"node": name, "samples": rows})


async def events(request: web.Request) -> web.Response:
    limit = int_query(request, "limit", 100, lo=1, hi=10_000) or 100
    rows = await asyncio.to_thread(
        request.app[STORE].events, _node_query(request), request.query.get("kind") or None,
        float_query(request, "since"), limit,
    )
    return web.json_response({"events": rows})


async def decisions(request: web.Request) -> web.Response:
    limit = int_query(request, "limit", 100, lo=1, hi=10_000) or 100
    rows = await asyncio.to_thread(
        request.app[STORE].decisions, _node_query(request), float_query(request, "since"), limit
    )
    return web.json_response({"decisions": rows})
