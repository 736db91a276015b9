"""The rollout planner: one pure function from (rollout, every node's view, now) to actions.

Why pure: the controller may die between any two steps of a rollout, and a new leader must take
the same decisions from the same stored state. All I/O (fleet store, Kubernetes) lives in
the rest of cloud/rollout/; this module only decides, so it is tested table by table and by hypothesis.

The DaemonSet uses `updateStrategy: OnDelete`: a node gets the new template only when its daemon
pod is deleted. Per node, in the manner of NVIDIA's GPU operator upgrade controller:

    upgrade-required --(wave open, a slot free, online)--> pod-deletion-required
    pod-deletion-required --(pod deleted / gone)--> validation-required
    validation-required --(reports the target version, online, not degraded)--> upgrade-done
    validation-required --(health_timeout passed)--> upgrade-failed
    upgrade-required | pod-deletion-required (pod not yet deleted) --(offline)--> offline-deferred
    offline-deferred --(online again)--> upgrade-required   (at any time, even after the last wave)

Rules (see `plan`): waves open one after the other (canaries are wave 0) once every node of the
open waves is settled (done, failed or deferred: a deferred node never holds a wave back); at
most `max_unavailable` nodes are in pod-deletion-required or validation-required at once; a failed
canary, or more failures than `failure_threshold`, rolls the rollout back.

Rollback: the template goes back to the saved previous one and every node whose pod this rollout
deleted is restarted again (same state machine, `reverting=True`; done = it no longer reports the
rolled-back version). Nodes never touched (deferred, still required) keep the old pod: nothing to do.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any


class NodeState(StrEnum):
    UPGRADE_REQUIRED = "upgrade-required"
    POD_DELETION_REQUIRED = "pod-deletion-required"
    VALIDATION_REQUIRED = "validation-required"
    UPGRADE_DONE = "upgrade-done"
    UPGRADE_FAILED = "upgrade-failed"
    OFFLINE_DEFERRED = "offline-deferred"


IN_FLIGHT = frozenset({NodeState.POD_DELETION_REQUIRED, NodeState.VALIDATION_REQUIRED})
"""Nodes whose daemon is (about to be) down: these count against max_unavailable."""
FINAL = frozenset({NodeState.UPGRADE_DONE, NodeState.UPGRADE_FAILED})
SETTLED = FINAL | {NodeState.OFFLINE_DEFERRED}
"""A wave may open when every node of the open waves is settled."""


class RolloutState(StrEnum):
    RUNNING = "running"
    ROLLING_BACK = "rolling-back"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled-back"
    CANCELLED = "cancelled"


ACTIVE = frozenset({RolloutState.RUNNING, RolloutState.ROLLING_BACK})


@dataclass(frozen=True)
class RolloutSpec:
    """What the planner needs of a rollout (counts already resolved from percentages)."""

    target_version: str
    max_unavailable: int
    failure_threshold: int  # more upgrade-failed nodes than this rolls back
    health_timeout: float  # seconds from pod deletion to a healthy report
    wave_count: int  # waves including the canary wave 0 (which may be empty)
    wave: int = 0  # the highest wave opened so far (monotonic, stored)
    state: RolloutState = RolloutState.RUNNING
    rollback_requested: bool = False  # an operator asked for it (POST .../rollback)


@dataclass(frozen=True)
class NodeView:
    """One node as stored (state, since, wave, marks) and as observed now (fleet store, pods)."""

    state: NodeState
    since: float
    wave: int = 0
    canary: bool = False
    online: bool = False
    daemon_version: str | None = None
    degraded: bool = False
    pod: str | None = None  # identity (uid) of the node's live daemon pod now; None: none
    marked_pod: str | None = None  # the pod to delete (pod-deletion-required), then the one deleted
    deleted: bool = False  # its pod was deleted in the current direction (forward, or reverting)
    reverting: bool = False  # rollback: this node goes back to the previous template


@dataclass(frozen=True)
class Transition:
    """Store `node` in state `to` since now. None fields keep their stored value."""

    node: str
    to: NodeState
    reason: str
    marked_pod: str | None = None
    clear_mark: bool = False  # store marked_pod = NULL
    deleted: bool | None = None
    reverting: bool | None = None
    from_version: str | None = None  # recorded when the node's pod is about to be restarted

    def changes(self, now: float) -> dict[str, Any]:
        """What this transition sets on the node (state, since, and the fields it names)."""
        changes: dict[str, Any] = {"state": self.to, "since": now}
        if self.marked_pod is not None:
            changes["marked_pod"] = self.marked_pod
        if self.clear_mark:
            changes["marked_pod"] = None
        if self.deleted is not None:
            changes["deleted"] = self.deleted
        if self.reverting is not None:
            changes["reverting"] = self.reverting
        return changes


@dataclass(frozen=True)
class DeletePod:
    """Delete the daemon pod `pod` on `node`; when that succeeds (or it is already gone) store `then`."""

    node: str
    pod: str
    then: Transition


@dataclass(frozen=True)
class OpenWave:
    wave: int


@dataclass(frozen=True)
class SetRolloutState:
    state: RolloutState
    reason: str


Action = Transition | DeletePod | OpenWave | SetRolloutState


# ---- the planner ----------------------------------------------------------------------------


@dataclass
class _Work:
    """The views as the actions emitted so far leave them, so later rules see earlier effects."""

    now: float
    views: dict[str, NodeView]
    actions: list[Action] = field(default_factory=list)

    def move(self, node: str, to: NodeState, reason: str, **marks: Any) -> Transition:
        t = Transition(node, to, reason, **marks)
        self.actions.append(t)
        self.views[node] = _applied(self.views[node], t, self.now)
        return t

    def count(self, states: frozenset[NodeState], eligible: Callable[[NodeView], bool] = lambda v: True) -> int:
        return sum(1 for v in self.views.values() if v.state in states and eligible(v))


def _applied(view: NodeView, t: Transition, now: float) -> NodeView:
    """The view after transition `t` (what the store will hold)."""
    return replace(view, **t.changes(now))


def plan(rollout: RolloutSpec, nodes: Mapping[str, NodeView], now: float) -> list[Action]:
    """Everything to do now, in order. Apply Transitions/OpenWave/SetRolloutState as one write;
    a DeletePod's `then` is stored only once its pod is really gone."""
    work = _Work(now, dict(nodes))
    if rollout.state == RolloutState.RUNNING:
        _forward(rollout, work)
    elif rollout.state == RolloutState.ROLLING_BACK:
        _reverse(rollout, work)
    return work.actions


