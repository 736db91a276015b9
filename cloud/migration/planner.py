"""The next steps of an in-progress migration, pure: from its row and the cluster as it is now.

The row is the truth across restarts: a pod recorded as evicted (deleted, gone, failed) is never
acted on again, a pod waiting out a backoff is left alone until its time, and a bare pod already
recreated only has its original deleted. The manager carries the steps out one by one and records
each as it happens; an API error on a step goes through `record_error` (backoff, then give up).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    OFFLINE_SUBJECT,
    POD_DONE,
    Migration,
    OfflineView,
    PodState,
    Step,
    StepKind,
)
from cloud.migration.placement import HOSTNAME_LABEL, GpuModel, NodeCandidate, ScoredTarget

MAX_POD_ERRORS = 5  # API errors (not 429s) on one pod before it is given up
BACKOFF_CAP_S = 60.0
NO_TARGET_RETRY_S = 5.0  # a bare pod with no target: look again this often


def backoff(attempts: int) -> float:
    return min(BACKOFF_CAP_S, 2.0 * 2 ** max(0, attempts - 1))


def plan_pods(m: Migration, node: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]],
              cands: Sequence[NodeCandidate], source_zone: str | None, source: GpuModel | None,
              now: float, edge_known: bool = True, offline: OfflineView | None = None) -> list[Step]:
    """The next steps of an in-progress migration, from its row and the cluster as it is now.

    A pod recorded as evicted (or deleted, gone, failed) is never acted on again; a pod waiting
    out a backoff is left alone until its time; a bare pod already recreated only has its
    original deleted. `complete` comes when no pod is left to act on. With `offline` (a migration
    off an unreachable node) only the pods that opted in move, once the node has been offline
    their wait, and none while the zone guard holds (see `offline_hold`)."""
    assert m.id is not None
    steps: list[Step] = []
    done_steps = {s["step"] for s in m.steps}
    if node is None:
        if StepKind.TAINT not in done_steps:
            steps.append(Step(StepKind.TAINT, detail="the node is not in the cluster"))
    else:
        full = with_our_taint((node.get("spec") or {}).get("taints") or [], taint_value(m))
        if full is not None:
            steps.append(Step(StepKind.TAINT, body=full,
                              detail=f"{TAINT_KEY}={taint_value(m)}:{TAINT_EFFECT}"))
    gpu_subjects = [s for s in m.subjects if s != OFFLINE_SUBJECT]
    if edge_known and gpu_subjects and StepKind.NOTIFY_EDGE not in done_steps:
        steps.append(Step(StepKind.NOTIFY_EDGE, body=gpu_subjects))

    on_node = {pod_key(p): p for p in pods if (p.get("spec") or {}).get("nodeName") == m.node}
    movable = {k: p for k, p in on_node.items() if movable_reason(p, m.node) is None}
    staying: dict[str, str] = {}  # offline: pods left on the node, and why
    held: dict[str, str] = {}  # offline: pods that opted in but wait, and why
    if offline is not None:
        movable, staying, held = offline_hold(m, movable, offline)
    if StepKind.FIND_PODS not in done_steps:
        skipped = sorted([f"{k} ({movable_reason(p, m.node)})" for k, p in on_node.items()
                          if k not in movable and k not in staying and k not in held
                          and movable_reason(p, m.node) != "no GPU request"]
                         + [f"{k} ({why})" for k, why in staying.items()])
        found = f"{len(movable)} GPU pod(s): {', '.join(sorted(movable)) or 'none'}"
        left = f"; left alone: {', '.join(skipped)}" if skipped else ""
        later = f"; waiting: {', '.join(sorted(held))}" if held else ""
        steps.append(Step(StepKind.FIND_PODS, body=sorted(movable), detail=found + left + later))

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

