"""The rollout tables (`rollouts`, `rollout_nodes`) through the fleet store's transactions.
Blocking: call in a thread. What the fleet's nodes report comes from the store's queries
(`FleetQueries.node_states`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from cloud.rollout.plan import (
    ACTIVE,
    Action,
    DeletePod,
    NodeState,
    OpenWave,
    RolloutState,
    SetRolloutState,
    Transition,
)
from cloud.store import FleetStore, FleetStoreError
from cloud.store.schema import rollout_nodes_table, rollouts_table


class ActiveRolloutExists(Exception):
    def __init__(self, rollout_id: int | None) -> None:
        super().__init__(f"rollout {rollout_id} is still active")
        self.rollout_id = rollout_id


class RolloutRepository:
    """The rollout tables, on the fleet store's database."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store

    def active(self) -> dict[str, Any] | None:
        with self.store.reading("read the active rollout") as conn:
            row = conn.execute(sa.select(rollouts_table).where(rollouts_table.c.active.is_not(None))).first()
        return dict(row._mapping) if row else None

    def get(self, rollout_id: int) -> dict[str, Any] | None:
        with self.store.reading("read rollout") as conn:
            row = conn.execute(sa.select(rollouts_table).where(rollouts_table.c.id == rollout_id)).first()
        return dict(row._mapping) if row else None

    def recent(self, limit: int) -> list[tuple[dict[str, Any], dict[str, int]]]:
        t, n = rollouts_table, rollout_nodes_table
        with self.store.reading("list rollouts") as conn:
            rows = [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(t.c.id.desc()).limit(limit))]
            counts: dict[int, dict[str, int]] = {r["id"]: {} for r in rows}
            if rows:
                for rid, state, count in conn.execute(
                    sa.select(n.c.rollout_id, n.c.state, sa.func.count())
                    .where(n.c.rollout_id.in_(list(counts)))
                    .group_by(n.c.rollout_id, n.c.state)
                ):
                    counts[rid][state] = int(count)
        return [(r, counts[r["id"]]) for r in rows]

    def nodes_of(self, rollout_id: int) -> list[dict[str, Any]]:
        n = rollout_nodes_table
        with self.store.reading("read rollout nodes") as conn:
            return [dict(r._mapping) for r in conn.execute(
                sa.select(n).where(n.c.rollout_id == rollout_id).order_by(n.c.wave, n.c.node))]

    def fleet(self) -> dict[str, dict[str, Any]]:
        """node -> what it reports (online, daemon_version, degraded, last_seen)."""
        return self.store.node_states()

    def create(self, row: dict[str, Any], nodes: list[dict[str, Any]]) -> int:
        try:
            with self.store.writing("create rollout") as conn:
                active = conn.execute(
                    sa.select(rollouts_table.c.id).where(rollouts_table.c.active.is_not(None))
                ).first()
                if active is not None:
                    raise ActiveRolloutExists(int(active.id))
                rollout_id = int(conn.execute(rollouts_table.insert().values(**row)
                                              .returning(rollouts_table.c.id)).scalar_one())
                for start in range(0, len(nodes), 500):
                    conn.execute(rollout_nodes_table.insert(),
                                 [{**node, "rollout_id": rollout_id} for node in nodes[start:start + 500]])
        except FleetStoreError as exc:
            if isinstance(exc.__cause__, IntegrityError):  # another replica's POST won the active slot
                raise ActiveRolloutExists(None) from None
            raise
        return rollout_id

    def apply(self, rollout_id: int, expect: str, actions: Sequence[Action], now: float) -> bool:
        """Store a tick's decisions in one transaction; False (nothing written) if the rollout
        left state `expect` meanwhile (cancelled over the API, or another leader moved it)."""
        r = rollouts_table
        with self.store.writing("store rollout decisions") as conn:
            current = conn.execute(sa.select(r.c.state, r.c.reason).where(r.c.id == rollout_id)).first()
            if current is None or current.state != expect:
                return False
            values: dict[str, Any] = {"updated_at": now}
            for action in actions:
                if isinstance(action, OpenWave):
                    values["wave"] = action.wave
                elif isinstance(action, SetRolloutState):
                    reason = action.reason
                    if action.state == RolloutState.ROLLED_BACK and current.reason:
                        reason = f"{current.reason}; {reason}"  # keep why it was rolled back
                    values.update(state=action.state.value, reason=reason)
                    if action.state not in ACTIVE:
                        values.update(active=None, finished_at=now)
                elif isinstance(action, Transition):
                    _store_transition(conn, rollout_id, action, now)
            conn.execute(r.update().where(r.c.id == rollout_id).values(**values))
        return True

    def store_deleted(self, rollout_id: int, deleted: list[DeletePod], now: float) -> None:
        """Store the follow-up of each pod deleted, if its node still waits on exactly that pod
        (a later leader may have moved it on: never step a node back)."""
        n = rollout_nodes_table
        with self.store.writing("store deleted pods") as conn:
            for d in deleted:
                _store_transition(conn, rollout_id, d.then, now, n.c.state == NodeState.POD_DELETION_REQUIRED.value,
                                  n.c.marked_pod == d.pod)

    def update(self, rollout_id: int, expect: set[str], **values: Any) -> bool:
        """Change the rollout row if it is in one of the states `expect`."""
        r = rollouts_table
        with self.store.writing("update rollout") as conn:
            result = conn.execute(r.update().where(r.c.id == rollout_id, r.c.state.in_(expect))
                                  .values(updated_at=time.time(), **values))
        return bool(result.rowcount)


def _store_transition(conn: Connection, rollout_id: int, t: Transition, now: float, *guards: Any) -> None:
    n = rollout_nodes_table
    values = {**t.changes(now), "state": t.to.value, "reason": t.reason}
    if t.from_version is not None:
        values["from_version"] = t.from_version
    conn.execute(n.update().where(n.c.rollout_id == rollout_id, n.c.node == t.node, *guards).values(**values))
