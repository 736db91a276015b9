"""The data of task migration: what the fleet store says (`World`), a migration's row
(`Migration`), what starts one (`Trigger`) and what the planner asks for (`Step`).

Kept apart from the logic so that the pure parts (triggers, planner) and the I/O shell
(repository, manager) share one vocabulary. The enums are `str`-valued: a state or a step kind
is stored and served as the same string as before (`"in-progress"`, `"delete-original"`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from cloud.migration.placement import ScoredTarget
from shared.gpu import Health

OFFLINE_SUBJECT = "node-offline"  # the subject (and taint value) of an offline-node migration
# A node-level edge request (no GPU) merged into a migration that has GPU subjects: the whole node
# is its subject from then on (a node-level migration of its own has no subject at all).
NODE_SUBJECT = "node"
NODE_SUBJECTS = (OFFLINE_SUBJECT, NODE_SUBJECT)
POD_MAP_SOURCES = ("pod-resources", "processes")  # StatusBody.pod_map_source values we trust
MAX_STEPS = 200  # a row keeps its newest steps


class MigrationState(StrEnum):
    """The states of a migration (see cloud/migration/__init__.py)."""

    NEEDS_CLUSTER = "needs-cluster"  # recorded with --no-kube; pending once a cluster leads
    DEFERRED = "deferred"  # the node's cool-down; pending when it ends
    PENDING = "pending"  # waiting for a slot
    IN_PROGRESS = "in-progress"
    COMPLETED = "completed"  # its pods moved; a node taint (if one was needed) stays until recovery
    FAILED = "failed"  # a pod could not be moved; the taint stays
    RECOVERED = "recovered"  # healthy again, taint removed
    CANCELLED = "cancelled"  # healthy again before it started


ACTIVE_STATES = (
    MigrationState.NEEDS_CLUSTER,
    MigrationState.DEFERRED,
    MigrationState.PENDING,
    MigrationState.IN_PROGRESS,
    MigrationState.COMPLETED,
    MigrationState.FAILED,
)
NOT_STARTED = (MigrationState.NEEDS_CLUSTER, MigrationState.DEFERRED, MigrationState.PENDING)
HOLDING = (MigrationState.COMPLETED, MigrationState.FAILED)  # the taint stays until recovery


class TriggerKind(StrEnum):
    """Why a migration started."""

    EDGE_REQUEST = "edge-request"  # a migration_request event from an edge
    GPU_UNHEALTHY = "gpu-unhealthy"  # unhealthy or lost for longer than the grace
    NODE_OFFLINE = "node-offline"  # offline past the threshold with GPU pods bound


class StepKind(StrEnum):
    """What the planner asks the manager to do for an in-progress migration (one manager
    method each)."""

    TAINT = "taint"
    NOTIFY_EDGE = "notify-edge"
    FIND_PODS = "find-pods"
    TARGET = "target"
    EVICT = "evict"
    RECREATE = "recreate"
    DELETE_ORIGINAL = "delete-original"
    NO_TARGET = "no-target"  # recorded as a "recreate" retry
    HOLD = "hold"  # an offline node's pods wait: their own wait not over, or the zone guard
    COMPLETE = "complete"


class Lifecycle(StrEnum):
    """Steps recorded by the lifecycle (reconcile, recovery), not planned."""

    TRIGGER = "trigger"
    CANCEL = "cancel"
    COOL_DOWN = "cool-down"
    CLUSTER = "cluster"
    START = "start"
    UNTAINT = "untaint"
    REOPEN = "reopen"  # a finished migration gained a subject: in progress again


class PodState(StrEnum):
    """What was done to one pod of a migration (`Migration.pods[key]["state"]`)."""

    WAITING = "waiting"  # a backoff or no target yet
    EVICTED = "evicted"
    RECREATED = "recreated"  # the copy exists; the original is still to delete
    DELETED = "deleted"
    GONE = "gone"
    FAILED = "failed"  # given up after repeated errors


POD_DONE = (PodState.EVICTED, PodState.DELETED, PodState.GONE, PodState.FAILED)


# ---- inputs: what the fleet store says ------------------------------------------------------


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
    last_event: tuple[float, str] | None = None  # (edge ts, health) of the newest health event
    healthy_event_ts: float | None = None  # edge ts of the newest health event saying healthy
    # From the newest status: the pods using this GPU ("namespace/name"; see World.pod_sources
    # for where the list came from) and where the edge's remediation ladder stands (None: in service).
    pods: tuple[str, ...] = ()
    remediation: str | None = None
    # the extended resource its device plugin advertises (amd.com/gpu, ...); None: nvidia.com/gpu
    resource_name: str | None = None


@dataclass(frozen=True)
class RequestEvent:
    """A `migration_request` event not yet consumed by a migration."""

    event_id: int
    node: str
    ts: float  # edge clock
    received_at: float
    gpu_uuid: str | None
    trigger: str
    reason: str


@dataclass(frozen=True)
class World:
    """What the fleet store says, for `reconcile` and the planner."""

    # name -> (online, last_seen)
    nodes: Mapping[str, tuple[bool, float]] = field(default_factory=dict)
    gpus: Mapping[str, tuple[GpuView, ...]] = field(default_factory=dict)  # node -> its GPUs
    requests: tuple[RequestEvent, ...] = ()
    gpu_pods: Mapping[str, int] | None = None  # node -> movable GPU pods there; None: no cluster
    # node -> GPU pods allowed to move off it now that it is offline (opted in, waited long
    # enough: manifests.offline_verdict); None: not checked this scan
    offline_ready: Mapping[str, int] | None = None
    zones: Mapping[str, str] = field(default_factory=dict)  # node -> topology zone (from the cluster)
    # node -> where its GPUs' `pods` came from ("pod-resources" | "processes"); absent: unknown
    pod_sources: Mapping[str, str] = field(default_factory=dict)

    def gpu(self, node: str, uuid: str) -> GpuView | None:
        return next((g for g in self.gpus.get(node, ()) if g.uuid == uuid), None)


def gpu_healthy(gpu: GpuView | None) -> bool:
    """Healthy in the newest status and not contradicted by a newer non-healthy event."""
    if gpu is None or gpu.health != Health.HEALTHY:
        return False
    return gpu.last_event is None or gpu.last_event[1] == Health.HEALTHY


def in_service(gpu: GpuView | None) -> bool:
    """Healthy and not held by the edge's remediation ladder (fenced, draining, resetting ...):
    what a node needs to keep taking GPU work, and what recovery waits for."""
    return gpu_healthy(gpu) and gpu is not None and gpu.remediation is None


def gpu_subjects(subjects: Sequence[str]) -> list[str]:
    """The GPU uuids among a migration's subjects."""
    return [s for s in subjects if s not in NODE_SUBJECTS]


