"""GPU power policies: `GPUPowerPolicy` objects (or the REST API) → one retained policy per node.

Sources, one per mode (one source of truth each):

* With a cluster, the `GPUPowerPolicy` objects (kgpu.io/v1alpha1, cluster-scoped) and the
  Kubernetes nodes' labels, polled every `poll_interval` seconds by the leader. The REST API
  then only reads: PUT/DELETE answer 409, because a policy written there would be overwritten
  by the next poll (or would disagree with what `kubectl get gpupowerpolicies` shows).
* With `--no-kube`, `PUT|GET|DELETE /api/v1/policies/{name}` and node labels from
  `PUT /api/v1/nodes/{node}/labels` (a node without labels matches empty selectors only). The
  nodes are then those the fleet store knows plus those given labels.

The leader's reconcile loop (`lead()`) resolves every node with the pure rules of
`cloud.policy_resolution`, stores each node's version and content hash (version first, publish
second, so a crash can repeat a publish but never reuse a version), then publishes each changed
policy RETAINED with QoS 1 on `kgpu/v1/cloud/<node>/policy`. Retained means an edge that is
offline, or has never connected yet, gets it from the broker the moment it (re)subscribes: no
one has to act when it comes back. An online node that still reports an older version after
`resend_after` gets the message again (covers a broker that lost its retained store).

A node that no policy matches gets nothing: its edge keeps the policy it has (its config's, or
the last one from the cloud, which it caches). If the cloud had published one before, the
retained message is cleared (an empty retained payload), so an edge installed afresh starts
from its config and not from a policy that no longer selects it.

"Applied" comes from the edges' status (`policy_name`/`policy_version` in the nodes table):
a node is applied when it reports exactly the resolved name and version, pending otherwise.
Each policy's status (`observedGeneration`, `nodesMatched`, `applied`, `pending`, conditions
`Valid` and `Applied`) is stored and, with a cluster, written to the object's status
subresource when it changes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from cloud.kube import Kube, KubeError
from cloud.policy_resolution import (
    POLICY_NAME_RE,
    NodeRecord,
    NodeResolution,
    NodeView,
    PolicySource,
    Resolution,
    ValidPolicy,
    policy_statuses,
    resolve,
    validate_labels,
    validate_spec,
)
from cloud.store import FleetStore, FleetStoreError, Incoming, JsonType, metadata, nodes_table
from shared.aio import wait_event
from shared.http import invalid_body, json_error, read_json
from shared.logs import get_logger
from shared.openapi import conform_body
from shared.protocol import Kind, PolicyBody, StatusBody, make_envelope
from shared.topics import NODE_NAME_RE, cloud_topic

if TYPE_CHECKING:
    from cloud.controller import Controller

log = get_logger(__name__)

GROUP, VERSION, PLURAL = "kgpu.io", "v1alpha1", "gpupowerpolicies"
SOURCE_KUBERNETES, SOURCE_API = "kubernetes", "api"
POLL_INTERVAL_S = 2.0  # list policies and nodes this often (and reconcile at least this often)
MIN_GAP_S = 0.2  # between two reconciles, however often something wakes the loop
RESEND_PENDING_S = 30.0  # publish again to an online node still reporting another version
WARN_EVERY_S = 60.0  # the same failure is logged at most this often
MODE_CONFLICT = "policies come from GPUPowerPolicy objects in this mode"
LABELS_CONFLICT = "node labels come from the Kubernetes nodes in this mode"

# ---- tables (kept identical to migrations/versions/0002_policies.py) -------------------------

policies_table = sa.Table(
    "policies",
    metadata,
    sa.Column("name", sa.String(253), primary_key=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("spec", JsonType, nullable=False),
    sa.Column("generation", sa.BigInteger, nullable=False),
    sa.Column("status", JsonType, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

policy_nodes_table = sa.Table(
    "policy_nodes",
    metadata,
    sa.Column("node", sa.String(253), primary_key=True),
    sa.Column("labels", JsonType, nullable=False),
    sa.Column("present", sa.Boolean, nullable=False),
    sa.Column("policy_name", sa.String(253)),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.String(64)),
    sa.Column("policy", JsonType),
    sa.Column("published_version", sa.Integer),
    sa.Column("published_at", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("ix_policy_nodes_policy_name", "policy_name"),
)


# ---- storage --------------------------------------------------------------------------------


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


class PolicyTables:
    """The two policy tables, on the fleet store's database. Blocking: call in a thread."""

    def __init__(self, store: FleetStore) -> None:
        self.engine = store.engine
        self.dialect = self.engine.dialect.name
        # SQLite: take the write lock at BEGIN (as the store does), so two writers never deadlock
        self._write_engine = self.engine.execution_options(kgpu_begin="IMMEDIATE")
        self._lock = threading.Lock() if self.dialect == "sqlite" else None

    @contextmanager
    def _tx(self, op: str, write: bool = False) -> Iterator[Connection]:
        engine = self._write_engine if write else self.engine
        try:
            if write and self._lock is not None:
                with self._lock, engine.begin() as conn:
                    yield conn
            else:
                with engine.begin() as conn:
                    yield conn
        except SQLAlchemyError as exc:
            reason = str(exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc)
            reason = (reason.strip().splitlines() or [type(exc).__name__])[0]
            raise FleetStoreError(f"policies: {op} failed: {reason}", reason=reason) from exc

    def _insert(self, table: sa.Table) -> Any:
        return pg_insert(table) if self.dialect == "postgresql" else sqlite_insert(table)

    # -- policies ------------------------------------------------------------------------------

    def policies(self) -> list[dict[str, Any]]:
        with self._tx("list policies") as conn:
            return [dict(r._mapping) for r in conn.execute(
                sa.select(policies_table).order_by(policies_table.c.name))]

    def policy(self, name: str) -> dict[str, Any] | None:
        with self._tx("read policy") as conn:
            row = conn.execute(sa.select(policies_table).where(policies_table.c.name == name)).first()
            return dict(row._mapping) if row else None

    def put_policy(self, name: str, spec: Mapping[str, Any], source: str, now: float) -> tuple[dict[str, Any], bool]:
        """Create or replace; the generation grows when the spec changes. Returns (row, created)."""
        t = policies_table
        with self._tx("write policy", write=True) as conn:
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
        with self._tx("delete policy", write=True) as conn:
            return bool(conn.execute(policies_table.delete().where(policies_table.c.name == name)).rowcount)

    def _changing(self, op: str, plan: Callable[[Connection], list[Callable[[Connection], Any]]]) -> None:
        """Plan in a read transaction; only if there is something to do, plan again and apply it
        in a write transaction. An idle poll then never takes SQLite's write lock."""
        with self._tx(op) as conn:
            if not plan(conn):
                return
        with self._tx(op, write=True) as conn:
            for step in plan(conn):
                step(conn)

    def sync_policies(self, listed: list[tuple[str, dict[str, Any], int | None]], source: str, now: float) -> None:
        """Make the table hold exactly `listed` (name, spec, generation or None: count it here)."""
        t = policies_table

        def plan(conn: Connection) -> list[Callable[[Connection], Any]]:
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
            return [lambda c, stmt=stmt: c.execute(stmt) for stmt in steps]

        self._changing("sync policies", plan)

    def save_statuses(self, statuses: Mapping[str, dict[str, Any]]) -> None:
        t = policies_table
        with self._tx("save policy status", write=True) as conn:
            for name, status in statuses.items():
                conn.execute(t.update().where(t.c.name == name).values(status=status))

    # -- nodes ---------------------------------------------------------------------------------

    def _new_node(self, node: str, labels: Mapping[str, str], now: float) -> dict[str, Any]:
        return {"node": node, "labels": dict(labels), "present": True, "policy_name": None, "version": 0,
                "content_hash": None, "policy": None, "published_version": None, "published_at": None,
                "updated_at": now}

    def set_labels(self, node: str, labels: Mapping[str, str], now: float) -> None:
        """Labels given over REST (--no-kube): the node exists for policies from now on."""
        stmt = self._insert(policy_nodes_table).values(self._new_node(node, labels, now))
        with self._tx("set node labels", write=True) as conn:
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["node"], set_={"labels": dict(labels), "present": True, "updated_at": now}))
            for step in self._mirror_plan(conn):
                step(conn)

    def sync_nodes(self, labels_by_node: Mapping[str, Mapping[str, str]], now: float) -> None:
        """The Kubernetes node list: those listed are present with these labels, others not."""
        t = policy_nodes_table

        def plan(conn: Connection) -> list[Callable[[Connection], Any]]:
            rows = {r.node: (r.labels, r.present) for r in conn.execute(sa.select(t.c.node, t.c.labels, t.c.present))}
            steps: list[Any] = []
            for node, labels in labels_by_node.items():
                if node not in rows:
                    steps.append(t.insert().values(self._new_node(node, labels, now)))
                elif rows[node] != (dict(labels), True):
                    steps.append(t.update().where(t.c.node == node).values(
                        labels=dict(labels), present=True, updated_at=now))
            gone = sorted(n for n, (_, present) in rows.items() if present and n not in labels_by_node)
            if gone:
                steps.append(t.update().where(t.c.node.in_(gone)).values(present=False, updated_at=now))
            return [lambda c, stmt=stmt: c.execute(stmt) for stmt in steps] + self._mirror_plan(conn)

        self._changing("sync nodes", plan)

    def adopt_fleet_nodes(self, now: float) -> None:
        """--no-kube: every node the fleet store knows takes part (no labels until given)."""
        t, n = policy_nodes_table, nodes_table

        def plan(conn: Connection) -> list[Callable[[Connection], Any]]:
            missing = list(conn.execute(
                sa.select(n.c.name).where(~sa.exists().where(t.c.node == n.c.name))).scalars())
            steps: list[Callable[[Connection], Any]] = []
            if missing:
                rows = [self._new_node(name, {}, now) for name in missing]
                steps.append(lambda c: c.execute(t.insert(), rows))
            return steps + self._mirror_plan(conn)

        self._changing("adopt fleet nodes", plan)

    def _mirror_plan(self, conn: Connection) -> list[Callable[[Connection], Any]]:
        """Copy the labels used for matching into the fleet store's nodes.labels (dashboard)."""
        t, n = policy_nodes_table, nodes_table
        rows = conn.execute(sa.select(n.c.name, n.c.labels, t.c.labels).join(t, t.c.node == n.c.name))
        return [lambda c, name=name, used=used: c.execute(n.update().where(n.c.name == name).values(labels=used))
                for name, shown, used in list(rows) if shown != used]

    def snapshot(self) -> Snapshot:
        t, n = policy_nodes_table, nodes_table
        with self._tx("read policy state") as conn:
            policies = [dict(r._mapping) for r in conn.execute(sa.select(policies_table))]
            rows = list(conn.execute(
                sa.select(t, n.c.policy_name.label("reported_name"), n.c.policy_version.label("reported_version"),
                          n.c.online).select_from(t.outerjoin(n, n.c.name == t.c.node))))
        snap = Snapshot(
            policies=[PolicySource(p["name"], p["spec"], int(p["generation"])) for p in policies],
            statuses={p["name"]: p["status"] or {} for p in policies},
            nodes=[], records={}, published={}, online={},
        )
        for r in rows:
            snap.records[r.node] = NodeRecord(int(r.version), r.content_hash)
            snap.published[r.node] = (r.published_version, r.published_at)
            snap.online[r.node] = bool(r.online)
            if r.present:
                snap.nodes.append(NodeView(r.node, dict(r.labels or {}), r.reported_name, r.reported_version))
            elif r.published_version is not None or r.content_hash is not None:
                snap.absent_published.append(r.node)
        return snap

    def save_resolution(self, changed: list[NodeResolution], forgotten: list[str], now: float) -> None:
        """Store the new versions BEFORE anything is published: a version is never reused."""
        t = policy_nodes_table
        with self._tx("save resolution", write=True) as conn:
            for r in changed:
                conn.execute(t.update().where(t.c.node == r.node).values(
                    policy_name=r.policy_name, version=r.version, content_hash=r.content_hash,
                    policy=r.policy.dump() if r.policy is not None else None, updated_at=now))
            if forgotten:
                conn.execute(t.update().where(t.c.node.in_(forgotten)).values(
                    policy_name=None, content_hash=None, policy=None, updated_at=now))

    def mark_published(self, published: Mapping[str, int | None], now: float) -> None:
        t = policy_nodes_table
        with self._tx("mark published", write=True) as conn:
            for node, version in published.items():
                conn.execute(t.update().where(t.c.node == node).values(published_version=version, published_at=now))

    def node_rows(self, policy_name: str | None = None, node: str | None = None) -> list[dict[str, Any]]:
        t, n = policy_nodes_table, nodes_table
        query = (sa.select(t, n.c.policy_name.label("reported_name"), n.c.policy_version.label("reported_version"),
                           n.c.online).select_from(t.outerjoin(n, n.c.name == t.c.node)).order_by(t.c.node))
        if policy_name is not None:
            query = query.where(t.c.policy_name == policy_name)
        if node is not None:
            query = query.where(t.c.node == node)
        with self._tx("read policy nodes") as conn:
            return [_node_out(dict(r._mapping)) for r in conn.execute(query)]


