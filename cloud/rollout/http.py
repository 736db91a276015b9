"""The rollouts' HTTP API: create, list, read, roll back, cancel (`/api/v1/rollouts`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from aiohttp import web

from cloud.kube import Kube
from cloud.rollout.plan import ACTIVE, RolloutState
from cloud.rollout.repository import RolloutRepository
from cloud.rollout.request import RolloutRequest
from cloud.rollout.views import RolloutRefused, node_out, rollout_out
from shared.http import int_query, json_error, read_model
from shared.logs import get_logger

log = get_logger(__name__)


class Rollouts(Protocol):
    """What the routes use of the part (cloud/rollout/manager.py)."""

    repo: RolloutRepository
    kube: Kube | None

    async def create(self, req: RolloutRequest) -> dict[str, Any]: ...

    def wake(self) -> None: ...


def _id(request: web.Request) -> int | None:
    text = request.match_info["id"]
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None


def add_routes(app: web.Application, manager: Rollouts) -> None:
    repo = manager.repo

    async def create(request: web.Request) -> web.Response:
        if manager.kube is None:
            # 409, not 503: the controller's mode refuses it, and a client retrying will not help
            return json_error(409, "rollouts need a cluster", "the controller runs with --no-kube")
        body = await read_model(request, RolloutRequest)
        try:
            created = await manager.create(body)
        except RolloutRefused as exc:
            return json_error(exc.status, exc.error, exc.detail)
        return web.json_response(created, status=201)

    async def list_rollouts(request: web.Request) -> web.Response:
        limit = int_query(request, "limit", 50, lo=1, hi=1000) or 50
        rows = await asyncio.to_thread(repo.recent, limit)
        return web.json_response({"rollouts": [rollout_out(r, counts) for r, counts in rows]})

    async def get(request: web.Request) -> web.Response:
        rollout_id = _id(request)
        row = await asyncio.to_thread(repo.get, rollout_id) if rollout_id is not None else None
        if row is None:
            return json_error(404, "no such rollout", request.match_info["id"])
        nodes, fleet = await asyncio.gather(asyncio.to_thread(repo.nodes_of, row["id"]),
                                            asyncio.to_thread(repo.fleet))
        counts: dict[str, int] = {}
        for n in nodes:
            counts[n["state"]] = counts.get(n["state"], 0) + 1
        out = rollout_out(row, counts)
        out["nodes"] = [node_out(n, fleet.get(n["node"])) for n in nodes]
        return web.json_response(out)

    async def rollback(request: web.Request) -> web.Response:
        rollout_id = _id(request)
        if rollout_id is None or await asyncio.to_thread(repo.get, rollout_id) is None:
            return json_error(404, "no such rollout", request.match_info["id"])
        if not await asyncio.to_thread(repo.update, rollout_id, {RolloutState.RUNNING.value},
                                       rollback_requested=True):
            return json_error(409, "only a running rollout can be rolled back", rollout_id)
        manager.wake()
        return web.json_response({"id": rollout_id, "rollbackRequested": True}, status=202)

    async def cancel(request: web.Request) -> web.Response:
        rollout_id = _id(request)
        if rollout_id is None or await asyncio.to_thread(repo.get, rollout_id) is None:
            return json_error(404, "no such rollout", request.match_info["id"])
        if not await asyncio.to_thread(
            repo.update, rollout_id, {s.value for s in ACTIVE}, state=RolloutState.CANCELLED.value,
            active=None, finished_at=time.time(), reason="cancelled by an operator: the template is left as it is",
        ):
            return json_error(409, "the rollout is not active", rollout_id)
        log.info("rollout cancelled", extra={"rollout": rollout_id})
        return web.json_response({"id": rollout_id, "state": RolloutState.CANCELLED.value})

    app.router.add_post("/api/v1/rollouts", create)
    app.router.add_get("/api/v1/rollouts", list_rollouts)
    app.router.add_get("/api/v1/rollouts/{id}", get)
    app.router.add_post("/api/v1/rollouts/{id}/rollback", rollback)
    app.router.add_post("/api/v1/rollouts/{id}/cancel", cancel)
