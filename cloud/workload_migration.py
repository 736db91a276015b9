"""Task migration: move GPU work off a failing node, through the Kubernetes API.

Triggers (found by the leader's periodic scan, woken early by ingested requests and health
events):

* `edge-request`: a `migration_request` event from an edge (XID 48/79/94/95, double-bit ECC,
  critical temperature ...). Each event is consumed once (`migration_triggers` remembers it).
* `gpu-unhealthy`: a GPU unhealthy or lost for longer than `migration_grace`, timed from the
  health events (cloud clock), or from when this controller first saw it unhealthy.
* `node-offline`: a node offline for longer than `offline_threshold` while GPU pods are still
  bound to it (pods from the API; this trigger needs a cluster).

One migration is open per node at a time: a trigger for a node with an open migration is merged
into it (a "trigger merged" step; the GPU joins its subjects). The Kubernetes API does not say
which GPU a pod holds, so a migration moves every GPU pod of the node.

States: `needs-cluster` (recorded with --no-kube; pending once a controller with a cluster
leads), `deferred` (cool-down: the node had a migration start less than
`migration_node_cooldown` ago; pending when it ends), `pending` (waiting for one of
`migration_max_concurrent` slots), `in-progress`, `completed` (every GPU pod moved; the node keeps
the taint while its GPU is unhealthy), `failed` (a pod could not be moved after repeated errors;
taint kept), `recovered` (the GPUs are healthy again and the taint is gone), `cancelled` (healthy
again before the migration started). A started migration always finishes: an XID 79 GPU that
comes back has already killed the work on it.

Steps of an in-progress migration, each recorded in the row's `steps` right after it happens:
taint the node `kgpu.io/gpu-unhealthy=<uuid>:NoSchedule` (the full taint list is patched; ours is
added once), tell the edge `migrate_away`, find the node's GPU pods, pick a target per pod
(cloud/placement.py), evict controller-owned pods (a 429 from a PodDisruptionBudget is retried
with backoff), recreate bare pods on the target (required node affinity on
`kubernetes.io/hostname`, deterministic name `<name>-m<id>`, so a repeat is a 409, not a second
copy) and delete the originals. The row is the truth across restarts: a pod recorded as evicted
is never evicted again. Each step is recorded right after its API call (shielded from a loss of
leadership); a crash between the two replays the call, which a real API server makes harmless:
an evicted pod is terminating (skipped), a recreated copy answers 409, a deleted original 404.

`reconcile` and `plan_pods` are pure (state in, decisions out); `MigrationManager` does the I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from aiohttp import web

from cloud import placement
from cloud.kube import KubeError
from cloud.placement import (
    HOSTNAME_LABEL,
    MEMORY_LABEL,
    PRODUCT_LABEL,
    ZONE_LABEL,
    CandidateGpu,
    GpuModel,
    NodeCandidate,
    PodNeeds,
    ScoredTarget,
    Taint,
    Toleration,
)
from cloud.store import JsonType, RowId, metadata
from shared.aio import wait_event
from shared.http import int_query, json_error
from shared.logs import get_logger
from shared.protocol import CommandBody, Kind
from shared.topics import NODE_NAME_RE

if TYPE_CHECKING:
    from cloud.controller import Controller
    from cloud.kube import Kube
    from cloud.store import Incoming

log = get_logger(__name__)

TAINT_KEY = "kgpu.io/gpu-unhealthy"
TAINT_EFFECT = "NoSchedule"
OFFLINE_SUBJECT = "node-offline"  # the subject (and taint value) of an offline-node migration
MIGRATION_ANNOTATION = "kgpu.io/migration"
MIGRATED_FROM_ANNOTATION = "kgpu.io/migrated-from"

ACTIVE_STATES = ("needs-cluster", "deferred", "pending", "in-progress", "completed", "failed")
NOT_STARTED = ("needs-cluster", "deferred", "pending")
HOLDING = ("completed", "failed")  # work moved (or given up); the taint stays until recovery
POD_DONE = ("evicted", "deleted", "gone", "failed")

REQUEST_MAX_AGE_S = 3600.0  # older migration_request events are left to the gpu-unhealthy trigger
MAX_POD_ERRORS = 5  # API errors (not 429s) on one pod before it is given up
MAX_STEPS = 200  # a row keeps its newest steps
BACKOFF_CAP_S = 60.0
OFFLINE_CHECK_EVERY_S = 30.0  # how often offline nodes are checked for bound GPU pods
NO_TARGET_RETRY_S = 5.0  # a bare pod with no target: look again this often

# ---- schema (kept identical to migrations/versions/0003_migrations.py) ----------------------

migrations_table = sa.Table(
    "migrations",
    metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),
    sa.Column("node", sa.String(253), nullable=False),
    sa.Column("gpu_uuid", sa.String),  # the GPU of the first trigger; NULL for a node trigger
    sa.Column("subjects", JsonType, nullable=False),  # every GPU uuid covered, or "node-offline"
    sa.Column("trigger", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),  # cloud clock
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),  # when it went in-progress: the node's cool-down runs from it
    sa.Column("next_attempt_at", sa.Float),  # deferred: end of the cool-down; in-progress: next retry
    sa.Column("pods", JsonType, nullable=False),  # "ns/name" -> what was done to that pod
    sa.Column("steps", JsonType, nullable=False),  # [{step, outcome, detail, at, ...}]
    sa.Index("ix_migrations_node_created", "node", "created_at"),
    sa.Index("ix_migrations_state", "state"),
)

migration_triggers_table = sa.Table(
    "migration_triggers",
    metadata,
    sa.Column("event_id", sa.BigInteger, primary_key=True, autoincrement=False),  # events.id
    sa.Column(
        "migration_id",
        RowId,
        sa.ForeignKey("migrations.id", name="fk_migration_triggers_migration", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("at", sa.Float, nullable=False),
)


# ---- the pure part: inputs ------------------------------------------------------------------


@dataclass(frozen=True)
class GpuView:
    """One GPU as the fleet store knows it."""

    node: str
    uuid: str
    index: int
    name: str | None
    health: str | None  # from the newest status
    sample: Mapping[str, Any] | None = None
    unhealthy_since: float | None = None  # cloud clock, start of the current non-healthy run
    last_event: tuple[float, str] | None = None  # (edge ts, current health) of the newest health event
    healthy_event_ts: float | None = None  # edge ts of the newest health event saying healthy


@dataclass(frozen=True)
class RequestEvent:
    event_id: int
    node: str
    ts: float  # edge clock
    received_at: float
    gpu_uuid: str | None
    trigger: str
    reason: str


@dataclass(frozen=True)
class World:
    """What the fleet store says, for `reconcile`."""

    nodes: Mapping[str, tuple[bool, float]] = field(default_factory=dict)  # name -> (online, last_seen)
    gpus: Mapping[str, tuple[GpuView, ...]] = field(default_factory=dict)  # node -> its GPUs
    requests: tuple[RequestEvent, ...] = ()
    gpu_pods: Mapping[str, int] | None = None  # node -> movable GPU pods bound there; None: no cluster

    def gpu(self, node: str, uuid: str) -> GpuView | None:
        return next((g for g in self.gpus.get(node, ()) if g.uuid == uuid), None)


@dataclass(frozen=True)
class Rules:
    grace_s: float
    offline_threshold_s: float
    max_concurrent: int
    cooldown_s: float
    has_kube: bool


@dataclass(frozen=True)
class Migration:
    """One `migrations` row (`id` None until inserted)."""

    id: int | None
    node: str
    gpu_uuid: str | None
    subjects: tuple[str, ...]
    trigger: str
    reason: str
    state: str
    created_at: float
    updated_at: float
    started_at: float | None = None
    next_attempt_at: float | None = None
    pods: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    steps: tuple[Mapping[str, Any], ...] = ()
    consumed: tuple[int, ...] = ()  # event ids consumed by this decision (not a column)

    def step(self, step: str, outcome: str, detail: str, now: float, **extra: Any) -> Migration:
        """This migration with one more step recorded (a repeat of the last one is not kept)."""
        entry = {"step": step, "outcome": outcome, "detail": detail, "at": round(now, 3),
                 **{k: v for k, v in extra.items() if v is not None}}
        last = next((s for s in reversed(self.steps) if s.get("pod") == entry.get("pod")), None)
        if last is not None and all(last.get(k) == entry.get(k) for k in ("step", "outcome", "detail", "pod")):
            return replace(self, updated_at=now)
        return replace(self, steps=(*self.steps, entry)[-MAX_STEPS:], updated_at=now)

    def with_pod(self, key: str, now: float, **changes: Any) -> Migration:
        pods = dict(self.pods)
        pods[key] = {**pods.get(key, {}), **changes}
        return replace(self, pods=pods, updated_at=now)

    def row(self) -> dict[str, Any]:
        return {"node": self.node, "gpu_uuid": self.gpu_uuid, "subjects": list(self.subjects),
                "trigger": self.trigger, "reason": self.reason, "state": self.state,
                "created_at": self.created_at, "updated_at": self.updated_at, "started_at": self.started_at,
                "next_attempt_at": self.next_attempt_at, "pods": dict(self.pods), "steps": list(self.steps)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Migration:
        return cls(id=int(row["id"]), node=row["node"], gpu_uuid=row["gpu_uuid"],
                   subjects=tuple(row["subjects"] or ()), trigger=row["trigger"], reason=row["reason"],
                   state=row["state"], created_at=row["created_at"], updated_at=row["updated_at"],
                   started_at=row["started_at"], next_attempt_at=row["next_attempt_at"],
                   pods=dict(row["pods"] or {}), steps=tuple(row["steps"] or ()))


@dataclass(frozen=True)
class Trigger:
    node: str
    kind: str  # edge-request, gpu-unhealthy, node-offline
    subject: str | None  # a GPU uuid, OFFLINE_SUBJECT, or None (a node-level edge request)
    reason: str
    event: RequestEvent | None = None


# ---- the pure part: health ------------------------------------------------------------------


def unhealthy_since(events: Sequence[tuple[float, float, str]]) -> float | None:
    """Start (cloud clock) of the current non-healthy run, from one GPU's health events given as
    (edge ts, received_at, current), newest first; None if the newest says healthy."""
    since = None
    for _ts, received_at, current in events:
        if current == "healthy":
            break
        since = received_at
    return since


def gpu_healthy(gpu: GpuView | None) -> bool:
    """Healthy in the newest status and not contradicted by a newer non-healthy event."""
    if gpu is None or gpu.health != "healthy":
        return False
    return gpu.last_event is None or gpu.last_event[1] == "healthy"


def recovered(world: World, node: str, subjects: Iterable[str]) -> bool:
    """Whether every subject of a migration is fine again (no subject: every GPU of the node)."""
    subjects = list(subjects)
    if not subjects:
        gpus = world.gpus.get(node, ())
        return bool(gpus) and all(gpu_healthy(g) for g in gpus)
    for subject in subjects:
        if subject == OFFLINE_SUBJECT:
            if not world.nodes.get(node, (False, 0.0))[0]:
                return False
        elif not gpu_healthy(world.gpu(node, subject)):
            return False
    return True


def find_triggers(world: World, rules: Rules, now: float,
                  first_seen_unhealthy: Mapping[tuple[str, str], float] | None = None) -> list[Trigger]:
    """Every reason to move work that the fleet shows now (duplicates are `reconcile`'s job)."""
    triggers: list[Trigger] = []
    for request in world.requests:
        uuid = request.gpu_uuid
        triggers.append(Trigger(request.node, "edge-request", uuid,
                                f"{request.trigger}: {request.reason}", request))
    first_seen = first_seen_unhealthy or {}
    for node, gpus in sorted(world.gpus.items()):
        for gpu in gpus:
            if gpu_healthy(gpu) or gpu.health is None:
                continue
            since = gpu.unhealthy_since if gpu.unhealthy_since is not None else first_seen.get((node, gpu.uuid))
            if since is None or now - since < rules.grace_s:
                continue
            triggers.append(Trigger(node, "gpu-unhealthy", gpu.uuid,
                                    f"GPU {gpu.index} ({gpu.uuid}) {gpu.health} for {now - since:.0f} s "
                                    f"(grace {rules.grace_s:g} s)"))
    if world.gpu_pods is not None:
        for node, (online, last_seen) in sorted(world.nodes.items()):
            if online or now - last_seen <= rules.offline_threshold_s or not world.gpu_pods.get(node):
                continue
            triggers.append(Trigger(node, "node-offline", OFFLINE_SUBJECT,
                                    f"node offline for {now - last_seen:.0f} s (threshold "
                                    f"{rules.offline_threshold_s:g} s) with {world.gpu_pods[node]} GPU pod(s) bound"))
    return triggers


# ---- the pure part: reconcile ---------------------------------------------------------------


def reconcile(world: World, migrations: Sequence[Migration], last_started: Mapping[str, float],
              triggers: Sequence[Trigger], rules: Rules, now: float) -> tuple[list[Migration], list[Migration]]:
    """Triggers and lifecycle in, rows out: (new migrations, changed migrations).

    Merges triggers into a node's open migration, defers new ones in the node's cool-down,
    records them as needs-cluster without a cluster, cancels ones not started whose GPUs
    recovered, ends cool-downs, and starts pending ones while slots are free. Completed ones
    whose GPUs recovered are left to the caller (untainting is I/O); see `to_recover`."""
    open_by_node: dict[str, Migration] = {}
    changed: dict[int, Migration] = {}
    for m in migrations:
        if m.state in ACTIVE_STATES and m.id is not None:
            open_by_node.setdefault(m.node, m)
    new: list[Migration] = []

    def current(m: Migration) -> Migration:
        return changed.get(m.id, m) if m.id is not None else m

    for t in triggers:
        if t.event is not None and t.subject and _stale_request(world, t):
            fresh = _new(t, "cancelled", now, "the GPU reported healthy after this request was made")
            new.append(fresh)
            continue
        existing = open_by_node.get(t.node)
        if existing is not None:
            m = current(existing)
            covered = t.subject is None or t.subject in m.subjects
            if covered and t.event is None:
                continue  # the same condition seen again: nothing to record
            if not covered:
                m = replace(m, subjects=(*m.subjects, t.subject))
            m = m.step("trigger", "merged", f"{t.kind}: {t.reason}", now, subject=t.subject)
            if t.event is not None:
                m = replace(m, consumed=(*m.consumed, t.event.event_id))
            if m.id is not None:
                changed[m.id] = m
                open_by_node[t.node] = m
            else:
                new[new.index(existing)] = m
                open_by_node[t.node] = m
            continue
        started = last_started.get(t.node)
        if started is not None and now - started < rules.cooldown_s:
            until = started + rules.cooldown_s
            m = _new(t, "deferred", now, f"cool-down: a migration from {t.node} started {now - started:.0f} s ago; "
                                         f"waits {until - now:.0f} s more", outcome="deferred (cool-down)")
            m = replace(m, next_attempt_at=until)
        elif not rules.has_kube:
            m = _new(t, "needs-cluster", now, "the controller runs with --no-kube: recorded, nothing moved",
                     outcome="needs-cluster")
        else:
            m = _new(t, "pending", now, "recorded")
        new.append(m)
        open_by_node[t.node] = m

    # lifecycle of the open ones
    for m0 in migrations:
        if m0.id is None:
            continue
        m = current(m0)
        if m.state in NOT_STARTED and recovered(world, m.node, m.subjects):
            changed[m.id] = replace(m.step("cancel", "cancelled", "healthy again before the migration started", now),
                                    state="cancelled", next_attempt_at=None)
        elif m.state == "deferred" and m.next_attempt_at is not None and now >= m.next_attempt_at:
            state = "pending" if rules.has_kube else "needs-cluster"
            changed[m.id] = replace(m.step("cool-down", "ended", f"now {state}", now), state=state,
                                    next_attempt_at=None)
        elif m.state == "needs-cluster" and rules.has_kube:
            changed[m.id] = replace(m.step("cluster", "available", "a controller with a cluster leads: pending", now),
                                    state="pending")

    # start pending ones, oldest first, while slots are free
    everything = [current(m) for m in migrations if m.id is not None]
    running = sum(1 for m in everything if m.state == "in-progress")
    pending = sorted((m for m in everything if m.state == "pending"), key=lambda m: (m.created_at, m.id or 0))
    for m in pending:
        if running >= rules.max_concurrent:
            break
        running += 1
        assert m.id is not None
        changed[m.id] = replace(m.step("start", "started", f"slot {running} of {rules.max_concurrent}", now),
                                state="in-progress", started_at=now)
    return new, list(changed.values())


def to_recover(world: World, migrations: Sequence[Migration]) -> list[Migration]:
    """Migrations that moved the work (or gave up) and whose GPUs/node are fine again: untaint."""
    return [m for m in migrations if m.state in HOLDING and recovered(world, m.node, m.subjects)]


def _stale_request(world: World, t: Trigger) -> bool:
    """A replayed request the edge has already taken back (a newer health event says healthy)."""
    assert t.event is not None and t.subject is not None
    gpu = world.gpu(t.node, t.subject)
    return gpu is not None and gpu.healthy_event_ts is not None and gpu.healthy_event_ts > t.event.ts \
        and gpu_healthy(gpu)


def _new(t: Trigger, state: str, now: float, detail: str, *, outcome: str = "recorded") -> Migration:
    subjects = (t.subject,) if t.subject else ()
    m = Migration(id=None, node=t.node, gpu_uuid=t.subject if t.subject != OFFLINE_SUBJECT else None,
                  subjects=subjects, trigger=t.kind, reason=t.reason, state=state, created_at=now, updated_at=now,
                  consumed=(t.event.event_id,) if t.event else ())
    return m.step("trigger", outcome, detail, now, subject=t.subject)


# ---- the pure part: Kubernetes objects ------------------------------------------------------


def pod_key(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def is_controller_owned(pod: Mapping[str, Any]) -> bool:
    return any(ref.get("controller") for ref in (pod.get("metadata") or {}).get("ownerReferences") or [])


def movable_reason(pod: Mapping[str, Any], node: str) -> str | None:
    """None if this pod is GPU work on `node` to move, else why not (for the record)."""
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    if spec.get("nodeName") != node:
        return "not on the node"  # field selectors may be ignored: check ourselves
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return "finished"
    if meta.get("deletionTimestamp"):
        return "already terminating"
    gpus, mig = placement.gpu_requests(spec)
    if not gpus and not mig:
        return "no GPU request"
    if any(ref.get("kind") == "DaemonSet" for ref in meta.get("ownerReferences") or []):
        return "DaemonSet pod (bound to its node)"
    if "kubernetes.io/config.mirror" in (meta.get("annotations") or {}):
        return "static pod"
    return None


def gpu_pods_by_node(pods: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if node and movable_reason(pod, node) is None:
            counts[node] += 1
    return dict(counts)


def with_samples(world: World, samples: Mapping[tuple[str, str], Mapping[str, Any]]) -> World:
    """The world with each GPU's latest sample filled in (`_load` leaves them out)."""
    return replace(world, gpus={node: tuple(replace(g, sample=samples.get((node, g.uuid))) for g in gpus)
                                for node, gpus in world.gpus.items()})


def source_gpu(world: World, node: str, subjects: Sequence[str], kube_node: Mapping[str, Any] | None) -> GpuModel | None:
    """The failing GPU's model: the subject GPU, else any GPU of the node, else its GFD label."""
    gpus = world.gpus.get(node, ())
    for gpu in [g for g in gpus if g.uuid in subjects] + list(gpus):
        if gpu.name:
            return placement.gpu_model(gpu.name)
    labels = ((kube_node or {}).get("metadata") or {}).get("labels") or {}
    if labels.get(PRODUCT_LABEL):
        return placement.gpu_model(labels[PRODUCT_LABEL], _float(labels.get(MEMORY_LABEL)))
    return None


def pod_needs(pod: Mapping[str, Any], source_zone: str | None, source: GpuModel | None) -> PodNeeds:
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    gpus, mig = placement.gpu_requests(spec)
    tolerations = tuple(
        placement.Toleration(key=t.get("key"), operator=t.get("operator") or "Equal", value=t.get("value"),
                             effect=t.get("effect"))
        for t in spec.get("tolerations") or []
    )
    return PodNeeds(
        namespace=meta.get("namespace") or "default", name=str(meta.get("name")), source_node=str(spec.get("nodeName")),
        gpus=gpus, mig=mig, node_selector=dict(spec.get("nodeSelector") or {}),
        affinity=placement.selector_terms(spec.get("affinity")), tolerations=tolerations,
        priority=int(spec.get("priority") or 0),
        workload_class=placement.workload_class(meta.get("labels") or {}, spec.get("priorityClassName")),
        source_zone=source_zone, source_gpu=source,
    )


def candidates(kube_nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
               world: World) -> list[NodeCandidate]:
    """Every cluster node as a placement candidate, with the fleet store's view of its GPUs."""
    requested: dict[str, int] = defaultdict(int)
    mig_used: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for pod in pods:
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        meta = pod.get("metadata") or {}
        if not node or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") or meta.get("deletionTimestamp"):
            continue
        gpus, mig = placement.gpu_requests(spec)
        requested[node] += gpus
        for resource, amount in mig.items():
            mig_used[node][resource] += amount
    out = []
    for node in kube_nodes:
        meta = node.get("metadata") or {}
        spec = node.get("spec") or {}
        name = str(meta.get("name"))
        labels = dict(meta.get("labels") or {})
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        mig_free = {r: placement._quantity(q) - mig_used[name].get(r, 0)
                    for r, q in allocatable.items() if r.startswith(placement.MIG_PREFIX)}
        label_model = labels.get(PRODUCT_LABEL)
        gpus = tuple(
            CandidateGpu(
                uuid=g.uuid,
                model=placement.gpu_model(g.name or label_model or "unknown",
                                          _float(labels.get(MEMORY_LABEL)) if not g.name else None),
                healthy=gpu_healthy(g),
                temperature_c=_float((g.sample or {}).get("temperature_c")),
                power_w=_float((g.sample or {}).get("power_w")),
                power_limit_w=_float((g.sample or {}).get("power_limit_w")),
            )
            for g in world.gpus.get(name, ())
        )
        taints = tuple(Taint(str(t.get("key")), str(t.get("effect")), t.get("value")) for t in spec.get("taints") or [])
        out.append(NodeCandidate(name=name, online=world.nodes.get(name, (False, 0.0))[0], labels=labels, gpus=gpus,
                                 gpus_requested=requested.get(name, 0), mig_free=mig_free, taints=taints,
                                 unschedulable=bool(spec.get("unschedulable"))))
    return out


def with_our_taint(taints: Sequence[Mapping[str, Any]], value: str) -> list[dict[str, Any]] | None:
    """The full taint list with ours added, or None if ours is there (any value: one per key+effect)."""
    if any(t.get("key") == TAINT_KEY and t.get("effect") == TAINT_EFFECT for t in taints):
        return None
    return [_taint_dict(t) for t in taints] + [{"key": TAINT_KEY, "value": value, "effect": TAINT_EFFECT}]


def without_our_taint(taints: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """The full taint list less ours (others untouched), or None if ours is not there."""
    kept = [_taint_dict(t) for t in taints if not (t.get("key") == TAINT_KEY and t.get("effect") == TAINT_EFFECT)]
    return None if len(kept) == len(taints) else kept


def _taint_dict(t: Mapping[str, Any]) -> dict[str, Any]:
    return {k: t[k] for k in ("key", "value", "effect", "timeAdded") if t.get(k) is not None}


def taint_value(m: Migration) -> str:
    value = m.gpu_uuid or (m.subjects[0] if m.subjects else OFFLINE_SUBJECT)
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:63].strip("-_.")
    return value or "unhealthy"


def recreated_name(name: str, migration_id: int) -> str:
    """`<name>-m<id>`, without piling up suffixes of earlier migrations; at most 253 characters."""
    base = re.sub(r"-m\d+$", "", name)
    suffix = f"-m{migration_id}"
    return base[: 253 - len(suffix)].rstrip("-.") + suffix


def recreate_manifest(pod: Mapping[str, Any], target: str, target_hostname: str, migration_id: int,
                      source_node: str) -> dict[str, Any]:
    """A copy of a bare pod for `target`: no nodeName/status/uid/resourceVersion, a new name and
    required node affinity to the target's hostname (ANDed into every existing required term)."""
    meta = dict(pod.get("metadata") or {})
    spec = dict(pod.get("spec") or {})
    name = str(meta.get("name"))
    annotations = {**(meta.get("annotations") or {}), MIGRATION_ANNOTATION: str(migration_id),
                   MIGRATED_FROM_ANNOTATION: f"{source_node}/{name}"}
    new_meta = {k: v for k, v in meta.items() if k in ("namespace", "labels")}
    new_meta.update(name=recreated_name(name, migration_id), annotations=annotations)
    spec.pop("nodeName", None)
    ours = {"key": HOSTNAME_LABEL, "operator": "In", "values": [target_hostname]}
    affinity = dict(spec.get("affinity") or {})
    node_affinity = dict(affinity.get("nodeAffinity") or {})
    required = dict(node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = [dict(t) for t in required.get("nodeSelectorTerms") or []] or [{}]
    for term in terms:
        expressions = [e for e in term.get("matchExpressions") or [] if e.get("key") != HOSTNAME_LABEL]
        term["matchExpressions"] = [*expressions, ours]
    required["nodeSelectorTerms"] = terms
    node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = required
    affinity["nodeAffinity"] = node_affinity
    spec["affinity"] = affinity
    return {"apiVersion": "v1", "kind": "Pod", "metadata": new_meta, "spec": spec}


# ---- the pure part: the step planner --------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One thing to do for an in-progress migration."""

    kind: str  # taint, notify-edge, find-pods, target, evict, recreate, delete-original, no-target, complete
    pod: str | None = None
    target: ScoredTarget | None = None
    body: Any = None
    detail: str = ""


def backoff(attempts: int) -> float:
    return min(BACKOFF_CAP_S, 2.0 * 2 ** max(0, attempts - 1))


def plan_pods(m: Migration, node: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]],
              cands: Sequence[NodeCandidate], source_zone: str | None, source: GpuModel | None,
              now: float, edge_known: bool = True) -> list[Step]:
    """The next steps of an in-progress migration, from its row and the cluster as it is now.

    A pod recorded as evicted (or deleted, gone, failed) is never acted on again; a pod waiting
    out a backoff is left alone until its time; a bare pod already recreated only has its
    original deleted. `complete` comes when no pod is left to act on."""
    assert m.id is not None
    steps: list[Step] = []
    done_steps = {s["step"] for s in m.steps}
    if node is None:
        if "taint" not in done_steps:
            steps.append(Step("taint", detail="the node is not in the cluster"))
    else:
        full = with_our_taint((node.get("spec") or {}).get("taints") or [], taint_value(m))
        if full is not None:
            steps.append(Step("taint", body=full, detail=f"{TAINT_KEY}={taint_value(m)}:{TAINT_EFFECT}"))
    gpu_subjects = [s for s in m.subjects if s != OFFLINE_SUBJECT]
    if edge_known and gpu_subjects and "notify-edge" not in done_steps:
        steps.append(Step("notify-edge", body=gpu_subjects))

    on_node = {pod_key(p): p for p in pods if (p.get("spec") or {}).get("nodeName") == m.node}
    movable = {k: p for k, p in on_node.items() if movable_reason(p, m.node) is None}
    if "find-pods" not in done_steps:
        skipped = sorted(f"{k} ({movable_reason(p, m.node)})" for k, p in on_node.items()
                         if k not in movable and movable_reason(p, m.node) != "no GPU request")
        steps.append(Step("find-pods", body=sorted(movable),
                          detail=f"{len(movable)} GPU pod(s): {', '.join(sorted(movable)) or 'none'}"
                                 + (f"; left alone: {', '.join(skipped)}" if skipped else "")))

    todo: dict[str, Mapping[str, Any]] = {}
    waiting = False
    for key, pod in movable.items():
        rec = m.pods.get(key) or {}
        uid = (pod.get("metadata") or {}).get("uid")
        same_pod = not rec or rec.get("uid") in (None, uid) or uid is None
        if rec and same_pod and rec.get("state") in POD_DONE:
            continue  # already handled: never evict twice
        if rec and same_pod and rec.get("next_at") is not None and now < rec["next_at"]:
            waiting = True
            continue
        todo[key] = pod
    for key, rec in m.pods.items():  # recreated copies whose original left on its own
        if rec.get("state") == "recreated" and key not in on_node:
            steps.append(Step("delete-original", pod=key, body=None, detail="the original is already gone"))

    needs = {key: pod_needs(pod, source_zone, source) for key, pod in todo.items()}
    for a in placement.assign(needs.values(), cands):
        key = a.pod.key
        pod = todo[key]
        rec = m.pods.get(key) or {}
        if rec.get("state") == "recreated":
            steps.append(Step("delete-original", pod=key, body=pod))
            continue
        if "target" not in rec or rec["target"] != (a.target.node if a.target else None):
            steps.append(Step("target", pod=key, target=a.target, body=a.ranked,
                              detail=_target_detail(a.target, a.ranked)))
        if is_controller_owned(pod):
            steps.append(Step("evict", pod=key, target=a.target, body=pod))
        elif a.target is not None:
            labels = next((c.labels for c in cands if c.name == a.target.node), {})
            hostname = labels.get(HOSTNAME_LABEL) or a.target.node
            manifest = recreate_manifest(pod, a.target.node, hostname, m.id, m.node)
            steps.append(Step("recreate", pod=key, target=a.target, body=manifest))
            steps.append(Step("delete-original", pod=key, body=pod))
        else:
            steps.append(Step("no-target", pod=key, body=pod, detail=_target_detail(None, a.ranked)))
    if not todo and not waiting and not any(s.kind == "delete-original" for s in steps):
        failed = sorted(k for k, r in m.pods.items() if r.get("state") == "failed")
        steps.append(Step("complete", body=failed,
                          detail=f"{len(m.pods)} pod(s) handled" + (f"; given up: {', '.join(failed)}" if failed else "")))
    return steps


def record_error(m: Migration, step: Step, error: str, now: float) -> Migration:
    """An API error on a step: retry with backoff; a pod is given up after MAX_POD_ERRORS."""
    if step.pod is None:
        return m.step(step.kind, "error", f"{error}; retried on the next scan", now)
    rec = m.pods.get(step.pod) or {}
    errors = int(rec.get("errors") or 0) + 1
    if errors >= MAX_POD_ERRORS:
        m = m.with_pod(step.pod, now, state="failed", errors=errors, next_at=None)
        return m.step(step.kind, "failed", f"{error}; given up after {errors} errors", now, pod=step.pod)
    wait = backoff(errors)
    state = "recreated" if rec.get("state") == "recreated" else "waiting"
    m = m.with_pod(step.pod, now, state=state, errors=errors, next_at=now + wait)
    return m.step(step.kind, "error", f"{error}; retry in {wait:g} s", now, pod=step.pod)


def _target_detail(target: ScoredTarget | None, ranked: Sequence[ScoredTarget]) -> str:
    others = [t for t in ranked if t is not target][:4]
    parts = []
    if target is not None:
        parts.append(f"{target.node} (score {target.score:g}: {'; '.join(target.reasons)})")
    else:
        parts.append("no node fits")
    for t in others:
        verdict = f"score {t.score:g}" if t.accepted else "rejected"
        parts.append(f"{t.node} {verdict}: {'; '.join(t.reasons)}")
    return " | ".join(parts)


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


# ---- the manager: I/O around the pure part --------------------------------------------------


class MigrationManager:
    """The controller's migration subsystem (see the module docstring)."""

    name = "migration"

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.store = controller.store
        self.settings = controller.settings
        self._wake = asyncio.Event()
        self._first_unhealthy: dict[tuple[str, str], float] = {}
        self._offline_checked_at = 0.0
        self.ticks = 0
        self.scan_interval_s = max(0.5, min(5.0, self.settings.migration_grace / 2))
        controller.ingestor.listeners.append(self._on_batch)

    # -- wiring --------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/migrations", self._list)
        app.router.add_get("/api/v1/migrations/{id}", self._one)

    async def _on_batch(self, batch: list[Incoming]) -> None:
        """Wake the scan early for a request or a health change (statuses, which come all the
        time from every node, wait for the periodic scan)."""
        if any(i.envelope.kind in (Kind.MIGRATION_REQUEST, Kind.HEALTH) for i in batch):
            self._wake.set()

    async def lead(self) -> None:
        log.info("migrations: leading", extra={"kube": self.controller.kube is not None})
        while True:
            self._wake.clear()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("migration scan failed; retrying")
            if await wait_event(self._wake, self.scan_interval_s):
                await asyncio.sleep(0.2)  # let the rest of a burst land in the store

    @property
    def rules(self) -> Rules:
        s = self.settings
        return Rules(grace_s=s.migration_grace, offline_threshold_s=s.offline_threshold,
                     max_concurrent=s.migration_max_concurrent, cooldown_s=s.migration_node_cooldown,
                     has_kube=self.controller.kube is not None)

    # -- one scan ------------------------------------------------------------------------------

    async def tick(self) -> None:
        now = time.time()
        kube = self.controller.kube
        world, migrations, last_started = await asyncio.to_thread(self._load, now)
        self._remember_unhealthy(world, now)
        kube_nodes: list[dict[str, Any]] | None = None
        pods: list[dict[str, Any]] | None = None
        offline_long = [n for n, (online, seen) in world.nodes.items()
                        if not online and now - seen > self.settings.offline_threshold]
        if kube is not None and offline_long and now - self._offline_checked_at >= OFFLINE_CHECK_EVERY_S:
            self._offline_checked_at = now  # listing every pod is not free: not on every scan
            kube_nodes, pods = await self._read_cluster(kube)
            world = replace(world, gpu_pods=gpu_pods_by_node(pods))
        triggers = find_triggers(world, self.rules, now, self._first_unhealthy)
        new, changed = reconcile(world, migrations, last_started, triggers, self.rules, now)
        if new or changed:
            await asyncio.to_thread(self._save, new, changed, now)
            if any(m.state == "pending" for m in new):
                self._wake.set()  # start it on the next scan, right away
            for m in new:
                log.info("migration %s for %s: %s (%s)", m.state, m.node, m.trigger, m.reason, extra={"node": m.node})
            world, migrations, last_started = await asyncio.to_thread(self._load, now)
        self.ticks += 1
        if kube is None:
            return
        work = [m for m in migrations if m.state == "in-progress"]
        healing = to_recover(world, migrations)
        if not work and not healing:
            return
        if kube_nodes is None or pods is None:
            kube_nodes, pods = await self._read_cluster(kube)
        if work:
            world = with_samples(world, await asyncio.to_thread(self._samples))
        for m in work:
            await self._advance(kube, m, world, kube_nodes, pods)
        for m in healing:
            await self._recover(kube, m)

    async def _read_cluster(self, kube: Kube) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        serialize = kube.api_client.sanitize_for_serialization
        nodes = await kube.call(kube.core.list_node)
        pods = await kube.call(kube.core.list_pod_for_all_namespaces)
        return [serialize(n) for n in nodes.items], [serialize(p) for p in pods.items]

    def _remember_unhealthy(self, world: World, now: float) -> None:
        seen = set()
        for node, gpus in world.gpus.items():
            for g in gpus:
                if not gpu_healthy(g) and g.health is not None:
                    seen.add((node, g.uuid))
                    self._first_unhealthy.setdefault((node, g.uuid), now)
        for key in list(self._first_unhealthy):
            if key not in seen:
                del self._first_unhealthy[key]

    # -- one migration -------------------------------------------------------------------------

    async def _advance(self, kube: Kube, m: Migration, world: World, kube_nodes: list[dict[str, Any]],
                       pods: list[dict[str, Any]]) -> None:
        """Run the planned steps of one in-progress migration, recording each as it happens."""
        node = next((n for n in kube_nodes if (n.get("metadata") or {}).get("name") == m.node), None)
        if node is not None:  # read it fresh: the taint list must not be stale when we patch it
            try:
                node = kube.api_client.sanitize_for_serialization(await kube.call(kube.core.read_node, m.node))
            except KubeError as exc:
                if not exc.not_found:
                    raise
                node = None
        zone = (((node or {}).get("metadata") or {}).get("labels") or {}).get(ZONE_LABEL)
        cands = candidates(kube_nodes, pods, world)
        source = source_gpu(world, m.node, m.subjects, node)
        now = time.time()
        plan = plan_pods(m, node, pods, cands, zone, source, now, edge_known=m.node in world.nodes)
        held: set[str] = set()  # pods whose step failed or must wait: their later steps wait too
        for step in plan:
            if step.pod in held:
                continue
            # A step and its record go together: losing leadership does not cut between them.
            m, ok, go_on = await asyncio.shield(self._step(kube, m, step))
            if not go_on:
                return
            waiting = ((m.pods.get(step.pod) or {}).get("next_at") or 0) > time.time() if step.pod else False
            if step.pod and (not ok or waiting):
                held.add(step.pod)

    async def _step(self, kube: Kube, m: Migration, step: Step) -> tuple[Migration, bool, bool]:
        """Do one step and record it: (the migration, whether it worked, whether to go on)."""
        now = time.time()
        ok = go_on = True
        try:
            m = await self._do(kube, m, step, now)
        except KubeError as exc:
            ok = False
            if exc.status == 0:
                log.warning("API server unreachable during migration %s: %s", m.id, exc)
                go_on = False
            m = record_error(m, step, str(exc), now)
        await asyncio.to_thread(self._update, m)
        return m, ok, go_on

    async def _do(self, kube: Kube, m: Migration, step: Step, now: float) -> Migration:
        """Carry out one step; return the migration with its outcome recorded."""
        key = step.pod
        if step.kind == "taint":
            if step.body is None:
                return m.step("taint", "skipped", step.detail, now)
            await kube.call(kube.core.patch_node, m.node, {"spec": {"taints": step.body}})
            log.info("tainted %s with %s", m.node, step.detail, extra={"node": m.node})
            return m.step("taint", "applied", step.detail, now)
        if step.kind == "notify-edge":
            sent = [uuid for uuid in step.body if await self._command(m, "migrate_away", uuid)]
            outcome = "sent" if len(sent) == len(step.body) else "not-sent"
            return m.step("notify-edge", outcome, f"migrate_away for {', '.join(step.body)}"
                          + ("" if outcome == "sent" else " (MQTT link down; the taint and evictions go on)"), now)
        if step.kind == "find-pods":
            return m.step("find-pods", "found", step.detail, now)
        if step.kind == "complete":
            state = "failed" if step.body else "completed"
            log.info("migration %s %s on %s", m.id, state, m.node, extra={"node": m.node})
            return replace(m.step("complete", state, step.detail, now), state=state, next_attempt_at=None)
        assert key is not None
        namespace, name = key.split("/", 1)
        uid = ((step.body or {}).get("metadata") or {}).get("uid") if isinstance(step.body, Mapping) else None
        target = step.target.node if step.target else None
        if step.kind == "target":
            outcome = "chosen" if step.target else "none"
            m = m.with_pod(key, now, target=target)
            return m.step("target", outcome, step.detail, now, pod=key, target=target)
        if step.kind == "no-target":
            rec = m.pods.get(key) or {}
            attempts = int(rec.get("attempts") or 0) + 1
            # Nothing to back off from (no API call failed): look again soon, capacity may appear.
            m = m.with_pod(key, now, state="waiting", attempts=attempts, next_at=now + NO_TARGET_RETRY_S, uid=uid,
                           owned=False)
            m = replace(m, next_attempt_at=now + NO_TARGET_RETRY_S)
            return m.step("recreate", "retry", f"no node fits the bare pod yet; looking again every "
                                               f"{NO_TARGET_RETRY_S:g} s", now, pod=key)
        if step.kind == "evict":
            body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace}}
            rec = m.pods.get(key) or {}
            try:
                await kube.call(kube.core.create_namespaced_pod_eviction, name, namespace, body)
            except KubeError as exc:
                if exc.not_found:
                    m = m.with_pod(key, now, state="gone", uid=uid, owned=True, next_at=None)
                    return m.step("evict", "gone", "the pod was already gone", now, pod=key)
                if not exc.too_many_requests:
                    raise
                attempts = int(rec.get("attempts") or 0) + 1
                wait = backoff(attempts)
                m = m.with_pod(key, now, state="waiting", attempts=attempts, next_at=now + wait, uid=uid, owned=True)
                m = replace(m, next_attempt_at=now + wait)
                return m.step("evict", "retry", f"refused (429, a PodDisruptionBudget): retry in {wait:g} s "
                                                f"(attempt {attempts})", now, pod=key)
            m = m.with_pod(key, now, state="evicted", uid=uid, owned=True, next_at=None, target=target)
            log.info("evicted %s from %s", key, m.node, extra={"node": m.node})
            return m.step("evict", "evicted", "eviction accepted; its controller recreates it"
                                              + (f", expected on {target}" if target else ""), now, pod=key,
                          target=target)
        if step.kind == "recreate":
            new_name = step.body["metadata"]["name"]
            try:
                await kube.call(kube.core.create_namespaced_pod, namespace, step.body)
                outcome = "created"
            except KubeError as exc:
                if not exc.conflict:
                    raise
                outcome = "created"  # made by us before a restart: same deterministic name
            m = m.with_pod(key, now, state="recreated", new_name=new_name, uid=uid, owned=False, next_at=None,
                           target=target)
            log.info("recreated %s as %s/%s on %s", key, namespace, new_name, target, extra={"node": m.node})
            return m.step("recreate", outcome, f"{namespace}/{new_name} with required node affinity "
                                               f"{HOSTNAME_LABEL} In [{target}]", now, pod=key, target=target)
        if step.kind == "delete-original":
            detail = "original deleted"
            if step.body is not None:
                grace = 0 if OFFLINE_SUBJECT in m.subjects else None
                try:
                    await kube.call(kube.core.delete_namespaced_pod, name, namespace, grace_period_seconds=grace)
                except KubeError as exc:
                    if not exc.not_found:
                        raise
                    detail = "the original was already gone"
            else:
                detail = step.detail or detail
            m = m.with_pod(key, now, state="deleted", next_at=None)
            return m.step("delete-original", "deleted", detail, now, pod=key)
        raise ValueError(f"unknown step {step.kind}")

    async def _recover(self, kube: Kube, m: Migration) -> None:
        """The GPUs are healthy again: remove our taint (only ours) and close the migration."""
        now = time.time()
        try:
            node = await kube.call(kube.core.read_node, m.node)
            taints = kube.api_client.sanitize_for_serialization(node).get("spec", {}).get("taints") or []
            kept = without_our_taint(taints)
            if kept is not None:
                await kube.call(kube.core.patch_node, m.node, {"spec": {"taints": kept}})
                m = m.step("untaint", "removed", f"{TAINT_KEY} removed; other taints kept ({len(kept)})", now)
                log.info("untainted %s: GPUs healthy again", m.node, extra={"node": m.node})
            else:
                m = m.step("untaint", "absent", f"{TAINT_KEY} was not on the node", now)
        except KubeError as exc:
            if not exc.not_found:
                log.warning("untainting %s failed, retrying: %s", m.node, exc)
                return
            m = m.step("untaint", "skipped", "the node is not in the cluster", now)
        for uuid in [s for s in m.subjects if s != OFFLINE_SUBJECT]:
            await self._command(m, "undrain", uuid)
        m = replace(m, state="recovered", next_attempt_at=None)
        await asyncio.to_thread(self._update, m)

    async def _command(self, m: Migration, command: str, uuid: str) -> bool:
        """Tell the edge, through the command outbox (sent again until the edge answers; applied
        at most once: the id is derived from the migration and the GPU)."""
        digest = hashlib.sha1(uuid.encode()).hexdigest()[:12]
        body = CommandBody(command=command, gpu_uuid=uuid, args={"migration": m.id})  # type: ignore[arg-type]
        return await self.controller.commands.send(m.node, body, f"migration-{m.id}-{command}-{digest}")

    # -- the database --------------------------------------------------------------------------

    def _writer(self) -> sa.Engine:
        return self.store.engine.execution_options(kgpu_begin="IMMEDIATE")

    def _load(self, now: float) -> tuple[World, list[Migration], dict[str, float]]:
        """The fleet view, the open migrations and each node's last start, in one read."""
        from cloud.store import epoch_key, events_table, gpus_table, nodes_table

        t, e, trig = migrations_table, events_table, migration_triggers_table
        with self.store.engine.connect() as conn, conn.begin():
            node_rows = list(conn.execute(sa.select(nodes_table.c.name, nodes_table.c.online, nodes_table.c.last_seen,
                                                    nodes_table.c.outbox_epoch)))
            nodes = {r.name: (bool(r.online), float(r.last_seen)) for r in node_rows}
            current_epoch = {r.name: epoch_key(r.outbox_epoch) for r in node_rows}
            # Not the samples: at thousands of nodes, decoding every GPU's JSON each scan cost as
            # much as the ingest. Only placement needs them (`with_samples`, when a migration runs).
            gpu_rows = [dict(r._mapping) for r in conn.execute(
                sa.select(*[c for c in gpus_table.c if c.name != "sample"]).order_by(gpus_table.c.index))]
            migrations = [Migration.from_row(r._mapping) for r in conn.execute(
                sa.select(t).where(t.c.state.in_(ACTIVE_STATES)).order_by(t.c.id))]
            last_started = {r.node: float(r.started) for r in conn.execute(
                sa.select(t.c.node, sa.func.max(t.c.started_at).label("started"))
                .where(t.c.started_at.is_not(None)).group_by(t.c.node))}
            consumed = sa.select(trig.c.event_id).where(trig.c.event_id == e.c.id).exists()
            requests = []
            for r in conn.execute(
                sa.select(e.c.id, e.c.node, e.c.ts, e.c.received_at, e.c.body)
                .where(e.c.kind == str(Kind.MIGRATION_REQUEST), e.c.received_at >= now - REQUEST_MAX_AGE_S, ~consumed)
                .order_by(e.c.id).limit(500)
            ):
                body = r.body or {}
                requests.append(RequestEvent(int(r.id), r.node, float(r.ts), float(r.received_at), body.get("gpu_uuid"),
                                             str(body.get("trigger") or "request"), str(body.get("reason") or "")))
            watched = sorted({g["node"] for g in gpu_rows if g["health"] not in (None, "healthy")}
                             | {m.node for m in migrations} | {r.node for r in requests})
            # Newest first by the node's own order: seq within its current outbox epoch, then
            # older epochs by time. Not by the edge's ts alone: its clock may have jumped.
            newest: dict[tuple[str, str], list[tuple[tuple[bool, float, int], tuple[float, float, str]]]] = \
                defaultdict(list)
            for chunk in (watched[i:i + 200] for i in range(0, len(watched), 200)):
                for r in conn.execute(
                    sa.select(e.c.id, e.c.node, e.c.epoch, e.c.seq, e.c.ts, e.c.received_at, e.c.body)
                    .where(e.c.kind == str(Kind.HEALTH), e.c.node.in_(chunk))
                    .order_by(e.c.id.desc()).limit(5000)
                ):
                    body = r.body or {}
                    if body.get("gpu_uuid"):
                        in_epoch = r.epoch == current_epoch.get(r.node)
                        order = (in_epoch, float(r.seq) if in_epoch else float(r.ts), int(r.id))
                        newest[(r.node, body["gpu_uuid"])].append(
                            (order, (float(r.ts), float(r.received_at), str(body.get("current")))))
            health = {key: [event for _, event in sorted(rows, key=lambda row: row[0], reverse=True)]
                      for key, rows in newest.items()}
        gpus: dict[str, list[GpuView]] = defaultdict(list)
        for g in gpu_rows:
            events = health.get((g["node"], g["uuid"]), [])
            healthy_ts = next((ts for ts, _, cur in events if cur == "healthy"), None)
            gpus[g["node"]].append(GpuView(
                node=g["node"], uuid=g["uuid"], index=int(g["index"]), name=g["name"], health=g["health"],
                unhealthy_since=unhealthy_since(events),
                last_event=(events[0][0], events[0][2]) if events else None, healthy_event_ts=healthy_ts))
        world = World(nodes=nodes, gpus={k: tuple(v) for k, v in gpus.items()}, requests=tuple(requests))
        return world, migrations, last_started

    def _samples(self) -> dict[tuple[str, str], Mapping[str, Any]]:
        """The latest sample of every GPU, by (node, uuid): what placement scores targets by."""
        from cloud.store import gpus_table

        g = gpus_table
        with self.store.engine.connect() as conn:
            return {(r.node, r.uuid): r.sample for r in conn.execute(
                sa.select(g.c.node, g.c.uuid, g.c.sample).where(g.c.sample.is_not(None)))}

    def _save(self, new: Sequence[Migration], changed: Sequence[Migration], now: float) -> None:
        """New rows, changed rows and consumed request events, in one transaction."""
        t, trig = migrations_table, migration_triggers_table
        with self._writer().connect() as conn, conn.begin():
            for m in new:
                mid = conn.execute(t.insert().values(m.row()).returning(t.c.id)).scalar_one()
                for event_id in m.consumed:
                    conn.execute(trig.insert().values(event_id=event_id, migration_id=mid, at=now))
            for m in changed:
                conn.execute(t.update().where(t.c.id == m.id).values(m.row()))
                for event_id in m.consumed:
                    conn.execute(trig.insert().values(event_id=event_id, migration_id=m.id, at=now))

    def _update(self, m: Migration) -> None:
        t = migrations_table
        with self._writer().connect() as conn, conn.begin():
            conn.execute(t.update().where(t.c.id == m.id).values(m.row()))

    def migrations(self, node: str | None = None, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Rows for the API, newest first."""
        t = migrations_table
        query = sa.select(t).order_by(t.c.id.desc()).limit(limit)
        if node is not None:
            query = query.where(t.c.node == node)
        if state is not None:
            query = query.where(t.c.state == state)
        with self.store.engine.connect() as conn:
            return [_out(r._mapping) for r in conn.execute(query)]

    def migration(self, mid: int) -> dict[str, Any] | None:
        t = migrations_table
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(t).where(t.c.id == mid)).first()
        return _out(row._mapping) if row is not None else None

    # -- HTTP ----------------------------------------------------------------------------------

    def _cluster_note(self) -> dict[str, Any]:
        if self.controller.kube is None:
            return {"cluster": False,
                    "detail": "this controller runs with --no-kube: migration triggers are recorded as "
                              "needs-cluster and nothing is moved"}
        return {"cluster": True}

    async def _list(self, request: web.Request) -> web.Response:
        node = request.query.get("node") or None
        if node is not None and not NODE_NAME_RE.match(node):
            return json_error(400, "not a valid node name", node)
        state = request.query.get("state") or None
        limit = int_query(request, "limit", 100, lo=1, hi=10_000) or 100
        rows = await asyncio.to_thread(self.migrations, node, state, limit)
        return web.json_response({**self._cluster_note(), "migrations": rows})

    async def _one(self, request: web.Request) -> web.Response:
        raw = request.match_info["id"]
        if not (raw.isascii() and raw.isdigit() and len(raw) < 19):
            return json_error(400, "a migration id is a positive integer", raw[:100])
        row = await asyncio.to_thread(self.migration, int(raw))
        if row is None:
            return json_error(404, "no such migration", int(raw))
        return web.json_response({**self._cluster_note(), **row})


def _out(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["subjects"] = list(out.get("subjects") or [])
    out["pods"] = dict(out.get("pods") or {})
    out["steps"] = list(out.get("steps") or [])
    return out


__all__ = [
    "GpuView",
    "Migration",
    "MigrationManager",
    "RequestEvent",
    "Rules",
    "Step",
    "Toleration",
    "Trigger",
    "World",
    "candidates",
    "find_triggers",
    "migration_triggers_table",
    "migrations_table",
    "plan_pods",
    "pod_needs",
    "reconcile",
    "recreate_manifest",
    "to_recover",
    "unhealthy_since",
    "with_our_taint",
    "with_samples",
    "without_our_taint",
]
