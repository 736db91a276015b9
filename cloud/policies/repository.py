"""The policy tables (`policies`, `policy_nodes`) through the fleet store's transactions, and the
one snapshot a reconcile reads. Blocking: call in a thread.

What the parts need of the nodes table (what each node reports, whether it is online, the labels
shown for it) comes from the store's queries (`FleetQueries.node_states`, `node_names`,
`show_labels`), inside the same transaction."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud.policies.resolution import NodeRecord, NodeResolution, NodeView, PolicySource
from cloud.store import DecodedLabels, FleetStore
from cloud.store.schema import policies_table, policy_nodes_table

Step = Callable[[Connection], Any]


@dataclass
class Snapshot:
    """What one reconcile reads, in one transaction."""

    policies: list[PolicySource]
    statuses: dict[str, dict[str, Any]]
    nodes: list[NodeView]  # present nodes only
    records: dict[str, NodeRecord]
    published: dict[str, tuple[int | None, float | None]]  # node -> (version, at), every row
    online: dict[str, bool]  # from the fleet store's nodes table
    absent_published: list[str] = field(default_factory=list)  # gone, but something retained


def _executing(statements: list[Any]) -> list[Step]:
    """Each statement as a step that executes it."""
    return [functools.partial(_execute, stmt) for stmt in statements]


def _execute(stmt: Any, conn: Connection) -> Any:
    return conn.execute(stmt)


def _new_node(node: str, labels: Mapping[str, str], now: float) -> dict[str, Any]:
    return {"node": node, "labels": dict(labels), "present": True, "policy_name": None, "version": 0,
            "content_hash": None, "policy": None, "published_version": None, "published_at": None,
            "updated_at": now}


class PolicyRepository:
    """The two policy tables, on the fleet store's database."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store
        self._labels = DecodedLabels()  # labels JSON text -> labels, once per distinct text
        self._fleet_seen: list[str] | None = None  # the fleet's nodes at the last adoption

    # -- policies ------------------------------------------------------------------------------

    def policies(self) -> list[dict[str, Any]]:
        with self.store.reading("list policies") as conn:
            return [dict(r._mapping) for r in conn.execute(
                sa.select(policies_table).order_by(policies_table.c.name))]

    def policy(self, name: str) -> dict[str, Any] | None:
        with self.store.reading("read policy") as conn:
            row = conn.execute(sa.select(policies_table).where(policies_table.c.name == name)).first()
            return dict(row._mapping) if row else None

    def put_policy(self, name: str, spec: Mapping[str, Any], source: str, now: float) -> tuple[dict[str, Any], bool]:
        """Create or replace; the generation grows when the spec changes. Returns (row, created)."""
        t = policies_table
        with self.store.writing("write policy") as conn:
            row = conn.execute(sa.select(t).where(t.c.name == name)).first()
            if row is None:
                values = {"name": name, "source": source, "spec": dict(spec), "generation": 1,
                          "status": {}, "created_at": now, "updated_at": now}
                conn.execute(t.insert().values(values))
                return values, True
            current = dict(row._mapping)
            if current["spec"] != spec or current["source"] != source:
                current.update(spec=dict(spec), source=source, generation=current["generation"] + 1,
                               updated_at=now)
                conn.execute(t.update().where(t.c.name == name).values(
                    spec=current["spec"], source=source, generation=current["generation"], updated_at=now))
            return current, False

    def delete_policy(self, name: str) -> bool:
        with self.store.writing("delete policy") as conn:
            return bool(conn.execute(policies_table.delete().where(policies_table.c.name == name)).rowcount)

    def _changing(self, op: str, plan: Callable[[Connection], list[Step]]) -> None:
        """Plan in a read transaction; only if there is something to do, plan again and apply it
        in a write transaction. An idle poll then never takes SQLite's write lock."""
        with self.store.reading(op) as conn:
            if not plan(conn):
                return
        with self.store.writing(op) as conn:
            for step in plan(conn):
                step(conn)

    def sync_policies(self, listed: list[tuple[str, dict[str, Any], int | None]], source: str, now: float) -> None:
        """Make the table hold exactly `listed` (name, spec, generation or None: count it here)."""
        t = policies_table

        def plan(conn: Connection) -> list[Step]:
            rows = {r.name: dict(r._mapping) for r in conn.execute(sa.select(t))}
            steps: list[Any] = []
            for name, spec, generation in listed:
                row = rows.get(name)
                if row is None:
                    steps.append(t.insert().values(name=name, source=source, spec=spec, generation=generation or 1,
                                                   status={}, created_at=now, updated_at=now))
                    continue
                spec_changed = row["spec"] != spec
                new_generation = generation if generation is not None else row["generation"] + int(spec_changed)
                if spec_changed or new_generation != row["generation"] or row["source"] != source:
                    steps.append(t.update().where(t.c.name == name).values(
                        spec=spec, generation=new_generation, source=source, updated_at=now))
            gone = sorted(set(rows) - {name for name, _, _ in listed})
            if gone:
                steps.append(t.delete().where(t.c.name.in_(gone)))
            return _executing(steps)

        self._changing("sync policies", plan)

    def save_statuses(self, statuses: Mapping[str, dict[str, Any]]) -> None:
        t = policies_table
        with self.store.writing("save policy status") as conn:
            for name, status in statuses.items():
                conn.execute(t.update().where(t.c.name == name).values(status=status))

    # -- nodes ---------------------------------------------------------------------------------

    def set_labels(self, node: str, labels: Mapping[str, str], now: float) -> None:
        """Labels given over REST (--no-kube): the node exists for policies from now on."""
        stmt = self.store.insert(policy_nodes_table).values(_new_node(node, labels, now))
        with self.store.writing("set node labels") as conn:
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["node"], set_={"labels": dict(labels), "present": True, "updated_at": now}))
            for step in self._mirror_plan(conn):
                step(conn)

    def sync_nodes(self, labels_by_node: Mapping[str, Mapping[str, str]], now: float) -> None:
        """The Kubernetes node list: those listed are present with these labels, others not."""
        t = policy_nodes_table

        def plan(conn: Connection) -> list[Step]:
            rows = {r[0]: (self._labels(r[1]), r[2])
                    for r in conn.execute(sa.select(t.c.node, sa.cast(t.c.labels, sa.Text), t.c.present))}
            steps: list[Any] = []
            for node, labels in labels_by_node.items():
                if node not in rows:
                    steps.append(t.insert().values(_new_node(node, labels, now)))
                elif rows[node] != (dict(labels), True):
                    steps.append(t.update().where(t.c.node == node).values(
                        labels=dict(labels), present=True, updated_at=now))
            gone = sorted(n for n, (_, present) in rows.items() if present and n not in labels_by_node)
            if gone:
                steps.append(t.update().where(t.c.node.in_(gone)).values(present=False, updated_at=now))
            return _executing(steps) + self._mirror_plan(conn)

        self._changing("sync nodes", plan)

    def forget(self) -> None:
        """The next `adopt_fleet_nodes` plans against the whole fleet, changed or not."""
        self._fleet_seen = None

    def adopt_fleet_nodes(self, now: float) -> None:
        """--no-kube: every node the fleet store knows takes part (no labels until given). Only
        when the fleet's nodes are not those of the last call (or after `forget`): a node's
        shown labels change only through this part (`set_labels`, `sync_nodes` mirror them
        themselves) or when it first appears, so an unchanged fleet has nothing to adopt."""
        with self.store.reading("fleet node names") as conn:
            names = self.store.node_names(conn)
        if names == self._fleet_seen:
            return
        self._adopt(now)
        self._fleet_seen = names

    def _adopt(self, now: float) -> None:
        t = policy_nodes_table

        def plan(conn: Connection) -> list[Step]:
            known = set(conn.execute(sa.select(t.c.node)).scalars())
            missing = [name for name in self.store.node_names(conn) if name not in known]
            steps: list[Step] = []
            if missing:
                rows = [_new_node(name, {}, now) for name in missing]
                steps.append(lambda c: c.execute(t.insert(), rows))
            return steps + self._mirror_plan(conn)

        self._changing("adopt fleet nodes", plan)

    def _mirror_plan(self, conn: Connection) -> list[Step]:
        """Show the labels used for matching as the fleet store's node labels (API, dashboard).
        Compared as JSON text, decoded only where the texts differ (a reconcile runs this every
        pass: decoding every node's labels twice was most of its cost at thousands of nodes)."""
        t = policy_nodes_table
        used: dict[str, str] = {r[0]: r[1] for r in conn.execute(sa.select(t.c.node, sa.cast(t.c.labels, sa.Text)))}
        shown = self.store.node_label_texts(conn)
        changed = {name: self._labels(text) for name, text in used.items()
                   if name in shown and shown[name] != text and self._labels(shown[name]) != self._labels(text)}
        return [lambda c: self.store.show_labels(changed, c)] if changed else []

    def snapshot(self) -> Snapshot:
        """Policies, the policy nodes and what each node's edge reports: narrow reads, no JSON
        decoded but the policies' and (once per distinct text) the labels."""
        t = policy_nodes_table
        with self.store.reading("read policy state") as conn:
            policies = [dict(r._mapping) for r in conn.execute(sa.select(policies_table))]
            rows = list(conn.execute(sa.select(
                t.c.node, sa.cast(t.c.labels, sa.Text), t.c.present, t.c.version, t.c.content_hash,
                t.c.published_version, t.c.published_at)))
            reports = self.store.node_reports(conn)
        snap = Snapshot(
            policies=[PolicySource(p["name"], p["spec"], int(p["generation"])) for p in policies],
            statuses={p["name"]: p["status"] or {} for p in policies},
            nodes=[], records={}, published={}, online={},
        )
        for node, labels, present, version, content_hash, published_version, published_at in rows:
            online, reported_name, reported_version = reports.get(node) or (False, None, None)
            snap.records[node] = NodeRecord(int(version), content_hash)
            snap.published[node] = (published_version, published_at)
            snap.online[node] = online
            if present:
                snap.nodes.append(NodeView(node, self._labels(labels), reported_name, reported_version))
            elif published_version is not None or content_hash is not None:
                snap.absent_published.append(node)
        return snap

    def save_resolution(self, changed: list[NodeResolution], forgotten: list[str], now: float) -> None:
        """Store the new versions BEFORE anything is published: a version is never reused."""
        t = policy_nodes_table
        with self.store.writing("save resolution") as conn:
            for r in changed:
                conn.execute(t.update().where(t.c.node == r.node).values(
                    policy_name=r.policy_name, version=r.version, content_hash=r.content_hash,
                    policy=r.policy.dump() if r.policy is not None else None, updated_at=now))
            if forgotten:
                conn.execute(t.update().where(t.c.node.in_(forgotten)).values(
                    policy_name=None, content_hash=None, policy=None, updated_at=now))

    def mark_published(self, published: Mapping[str, int | None], now: float) -> None:
        t = policy_nodes_table
        with self.store.writing("mark published") as conn:
            for node, version in published.items():
                conn.execute(t.update().where(t.c.node == node).values(published_version=version, published_at=now))

    def node_rows(self, policy_name: str | None = None, node: str | None = None) -> list[dict[str, Any]]:
        """The policy view of nodes (what they should run, what they report), by name."""
        t = policy_nodes_table
        query = sa.select(t).order_by(t.c.node)
        if policy_name is not None:
            query = query.where(t.c.policy_name == policy_name)
        if node is not None:
            query = query.where(t.c.node == node)
        with self.store.reading("read policy nodes") as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
            few = [row["node"] for row in rows] if len(rows) <= 100 else None
            states = self.store.node_states(conn, few) if rows else {}
        return [node_out(row, states.get(row["node"])) for row in rows]


def node_out(row: dict[str, Any], state: Mapping[str, Any] | None) -> dict[str, Any]:
    """A `policy_nodes` row with what its edge reports (None for a node that never reported)."""
    reported_name = state["policy_name"] if state else None
    reported_version = state["policy_version"] if state else None
    applied = (row["policy_name"] is not None
               and (reported_name, reported_version) == (row["policy_name"], row["version"]))
    return {
        "node": row["node"], "labels": row["labels"], "present": row["present"],
        "policy_name": row["policy_name"], "version": row["version"] if row["policy_name"] else None,
        "policy": row["policy"], "published_version": row["published_version"],
        "published_at": row["published_at"], "reported_name": reported_name,
        "reported_version": reported_version, "online": state["online"] if state else None, "applied": applied,
    }
