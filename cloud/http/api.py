"""The controller's HTTP API over the fleet store, and `make_app`, which puts it together with
the dashboard, /metrics and every part's routes. Store reads run in the API's own thread pool
(`ReadPool`, `http_read_threads`), apart from the ingest's writer, and list endpoints page
(`limit`, `cursor`), so that readers never hold the store for long; errors are JSON."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Metric, generate_latest

from cloud.auth import AUTH, ApiAuth, auth_middleware
from cloud.commands.model import OperatorCommand
from cloud.http.dashboard import add_dashboard_routes
from cloud.http.fleet_metrics import add_fleet_metrics_route
from cloud.http.metrics import make_registry
from cloud.ingest import Ingestor
from cloud.link import EdgeLink
from cloud.policies.resolution import NodeLabels
from cloud.quarantine import BrokerQuarantine
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
    sample_point_table,
)
from shared import __version__
from shared.http import (
    MAX_BODY_BYTES,
    READ_POOL,
    REQUEST_TIMEOUT,
    ReadPool,
    ReadPoolCollector,
    RejectionCollector,
    bad_query,
    encode_cursor,
    error_middleware,
    float_query,
    handler_args,
    int_query,
    json_bytes,
    json_error,
    json_response,
    page_query,
    track_rejections,
)
from shared.openapi import OpenApi, add_spec_route, load
from shared.policy import PowerPolicy
from shared.topics import NODE_NAME_RE

STORE: web.AppKey[FleetStore] = web.AppKey("store", FleetStore)
INGESTOR: web.AppKey[Ingestor] = web.AppKey("ingestor", Ingestor)
# node -> the end of its quarantine at the broker (cloud/quarantine.py), unix time
QUARANTINED: web.AppKey[Callable[[], dict[str, float]]] = web.AppKey("quarantined")
LINK: web.AppKey[EdgeLink] = web.AppKey("link", EdgeLink)
READS = READ_POOL  # the API's own read threads (shared.http.ReadPool)
LAG_UNHEALTHY_S: web.AppKey[float] = web.AppKey("ingest_lag_unhealthy_s", float)

NODES_PAGE = (500, 2000)  # (default, maximum) nodes a page of /api/v1/nodes
NODE_GPUS = (1024, 1024)  # GPUs listed in one node's view
ROWS_PAGE = (100, 10_000)  # events and decisions

OPENAPI_FILE = Path(__file__).parent.parent / "openapi.yaml"


def openapi_spec() -> OpenApi:
    """cloud/openapi.yaml completed from the rows, models and enums the API really returns and
    takes (the names its `x-kgpu-*` markers use): the store's tables and the parts' models."""
    return load(OPENAPI_FILE,
                tables={"nodes": nodes_table, "gpus": gpus_table, "samples": sample_point_table, "events": events_table,
                        "decisions": decisions_table, "edge_commands": edge_commands_table,
                        "migrations": migrations_table},
                models={"NodeLabels": NodeLabels, "PowerPolicy": PowerPolicy, "RolloutRequest": RolloutRequest,
                        "OperatorCommand": OperatorCommand},
                enums={"RolloutState": RolloutState, "NodeState": NodeState})


def make_app(services: Services, *, ingestor: Ingestor, link: EdgeLink, parts: Sequence[Part],
             command_resends: Callable[[], int], quarantine: BrokerQuarantine | None = None) -> web.Application:
    """The API, the dashboard, /metrics and every part's routes. Changes need the bearer token
    (cloud.auth); the description of every route is cloud/openapi.yaml, served at
    /api/v1/openapi.json."""
    settings = services.settings
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=MAX_BODY_BYTES,
                          handler_args=handler_args(settings.http_header_timeout))
    app[REQUEST_TIMEOUT] = settings.http_request_timeout
    app[LAG_UNHEALTHY_S] = settings.ingest_lag_unhealthy_s
    app[READS] = reads = ReadPool(settings.http_read_threads)
    app[STORE] = services.store
    app[INGESTOR] = ingestor
    app[LINK] = link
    app[AUTH] = auth = ApiAuth.from_settings(services.settings, services.kube)
    registry = make_registry(ingestor=ingestor, link=link, leading=services.leading, command_resends=command_resends)
    registry.register(RejectionCollector(track_rejections(app)))
    for part in parts:  # a part with figures of its own is a Prometheus collector (`collect()`)
        if callable(getattr(part, "collect", None)):
            registry.register(part)  # type: ignore[arg-type]
    app[QUARANTINED] = quarantine.quarantined if quarantine is not None else dict
    if quarantine is not None:
        registry.register(quarantine)
    registry.register(ReadPoolCollector(reads))
    add_spec_route(app, openapi_spec())

    async def announce_auth(_: web.Application) -> None:
        await auth.log_start()

    async def close_reads(_: web.Application) -> None:
        reads.close()

    app.on_startup.append(announce_auth)
    app.on_cleanup.append(close_reads)

    async def metrics(request: web.Request) -> web.Response:
        # Collected on the loop (the collectors read state the loop owns), written out in a read
        # thread: the text of a large fleet's per-node series (~180 ms at 8,000 nodes) must not
        # hold up the loop, which is the ingest's too. `?name[]=<sample name>` (repeatable), as
        # prometheus_client's own handler: only those samples, from the collectors that hold
        # them and those not known by name (the benches poll a few counters, ten times a second).
        names = request.query.getall("name[]", [])
        families = Collected((registry.restricted_registry(names) if names else registry).collect())
        body = await reads.run(generate_latest, families)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

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
    add_dashboard_routes(app, store=services.store, reads=reads,
                         over_budget=lambda: _flags_and_quarantines(ingestor.budget_flags, app[QUARANTINED]()),
                         health=lambda: health_report(app))
    return app


def _flags_and_quarantines(flags: Mapping[str, str], quarantined: Mapping[str, float]) -> dict[str, str]:
    """What the dashboard shows a node over: its budget, or, while it is shut out at the broker
    (its flag clears 10 s after the flood stops reaching us), its quarantine and when it ends."""
    return {**flags, **{node: "quarantined until " + time.strftime("%H:%M:%SZ", time.gmtime(end))
                        for node, end in quarantined.items()}}


class Collected:
    """Metric families collected already, for `generate_latest` to write out (in a read thread)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _node_query(request: web.Request) -> str | None:
    value = request.query.get("node") or None
    if value is not None and not NODE_NAME_RE.match(value):
        raise bad_query("not a valid node name", value[:300])
    return value


