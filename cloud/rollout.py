"""Edge-aware rollouts of the edge daemon's DaemonSet: waves over flaky nodes, per-node state in the DB.

A plain RollingUpdate stalls as soon as an edge node is NotReady (kubernetes issue 117204): its
old pod never terminates and the update waits on it. Here the DaemonSet uses `updateStrategy:
OnDelete` and the leader restarts pods itself, node by node, in waves, judging each node by what
its daemon reports over MQTT (version, online, degraded); an offline node is deferred instead of
blocking, and upgraded when it comes back. The decisions are in cloud/rollout_plan.py (pure);
this module is the I/O around them: HTTP API, tables, observing the fleet and the pods, acting.

How a rollout knows the new version: the request names it (`version`), or it is the tag of
`image` (`repo/edge:0.2.0` -> "0.2.0"); a `templatePatch` needs an explicit `version`. A node is
done when its new pod's daemon reports exactly that version, online and not degraded, within
`healthTimeout` of its pod's deletion.

Crash safety: a node's pod is only deleted after `pod-deletion-required` and the pod's uid are
stored; after a restart, a stored uid that is no longer on the node means the deletion happened,
so no pod is ever deleted twice. The template write is recorded too (`template_applied`) and is
idempotent, so a new leader simply continues from the tables.

Rollback restarts the nodes this rollout restarted (see rollout_plan); `POST .../cancel` stops
tracking a rollout and leaves the DaemonSet template as it is (the way out of a rollout that waits
forever for a node that will never come back).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from aiohttp import web
from pydantic import Field, StrictInt, field_validator, model_validator
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from cloud.kube import Kube, KubeError, KubeUnavailable
from cloud.rollout_plan import (
    ACTIVE,
    Action,
    DeletePod,
    NodeState,
    NodeView,
    OpenWave,
    RolloutSpec,
    RolloutState,
    SetRolloutState,
    Transition,
    apply_merge_patch,
    assign_waves,
    merge_diff,
    parse_amount,
    plan,
    resolve_amount,
    version_from_image,
    with_image,
)
from cloud.store import FleetStoreError, JsonType, RowId, metadata, nodes_table
from shared.aio import wait_event
from shared.http import int_query, json_error, read_model
from shared.logs import get_logger
from shared.policy import Seconds
from shared.protocol import Kind
from shared.topics import NODE_NAME_RE
from shared.wire import CamelModel

if TYPE_CHECKING:
    from cloud.controller import Controller
    from cloud.store import Incoming

log = get_logger(__name__)

TICK_S = 1.0  # the leader's loop period when nothing wakes it earlier
MIN_TICK_S = 0.2  # status reports wake the loop, but not more often than this
MAX_PARALLEL_DELETES = 16
MERGE_PATCH = "application/merge-patch+json"

# ---- tables (kept equal to migrations/versions/0004_rollouts.py) ----------------------------

rollouts_table = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("active", sa.Integer),  # 1 while running or rolling back, else NULL: the UNIQUE allows one
    sa.Column("target_version", sa.String(128), nullable=False),
    sa.Column("image", sa.String(512)),
    sa.Column("container", sa.String(253)),
    sa.Column("template_patch", JsonType),
    sa.Column("request", JsonType, nullable=False),  # as accepted, defaults filled in (camelCase)
    sa.Column("max_unavailable", sa.Integer, nullable=False),  # resolved against the node count
    sa.Column("failure_threshold", sa.Integer, nullable=False),
    sa.Column("health_timeout", sa.Float, nullable=False),
    sa.Column("wave", sa.Integer, nullable=False),  # highest wave opened (0: canaries)
    sa.Column("wave_count", sa.Integer, nullable=False),
    sa.Column("previous_template", JsonType, nullable=False),  # the pod template before: rollback target
    sa.Column("new_template", JsonType, nullable=False),
    sa.Column("template_applied", sa.String(16)),  # "new" | "previous": the template last written
    sa.Column("rollback_requested", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.UniqueConstraint("active", name="uq_rollouts_active"),
)

rollout_nodes_table = sa.Table(
    "rollout_nodes",
    metadata,
    sa.Column(
        "rollout_id",
        RowId,
        sa.ForeignKey("rollouts.id", name="fk_rollout_nodes_rollout", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("node", sa.String(253), primary_key=True),  # no FK: a node may never have reported
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("canary", sa.Boolean, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("since", sa.Float, nullable=False),  # cloud clock
    sa.Column("marked_pod", sa.String(253)),  # uid of the pod to delete, then of the pod deleted
    sa.Column("deleted", sa.Boolean, nullable=False),  # pod deleted in the current direction
    sa.Column("reverting", sa.Boolean, nullable=False),  # rollback: goes back to the previous template
    sa.Column("from_version", sa.String(128)),  # what it reported before its restart
    sa.Column("reason", sa.Text),  # why it is in its state
    sa.Index("ix_rollout_nodes_rollout_state", "rollout_id", "state"),
)


# ---- the request ----------------------------------------------------------------------------


def _amount(value: int | str) -> int | str:
    parse_amount(value)  # raises ValueError with the reason
    return value


class Waves(CamelModel):
    """Canary nodes first (wave 0), then cumulative percentages of the other nodes (by name)."""

    canary: list[str] = Field(default_factory=list, max_length=1000)
    percentages: list[float] = Field(default_factory=lambda: [10.0, 50.0, 100.0], min_length=1, max_length=100)

    @field_validator("canary")
    @classmethod
    def _nodes(cls, names: list[str]) -> list[str]:
        bad = [n for n in names if not NODE_NAME_RE.match(n)]
        if bad:
            raise ValueError(f"not node names: {bad[:5]}")
        if len(set(names)) != len(names):
            raise ValueError("a canary node is named twice")
        return names

    @field_validator("percentages")
    @classmethod
    def _percentages(cls, values: list[float]) -> list[float]:
        if any(not 0 < p <= 100 for p in values):
            raise ValueError("percentages must be within (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(values)):
            raise ValueError("percentages must increase (they are cumulative)")
        return values if values[-1] == 100 else [*values, 100.0]  # the last wave takes the rest


class RolloutRequest(CamelModel):
    """`POST /api/v1/rollouts`. Exactly one of `image` and `templatePatch`."""

    image: str | None = Field(None, min_length=1, max_length=512)
    container: str | None = Field(None, min_length=1, max_length=253)  # for `image`; default: the first
    template_patch: dict[str, Any] | None = None  # JSON merge patch (RFC 7386) on the pod template
    version: str | None = Field(None, min_length=1, max_length=128)
    max_unavailable: StrictInt | str = "10%"
    waves: Waves = Field(default_factory=Waves)
    health_timeout: Seconds = 300.0
    failure_threshold: StrictInt | str = "5%"

    @field_validator("max_unavailable")
    @classmethod
    def _max_unavailable(cls, value: int | str) -> int | str:
        number, _ = parse_amount(value)
        if number <= 0:
            raise ValueError("must allow at least one node (a count >= 1 or a percentage > 0)")
        return value

    @field_validator("failure_threshold")
    @classmethod
    def _failure_threshold(cls, value: int | str) -> int | str:
        return _amount(value)

    @field_validator("health_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be longer than 0 s")
        return value

    @model_validator(mode="after")
    def _one_change(self) -> RolloutRequest:
        if (self.image is None) == (self.template_patch is None):
            raise ValueError("give exactly one of image and templatePatch")
        if self.template_patch is not None and self.container is not None:
            raise ValueError("container goes with image, not with templatePatch")
        if self.version is None:
            if self.template_patch is not None:
                raise ValueError("templatePatch needs version: the daemon version the new pods will report")
            assert self.image is not None
            self.version = version_from_image(self.image)
            if self.version is None:
                raise ValueError("image has no tag to take the version from: give version")
        return self


# ---- storage --------------------------------------------------------------------------------


class ActiveRolloutExists(Exception):
    def __init__(self, rollout_id: int | None) -> None:
        super().__init__(f"rollout {rollout_id} is still active")
        self.rollout_id = rollout_id


class RolloutRepo:
    """The rollout tables, on the fleet store's engine. Blocking: call from a thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # SQLite: take the write lock at BEGIN (the store's convention), so a read-then-write
        # transaction cannot fail on lock upgrade; PostgreSQL ignores the option.
        self.write_engine = engine.execution_options(kgpu_begin="IMMEDIATE")

    def active(self) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(rollouts_table).where(rollouts_table.c.active.is_not(None))).first()
        return dict(row._mapping) if row else None

    def get(self, rollout_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(rollouts_table).where(rollouts_table.c.id == rollout_id)).first()
        return dict(row._mapping) if row else None

    def recent(self, limit: int) -> list[tuple[dict[str, Any], dict[str, int]]]:
        t, n = rollouts_table, rollout_nodes_table
        with self.engine.connect() as conn:
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
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(
                sa.select(n).where(n.c.rollout_id == rollout_id).order_by(n.c.wave, n.c.node))]

    def fleet(self) -> dict[str, dict[str, Any]]:
        t = nodes_table
        with self.engine.connect() as conn:
            return {r.name: dict(r._mapping) for r in conn.execute(
                sa.select(t.c.name, t.c.online, t.c.daemon_version, t.c.degraded, t.c.last_seen))}

    def create(self, row: dict[str, Any], nodes: list[dict[str, Any]]) -> int:
        try:
            with self.write_engine.begin() as conn:
                active = conn.execute(sa.select(rollouts_table.c.id).where(rollouts_table.c.active.is_not(None))).first()
                if active is not None:
                    raise ActiveRolloutExists(int(active.id))
                rollout_id = int(conn.execute(rollouts_table.insert().values(**row)
                                              .returning(rollouts_table.c.id)).scalar_one())
                for start in range(0, len(nodes), 500):
                    conn.execute(rollout_nodes_table.insert(),
                                 [{**node, "rollout_id": rollout_id} for node in nodes[start:start + 500]])
        except IntegrityError:  # another replica's POST won the race for the active slot
            raise ActiveRolloutExists(None) from None
        return rollout_id

    def apply(self, rollout_id: int, expect: str, actions: Sequence[Action], now: float) -> bool:
        """Store a tick's decisions in one transaction; False (nothing written) if the rollout
        left state `expect` meanwhile (cancelled over the API, or another leader moved it)."""
        r = rollouts_table
        with self.write_engine.begin() as conn:
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
        with self.write_engine.begin() as conn:
            for d in deleted:
                _store_transition(conn, rollout_id, d.then, now, n.c.state == NodeState.POD_DELETION_REQUIRED.value,
                                  n.c.marked_pod == d.pod)

    def update(self, rollout_id: int, expect: set[str], **values: Any) -> bool:
        """Change the rollout row if it is in one of the states `expect`."""
        r = rollouts_table
        with self.write_engine.begin() as conn:
            result = conn.execute(r.update().where(r.c.id == rollout_id, r.c.state.in_(expect))
                                  .values(updated_at=time.time(), **values))
        return bool(result.rowcount)


