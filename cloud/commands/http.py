"""The outbox's HTTP API: `GET /api/v1/commands`, `POST /api/v1/nodes/{node}/commands`."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Protocol

from aiohttp import web

from cloud.commands.model import OperatorCommand
from cloud.store import FleetStore
from shared.http import int_query, json_error, read_model
from shared.logs import get_logger
from shared.protocol import CommandBody
from shared.topics import NODE_NAME_RE

log = get_logger(__name__)


class Outbox(Protocol):
    """What the routes use of the outbox (cloud/commands/outbox.py)."""

    store: FleetStore

    async def send(self, node: str, body: CommandBody, command_id: str | None = None) -> bool: ...

    def recent(self, node: str | None, limit: int, command_id: str | None = None) -> list[dict[str, Any]]: ...


def add_routes(app: web.Application, commands: Outbox) -> None:
    async def list_commands(request: web.Request) -> web.Response:
        node = request.query.get("node") or None
        if node is not None and not NODE_NAME_RE.match(node):
            return json_error(400, "not a valid node name", None)
        limit = int_query(request, "limit", 100, lo=1, hi=1000) or 100
        return web.json_response({"commands": await asyncio.to_thread(commands.recent, node, limit)})

    async def send(request: web.Request) -> web.Response:
        node = request.match_info["node"]
        if not NODE_NAME_RE.match(node):
            return json_error(400, "not a valid node name", None)
        body = await read_model(request, OperatorCommand)
        known = await asyncio.to_thread(commands.store.node, node)
        if known is None:
            return json_error(404, "no such node", node)
        command_id = f"operator-{uuid.uuid4().hex}"
        published = await commands.send(node, CommandBody(command=body.command, gpu_uuid=body.gpu_uuid), command_id)
        log.info("operator command %s for %s%s", body.command, node, "" if published else " (queued: link down)",
                 extra={"node": node, "msg_id": command_id})
        (row,) = await asyncio.to_thread(commands.recent, node, 1, command_id)
        return web.json_response(row, status=202)

    app.router.add_get("/api/v1/commands", list_commands)
    app.router.add_post("/api/v1/nodes/{node}/commands", send)
