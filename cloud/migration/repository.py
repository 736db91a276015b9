"""The migration part's storage: its own tables (`migrations`, `migration_triggers`) and the
fleet view a scan decides on, read through the store's methods in one transaction.

The row is the truth across restarts (steps and pods are recorded right after each API call), so
every write is one transaction through `store.writing()`; the fleet's tables are read through
`FleetQueries` (cloud/store/queries.py), never directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa

from cloud.migration.fleet_view import FleetView
from cloud.migration.model import (
    ACTIVE_STATES,
    GpuView,
    Migration,
    RequestEvent,
    World,
)
from cloud.migration.triggers import unhealthy_since
from cloud.store import FleetStore
from cloud.store.schema import migration_triggers_table, migrations_table
from shared.gpu import Health

REQUEST_MAX_AGE_S = 3600.0  # older migration_request events are left to the gpu-unhealthy trigger
REQUEST_BATCH = 500  # requests taken per scan


class MigrationRepository:
    """Reads and writes of the migration part (blocking: the manager calls it in a thread)."""

    def __init__(self, store: FleetStore, view: FleetView | None = None) -> None:
        self.store = store
        self.view = view or FleetView()  # the GPUs, re-read only where they changed (fleet_view.py)

    def load(self, now: float) -> tuple[World, list[Migration], dict[str, float]]:
        """The fleet view, the open migrations and each node's last start, in one read."""
        t = migrations_table
        active = [str(s) for s in ACTIVE_STATES]
        with self.store.reading("migration scan") as conn:
            migrations = [Migration.from_row(dict(r._mapping)) for r in conn.execute(
                sa.select(t).where(t.c.state.in_(active)).order_by(t.c.id))]
            last_started = {r.node: float(r.started) for r in conn.execute(
                sa.select(t.c.node, sa.func.max(t.c.started_at).label("started"))
                .where(t.c.started_at.is_not(None)).group_by(t.c.node))}
            # Not the samples: at thousands of nodes, decoding every GPU's JSON each scan cost as
            # much as the ingest. Only placement needs them (`samples`, when a migration runs).
            fleet = self.view.read(self.store, conn)
            requests = [_request(r) for r in self.store.migration_requests(
                now - REQUEST_MAX_AGE_S, REQUEST_BATCH, conn)]
            watched = fleet.not_healthy | {m.node for m in migrations} | {r.node for r in requests}
            health = self.store.gpu_health_history(sorted(watched), conn=conn)
        gpus = fleet.gpus  # a copy of the view's: the watched nodes' GPUs get their health events
        for node in watched & gpus.keys():
            gpus[node] = tuple(_with_events(g, health.get((node, g.uuid), [])) for g in gpus[node])
        world = World(nodes=fleet.nodes, gpus=gpus, requests=tuple(requests), pod_sources=fleet.pod_sources)
        return world, migrations, last_started

    def samples(self) -> dict[tuple[str, str], Mapping[str, Any]]:
        """The latest sample of every GPU, by (node, uuid): what placement scores targets by."""
        return self.store.gpu_samples()

    def save(self, new: Sequence[Migration], changed: Sequence[Migration], now: float) -> None:
        """New rows, changed rows and consumed request events, in one transaction."""
        t, trig = migrations_table, migration_triggers_table
        with self.store.writing("save migrations") as conn:
            for m in new:
                mid = conn.execute(t.insert().values(m.row()).returning(t.c.id)).scalar_one()
                for event_id in m.consumed:
                    conn.execute(trig.insert().values(event_id=event_id, migration_id=mid, at=now))
            for m in changed:
                conn.execute(t.update().where(t.c.id == m.id).values(m.row()))
                for event_id in m.consumed:
                    conn.execute(trig.insert().values(event_id=event_id, migration_id=m.id, at=now))

    def update(self, m: Migration) -> None:
        """One migration's row as it is now (a step was just recorded)."""
        t = migrations_table
        with self.store.writing("update migration") as conn:
            conn.execute(t.update().where(t.c.id == m.id).values(m.row()))

    def migrations(self, node: str | None = None, state: str | None = None,
                   limit: int = 100, before_id: int | None = None) -> list[dict[str, Any]]:
        """Rows for the API, newest first (by id); with `before_id`, those older than it (a page)."""
        t = migrations_table
        query = sa.select(t).order_by(t.c.id.desc()).limit(limit)
        if node is not None:
            query = query.where(t.c.node == node)
        if state is not None:
            query = query.where(t.c.state == state)
        if before_id is not None:
            query = query.where(t.c.id < before_id)
        with self.store.reading("migrations") as conn:
            return [_out(dict(r._mapping)) for r in conn.execute(query)]

    def migration(self, mid: int) -> dict[str, Any] | None:
        """One row for the API, or None."""
        t = migrations_table
        with self.store.reading("migration") as conn:
            row = conn.execute(sa.select(t).where(t.c.id == mid)).first()
        return _out(dict(row._mapping)) if row is not None else None


def _with_events(g: GpuView, events: Sequence[tuple[float, float, str]]) -> GpuView:
    """The GPU with what its health events say (newest first), for a node the scan watches."""
    if not events:
        return g
    healthy_ts = next((ts for ts, _, cur in events if cur == Health.HEALTHY), None)
    return replace(g, unhealthy_since=unhealthy_since(events), last_event=(events[0][0], events[0][2]),
                   healthy_event_ts=healthy_ts)


def _request(r: Mapping[str, Any]) -> RequestEvent:
    body = r["body"] or {}
    return RequestEvent(int(r["id"]), r["node"], float(r["ts"]), float(r["received_at"]),
                        body.get("gpu_uuid"), str(body.get("trigger") or "request"),
                        str(body.get("reason") or ""))


def _out(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["subjects"] = list(out.get("subjects") or [])
    out["pods"] = dict(out.get("pods") or {})
    out["steps"] = list(out.get("steps") or [])
    return out
