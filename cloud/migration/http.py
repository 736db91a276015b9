"""The migration part's HTTP API: `GET /api/v1/migrations` and `GET /api/v1/migrations/{id}`,
served on every replica from the store (the leader does the work)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from cloud.migration.repository import MigrationRepository
from shared.http import bad_query, encode_cursor, json_error, page_query
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
        limit, cursor = page_query(request, "migrations", default=100, maximum=10_000)
        if cursor is not None and not (len(cursor) == 1 and isinstance(cursor[0], int)):
            raise bad_query("not a valid cursor", "pass the next_cursor of the previous page unchanged")
        rows = await asyncio.to_thread(repository.migrations, node, state, limit + 1,
                                       cursor[0] if cursor is not None else None)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor("migrations", rows[-1]["id"]) if more else None
        return web.json_response({**note, "migrations": rows, "next_cursor": next_cursor})

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
