"""The migration part's HTTP API: `GET /api/v1/migrations` and `GET /api/v1/migrations/{id}`,
served on every replica from the store (the leader does the work)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from cloud.migration.repository import MigrationRepository
from shared.http import int_query, json_error
from shared.topics import NODE_NAME_RE

NO_CLUSTER_DETAIL = ("this controller runs with --no-kube: migration triggers are recorded as "
                     "needs-cluster and nothing is moved")


def add_routes(app: web.Application, repository: MigrationRepository, *, has_kube: bool) -> None:
    note: dict[str, Any] = ({"cluster": True} if has_kube
                            else {"cluster": False, "detail": NO_CLUSTER_DETAIL})

    async def list_migrations(request: web.Request) -> web.Response:
        node = request.query.get("node") or None
        if node is not None and not NODE_NAME_RE.match(node):
            return json_error(400, "not a valid node name", node)
        state = request.query.get("state") or None
        limit = int_query(request, "limit", 100, lo=1, hi=10_000) or 100
        rows = await asyncio.to_thread(repository.migrations, node, state, limit)
        return web.json_response({**note, "migrations": rows})

    async def one_migration(request: web.Request) -> web.Response:
        raw = request.match_info["id"]
        if not (raw.isascii() and raw.isdigit() and len(raw) < 19):
            return json_error(400, "a migration id is a positive integer", raw[:100])
        row = await asyncio.to_thread(repository.migration, int(raw))
        if row is None:
            return json_error(404, "no such migration", int(raw))
        return web.json_response({**note, **row})

    app.router.add_get("/api/v1/migrations", list_migrations)
    app.router.add_get("/api/v1/migrations/{id}", one_migration)