def health_report(app: web.Application) -> dict[str, Any]:
    """What /healthz answers (and the dashboard's banner shows): the reasons the controller is
    unhealthy, if any."""
    link, ingestor = app[LINK], app[INGESTOR]
    reasons = []
    if not link.connected:
        reasons.append("MQTT link down" + (f": {link.last_error}" if link.last_error else ""))
    reasons.extend(link.broker_problems())  # a refused subscription, a $share group that delivers nothing
    if ingestor.failing:
        reasons.append("fleet store not writable (retrying)")
    lag, threshold = ingestor.backlog_age_s(), app[LAG_UNHEALTHY_S]
    if lag > threshold:
        reasons.append(f"ingest lagging: the oldest message has waited {lag:.1f} s to be written "
                       f"(unhealthy past {threshold:g} s)")
    return {"status": "ok" if not reasons else "unhealthy", "version": __version__, "reasons": reasons,
            "ingest_lag_s": round(lag, 3)}


async def healthz(request: web.Request) -> web.Response:
    """503 with the reasons while the link is down or deaf (docs/broker.md), the store is not
    writable or the ingest lags
    (its oldest waiting message older than `ingest_lag_unhealthy_s`)."""
    body = health_report(request.app)
    return web.json_response(body, status=200 if body["status"] == "ok" else 503)


