"""The next steps of an in-progress migration, pure: from its row and the cluster as it is now.

The row is the truth across restarts: a pod recorded as evicted (deleted, gone, failed) is never
acted on again, a pod waiting out a backoff is left alone until its time, and a bare pod already
recreated only has its original deleted. The manager carries the steps out one by one and records
each as it happens; an API error on a step goes through `record_error` (backoff, then give up).
Which of the node's GPU pods a migration moves is `pod_scope`; whether the node is tainted,
`taint_reason` (see cloud/migration/__init__.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloud.migration import placement
from cloud.migration.manifests import (
    TAINT_EFFECT,
    TAINT_KEY,
    is_controller_owned,
    movable_reason,
    offline_verdict,
    pod_key,
    pod_needs,
    recreate_manifest,
    taint_value,
    with_our_taint,
)
from cloud.migration.model import (
    POD_DONE,
    POD_MAP_SOURCES,
    GpuView,
    Migration,
    OfflineView,
    PodState,
    Step,
    StepKind,
    gpu_subjects,
    in_service,
    node_level,
)
from cloud.migration.placement import HOSTNAME_LABEL, GpuModel, NodeCandidate, ScoredTarget

UNKNOWN_NAMESPACE = "unknown"  # an edge without a pod list names a pod "unknown/<pod uid>" (edge/pods.py)
MAX_POD_ERRORS = 5  # API errors (not 429s) on one pod before it is given up
BACKOFF_CAP_S = 60.0
NO_TARGET_RETRY_S = 5.0  # a bare pod with no target: look again this often


def backoff(attempts: int) -> float:
    return min(BACKOFF_CAP_S, 2.0 * 2 ** max(0, attempts - 1))


def plan_pods(m: Migration, node: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]],
              cands: Sequence[NodeCandidate], source_zone: str | None, source: GpuModel | None,
              now: float, edge_known: bool = True, offline: OfflineView | None = None,
              gpus: Sequence[GpuView] = (), pod_map_source: str | None = None) -> list[Step]:
    """The next steps of an in-progress migration, from its row and the cluster as it is now.

    `gpus` are the node's GPUs as its newest status has them, `pod_map_source` where their `pods`
    came from: a GPU migration moves only the pods listed on its subject GPUs when the source is
    known (`pod_scope`), and taints the node only when no GPU of it is left in service
    (`taint_reason`). A pod recorded as evicted (or deleted, gone, failed) is never acted on
    again; a pod waiting out a backoff is left alone until its time; a bare pod already recreated
    only has its original deleted. `complete` comes when no pod is left to act on. With `offline`
    (a migration off an unreachable node) only the pods that opted in move, once the node has
    been offline their wait, and none while the zone guard holds (see `offline_hold`)."""
    assert m.id is not None
    steps: list[Step] = []
    why_taint, why_not = taint_reason(m, gpus)
    last_taint = next((s for s in reversed(m.steps) if s["step"] == StepKind.TAINT), None)
    if node is None:
        if last_taint is None:
            steps.append(Step(StepKind.TAINT, detail="the node is not in the cluster"))
    else:
        full = with_our_taint((node.get("spec") or {}).get("taints") or [], taint_value(m))
        if full is not None and why_taint is not None:
            steps.append(Step(StepKind.TAINT, body=full,
                              detail=f"{TAINT_KEY}={taint_value(m)}:{TAINT_EFFECT} ({why_taint})"))
        elif full is not None and (last_taint is None or (last_taint.get("outcome") == "skipped"
                                                          and last_taint.get("detail") != why_not)):
            steps.append(Step(StepKind.TAINT, detail=why_not))  # no body: recorded as skipped
    subjects = gpu_subjects(m.subjects)
    notified = _notified(m)
    if edge_known and [s for s in subjects if s not in notified]:
        steps.append(Step(StepKind.NOTIFY_EDGE, body=[s for s in subjects if s not in notified]))

    on_node = {pod_key(p): p for p in pods if (p.get("spec") or {}).get("nodeName") == m.node}
    movable = {k: p for k, p in on_node.items() if movable_reason(p, m.node) is None}
    staying: dict[str, str] = {}  # pods left on the node, and why (offline; on a healthy GPU)
    held: dict[str, str] = {}  # offline: pods that opted in but wait, and why
    if offline is not None:
        movable, staying, held = offline_hold(m, movable, offline)
    uid_keys = {str((p.get("metadata") or {}).get("uid")): k for k, p in on_node.items()}
    scope = pod_scope(m, gpus, pod_map_source, uid_keys)
    unseen = sorted(k for k in movable if scope.unseen(k) and k not in m.pods)
    staying.update({k: scope.elsewhere(k) for k in movable if not scope.moves(k) and k not in m.pods})
    movable = {k: p for k, p in movable.items() if scope.moves(k) or k in m.pods}
    last_find = next((s for s in reversed(m.steps) if s["step"] == StepKind.FIND_PODS), None)
    if last_find is None or (last_find.get("subjects") is not None and last_find["subjects"] != subjects):
        skipped = sorted([f"{k} ({movable_reason(p, m.node)})" for k, p in on_node.items()
                          if k not in movable and k not in staying and k not in held
                          and movable_reason(p, m.node) != "no GPU request"]
                         + [f"{k} ({why})" for k, why in staying.items()])
        found = f"{len(movable)} GPU pod(s) {scope.where}: {', '.join(sorted(movable)) or 'none'}"
        left = f"; left alone: {', '.join(skipped)}" if skipped else ""
        later = f"; waiting: {', '.join(sorted(held))}" if held else ""
        maybe = (f"; of them not seen on any GPU per processes (they may hold a failing one): "
                 f"{', '.join(unseen)}" if unseen else "")
        steps.append(Step(StepKind.FIND_PODS, body={"pods": sorted(movable), "subjects": subjects},
                          detail=found + maybe + left + later))

    todo: dict[str, Mapping[str, Any]] = {}
    waiting = bool(held)
    if held:  # one step, its detail stable across scans: recorded once, not on every scan
        steps.append(Step(StepKind.HOLD, detail="; ".join(sorted(set(held.values())))))
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
        if rec.get("state") == PodState.RECREATED and key not in on_node:
            steps.append(Step(StepKind.DELETE_ORIGINAL, pod=key, body=None,
                              detail="the original is already gone"))

    needs = {key: pod_needs(pod, source_zone, source) for key, pod in todo.items()}
    for a in placement.assign(needs.values(), cands):
        key = a.pod.key
        pod = todo[key]
        rec = m.pods.get(key) or {}
        if rec.get("state") == PodState.RECREATED:
            steps.append(Step(StepKind.DELETE_ORIGINAL, pod=key, body=pod))
            continue
        if "target" not in rec or rec["target"] != (a.target.node if a.target else None):
            steps.append(Step(StepKind.TARGET, pod=key, target=a.target, body=a.ranked,
                              detail=_target_detail(a.target, a.ranked)))
        if is_controller_owned(pod):
            steps.append(Step(StepKind.EVICT, pod=key, target=a.target, body=pod))
        elif a.target is not None:
            labels = next((c.labels for c in cands if c.name == a.target.node), {})
            hostname = labels.get(HOSTNAME_LABEL) or a.target.node
            manifest = recreate_manifest(pod, a.target.node, hostname, m.id, m.node)
            steps.append(Step(StepKind.RECREATE, pod=key, target=a.target, body=manifest))
            steps.append(Step(StepKind.DELETE_ORIGINAL, pod=key, body=pod))
        else:
            steps.append(Step(StepKind.NO_TARGET, pod=key, body=pod,
                              detail=_target_detail(None, a.ranked)))
    if not todo and not waiting and not any(s.kind == StepKind.DELETE_ORIGINAL for s in steps):
        failed = sorted(k for k, r in m.pods.items() if r.get("state") == PodState.FAILED)
        given_up = f"; given up: {', '.join(failed)}" if failed else ""
        steps.append(Step(StepKind.COMPLETE, body=failed,
                          detail=f"{len(m.pods)} pod(s) handled{given_up}"))
    return steps


@dataclass(frozen=True)
class PodScope:
    """Which of the node's GPU pods a migration moves: `pods` None means every one of them."""

    pods: frozenset[str] | None
    where: str  # for the find-pods record: "on GPU 1 (GPU-...) per pod-resources", or why all
    healthy: Mapping[str, str] = field(default_factory=dict)  # pod -> the other GPUs it is on
    source: str | None = None

    def moves(self, pod: str) -> bool:
        """Whether this GPU pod of the node leaves: every one without a listing; else one listed
        on a failing GPU, or (per processes) one listed on no GPU at all."""
        return self.pods is None or pod in self.pods or self.unseen(pod)

    def unseen(self, pod: str) -> bool:
        """Listed on no GPU by a listing that shows only pods running GPU work now (processes):
        it may hold the failing GPU, so it moves; pod-resources lists every allocation."""
        return (self.pods is not None and self.source == "processes" and pod not in self.pods
                and pod not in self.healthy)

    def elsewhere(self, pod: str) -> str:
        """Why a GPU pod of the node outside the scope stays."""
        if pod in self.healthy:
            return f"on {self.healthy[pod]}"
        return f"holds no failing GPU per {self.source}"