def healthy_on(view: NodeView, version: str) -> bool:
    """The node runs `version` and is fit: the rule for upgrade-done."""
    return view.online and not view.degraded and view.daemon_version == version


def _forward(r: RolloutSpec, w: _Work) -> None:
    def validated(v: NodeView) -> bool:
        return v.pod is not None and v.pod != v.marked_pod and healthy_on(v, r.target_version)

    # first what already happened (pods gone, reports, timeouts), so a rollback sees every restart
    _settle_in_flight(r, w, validated, describe=lambda v: _not_healthy(v, r.target_version))
    if r.rollback_requested:
        _roll_back(w, "rollback requested by an operator")
        return
    failed = sorted(n for n, v in w.views.items() if v.state == NodeState.UPGRADE_FAILED)
    canaries = [n for n in failed if w.views[n].canary]
    if canaries:
        _roll_back(w, f"canary {', '.join(canaries)} failed")
        return
    if len(failed) > r.failure_threshold:
        _roll_back(w, f"{len(failed)} nodes failed, more than the failure threshold {r.failure_threshold}")
        return

    wave = r.wave
    while True:
        for name in sorted(w.views):
            v = w.views[name]
            if v.wave <= wave:
                _offline_rules(w, name, v)
                v = w.views[name]
                if v.state == NodeState.UPGRADE_REQUIRED and not v.deleted and healthy_on(v, r.target_version):
                    w.move(name, NodeState.UPGRADE_DONE, f"already reports {r.target_version}: no restart needed")
        if wave + 1 < r.wave_count and all(v.state in SETTLED for v in w.views.values() if v.wave <= wave):
            wave += 1
            w.actions.append(OpenWave(wave))
            continue
        break

    _start(r, w, lambda v: v.wave <= wave, "restart onto the new template (wave {wave})", record_version=True)
    _delete_marked(w)
    if wave + 1 >= r.wave_count and all(v.state in FINAL for v in w.views.values()):
        done = w.count(frozenset({NodeState.UPGRADE_DONE}))
        w.actions.append(SetRolloutState(RolloutState.COMPLETED, f"{done} nodes on {r.target_version}, "
                                                                 f"{len(failed)} failed"))


