"""The reboot part's storage: its table `reboots` (one row per REBOOT_REQUEST event, keyed by
the event's id, so a request is taken once whichever replica leads and however often the edge
sent it), and the fleet view the breaker decides on, read in one transaction.

Blocking: the manager calls it in a thread. Node liveness and GPU health are read through the
store's methods (`FleetQueries`), and so are the requests: the stored events that have no row yet.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa

from cloud.commands.repository import CommandRepository
from cloud.reboots.breaker import Decision, Ended, Grant, NodeState, Verdict, command_id
from cloud.store import FleetStore
from cloud.store.schema import reboots_table
from shared.gpu import Health

REQUEST_BATCH = 500  # new requests taken per scan
OPEN_VERDICTS = (str(Verdict.HOLD), str(Verdict.DENY))  # decided again on every scan


@dataclass(frozen=True)
class RequestRow:
    """A reboot request as stored (or about to be): what the edge asked and the current verdict."""

    event_id: int
    node: str
    seq: int
    gpu_index: int | None
    gpu_uuid: str | None
    reason: str
    attempt: int
    requested_at: float
    received_at: float
    verdict: str | None = None  # None: new, not decided yet
    why: str | None = None


@dataclass
class Snapshot:
    """What one scan decides on."""

    new: list[RequestRow] = field(default_factory=list)
    open: list[RequestRow] = field(default_factory=list)  # held or denied: decided again
    grants: list[Grant] = field(default_factory=list)  # in the window, or still in progress
    nodes: dict[str, NodeState] = field(default_factory=dict)
    granted: dict[int, RequestRow] = field(default_factory=dict)  # each grant's own request, by its id


class RebootRepository:
    """Reads and writes of the reboot part."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store
        self.commands = CommandRepository(store)  # the outbox's rows: the edge's answer to a grant

    def load(self, now: float, lookback_s: float) -> Snapshot:
        """New requests, open ones, the grants of the last `lookback_s` (or still unended) and the
        nodes' state, in one read; the nodes only when there is something to decide or follow."""
        r = reboots_table
        snap = Snapshot()
        with self.store.reading("reboot scan") as conn:
            snap.new = [_new_request(row) for row in self.store.reboot_requests(REQUEST_BATCH, conn)]
            snap.open = [_request(dict(row._mapping)) for row in conn.execute(
                sa.select(r).where(r.c.verdict.in_(OPEN_VERDICTS)).order_by(r.c.event_id))]
            grants: dict[str, Grant] = {}  # one per reboot: a grant's rows share its command
            for row in conn.execute(
                    sa.select(r).where(r.c.verdict == str(Verdict.GRANT),
                                       sa.or_(r.c.ended_at.is_(None), r.c.granted_at >= now - lookback_s))
                    .order_by(r.c.event_id)):
                if (row.command_id or command_id(row.event_id)) not in grants:
                    grants[row.command_id or command_id(row.event_id)] = _grant(dict(row._mapping))
                    snap.granted[int(row.event_id)] = _request(dict(row._mapping))
            snap.grants = list(grants.values())
            if not (snap.new or snap.open or any(g.ended_at is None for g in snap.grants)):
                return snap  # nothing to decide or follow: the fleet is not read
            liveness = self.store.node_liveness(conn)
            healthy: Counter[str] = Counter(g["node"] for g in self.store.gpu_states(conn)
                                            if g["health"] == Health.HEALTHY)
        for i, g in enumerate(snap.grants):
            if g.ended_at is None:  # the edge's answer to the reboot command, when it refused it
                answer = self.commands.recent(g.node, 1, command_id(g.request_id))
                if answer and answer[0]["result_at"] is not None and not answer[0]["ok"]:
                    snap.grants[i] = replace(g, refusal=str(answer[0]["detail"] or "refused"))
        snap.nodes = {name: NodeState(online=online, last_seen=seen, healthy_gpus=healthy[name])
                      for name, (online, seen) in liveness.items()}
        return snap

    def save(self, new: Sequence[RequestRow], decisions: Mapping[int, Decision], grants: Sequence[Grant],
             now: float) -> None:
        """New rows (a row already there wins: the request is taken once), changed verdicts,
        and grants whose progress changed, in one transaction. `decisions` holds only verdicts
        that changed (by request id)."""
        r = reboots_table
        with self.store.writing("save reboots") as conn:
            rows = [{**_row(req), **_decided(decisions[req.event_id], now)}
                    for req in new if req.event_id in decisions]
            if rows:
                conn.execute(self.store.insert(r).on_conflict_do_nothing(index_elements=["event_id"]), rows)
            fresh = {req.event_id for req in new}
            for rid, d in decisions.items():
                if rid not in fresh:
                    conn.execute(r.update().where(r.c.event_id == rid, r.c.verdict.in_(OPEN_VERDICTS))
                                 .values(**_decided(d, now)))
            for g in grants:
                conn.execute(r.update().where(r.c.command_id == command_id(g.request_id),
                                              r.c.verdict == str(Verdict.GRANT))
                             .values(down_at=g.down_at, ended_at=g.ended_at,
                                     ended=str(g.ended) if g.ended is not None else None))

    def mark_down(self, nodes: Mapping[str, float]) -> int:
        """Nodes that said they went offline (at cloud time): their reboots granted before that and
        not yet seen down are now seen down. Any replica's ingest calls this."""
        r = reboots_table
        count = 0
        with self.store.writing("reboot: node went offline") as conn:
            for node, at in nodes.items():
                count += int(conn.execute(
                    r.update().where(r.c.node == node, r.c.verdict == str(Verdict.GRANT), r.c.ended_at.is_(None),
                                     r.c.down_at.is_(None), r.c.granted_at <= at)
                    .values(down_at=at)).rowcount or 0)
        return count

    def reboots(self, node: str | None = None, verdict: str | None = None, limit: int = 100,
                before_id: int | None = None) -> list[dict[str, Any]]:
        """Rows for the API, newest request first; with `before_id`, those older than it (a page)."""
        r = reboots_table
        query = sa.select(r).order_by(r.c.event_id.desc()).limit(limit)
        if node is not None:
            query = query.where(r.c.node == node)
        if verdict is not None:
            query = query.where(r.c.verdict == verdict)
        if before_id is not None:
            query = query.where(r.c.event_id < before_id)
        with self.store.reading("reboots") as conn:
            return [dict(row._mapping) for row in conn.execute(query)]