def _node_out(row: dict[str, Any]) -> dict[str, Any]:
    applied = (row["policy_name"] is not None
               and (row["reported_name"], row["reported_version"]) == (row["policy_name"], row["version"]))
    return {
        "node": row["node"], "labels": row["labels"], "present": row["present"],
        "policy_name": row["policy_name"], "version": row["version"] if row["policy_name"] else None,
        "policy": row["policy"], "published_version": row["published_version"],
        "published_at": row["published_at"], "reported_name": row["reported_name"],
        "reported_version": row["reported_version"], "online": row["online"], "applied": applied,
    }


def _policy_out(row: Mapping[str, Any]) -> dict[str, Any]:
    checked = validate_spec(row["name"], row["spec"], int(row["generation"]))
    spec = row["spec"] if isinstance(row["spec"], Mapping) else {}
    out = {
        "name": row["name"], "source": row["source"], "generation": row["generation"],
        "spec": row["spec"], "status": row["status"] or {},
        "created_at": row["created_at"], "updated_at": row["updated_at"],
    }
    if isinstance(checked, ValidPolicy):
        policy = checked.policy.dump()
        policy.pop("version", None)
        out.update(valid=True, reason=None, errors=[], priority=checked.priority,
                   node_selector=dict(checked.node_selector), policy=policy)
    else:
        out.update(valid=False, reason=checked.reason, errors=[e.as_dict() for e in checked.errors],
                   priority=spec.get("priority"), node_selector=spec.get("nodeSelector"), policy=None)
    return out


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- the subsystem --------------------------------------------------------------------------