def _reverse(r: RolloutSpec, w: _Work) -> None:
    """Rollback: only reverting nodes act; done = a new pod that no longer reports the target."""

    def back(v: NodeView) -> bool:
        return (v.pod is not None and v.pod != v.marked_pod and v.online and not v.degraded
                and v.daemon_version is not None and v.daemon_version != r.target_version)

    _settle_in_flight(r, w, back, describe=lambda v: _not_back(v, r.target_version))
    for name in sorted(w.views):
        if w.views[name].reverting:
            _offline_rules(w, name, w.views[name])
    _start(r, w, lambda v: v.reverting, "rollback: restart onto the previous template", record_version=False)
    _delete_marked(w)
    if all(v.state in FINAL for v in w.views.values() if v.reverting):
        back_count = w.count(frozenset({NodeState.UPGRADE_DONE}), lambda v: v.reverting)
        failed = w.count(frozenset({NodeState.UPGRADE_FAILED}), lambda v: v.reverting)
        w.actions.append(SetRolloutState(RolloutState.ROLLED_BACK, f"{back_count} nodes back on the previous "
                                                                   f"template, {failed} did not come back"))


def _settle_in_flight(r: RolloutSpec, w: _Work, validated: Callable[[NodeView], bool],
                      describe: Callable[[NodeView], str]) -> None:
    """Nodes whose pod is gone move to validation; validated nodes are done, timed-out ones failed."""
    for name in sorted(w.views):
        v = w.views[name]
        if v.state == NodeState.POD_DELETION_REQUIRED:
            if v.pod is None or v.pod != v.marked_pod:
                w.move(name, NodeState.VALIDATION_REQUIRED, "the old pod is gone", deleted=True)
            elif not v.online:
                w.move(name, NodeState.OFFLINE_DEFERRED, "node went offline before its pod was deleted",
                       clear_mark=True)
        v = w.views[name]
        if v.state == NodeState.VALIDATION_REQUIRED:
            if validated(v):
                w.move(name, NodeState.UPGRADE_DONE, f"reports {v.daemon_version}, online, not degraded")
            elif w.now - v.since >= r.health_timeout:
                w.move(name, NodeState.UPGRADE_FAILED,
                       f"not healthy {r.health_timeout:g} s after its pod was deleted: {describe(v)}")


def _offline_rules(w: _Work, name: str, v: NodeView) -> None:
    if v.state == NodeState.UPGRADE_REQUIRED and not v.online:
        w.move(name, NodeState.OFFLINE_DEFERRED, "node offline: it is upgraded when it comes back")
    elif v.state == NodeState.OFFLINE_DEFERRED and v.online:
        w.move(name, NodeState.UPGRADE_REQUIRED, "node back online")


def _start(r: RolloutSpec, w: _Work, eligible: Callable[[NodeView], bool], reason: str, *,
           record_version: bool) -> None:
    """Fill the free slots (max_unavailable) with online upgrade-required nodes, earliest wave first."""
    free = r.max_unavailable - w.count(IN_FLIGHT)
    candidates = sorted(
        (v.wave, name) for name, v in w.views.items()
        if v.state == NodeState.UPGRADE_REQUIRED and v.online and eligible(v)
    )
    for wave, name in candidates[: max(0, free)]:
        v = w.views[name]
        why = reason.format(wave=wave)
        from_version = v.daemon_version if record_version else None
        if v.pod is None:  # nothing to delete: the DaemonSet creates the pod from the template now
            w.move(name, NodeState.VALIDATION_REQUIRED, f"{why}: no daemon pod, waiting for the new one",
                   clear_mark=True, deleted=True, from_version=from_version)
        else:
            w.move(name, NodeState.POD_DELETION_REQUIRED, why, marked_pod=v.pod, from_version=from_version)


def _delete_marked(w: _Work) -> None:
    for name in sorted(w.views):
        v = w.views[name]
        if v.state == NodeState.POD_DELETION_REQUIRED and v.online and v.pod is not None and v.pod == v.marked_pod:
            then = Transition(name, NodeState.VALIDATION_REQUIRED, f"pod {v.pod} deleted", deleted=True)
            w.actions.append(DeletePod(name, v.pod, then))