def _store_transition(conn: Connection, rollout_id: int, t: Transition, now: float, *guards: Any) -> None:
    n = rollout_nodes_table
    values = {**t.changes(now), "state": t.to.value, "reason": t.reason}
    if t.from_version is not None:
        values["from_version"] = t.from_version
    conn.execute(n.update().where(n.c.rollout_id == rollout_id, n.c.node == t.node, *guards).values(**values))


# ---- Kubernetes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonPod:
    name: str
    uid: str | None

    @property
    def identity(self) -> str:
        """The uid (a pod of the same name created later is another pod); the name if none."""
        return self.uid or f"name:{self.name}"


class RolloutRefused(Exception):
    """A request that cannot be carried out: HTTP `status` with a JSON error."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a pod's labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if op == "In" and (not present or labels[key] not in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def _selector_string(selector: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items()))


async def _raw(kube: Kube, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A client call's JSON as plain dicts (no model round trip that could drop fields)."""
    def call() -> Any:
        return json.loads(fn(*args, _preload_content=False, **kwargs).data)

    return await kube.call(call)


# ---- the subsystem --------------------------------------------------------------------------


class RolloutManager:
    """Rollouts: HTTP API on every replica; the planner loop only on the leader."""

    name = "rollouts"

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.repo = RolloutRepo(controller.store.engine)
        self.namespace = controller.settings.namespace
        self.daemonset = controller.settings.daemonset
        self._wake = asyncio.Event()
        self._deletes = asyncio.Semaphore(MAX_PARALLEL_DELETES)
        controller.ingestor.listeners.append(self._on_batch)

    async def _on_batch(self, batch: list[Incoming]) -> None:
        """A status may finish a validation: look again soon instead of a tick later."""
        if any(item.envelope.kind == Kind.STATUS for item in batch):
            self._wake.set()

    # -- HTTP ------------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/v1/rollouts", self._http_create)
        app.router.add_get("/api/v1/rollouts", self._http_list)
        app.router.add_get("/api/v1/rollouts/{id}", self._http_get)
        app.router.add_post("/api/v1/rollouts/{id}/rollback", self._http_rollback)
        app.router.add_post("/api/v1/rollouts/{id}/cancel", self._http_cancel)

    async def _http_create(self, request: web.Request) -> web.Response:
        if self.controller.kube is None:
            # 409, not 503: the controller's mode refuses it, and a client retrying will not help
            return json_error(409, "rollouts need a cluster", "the controller runs with --no-kube")
        body = await read_model(request, RolloutRequest)
        try:
            created = await self.create(body)
        except RolloutRefused as exc:
            return json_error(exc.status, exc.error, exc.detail)
        return web.json_response(created, status=201)

    async def _http_list(self, request: web.Request) -> web.Response:
        limit = int_query(request, "limit", 50, lo=1, hi=1000) or 50
        rows = await asyncio.to_thread(self.repo.recent, limit)
        return web.json_response({"rollouts": [rollout_out(r, counts) for r, counts in rows]})

    async def _http_get(self, request: web.Request) -> web.Response:
        rollout_id = _id(request)
        row = await asyncio.to_thread(self.repo.get, rollout_id) if rollout_id is not None else None
        if row is None:
            return json_error(404, "no such rollout", request.match_info["id"])
        nodes, fleet = await asyncio.gather(asyncio.to_thread(self.repo.nodes_of, row["id"]),
                                            asyncio.to_thread(self.repo.fleet))
        counts: dict[str, int] = {}
        for n in nodes:
            counts[n["state"]] = counts.get(n["state"], 0) + 1
        out = rollout_out(row, counts)
        out["nodes"] = [node_out(n, fleet.get(n["node"])) for n in nodes]
        return web.json_response(out)

    async def _http_rollback(self, request: web.Request) -> web.Response:
        rollout_id = _id(request)
        if rollout_id is None or await asyncio.to_thread(self.repo.get, rollout_id) is None:
            return json_error(404, "no such rollout", request.match_info["id"])
        if not await asyncio.to_thread(self.repo.update, rollout_id, {RolloutState.RUNNING.value},
                                       rollback_requested=True):
            return json_error(409, "only a running rollout can be rolled back", rollout_id)
        self._wake.set()
        return web.json_response({"id": rollout_id, "rollbackRequested": True}, status=202)

    async def _http_cancel(self, request: web.Request) -> web.Response:
        rollout_id = _id(request)
        if rollout_id is None or await asyncio.to_thread(self.repo.get, rollout_id) is None:
            return json_error(404, "no such rollout", request.match_info["id"])
        if not await asyncio.to_thread(
            self.repo.update, rollout_id, {s.value for s in ACTIVE}, state=RolloutState.CANCELLED.value,
            active=None, finished_at=time.time(), reason="cancelled by an operator: the template is left as it is",
        ):
            return json_error(409, "the rollout is not active", rollout_id)
        log.info("rollout cancelled", extra={"rollout": rollout_id})
        return web.json_response({"id": rollout_id, "state": RolloutState.CANCELLED.value})

    # -- creating a rollout -------------------------------------------------------------------

    async def create(self, req: RolloutRequest) -> dict[str, Any]:
        """Validate against the cluster and store a new rollout; the leader's loop carries it out."""
        try:
            kube = self.controller.require_kube("rollouts")
        except KubeUnavailable as exc:
            raise RolloutRefused(409, "rollouts need a cluster", str(exc)) from None
        active = await asyncio.to_thread(self.repo.active)
        if active is not None:
            raise RolloutRefused(409, "another rollout is active", {"id": active["id"], "state": active["state"]})
        try:
            ds = await self._read_daemonset(kube)
            pods = await self._pods(kube, ds)
        except KubeError as exc:
            if exc.not_found:
                raise RolloutRefused(409, f"no DaemonSet {self.namespace}/{self.daemonset}", str(exc)) from None
            raise RolloutRefused(502, "the Kubernetes API failed", str(exc)) from None
        strategy = (ds.get("spec", {}).get("updateStrategy") or {}).get("type", "RollingUpdate")
        if strategy != "OnDelete":
            raise RolloutRefused(409, "the DaemonSet must use updateStrategy OnDelete",
                                 f"{self.namespace}/{self.daemonset} uses {strategy}: a RollingUpdate would "
                                 "restart pods itself and stall on NotReady edge nodes")
        previous = ds["spec"]["template"]
        try:
            new = (with_image(previous, req.image, req.container) if req.image is not None
                   else apply_merge_patch(previous, req.template_patch))
        except ValueError as exc:
            raise RolloutRefused(400, "cannot apply the change to the pod template", str(exc)) from None
        members = sorted(pods)
        missing = [n for n in req.waves.canary if n not in pods]
        if missing:
            raise RolloutRefused(400, "canary nodes without a daemon pod", missing)
        waves = assign_waves(members, req.waves.canary, req.waves.percentages)
        now = time.time()
        assert req.version is not None
        row = {
            "state": RolloutState.RUNNING.value, "active": 1, "target_version": req.version,
            "image": req.image, "container": req.container, "template_patch": req.template_patch,
            "request": req.model_dump(mode="json", by_alias=True),
            "max_unavailable": resolve_amount(req.max_unavailable, len(members), at_least=1),
            "failure_threshold": resolve_amount(req.failure_threshold, len(members)),
            "health_timeout": req.health_timeout, "wave": 0, "wave_count": len(req.waves.percentages) + 1,
            "previous_template": previous, "new_template": new, "template_applied": None,
            "rollback_requested": False, "reason": None, "created_at": now, "updated_at": now, "finished_at": None,
        }
        nodes = [{"node": name, "wave": waves[name], "canary": waves[name] == 0 and name in req.waves.canary,
                  "state": NodeState.UPGRADE_REQUIRED.value, "since": now, "marked_pod": None, "deleted": False,
                  "reverting": False, "from_version": None, "reason": "waiting for its wave"} for name in members]
        try:
            rollout_id = await asyncio.to_thread(self.repo.create, row, nodes)
        except ActiveRolloutExists as exc:
            raise RolloutRefused(409, "another rollout is active", {"id": exc.rollout_id}) from None
        log.info("rollout created", extra={"rollout": rollout_id, "version": req.version, "nodes": len(members),
                                           "max_unavailable": row["max_unavailable"]})
        self._wake.set()
        stored = await asyncio.to_thread(self.repo.get, rollout_id)
        assert stored is not None
        return rollout_out(stored, {NodeState.UPGRADE_REQUIRED.value: len(members)} if members else {})

    async def _read_daemonset(self, kube: Kube) -> dict[str, Any]:
        return dict(await _raw(kube, kube.apps.read_namespaced_daemon_set, self.daemonset, self.namespace))

    async def _pods(self, kube: Kube, ds: dict[str, Any]) -> dict[str, DaemonPod]:
        """node -> its live daemon pod. Selectors are checked here too (an emulator may ignore them)."""
        selector = ds.get("spec", {}).get("selector") or {}
        listed = await _raw(kube, kube.core.list_namespaced_pod, self.namespace,
                            label_selector=_selector_string(selector))
        pods: dict[str, DaemonPod] = {}
        for pod in listed.get("items") or []:
            meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
            node = spec.get("nodeName")
            if not node or meta.get("deletionTimestamp") or not selector_matches(selector, meta.get("labels") or {}):
                continue
            owners = meta.get("ownerReferences") or []
            if not any(o.get("kind") == "DaemonSet" and o.get("name") == self.daemonset for o in owners):
                continue
            pods[node] = DaemonPod(meta.get("name", ""), meta.get("uid"))
        return pods

    # -- leading ------------------------------------------------------------------------------

    async def lead(self) -> None:
        """Drive the active rollout, a tick at a time, until cancelled (leadership lost)."""
        if self.controller.kube is None:
            return  # --no-kube: no rollouts
        log.info("rollouts: leading")
        while True:
            started = time.monotonic()
            self._wake.clear()  # before looking: a report arriving during the tick wakes the next
            again = False
            try:
                again = await self.tick()
            except asyncio.CancelledError:
                raise
            except KubeError as exc:
                log.warning("rollout step: Kubernetes API failed: %s", exc)
            except (SQLAlchemyError, FleetStoreError) as exc:
                log.warning("rollout step: database failed: %s", exc)
            except Exception:
                log.exception("rollout step failed")
            if again:
                continue
            await wait_event(self._wake, TICK_S)
            await asyncio.sleep(max(0.0, MIN_TICK_S - (time.monotonic() - started)))

    async def tick(self) -> bool:
        """One round: observe, plan, act, store. True when it should run again right away."""
        kube = self.controller.require_kube("rollouts")
        row = await asyncio.to_thread(self.repo.active)
        if row is None:
            return False
        rollout_id, state = int(row["id"]), RolloutState(row["state"])
        ds = await self._read_daemonset(kube)
        await self._ensure_template(kube, row, ds)
        pods = await self._pods(kube, ds)
        stored, fleet = await asyncio.gather(asyncio.to_thread(self.repo.nodes_of, rollout_id),
                                             asyncio.to_thread(self.repo.fleet))
        views = {n["node"]: _view(n, fleet.get(n["node"]), pods.get(n["node"])) for n in stored}
        spec = RolloutSpec(
            target_version=row["target_version"], max_unavailable=row["max_unavailable"],
            failure_threshold=row["failure_threshold"], health_timeout=row["health_timeout"],
            wave_count=row["wave_count"], wave=row["wave"], state=state,
            rollback_requested=bool(row["rollback_requested"]),
        )
        now = time.time()
        actions = plan(spec, views, now)
        if not actions:
            return False
        deletes = [a for a in actions if isinstance(a, DeletePod)]
        decided = [a for a in actions if not isinstance(a, DeletePod)]
        if decided and not await asyncio.to_thread(self.repo.apply, rollout_id, state.value, decided, now):
            log.info("rollout changed meanwhile: decisions dropped", extra={"rollout": rollout_id})
            return True
        for action in decided:
            _log_action(rollout_id, action)
        if deletes:
            results = await asyncio.gather(*(self._delete(kube, pods[d.node], d) for d in deletes))
            done = [d for d, ok in zip(deletes, results, strict=True) if ok]
            if done:
                await asyncio.to_thread(self.repo.store_deleted, rollout_id, done, time.time())
                for d in done:
                    _log_action(rollout_id, d.then)
        return any(isinstance(a, SetRolloutState) for a in decided)

    async def _ensure_template(self, kube: Kube, row: dict[str, Any], ds: dict[str, Any]) -> None:
        """Write the template the rollout's state calls for, once (recorded in `template_applied`)."""
        which = "new" if row["state"] == RolloutState.RUNNING.value else "previous"
        if row["template_applied"] == which:
            return
        desired = row["new_template"] if which == "new" else row["previous_template"]
        patch = merge_diff(ds.get("spec", {}).get("template") or {}, desired)
        if patch:
            body: dict[str, Any] = {"spec": {"template": patch}}
            version = (ds.get("metadata") or {}).get("resourceVersion")
            if version:  # a real API server refuses the write if the DaemonSet changed since our read
                body["metadata"] = {"resourceVersion": version}
            await kube.call(kube.apps.patch_namespaced_daemon_set, self.daemonset, self.namespace, body,
                            _content_type=MERGE_PATCH)
        await asyncio.to_thread(self.repo.update, int(row["id"]), {row["state"]}, template_applied=which)
        row["template_applied"] = which
        log.info("DaemonSet template written", extra={"rollout": row["id"], "template": which,
                                                      "daemonset": f"{self.namespace}/{self.daemonset}"})

    async def _delete(self, kube: Kube, pod: DaemonPod, action: DeletePod) -> bool:
        """Delete one pod (only that uid); True when it is gone, whoever deleted it."""
        from kubernetes import client

        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=pod.uid)) if pod.uid else None
        async with self._deletes:
            try:
                await kube.call(kube.core.delete_namespaced_pod, pod.name, self.namespace, body=body)
            except KubeError as exc:
                if exc.not_found or exc.conflict:  # gone already, or the name is another pod now
                    return True
                log.warning("deleting daemon pod failed: %s", exc, extra={"node": action.node, "pod": pod.name})
                return False
        log.info("daemon pod deleted", extra={"node": action.node, "pod": pod.name, "uid": pod.uid})
        return True