class PolicyManager:
    """Resolves and publishes per-node power policies (leader only); serves /api/v1/policies."""

    name = "policies"

    def __init__(self, controller: Controller, *, poll_interval: float = POLL_INTERVAL_S,
                 resend_after: float = RESEND_PENDING_S) -> None:
        self.controller = controller
        self.tables = PolicyTables(controller.store)
        self.poll_interval = poll_interval
        self.resend_after = resend_after
        self._wake = asyncio.Event()
        self._reported: dict[str, tuple[str | None, int | None]] = {}  # as of the last reconcile
        self._warned: dict[str, float] = {}
        controller.ingestor.listeners.append(self._on_batch)

    @property
    def kube(self) -> Kube | None:
        return self.controller.kube

    # -- leader loop ---------------------------------------------------------------------------

    async def lead(self) -> None:
        log.info("policy reconciler started", extra={"source": SOURCE_KUBERNETES if self.kube else SOURCE_API})
        while True:
            self._wake.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except FleetStoreError as exc:
                self._warn("store", f"policy reconcile: {exc}")
            except Exception:
                log.exception("policy reconcile failed")
            await wait_event(self._wake, self.poll_interval)
            await asyncio.sleep(MIN_GAP_S)

    def wake(self) -> None:
        self._wake.set()

    async def _on_batch(self, batch: list[Incoming]) -> None:
        """A node reporting a policy other than when we last looked: reconcile now (applied
        counts move, a new node gets its policy) rather than at the next poll."""
        for item in batch:
            body = item.body
            if not isinstance(body, StatusBody) or body.state != "online":
                continue
            reported = (body.policy_name, body.policy_version)
            if self._reported.get(item.envelope.node) != reported:
                self._reported[item.envelope.node] = reported  # wake once per change, not per status
                self._wake.set()

    async def reconcile(self) -> Resolution:
        """One pass: read the sources, resolve, store, publish, write statuses."""
        now = time.time()
        kube = self.kube
        if kube is not None:
            await self._pull_from_kubernetes(kube, now)
        else:
            await asyncio.to_thread(self.tables.adopt_fleet_nodes, now)
        snap = await asyncio.to_thread(self.tables.snapshot)
        resolution = resolve(snap.policies, snap.nodes, snap.records)
        changed = [r for r in resolution.nodes.values() if r.changed]
        if changed or snap.absent_published:
            await asyncio.to_thread(self.tables.save_resolution, changed, snap.absent_published, now)
            for r in changed:
                if r.policy is not None:
                    log.info("node policy resolved", extra={"node": r.node, "policy": r.policy_name, "version": r.version})
                else:
                    log.info("no policy selects the node any more; its edge keeps the policy it has",
                             extra={"node": r.node})
        await self._publish(resolution, snap, now)
        statuses = policy_statuses(resolution, snap.statuses, _rfc3339(now))
        await self._write_statuses(statuses, snap.statuses)
        self._reported.update({n.name: (n.reported_name, n.reported_version) for n in snap.nodes})
        return resolution

    async def _pull_from_kubernetes(self, kube: Kube, now: float) -> None:
        """List the GPUPowerPolicy objects and the nodes; on an API failure keep the stored state."""
        try:
            listed = await kube.call(kube.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
            items = list(listed.get("items") or [])
        except KubeError as exc:
            if not exc.not_found:
                self._warn("list-policies", f"cannot list GPUPowerPolicy objects (keeping the last known): {exc}")
                return
            self._warn("no-crd", "GPUPowerPolicy is not served by the API server (CRD not installed?): no policies")
            items = []
        try:
            nodes = await kube.call(kube.core.list_node)
        except KubeError as exc:
            self._warn("list-nodes", f"cannot list nodes (keeping the last known labels): {exc}")
            nodes = None
        policies: list[tuple[str, dict[str, Any], int | None]] = []
        for item in items:
            meta = item.get("metadata") or {}
            name = meta.get("name")
            if not isinstance(name, str):
                continue
            spec = item.get("spec")
            generation = meta.get("generation")
            policies.append((name, spec if isinstance(spec, dict) else {},
                             generation if isinstance(generation, int) else None))
        await asyncio.to_thread(self.tables.sync_policies, policies, SOURCE_KUBERNETES, now)
        if nodes is not None:
            labels = {n.metadata.name: dict(n.metadata.labels or {}) for n in nodes.items
                      if n.metadata and n.metadata.name and NODE_NAME_RE.match(n.metadata.name)}
            await asyncio.to_thread(self.tables.sync_nodes, labels, now)

    async def _publish(self, resolution: Resolution, snap: Snapshot, now: float) -> None:
        """Publish (retained) what the broker does not hold yet; clear what no longer applies."""
        done: dict[str, int | None] = {}
        failed = 0
        for r in resolution.nodes.values():
            published_version, published_at = snap.published.get(r.node, (None, None))
            if r.policy is not None:
                resend = (published_version == r.version and not r.applied and snap.online.get(r.node, False)
                          and now - (published_at or 0.0) >= self.resend_after)
                if published_version == r.version and not resend:
                    continue
                payload = make_envelope(r.node, PolicyBody(policy=r.policy), Kind.POLICY).to_json()
                if self.controller.publish(cloud_topic(r.node, "policy"), payload, retain=True):
                    done[r.node] = r.version
                    log.info("policy published" if not resend else "policy published again (node still pending)",
                             extra={"node": r.node, "policy": r.policy_name, "version": r.version})
                else:
                    failed += 1
            elif published_version is not None:
                if self._clear(r.node):
                    done[r.node] = None
                else:
                    failed += 1
        for node in snap.absent_published:
            if snap.published.get(node, (None, None))[0] is not None:
                if self._clear(node):
                    done[node] = None
                else:
                    failed += 1
        if done:
            await asyncio.to_thread(self.tables.mark_published, done, now)
        if failed:
            self._warn("publish", f"MQTT link down: {failed} policy message(s) not published; retrying")

    def _clear(self, node: str) -> bool:
        """Remove the retained policy (zero-length retained payload); the edge keeps its own."""
        if self.controller.publish(cloud_topic(node, "policy"), b"", retain=True):
            log.info("retained policy cleared: no policy selects the node", extra={"node": node})
            return True
        return False

    async def _write_statuses(self, statuses: dict[str, dict[str, Any]], before: Mapping[str, Any]) -> None:
        changed = {name: s for name, s in statuses.items() if before.get(name) != s}
        if not changed:
            return
        kube = self.kube
        saved: dict[str, dict[str, Any]] = {}
        for name, status in changed.items():
            if kube is not None:
                try:
                    await kube.call(kube.custom.patch_cluster_custom_object_status, GROUP, VERSION, PLURAL, name,
                                    {"status": status})
                except KubeError as exc:
                    if not exc.not_found:  # deleted meanwhile: the next poll drops it
                        self._warn(f"status-{name}", f"cannot write the status of GPUPowerPolicy {name}: {exc}")
                    continue
            saved[name] = status
        if saved:
            await asyncio.to_thread(self.tables.save_statuses, saved)

    def _warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[key] = now
            log.warning(message)

    # -- HTTP ----------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/policies", self._list)
        app.router.add_get("/api/v1/policies/{name}", self._get)
        app.router.add_put("/api/v1/policies/{name}", self._put)
        app.router.add_delete("/api/v1/policies/{name}", self._delete)
        app.router.add_put("/api/v1/nodes/{node}/labels", self._put_labels)
        app.router.add_get("/api/v1/nodes/{node}/policy", self._node_policy)

    async def _list(self, _: web.Request) -> web.Response:
        rows = await asyncio.to_thread(self.tables.policies)
        return web.json_response({"source": self._source(), "policies": [_policy_out(r) for r in rows]})

    async def _get(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        row = await asyncio.to_thread(self.tables.policy, name) if POLICY_NAME_RE.match(name) else None
        if row is None:
            return json_error(404, "no such policy", name)
        nodes = await asyncio.to_thread(self.tables.node_rows, name)
        return web.json_response({**_policy_out(row), "nodes": nodes})

    async def _put(self, request: web.Request) -> web.Response:
        if self.kube is not None:
            return json_error(409, MODE_CONFLICT, "kubectl apply a GPUPowerPolicy instead")
        name = request.match_info["name"]
        body = await read_json(request)
        spec = _unwrap(body, name)
        checked = validate_spec(name, spec)
        if not isinstance(checked, ValidPolicy):
            raise invalid_body([e.as_dict() for e in checked.errors], "invalid policy")
        conform_body(request, body, "invalid policy")  # types exactly as described: no lax "300" or true
        row, created = await asyncio.to_thread(self.tables.put_policy, name, dict(spec), SOURCE_API, time.time())
        log.info("policy %s over the API", "created" if created else "written",
                 extra={"policy": name, "generation": row["generation"]})
        self.wake()
        return web.json_response(_policy_out(row), status=201 if created else 200)

    async def _delete(self, request: web.Request) -> web.Response:
        if self.kube is not None:
            return json_error(409, MODE_CONFLICT, "kubectl delete the GPUPowerPolicy instead")
        name = request.match_info["name"]
        if not POLICY_NAME_RE.match(name) or not await asyncio.to_thread(self.tables.delete_policy, name):
            return json_error(404, "no such policy", name)
        log.info("policy deleted over the API", extra={"policy": name})
        self.wake()
        return web.json_response({"deleted": name})

    async def _put_labels(self, request: web.Request) -> web.Response:
        if self.kube is not None:
            return json_error(409, LABELS_CONFLICT, "label the Kubernetes node instead")
        node = request.match_info["node"]
        if not NODE_NAME_RE.match(node):
            return json_error(400, "not a valid node name", node)
        body = await read_json(request)
        labels, errors = validate_labels(body.get("labels") if isinstance(body, dict) else None)
        if labels is None or not isinstance(body, dict) or set(body) - {"labels"}:
            detail = [e.as_dict() for e in errors] or [{"field": "", "problem": 'expected {"labels": {...}}'}]
            raise invalid_body(detail, "invalid labels")
        conform_body(request, body, "invalid labels")
        await asyncio.to_thread(self.tables.set_labels, node, labels, time.time())
        self.wake()
        return web.json_response({"node": node, "labels": labels})

    async def _node_policy(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        rows = await asyncio.to_thread(self.tables.node_rows, None, node) if NODE_NAME_RE.match(node) else []
        if not rows:
            return json_error(404, "no such node for policies", node)
        return web.json_response(rows[0])

    def _source(self) -> str:
        return SOURCE_KUBERNETES if self.kube is not None else SOURCE_API


def _unwrap(body: Any, name: str) -> Any:
    """Accept the spec itself, or a whole object `{"apiVersion", "kind", "metadata", "spec"}`."""
    if isinstance(body, dict) and "spec" in body and set(body) <= {"apiVersion", "kind", "metadata", "spec"}:
        given = (body.get("metadata") or {}).get("name") if isinstance(body.get("metadata"), dict) else None
        if given not in (None, name):
            raise invalid_body([{"field": "metadata.name", "problem": f"{str(given)[:300]!r} is not {name!r}"}],
                               "invalid policy")
        return body["spec"]
    return body
