"""The edge daemon's HTTP API: /healthz, /metrics, /api/v1/* and, with the simulated driver
only, the fault-injection endpoint. Reads come from the daemon's memory or the store (in a
thread); nothing here touches NVML on the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from edge.metrics import make_registry, render
from edge.sim import SimFault, SimRefused
from edge.store import StoreError, decisions_table, events_table
from shared import __version__
from shared.gpu import GpuInventory, GpuSample, Health
from shared.http import (
    MAX_BODY_BYTES,
    REQUEST_TIMEOUT,
    RejectionCollector,
    error_middleware,
    handler_args,
    int_query,
    json_error,
    read_model,
    track_rejections,
)
from shared.logs import get_logger
from shared.openapi import OpenApi, add_spec_route, load
from shared.policy import PowerPolicy

if TYPE_CHECKING:
    from edge.daemon import EdgeDaemon

log = get_logger(__name__)
DAEMON: web.AppKey[EdgeDaemon] = web.AppKey("daemon")


OPENAPI_FILE = Path(__file__).with_name("openapi.yaml")


def openapi_spec(features: Iterable[str] = ()) -> OpenApi:
    """edge/openapi.yaml completed from the rows, models and enums this API really returns and
    takes (the names its `x-kgpu-*` markers use), with the operations of `features` ("sim")."""
    return load(OPENAPI_FILE, features,
                tables={"decisions": decisions_table, "events": events_table},
                models={"GpuInventory": GpuInventory, "GpuSample": GpuSample, "PowerPolicy": PowerPolicy,
                        "SimFault": SimFault},
                enums={"Health": Health})


def make_app(daemon: EdgeDaemon) -> web.Application:
    """Every route is described in edge/openapi.yaml, served at /api/v1/openapi.json (the fault
    endpoint, and its description, only with the simulated driver)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES,
                          handler_args=handler_args(daemon.settings.http_header_timeout))
    app[REQUEST_TIMEOUT] = daemon.settings.http_request_timeout
    app[DAEMON] = daemon
    registry = make_registry(daemon)
    registry.register(RejectionCollector(track_rejections(app)))
    add_spec_route(app, openapi_spec({"sim"} if daemon.sim is not None else ()))

    async def metrics(_: web.Request) -> web.Response:
        body = render(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/gpus", gpus)
    app.router.add_get("/api/v1/decisions", decisions)
    app.router.add_get("/api/v1/events", events)
    app.router.add_get("/api/v1/policy", policy)
    app.router.add_get("/api/v1/energy", energy)
    if daemon.sim is not None:
        app.router.add_post("/api/v1/sim/gpus/{index}", sim_inject)
        app.router.add_post("/api/v1/sim/gpus/{index}/reset", sim_reset)
        app.router.add_post("/api/v1/sim/gpus/{index}/diag", sim_diag)
        app.router.add_post("/api/v1/sim/reboot", sim_reboot)
    return app


async def healthz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    healthy, reasons, degraded = daemon.health_report()
    body = {
        "status": "ok" if healthy else "unhealthy",
        "node": daemon.node,
        "version": __version__,
        "backend": daemon.backend.backend,  # nvml, jetson, amd or intel (edge/devices/)
        "vendor": daemon.backend.vendor,
        "reasons": reasons,
        "degraded": degraded,
        "uptime_s": round(time.time() - daemon.started_at, 1),
    }
    return web.json_response(body, status=200 if healthy else 503)


async def gpus(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    out: list[dict[str, Any]] = []
    for index, view in sorted(daemon.gpus.items()):
        out.append(
            {
                "index": index,
                "inventory": view.inventory.model_dump(mode="json"),
                "sample": view.sample.model_dump(mode="json") if view.sample else None,
                "health": {
                    "state": view.health.health.value,
                    "reasons": list(view.health.reasons),
                    "since": view.health.since,
                },
                "policy_state": {
                    "thermal_steps": view.policy_state.thermal_steps,
                    "clocks_locked_mhz": view.policy_state.clocks_locked_mhz,
                    "power_saving_active": view.policy_state.saving_active,
                    "target_limit_w": view.policy_state.target_limit_w,
                },
                "last_xid": view.last_xid,
                "draining": view.draining,
                # the ladder's stage (edge/remediation/), as the status says it; None: in service. From the
                # manager, not the view: a ladder resumed at start holds its stage before the first cycle
                "remediation": daemon.remediation.stage(view.inventory.uuid),
            }
        )
    return web.json_response({"node": daemon.node, "gpus": out})


async def decisions(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    limit = int_query(request, "limit", 100, lo=1, hi=10_000)
    before = int_query(request, "before", None, lo=-(2**62), hi=2**62)  # <= 0 after a new epoch
    gpu = request.query.get("gpu") or None
    rule = request.query.get("rule") or None
    try:
        rows = await asyncio.to_thread(daemon.store.decisions, limit or 100, before, gpu, rule)
    except StoreError as exc:
        return json_error(503, "store unavailable", str(exc))
    return web.json_response({"node": daemon.node, "decisions": rows})


async def events(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    limit = int_query(request, "limit", 100, lo=1, hi=10_000)
    kind = request.query.get("kind") or None
    try:
        rows = await asyncio.to_thread(daemon.store.events, limit or 100, kind)
    except StoreError as exc:
        return json_error(503, "store unavailable", str(exc))
    return web.json_response({"node": daemon.node, "events": rows})


async def policy(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    return web.json_response(
        {"node": daemon.node, "source": daemon.policy_source, "policy": daemon.policy.dump()}
    )


async def energy(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    return web.json_response({"node": daemon.node, **daemon.energy.snapshot()})


def _sim(request: web.Request) -> Any:
    simulated = request.app[DAEMON].sim
    assert simulated is not None  # the sim routes exist only with the simulated driver
    return simulated


def _sim_index(request: web.Request) -> int | None:
    """The {index} of a sim route; None when it is not a GPU index at all (404)."""
    raw_index = request.match_info["index"]
    if not (raw_index.isascii() and raw_index.isdigit() and len(raw_index) <= 4):
        return None
    return int(raw_index)


async def sim_reset(request: web.Request) -> web.Response:
    """What `nvidia-smi --gpu-reset -i <index>` does to the simulated GPU (edge/sim/tools)."""
    simulated = _sim(request)
    index = _sim_index(request)
    if index is None:
        return json_error(404, "no such GPU", request.match_info["index"][:100])
    try:
        result = await asyncio.to_thread(simulated.gpu_reset, index)
    except IndexError:
        return json_error(404, "no such GPU", index)
    except SimRefused as exc:
        return json_error(409, "reset refused", {"reason": exc.reason, "message": str(exc),
                                                 "pci_bus_id": simulated.gpus[index].pci_bus_id})
    log.info("simulated GPU %s reset (effective: %s)", index, result["effective"])
    return web.json_response(result)


async def sim_diag(request: web.Request) -> web.Response:
    """What `dcgmi diag -r <level> -i <index>` finds on the simulated GPU (edge/sim/tools)."""
    simulated = _sim(request)
    level = int_query(request, "level", 1, lo=1, hi=4) or 1
    index = _sim_index(request)
    if index is None:
        return json_error(404, "no such GPU", request.match_info["index"][:100])
    try:
        result = await asyncio.to_thread(simulated.diagnose, index, level)
    except IndexError:
        return json_error(404, "no such GPU", index)
    return web.json_response(result)


async def sim_reboot(request: web.Request) -> web.Response:
    """Reboot the simulated node: every GPU fresh, the driver reloaded (the daemon keeps running
    and initialises NVML again, as a restarted daemon would)."""
    simulated = _sim(request)
    result = await asyncio.to_thread(simulated.reboot)
    log.warning("simulated node rebooted (boot %s)", result["boots"])
    return web.json_response(result)


async def sim_inject(request: web.Request) -> web.Response:
    simulated = _sim(request)
    raw_index = request.match_info["index"]
    if _sim_index(request) is None:
        return json_error(404, "no such GPU", raw_index[:100])
    fault = await read_model(request, SimFault)
    try:
        state = await asyncio.to_thread(simulated.inject, int(raw_index), fault)
    except IndexError:
        return json_error(404, "no such GPU", int(raw_index))
    except ValueError as exc:
        return json_error(400, "fault refused", str(exc))
    log.info("simulated fault injected on GPU %s: %s", raw_index, fault.model_dump(exclude_none=True))
    return web.json_response({"index": int(raw_index), "state": state})
