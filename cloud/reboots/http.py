"""The reboot part's HTTP API: `GET /api/v1/reboots`, the edges' reboot requests with the circuit
breaker's verdicts, newest first; served on every replica from the store (the leader decides)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from cloud.reboots.breaker import Verdict
from cloud.reboots.repository import RebootRepository
from shared.http import bad_query, encode_cursor, page_query
from shared.topics import NODE_NAME_RE

VERDICTS = frozenset(str(v) for v in Verdict)


def add_routes(app: web.Application, repository: RebootRepository) -> None:

    async def list_reboots(request: web.Request) -> web.Response:
        node = request.query.get("node") or None
        if node is not None and not NODE_NAME_RE.match(node):
            raise bad_query("not a valid node name", node[:300])
        verdict = request.query.get("verdict") or None
        if verdict is not None and verdict not in VERDICTS:
            raise bad_query("not a verdict", {"verdict": verdict[:100], "verdicts": sorted(VERDICTS)})
        limit, cursor = page_query(request, "reboots", default=100, maximum=10_000)
        if cursor is not None and not (len(cursor) == 1 and type(cursor[0]) is int and 0 < cursor[0] < 2**63):
            raise bad_query("not a valid cursor", "pass the next_cursor of the previous page unchanged")
        rows = await asyncio.to_thread(repository.reboots, node, verdict, limit + 1,
                                       cursor[0] if cursor is not None else None)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor("reboots", rows[-1]["event_id"]) if more else None
        return web.json_response({"reboots": [_out(r) for r in rows], "next_cursor": next_cursor})

    app.router.add_get("/api/v1/reboots", list_reboots)


def _out(row: dict[str, Any]) -> dict[str, Any]:
    """A row with where its reboot stands: `in-progress` from the grant until it ended (then
    `back`, `refused` or `timed-out`); None for a request not granted."""
    out = dict(row)
    out["reboot"] = (None if row["verdict"] != Verdict.GRANT
                     else row["ended"] or "in-progress")
    return out