def node_level(subjects: Sequence[str]) -> bool:
    """Whether a migration is about the whole node: offline, an edge request without a GPU (no
    subject, or NODE_SUBJECT merged in). Such a migration taints the node and moves every GPU pod."""
    return not gpu_subjects(subjects) or any(s in NODE_SUBJECTS for s in subjects)


def with_samples(world: World, samples: Mapping[tuple[str, str], Mapping[str, Any]]) -> World:
    """The world with each GPU's latest sample filled in (the scan's load leaves them out)."""
    return replace(world, gpus={
        node: tuple(replace(g, sample=samples.get((node, g.uuid))) for g in gpus)
        for node, gpus in world.gpus.items()
    })


@dataclass(frozen=True)
class Rules:
    """The settings the pure decisions use."""

    grace_s: float
    offline_threshold_s: float
    max_concurrent: int
    cooldown_s: float
    has_kube: bool
    offline_zone_max_share: float = 0.5  # the zone guard: above this share offline, nothing moves
    offline_selector: Mapping[str, str] | None = None  # pods moved off an offline node without opting in


@dataclass(frozen=True)
class OfflineView:
    """What the planner of an offline-node migration needs to know about the node now."""

    offline_for_s: float | None  # None: the node is reachable again
    threshold_s: float
    selector: Mapping[str, str] | None = None
    zone_guard: str | None = None  # why nothing may move in the node's zone now (None: free to)


# ---- a migration ----------------------------------------------------------------------------


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", MigrationState(self.state))
        object.__setattr__(self, "trigger", TriggerKind(self.trigger))

    def step(self, step: str, outcome: str, detail: str, now: float, **extra: Any) -> Migration:
        """This migration with one more step recorded (a repeat of the last one is not kept)."""
        entry = {"step": str(step), "outcome": str(outcome), "detail": detail, "at": round(now, 3),
                 **{k: v for k, v in extra.items() if v is not None}}
        last = next((s for s in reversed(self.steps) if s.get("pod") == entry.get("pod")), None)
        if last is not None and all(last.get(k) == entry.get(k)
                                    for k in ("step", "outcome", "detail", "pod")):
            return replace(self, updated_at=now)
        return replace(self, steps=(*self.steps, entry)[-MAX_STEPS:], updated_at=now)

    def with_pod(self, key: str, now: float, **changes: Any) -> Migration:
        pods = dict(self.pods)
        pods[key] = {**pods.get(key, {}), **{k: _plain(v) for k, v in changes.items()}}
        return replace(self, pods=pods, updated_at=now)

    def row(self) -> dict[str, Any]:
        return {"node": self.node, "gpu_uuid": self.gpu_uuid, "subjects": list(self.subjects),
                "trigger": str(self.trigger), "reason": self.reason, "state": str(self.state),
                "created_at": self.created_at, "updated_at": self.updated_at,
                "started_at": self.started_at, "next_attempt_at": self.next_attempt_at,
                "pods": dict(self.pods), "steps": list(self.steps)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Migration:
        return cls(id=int(row["id"]), node=row["node"], gpu_uuid=row["gpu_uuid"],
                   subjects=tuple(row["subjects"] or ()), trigger=row["trigger"],
                   reason=row["reason"], state=row["state"],
                   created_at=row["created_at"], updated_at=row["updated_at"],
                   started_at=row["started_at"], next_attempt_at=row["next_attempt_at"],
                   pods=dict(row["pods"] or {}), steps=tuple(row["steps"] or ()))


@dataclass(frozen=True)
class Trigger:
    """A reason to move work that the fleet shows now."""

    node: str
    kind: TriggerKind
    subject: str | None  # a GPU uuid, OFFLINE_SUBJECT, or None (a node-level edge request)
    reason: str
    event: RequestEvent | None = None


@dataclass(frozen=True)
class Step:
    """One thing to do for an in-progress migration (planned by cloud/migration/planner.py)."""

    kind: StepKind
    pod: str | None = None
    target: ScoredTarget | None = None
    body: Any = None
    detail: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", StepKind(self.kind))


def _plain(value: Any) -> Any:
    """A str enum stored as its plain string (rows are JSON)."""
    return str(value) if isinstance(value, StrEnum) else value