def _new_request(row: Mapping[str, Any]) -> RequestRow:
    """A stored `reboot_request` event (FleetQueries.reboot_requests) as a request to decide."""
    body = row["body"] if isinstance(row["body"], Mapping) else {}
    index, attempt = body.get("gpu_index"), body.get("attempt")
    return RequestRow(
        event_id=int(row["id"]), node=row["node"], seq=int(row["seq"]),
        gpu_index=index if isinstance(index, int) else None,
        gpu_uuid=str(body["gpu_uuid"])[:200] if body.get("gpu_uuid") else None,
        reason=str(body.get("reason") or "")[:2000],
        attempt=attempt if isinstance(attempt, int) and attempt >= 1 else 1,
        requested_at=float(row["ts"]), received_at=float(row["received_at"]))


def _request(row: Mapping[str, Any]) -> RequestRow:
    return RequestRow(event_id=int(row["event_id"]), node=row["node"], seq=int(row["seq"]),
                      gpu_index=row["gpu_index"], gpu_uuid=row["gpu_uuid"], reason=row["reason"],
                      attempt=int(row["attempt"]), requested_at=float(row["requested_at"]),
                      received_at=float(row["received_at"]), verdict=row["verdict"], why=row["why"])


def _grant(row: Mapping[str, Any]) -> Grant:
    return Grant(request_id=int(row["event_id"]), node=row["node"], site=row["site"],
                 granted_at=float(row["granted_at"]), down_at=row["down_at"], ended_at=row["ended_at"],
                 ended=Ended(row["ended"]) if row["ended"] else None)


def _row(req: RequestRow) -> dict[str, Any]:
    return {"event_id": req.event_id, "node": req.node, "seq": req.seq, "gpu_index": req.gpu_index,
            "gpu_uuid": req.gpu_uuid, "reason": req.reason, "attempt": req.attempt,
            "requested_at": req.requested_at, "received_at": req.received_at}


def _decided(d: Decision, now: float) -> dict[str, Any]:
    granted = d.verdict is Verdict.GRANT
    return {"site": d.site, "verdict": str(d.verdict), "why": d.why, "decided_at": now,
            "granted_at": now if granted else None, "command_id": d.command_id if granted else None}