# ---- views and JSON -------------------------------------------------------------------------


def _view(stored: dict[str, Any], fleet: dict[str, Any] | None, pod: DaemonPod | None) -> NodeView:
    return NodeView(
        state=NodeState(stored["state"]), since=float(stored["since"]), wave=int(stored["wave"]),
        canary=bool(stored["canary"]),
        online=bool(fleet and fleet["online"]),  # a node that never reported counts as offline
        daemon_version=fleet["daemon_version"] if fleet else None,
        degraded=bool(fleet and fleet["degraded"]),
        pod=pod.identity if pod else None, marked_pod=stored["marked_pod"],
        deleted=bool(stored["deleted"]), reverting=bool(stored["reverting"]),
    )


def _log_action(rollout_id: int, action: Action) -> None:
    if isinstance(action, Transition):
        log.info("rollout node %s: %s", action.to.value, action.reason, extra={"rollout": rollout_id, "node": action.node})
    elif isinstance(action, OpenWave):
        log.info("rollout wave %d open", action.wave, extra={"rollout": rollout_id})
    elif isinstance(action, SetRolloutState):
        log.info("rollout %s: %s", action.state.value, action.reason, extra={"rollout": rollout_id})


def _id(request: web.Request) -> int | None:
    text = request.match_info["id"]
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None