def _roll_back(w: _Work, reason: str) -> None:
    """Switch to rolling-back: nodes this rollout restarted go back; untouched ones are left alone."""
    w.actions.append(SetRolloutState(RolloutState.ROLLING_BACK, reason))
    for name in sorted(w.views):
        v = w.views[name]
        if v.deleted or v.state == NodeState.VALIDATION_REQUIRED:
            w.move(name, NodeState.UPGRADE_REQUIRED, f"rollback ({reason}): back to the previous template",
                   reverting=True, deleted=False, clear_mark=True)
        elif v.state == NodeState.POD_DELETION_REQUIRED:
            w.move(name, NodeState.UPGRADE_REQUIRED, f"rollback ({reason}): pod not restarted", clear_mark=True)


def _not_healthy(v: NodeView, version: str) -> str:
    problems = []
    if v.pod is None or v.pod == v.marked_pod:
        problems.append("no new pod")
    if not v.online:
        problems.append("offline")
    if v.daemon_version != version:
        problems.append(f"reports version {v.daemon_version}, not {version}")
    if v.degraded:
        problems.append("degraded")
    return ", ".join(problems) or "unknown"


def _not_back(v: NodeView, version: str) -> str:
    if v.daemon_version == version:
        return f"still reports {version}"
    return _not_healthy(v, v.daemon_version or "?")


# ---- pure helpers for creating a rollout ----------------------------------------------------

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_amount(value: int | str) -> tuple[float, bool]:
    """`3` -> (3, False); `"25%"` -> (25.0, True); `"3"` -> (3, False). Raises ValueError."""
    if isinstance(value, bool):  # ValueError, not TypeError: pydantic reports it as a field error
        raise ValueError("expected a count or a percentage string like '25%'")
    if isinstance(value, int):
        number, percent = float(value), False
    else:
        match = _PERCENT.match(value)
        if match:
            number, percent = float(match.group(1)), True
        elif value.strip().isdigit():
            number, percent = float(value.strip()), False
        else:
            raise ValueError(f"expected a count or a percentage like '25%', got {value!r}")
    if number < 0 or (percent and number > 100):
        raise ValueError(f"out of range: {value!r}")
    return number, percent


def resolve_amount(value: int | str, total: int, *, at_least: int = 0) -> int:
    """A count, or a percentage of `total` rounded down (as Kubernetes does for maxUnavailable)."""
    number, percent = parse_amount(value)
    resolved = math.floor(number * total / 100 + 1e-9) if percent else int(number)
    return max(at_least, resolved)


def assign_waves(members: Sequence[str], canary: Sequence[str], percentages: Sequence[float]) -> dict[str, int]:
    """Wave of every member: canaries 0, then cumulative percentages of the other nodes (by name).

    Wave k (1-based) holds the nodes up to ceil(percentages[k-1] % of the non-canary nodes); the
    last wave takes whatever is left, so every member has a wave."""
    canaries = set(canary)
    rest = sorted(set(members) - canaries)
    waves = {name: 0 for name in canaries if name in set(members)}
    start = 0
    for k, pct in enumerate(percentages, start=1):
        end = len(rest) if k == len(percentages) else min(len(rest), math.ceil(pct * len(rest) / 100 - 1e-9))
        for name in rest[start:end]:
            waves[name] = k
        start = max(start, end)
    return waves


def version_from_image(image: str) -> str | None:
    """`registry:5000/kgpu/edge:0.2.0` -> "0.2.0"; None when the image names no tag (or a digest)."""
    if "@" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return None
    tag = last.rsplit(":", 1)[1]
    return tag or None


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def merge_diff(current: Any, desired: Any) -> Any:
    """A JSON merge patch that turns `current` into `desired` (keys only in `current` become null)."""
    if not isinstance(current, dict) or not isinstance(desired, dict):
        return desired
    patch: dict[str, Any] = {key: None for key in current if key not in desired}
    for key, value in desired.items():
        if key not in current:
            patch[key] = value
        elif current[key] != value:
            patch[key] = merge_diff(current[key], value)
    return patch


def with_image(template: Mapping[str, Any], image: str, container: str | None) -> dict[str, Any]:
    """The pod template with `image` set on `container` (default: the first container)."""
    containers = list(template.get("spec", {}).get("containers") or [])
    if not containers:
        raise ValueError("the DaemonSet's pod template has no containers")
    names = [c.get("name") for c in containers]
    index = 0 if container is None else (names.index(container) if container in names else -1)
    if index < 0:
        raise ValueError(f"no container {container!r} in the pod template (has {', '.join(map(str, names))})")
    containers[index] = {**containers[index], "image": image}
    return {**template, "spec": {**template.get("spec", {}), "containers": containers}}