def pod_scope(m: Migration, gpus: Sequence[GpuView], source: str | None,
              uid_keys: Mapping[str, str] | None = None) -> PodScope:
    """The pods a migration moves. A node-level one (offline, an edge request without a GPU):
    every GPU pod of the node. A GPU one: the pods the node's newest status lists on its subject
    GPUs (MIG devices and time-slicing replicas are folded into their GPU by the edge) when that
    status says where the listing came from; else every GPU pod of the node, since which GPU a pod
    holds is not known. A pod listed on a subject GPU moves even if it also holds a healthy one; a
    pod listed only on other GPUs never moves. pod-resources lists every device allocated, so a
    GPU pod it does not list on a failing GPU stays; processes lists only the pods running GPU
    work now, so a GPU pod it lists on no GPU at all moves too (`PodScope.unseen`). An edge
    without a pod list names a pod "unknown/<pod uid>": `uid_keys` (uid -> namespace/name of
    the node's pods) turns it into the pod's key."""
    subjects = gpu_subjects(m.subjects)

    def key(listed: str) -> str:
        namespace, _, rest = listed.partition("/")
        return (uid_keys or {}).get(rest, listed) if namespace == UNKNOWN_NAMESPACE else listed

    if node_level(m.subjects):
        return PodScope(None, "(the whole node: a node-level trigger)")
    if source not in POD_MAP_SOURCES:
        return PodScope(None, "(every GPU pod of the node: its status does not say which pod uses "
                              "which GPU, pod_map_source unknown)")
    by_uuid = {g.uuid: g for g in gpus}
    missing = [s for s in subjects if s not in by_uuid]
    if missing:
        return PodScope(None, f"(every GPU pod of the node: GPU {', '.join(missing)} is not in its "
                              "newest status, so its pods are not known)")
    failing = [by_uuid[s] for s in subjects]
    pods = frozenset(key(p) for g in failing for p in g.pods)
    healthy: dict[str, list[str]] = {}
    for g in gpus:
        if g.uuid not in subjects:
            for p in g.pods:
                healthy.setdefault(key(p), []).append(f"healthy GPU {g.index}" if in_service(g) else
                                                 f"GPU {g.index} (not a subject of this migration)")
    where = "on " + ", ".join(f"GPU {g.index} ({g.uuid})" for g in failing) + f" per {source}"
    return PodScope(pods, where, {p: ", ".join(ix) for p, ix in healthy.items()}, source)


