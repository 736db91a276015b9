"""`EdgeCommands`: the command outbox (see the package docstring). Every part sends its edge
commands through it (`Services.commands`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from cloud.commands.http import add_routes
from cloud.commands.model import command_state
from cloud.commands.repository import CommandRepository
from cloud.config import CloudSettings
from cloud.services import BatchBus, Periodic, Publish
from cloud.store import FleetStore, FleetStoreError, Incoming
from shared.logs import get_logger
from shared.protocol import CommandBody, CommandResultBody, Kind, make_envelope
from shared.topics import cloud_topic

log = get_logger(__name__)

SCAN_INTERVAL_S = 1.0


class EdgeCommands:
    """The controller's command outbox; implements `cloud.services.CommandSender`."""

    name = "edge-commands"

    def __init__(self, *, settings: CloudSettings, store: FleetStore, publish: Publish, batches: BatchBus) -> None:
        self.store = store
        self.repo = CommandRepository(store)
        self.publish = publish
        self.resend_interval_s = settings.command_resend_interval
        self.ttl_s = settings.command_ttl
        self.resends = 0
        batches.subscribe(self._on_batch, kinds=[Kind.COMMAND_RESULT])

    # -- sending --------------------------------------------------------------------------------

    async def send(self, node: str, body: CommandBody, command_id: str | None = None) -> bool:
        """Store the command and publish it; True when the broker took it now (if not, the
        leader sends it later). A second call with the same id stores and sends nothing new."""
        envelope = make_envelope(node, body, Kind.COMMAND)
        if command_id is not None:
            envelope = envelope.model_copy(update={"id": command_id})
        payload = envelope.to_json()
        created = await asyncio.to_thread(self.repo.insert, envelope.id, node, body.command, payload)
        if not created:
            return True
        return await self._publish(envelope.id, node, payload)

    async def _publish(self, command_id: str, node: str, payload: bytes) -> bool:
        if not self.publish(cloud_topic(node, "commands"), payload):
            return False
        await asyncio.to_thread(self.repo.mark_sent, command_id, time.time())
        return True

    # -- the leader's loop ----------------------------------------------------------------------

    def periodic(self) -> Sequence[Periodic]:
        return [Periodic("re-sending edge commands", self.resend_due, SCAN_INTERVAL_S,
                         expected=(FleetStoreError,))]

    async def resend_due(self) -> None:
        """Re-send what no edge has answered yet, while its node is online."""
        due = await asyncio.to_thread(self.repo.due, time.time(), self.ttl_s, self.resend_interval_s)
        for command_id, node, payload, sends in due:
            if await self._publish(command_id, node, payload.encode()):
                self.resends += 1
                log.info("command %s sent again (no result after %d sends)", command_id, sends,
                         extra={"node": node, "msg_id": command_id})

    async def _on_batch(self, batch: list[Incoming]) -> None:
        results = [(i.envelope.node, i.body) for i in batch
                   if i.envelope.kind is Kind.COMMAND_RESULT and isinstance(i.body, CommandResultBody)]
        if results:
            await asyncio.to_thread(self.repo.mark_results, results, time.time())

    # -- reading back ---------------------------------------------------------------------------

    def recent(self, node: str | None, limit: int, command_id: str | None = None) -> list[dict[str, Any]]:
        """Commands newest first, each with its `state` (pending, done, failed, expired). Blocking."""
        rows = self.repo.recent(node, limit, command_id)
        now = time.time()
        return [{**row, "state": command_state(row, now, self.ttl_s)} for row in rows]

    def add_routes(self, app: web.Application) -> None:
        add_routes(app, self)
