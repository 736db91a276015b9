"""Commands to edge nodes, sent again until the edge answers.

A QoS 1 publish is not the end of a command's road: the broker drops what it queued for a node
whose session was taken over, expired or lost with a broker that restarted without its
persistence file, and a node that never connected has no session to queue into at all. The edge
applies each command id at most once and answers with a `command_result` event, so the controller
can safely send the same command again until that answer is stored: at-least-once delivery,
at-most-once effect.

- `send()` stores the command (table `edge_commands`) before it first publishes it, so a command
  survives a controller restart too; its id decides: a second `send()` of an id is a no-op.
- The leader re-publishes every pending command of an online node every `--command-resend-interval`
  (30 s), for at most `--command-ttl` (1 h; after that it is `expired`: the situation it was for is
  long gone).
- Every replica's ingest marks the results (a result reaches whichever replica's share of the
  subscription it falls in).

Operators send `drain`, `undrain` and `restart_check` with `POST /api/v1/nodes/{node}/commands`
and read them back from `GET /api/v1/commands`; the migration subsystem sends its own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from aiohttp import web
from pydantic import Field

from cloud.ingest import Incoming
from cloud.store import metadata, nodes_table
from shared.http import int_query, json_error, read_model
from shared.logs import get_logger
from shared.protocol import CommandBody, CommandResultBody, Kind, make_envelope
from shared.topics import NODE_NAME_RE, cloud_topic
from shared.wire import CamelModel

if TYPE_CHECKING:
    from cloud.controller import Controller

log = get_logger(__name__)

SCAN_INTERVAL_S = 1.0

edge_commands_table = sa.Table(
    "edge_commands",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # the envelope id: the edge applies it once
    sa.Column("node", sa.String(253), nullable=False),
    sa.Column("command", sa.String(32), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # the envelope, exactly as published each time
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("sent_at", sa.Float),  # last publish the broker took; NULL: not yet
    sa.Column("sends", sa.Integer, nullable=False),
    sa.Column("result_at", sa.Float),  # when the edge's command_result was stored
    sa.Column("ok", sa.Boolean),
    sa.Column("detail", sa.Text),
    sa.Index("ix_edge_commands_result_at_created_at", "result_at", "created_at"),
)


class OperatorCommand(CamelModel):
    """`POST /api/v1/nodes/{node}/commands` body. `migrate_away` is the migration subsystem's."""

    command: Literal["drain", "undrain", "restart_check"]
    gpu_uuid: str | None = Field(None, min_length=1, max_length=96)


def command_state(row: dict[str, Any], now: float, ttl_s: float) -> str:
    if row["result_at"] is not None:
        return "done" if row["ok"] else "failed"
    return "expired" if now - row["created_at"] > ttl_s else "pending"