def taint_reason(m: Migration, gpus: Sequence[GpuView]) -> tuple[str | None, str]:
    """(why the node gets our NoSchedule taint, None: it does not; why not). The node is tainted
    for a node-level trigger or when no GPU of it is left in service; otherwise the edge's device
    plugin fences the failing GPU alone and the node keeps taking work on its healthy GPUs."""
    if node_level(m.subjects):
        return "a node-level trigger", ""
    others = [g for g in gpus if g.uuid not in m.subjects]
    healthy = [g for g in others if in_service(g)]
    if not healthy:
        return ("no healthy GPU left on the node" if gpus
                else "the node's GPUs are not known"), ""
    subjects = ", ".join(gpu_subjects(m.subjects))
    return None, (f"no node taint: {len(healthy)} of {len(gpus)} GPU(s) still healthy "
                  f"({', '.join(str(g.index) for g in healthy)}); the edge's device plugin fences {subjects}")


def _notified(m: Migration) -> set[str]:
    """The GPUs the edge was already told to migrate away from (a notify-edge step recorded
    before steps named their GPUs counts for every subject)."""
    out: set[str] = set()
    for s in m.steps:
        if s["step"] == StepKind.NOTIFY_EDGE:
            if s.get("gpus") is None:
                return set(m.subjects)
            out.update(s["gpus"])
    return out


def offline_hold(m: Migration, movable: Mapping[str, Mapping[str, Any]], offline: OfflineView,
                 ) -> tuple[dict[str, Mapping[str, Any]], dict[str, str], dict[str, str]]:
    """Split an offline node's GPU pods: (those to move now, those that stay and why, those that
    wait and why). A pod already moved (or copied, its original still to delete) by this
    migration stays in the first group."""
    go: dict[str, Mapping[str, Any]] = {}
    staying: dict[str, str] = {}
    held: dict[str, str] = {}
    for key, pod in movable.items():
        if (m.pods.get(key) or {}).get("state") in (*POD_DONE, PodState.RECREATED):
            go[key] = pod
            continue
        verdict = offline_verdict(pod, offline.threshold_s, offline.selector)
        if verdict.wait_s is None:
            staying[key] = verdict.reason
        elif offline.offline_for_s is None:
            staying[key] = "the node is reachable again"
        elif offline.zone_guard is not None:
            held[key] = offline.zone_guard
        elif offline.offline_for_s < verdict.wait_s:
            held[key] = f"{key} waits until the node has been offline {verdict.wait_s:g} s ({verdict.reason})"
        else:
            go[key] = pod
    return go, staying, held


def record_error(m: Migration, step: Step, error: str, now: float) -> Migration:
    """An API error on a step: retry with backoff; a pod is given up after MAX_POD_ERRORS."""
    if step.pod is None:
        return m.step(step.kind, "error", f"{error}; retried on the next scan", now)
    rec = m.pods.get(step.pod) or {}
    errors = int(rec.get("errors") or 0) + 1
    if errors >= MAX_POD_ERRORS:
        m = m.with_pod(step.pod, now, state=PodState.FAILED, errors=errors, next_at=None)
        return m.step(step.kind, "failed", f"{error}; given up after {errors} errors", now,
                      pod=step.pod)
    wait = backoff(errors)
    state = PodState.RECREATED if rec.get("state") == PodState.RECREATED else PodState.WAITING
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