def _with_ingest(skew: Mapping[str, float | None], flags: Mapping[str, str], quarantined: Mapping[str, float],
                 rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Node rows plus what this replica's ingest knows of each: its clock skew (`skew`), the
    node's clock minus ours (0 when in step, null before its first telemetry;
    cloud/clock_skew.py), `over_budget` (`flags`), the budget it is over right now (null:
    within budget; cloud/budget.py), and `quarantined_until`, the end of its quarantine at the
    broker (unix time; null: none; cloud/quarantine.py)."""
    return [{**row, "clockSkewSeconds": skew.get(row["name"]), "over_budget": flags.get(row["name"]),
             "quarantined_until": quarantined.get(row["name"])} for row in rows]


def _next(kind: str, key: tuple[Any, ...] | str | None) -> str | None:
    if key is None:
        return None
    return encode_cursor(kind, *(key if isinstance(key, tuple) else (key,)))


async def nodes(request: web.Request) -> web.Response:
    limit, cursor = page_query(request, "nodes", default=NODES_PAGE[0], maximum=NODES_PAGE[1])
    after = None
    if cursor is not None:
        if len(cursor) != 1 or not isinstance(cursor[0], str):
            raise bad_query("not a valid cursor", "pass the next_cursor of the previous page unchanged")
        after = cursor[0]
    ingestor, store = request.app[INGESTOR], request.app[STORE]
    # copies: read in a thread below
    skew, flags, quarantined = dict(ingestor.clock.skew), dict(ingestor.budget_flags), request.app[QUARANTINED]()

    def page() -> bytes:  # the read and its JSON, in a read thread: the event loop is the ingest's too
        rows, last = store.nodes_page(after, limit)
        return json_bytes({"nodes": _with_ingest(skew, flags, quarantined, rows), "next_cursor": _next("nodes", last)})

    return json_response(await request.app[READS].run(page))


async def node(request: web.Request) -> web.Response:
    name = request.match_info["node"]
    gpu_limit = int_query(request, "gpu_limit", NODE_GPUS[0], lo=0, hi=NODE_GPUS[1])
    found = (await request.app[READS].run(request.app[STORE].node, name, gpu_limit or 0)
             if NODE_NAME_RE.match(name) else None)
    if found is None:
        return json_error(404, "no such node", name)
    ingestor = request.app[INGESTOR]
    return web.json_response(_with_ingest(ingestor.clock.skew, ingestor.budget_flags, request.app[QUARANTINED](),
                                          [found])[0])


async def samples(request: web.Request) -> web.Response:
    """A node's sample history from the tier that holds [since, until] in at most `limit`
    points (cloud/store/history.py); `resolution_s` says how far apart they are."""
    name = request.match_info["node"]
    if not NODE_NAME_RE.match(name):
        return json_error(404, "no such node", name)
    since, until = float_query(request, "since"), float_query(request, "until")
    if since is not None and until is not None and since > until:
        raise bad_query("'since' is after 'until'", {"since": since, "until": until})
    limit = int_query(request, "limit", 2000, lo=1, hi=100_000) or 2000
    uuid = request.query.get("uuid") or request.query.get("gpu") or None  # `gpu`: its name before `uuid`
    if uuid is not None and len(uuid) > 512:
        raise bad_query("not a GPU uuid", uuid[:100])
    store = request.app[STORE]

    def read() -> bytes:
        answer = store.history(name, uuid, since, until, limit)
        return json_bytes({"node": name, "tier": answer.tier, "resolution_s": answer.resolution_s,
                           "samples": answer.rows})

    return json_response(await request.app[READS].run(read))


async def events(request: web.Request) -> web.Response:
    limit, cursor = page_query(request, "events", default=ROWS_PAGE[0], maximum=ROWS_PAGE[1])
    node, kind, since = _node_query(request), request.query.get("kind") or None, float_query(request, "since")
    store = request.app[STORE]

    def page() -> bytes:
        rows, last = store.events_page(node, kind, since, limit, cursor)
        return json_bytes({"events": rows, "next_cursor": _next("events", last)})

    try:
        return json_response(await request.app[READS].run(page))
    except ValueError:
        raise bad_query("not a valid cursor", "pass the next_cursor of the previous page unchanged, "
                        "with the same node filter") from None


async def decisions(request: web.Request) -> web.Response:
    limit, cursor = page_query(request, "decisions", default=ROWS_PAGE[0], maximum=ROWS_PAGE[1])
    node, since = _node_query(request), float_query(request, "since")
    store = request.app[STORE]

    def page() -> bytes:
        rows, last = store.decisions_page(node, since, limit, cursor)
        return json_bytes({"decisions": rows, "next_cursor": _next("decisions", last)})

    try:
        return json_response(await request.app[READS].run(page))
    except ValueError:
        raise bad_query("not a valid cursor", "pass the next_cursor of the previous page unchanged, "
                        "with the same node filter") from None