class EdgeCommands:
    """The controller's command outbox (see the module docstring)."""

    name = "edge-commands"

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.store = controller.store
        self.resend_interval_s = controller.settings.command_resend_interval
        self.ttl_s = controller.settings.command_ttl
        self.resends = 0
        controller.ingestor.listeners.append(self._on_batch)

    # -- sending --------------------------------------------------------------------------------

    async def send(self, node: str, body: CommandBody, command_id: str | None = None) -> bool:
        """Store the command and publish it; True when the broker took it now (if not, the
        leader sends it later). A second call with the same id stores and sends nothing new."""
        envelope = make_envelope(node, body, Kind.COMMAND)
        if command_id is not None:
            envelope = envelope.model_copy(update={"id": command_id})
        payload = envelope.to_json()
        created = await asyncio.to_thread(self._insert, envelope.id, node, body.command, payload)
        if not created:
            return True
        return await self._publish(envelope.id, node, payload)

    async def _publish(self, command_id: str, node: str, payload: bytes) -> bool:
        if not self.controller.publish(cloud_topic(node, "commands"), payload):
            return False
        await asyncio.to_thread(self._mark_sent, command_id, time.time())
        return True

    async def lead(self) -> None:
        """Re-send what no edge has answered yet, while its node is online."""
        while True:
            try:
                for command_id, node, payload, sends in await asyncio.to_thread(self._due, time.time()):
                    if await self._publish(command_id, node, payload.encode()):
                        self.resends += 1
                        log.info("command %s sent again (no result after %d sends)", command_id, sends,
                                 extra={"node": node, "msg_id": command_id})
            except Exception as exc:  # the database away: try again at the next scan
                log.error("re-sending edge commands failed: %s", exc)
            await asyncio.sleep(SCAN_INTERVAL_S)

    async def _on_batch(self, batch: list[Incoming]) -> None:
        results = [(i.envelope.node, i.body) for i in batch
                   if i.envelope.kind is Kind.COMMAND_RESULT and isinstance(i.body, CommandResultBody)]
        if results:
            await asyncio.to_thread(self._mark_results, results, time.time())

    # -- the database ---------------------------------------------------------------------------

    def _writer(self) -> sa.Engine:
        return self.store.engine.execution_options(kgpu_begin="IMMEDIATE")

    def _insert(self, command_id: str, node: str, command: str, payload: bytes) -> bool:
        t = edge_commands_table
        with self._writer().connect() as conn, conn.begin():
            if conn.execute(sa.select(t.c.id).where(t.c.id == command_id)).first() is not None:
                return False
            conn.execute(t.insert().values(id=command_id, node=node, command=command, payload=payload.decode(),
                                           created_at=time.time(), sends=0))
        return True

    def _mark_sent(self, command_id: str, now: float) -> None:
        t = edge_commands_table
        with self._writer().connect() as conn, conn.begin():
            conn.execute(t.update().where(t.c.id == command_id).values(sent_at=now, sends=t.c.sends + 1))

    def _due(self, now: float) -> list[tuple[str, str, str, int]]:
        t, n = edge_commands_table, nodes_table
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.c.id, t.c.node, t.c.payload, t.c.sends).join(n, n.c.name == t.c.node)
                .where(t.c.result_at.is_(None), t.c.created_at >= now - self.ttl_s, n.c.online.is_(True),
                       sa.or_(t.c.sent_at.is_(None), t.c.sent_at <= now - self.resend_interval_s))
                .order_by(t.c.created_at).limit(500))
            return [(r.id, r.node, r.payload, int(r.sends)) for r in rows]

    def _mark_results(self, results: list[tuple[str, CommandResultBody]], now: float) -> None:
        t = edge_commands_table
        with self._writer().connect() as conn, conn.begin():
            for node, result in results:
                conn.execute(t.update().where(t.c.id == result.command_id, t.c.node == node, t.c.result_at.is_(None))
                             .values(result_at=now, ok=result.ok, detail=result.detail[:2000]))

    def recent(self, node: str | None, limit: int, command_id: str | None = None) -> list[dict[str, Any]]:
        """Commands newest first, each with its `state` (pending, done, failed, expired)."""
        t = edge_commands_table
        query = sa.select(t.c.id, t.c.node, t.c.command, t.c.created_at, t.c.sent_at, t.c.sends, t.c.result_at,
                          t.c.ok, t.c.detail)
        if node is not None:
            query = query.where(t.c.node == node)
        if command_id is not None:
            query = query.where(t.c.id == command_id)
        with self.store.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query.order_by(t.c.created_at.desc()).limit(limit))]
        now = time.time()
        return [{**row, "state": command_state(row, now, self.ttl_s)} for row in rows]

    # -- HTTP -----------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/commands", self._http_list)
        app.router.add_post("/api/v1/nodes/{node}/commands", self._http_send)

    async def _http_list(self, request: web.Request) -> web.Response:
        node = request.query.get("node") or None
        if node is not None and not NODE_NAME_RE.match(node):
            return json_error(400, "not a valid node name", None)
        limit = int_query(request, "limit", 100, lo=1, hi=1000) or 100
        return web.json_response({"commands": await asyncio.to_thread(self.recent, node, limit)})

    async def _http_send(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        if not NODE_NAME_RE.match(node):
            return json_error(400, "not a valid node name", None)
        body = await read_model(request, OperatorCommand)
        known = await asyncio.to_thread(self.store.node, node)
        if known is None:
            return json_error(404, "no such node", node)
        command_id = f"operator-{uuid.uuid4().hex}"
        published = await self.send(node, CommandBody(command=body.command, gpu_uuid=body.gpu_uuid), command_id)
        log.info("operator command %s for %s%s", body.command, node, "" if published else " (queued: link down)",
                 extra={"node": node, "msg_id": command_id})
        (row,) = await asyncio.to_thread(self.recent, node, 1, command_id)
        return web.json_response(row, status=202)
