"""The `edge_commands` table, through the fleet store's transactions. Blocking: call in a thread."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from cloud.store import FleetStore
from cloud.store.schema import edge_commands_table
from shared.protocol import CommandResultBody

DUE_BATCH = 500  # at most this many commands re-sent per scan


class CommandRepository:
    def __init__(self, store: FleetStore) -> None:
        self.store = store

    def insert(self, command_id: str, node: str, command: str, payload: bytes) -> bool:
        """Store a new command; False (nothing written) if its id is stored already."""
        t = edge_commands_table
        with self.store.writing("store edge command") as conn:
            if conn.execute(sa.select(t.c.id).where(t.c.id == command_id)).first() is not None:
                return False
            conn.execute(t.insert().values(id=command_id, node=node, command=command, payload=payload.decode(),
                                           created_at=time.time(), sends=0))
        return True

    def mark_sent(self, command_id: str, now: float) -> None:
        t = edge_commands_table
        with self.store.writing("mark edge command sent") as conn:
            conn.execute(t.update().where(t.c.id == command_id).values(sent_at=now, sends=t.c.sends + 1))

    def due(self, now: float, ttl_s: float, resend_interval_s: float) -> list[tuple[str, str, str, int]]:
        """(id, node, payload, sends) of the oldest unanswered, unexpired commands of online
        nodes not sent within `resend_interval_s`."""
        t = edge_commands_table
        with self.store.reading("due edge commands") as conn:
            online = self.store.online_nodes(conn)
            if not online:
                return []
            pending = conn.execute(
                sa.select(t.c.id, t.c.node, t.c.sends)
                .where(t.c.result_at.is_(None), t.c.created_at >= now - ttl_s,
                       sa.or_(t.c.sent_at.is_(None), t.c.sent_at <= now - resend_interval_s))
                .order_by(t.c.created_at))
            due = [(r.id, r.node, int(r.sends)) for r in pending if r.node in online][:DUE_BATCH]
            if not due:
                return []
            payloads = {r.id: r.payload for r in conn.execute(
                sa.select(t.c.id, t.c.payload).where(t.c.id.in_([d[0] for d in due])))}
        return [(cid, node, payloads[cid], sends) for cid, node, sends in due if cid in payloads]

    def mark_results(self, results: list[tuple[str, CommandResultBody]], now: float) -> None:
        t = edge_commands_table
        with self.store.writing("store edge command results") as conn:
            for node, result in results:
                conn.execute(t.update().where(t.c.id == result.command_id, t.c.node == node, t.c.result_at.is_(None))
                             .values(result_at=now, ok=result.ok, detail=result.detail[:2000]))

    def recent(self, node: str | None, limit: int, command_id: str | None = None) -> list[dict[str, Any]]:
        """Stored commands, newest first (without their payload)."""
        t = edge_commands_table
        query = sa.select(t.c.id, t.c.node, t.c.command, t.c.created_at, t.c.sent_at, t.c.sends, t.c.result_at,
                          t.c.ok, t.c.detail)
        if node is not None:
            query = query.where(t.c.node == node)
        if command_id is not None:
            query = query.where(t.c.id == command_id)
        with self.store.reading("list edge commands") as conn:
            return [dict(r._mapping) for r in conn.execute(query.order_by(t.c.created_at.desc()).limit(limit))]
