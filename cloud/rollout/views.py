"""What the rollout API answers (pure): a rollout and its nodes as JSON, and a refusal."""

from __future__ import annotations

from typing import Any

from cloud.rollout.plan import NodeState


class RolloutRefused(Exception):
    """A request that cannot be carried out: HTTP `status` with a JSON error."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail


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