def rollout_out(row: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    req = row["request"] or {}
    return {
        "id": row["id"], "state": row["state"], "version": row["target_version"], "image": row["image"],
        "container": row["container"], "templatePatch": row["template_patch"],
        "maxUnavailable": req.get("maxUnavailable"), "maxUnavailableNodes": row["max_unavailable"],
        "failureThreshold": req.get("failureThreshold"), "failureThresholdNodes": row["failure_threshold"],
        "healthTimeout": row["health_timeout"], "waves": req.get("waves"), "wave": row["wave"],
        "waveCount": row["wave_count"], "templateApplied": row["template_applied"],
        "rollbackRequested": bool(row["rollback_requested"]), "reason": row["reason"],
        "createdAt": row["created_at"], "updatedAt": row["updated_at"], "finishedAt": row["finished_at"],
        "nodeCount": sum(counts.values()), "counts": {s.value: counts.get(s.value, 0) for s in NodeState},
    }


def node_out(row: dict[str, Any], fleet: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "node": row["node"], "state": row["state"], "since": row["since"], "wave": row["wave"],
        "canary": bool(row["canary"]), "reverting": bool(row["reverting"]), "pod": row["marked_pod"],
        "fromVersion": row["from_version"], "reason": row["reason"],
        "online": bool(fleet["online"]) if fleet else None,
        "daemonVersion": fleet["daemon_version"] if fleet else None,
    }
