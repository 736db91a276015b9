"""The Kubernetes side of a migration, pure: which pods are GPU work to move, what placement
gets to know about pods and nodes, and the objects sent to the API server (the node's taint list,
an eviction, the recreated copy of a bare pod).

No I/O: the manager reads the cluster and sends what these functions build.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloud.migration import placement
from cloud.migration.model import OFFLINE_SUBJECT, Migration, World, in_service
from cloud.migration.placement import (
    HOSTNAME_LABEL,
    MEMORY_LABEL,
    PRODUCT_LABEL,
    ZONE_LABEL,
    CandidateGpu,
    GpuModel,
    NodeCandidate,
    PodNeeds,
    Taint,
)
from shared.policy import parse_duration

TAINT_KEY = "kgpu.io/gpu-unhealthy"
TAINT_EFFECT = "NoSchedule"
MIGRATION_ANNOTATION = "kgpu.io/migration"
MIGRATED_FROM_ANNOTATION = "kgpu.io/migrated-from"
# A pod's opt-in to leave a node offline at least this long (e.g. "600s"): see docs/operations.md
MIGRATE_WHEN_OFFLINE = "kgpu.io/migrate-when-offline"
UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"


def eviction_body(name: str, namespace: str) -> dict[str, Any]:
    """A policy/v1 Eviction of one pod (its PodDisruptionBudget may answer 429)."""
    return {"apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace}}


def taints_patch(taints: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A node patch that sets its full taint list."""
    return {"spec": {"taints": list(taints)}}


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


# ---- offline nodes: which pods may leave one, and when ---------------------------------------


@dataclass(frozen=True)
class OfflineVerdict:
    """Whether (and after how long offline) one pod may be moved off an unreachable node."""

    wait_s: float | None  # the node must be offline at least this long; None: never moved
    reason: str
    refusal: str | None = None  # an opt-in refused ("bad-annotation", "tolerates-unreachable"): logged, counted


def tolerates_unreachable_forever(pod: Mapping[str, Any]) -> bool:
    """A NoExecute toleration of the unreachable taint without tolerationSeconds: the pod asked to
    stay on its node however long the node is cut off."""
    for t in (pod.get("spec") or {}).get("tolerations") or []:
        key, operator = t.get("key"), t.get("operator") or "Equal"
        matches_key = key == UNREACHABLE_TAINT or (not key and operator == "Exists")
        if matches_key and t.get("effect") in (None, "", "NoExecute") and t.get("tolerationSeconds") is None:
            return True
    return False


def offline_verdict(pod: Mapping[str, Any], threshold_s: float,
                    selector: Mapping[str, str] | None) -> OfflineVerdict:
    """A pod stays on an unreachable node (edge autonomy keeps it running there) unless it opted in:
    the `kgpu.io/migrate-when-offline` annotation (moved once the node is offline that long, and at
    least `threshold_s`) or labels matching `selector` (moved after `threshold_s`). Never a pod
    that tolerates the unreachable taint forever."""
    meta = pod.get("metadata") or {}
    annotation = (meta.get("annotations") or {}).get(MIGRATE_WHEN_OFFLINE)
    labels = meta.get("labels") or {}
    selected = bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())
    opted_in = annotation is not None or selected
    if tolerates_unreachable_forever(pod):
        return OfflineVerdict(None, f"tolerates {UNREACHABLE_TAINT} without tolerationSeconds"
                              + (" (its opt-in is ignored)" if opted_in else ""),
                              "tolerates-unreachable" if opted_in else None)
    if annotation is not None:
        try:
            wait = parse_duration(str(annotation))
        except ValueError as exc:
            return OfflineVerdict(None, f"{MIGRATE_WHEN_OFFLINE}: {exc}", "bad-annotation")
        assert isinstance(wait, float)
        return OfflineVerdict(max(wait, threshold_s), f"{MIGRATE_WHEN_OFFLINE}={annotation}")
    if selected:
        return OfflineVerdict(threshold_s, "selected by offline_migration_selector")
    return OfflineVerdict(None, f"did not opt in ({MIGRATE_WHEN_OFFLINE})")


def offline_ready_by_node(pods: Iterable[Mapping[str, Any]], offline_for: Mapping[str, float],
                          threshold_s: float, selector: Mapping[str, str] | None) -> dict[str, int]:
    """Offline node -> its GPU pods allowed to move now (opted in, waited long enough)."""
    counts: dict[str, int] = defaultdict(int)
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or node not in offline_for or movable_reason(pod, node) is not None:
            continue
        wait = offline_verdict(pod, threshold_s, selector).wait_s
        if wait is not None and offline_for[node] >= wait:
            counts[node] += 1
    return dict(counts)


def node_zones(kube_nodes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Node -> its `topology.kubernetes.io/zone` ("" without one)."""
    return {str((n.get("metadata") or {}).get("name")):
            str(((n.get("metadata") or {}).get("labels") or {}).get(ZONE_LABEL) or "") for n in kube_nodes}


def source_gpu(world: World, node: str, subjects: Sequence[str],
               kube_node: Mapping[str, Any] | None) -> GpuModel | None:
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
        source_zone=source_zone, source_gpu=source, resource=placement.gpu_resource(spec),
    )


def candidates(kube_nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
               world: World) -> list[NodeCandidate]:
    """Every cluster node as a placement candidate, with the fleet store's view of its GPUs."""
    requested: dict[str, int] = defaultdict(int)  # nvidia.com/gpu
    others: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # the other vendors' resources
    mig_used: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for pod in pods:
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        meta = pod.get("metadata") or {}
        finished = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        if not node or finished or meta.get("deletionTimestamp"):
            continue
        gpus, mig = placement.gpu_requests(spec)
        resource = placement.gpu_resource(spec)
        if resource == placement.GPU_RESOURCE:
            requested[node] += gpus
        else:
            others[node][resource] += gpus
        for resource, amount in mig.items():
            mig_used[node][resource] += amount
    out = []
    for node in kube_nodes:
        meta = node.get("metadata") or {}
        spec = node.get("spec") or {}
        name = str(meta.get("name"))
        labels = dict(meta.get("labels") or {})
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        mig_free = {r: placement.quantity(q) - mig_used[name].get(r, 0)
                    for r, q in allocatable.items() if r.startswith(placement.MIG_PREFIX)}
        label_model = labels.get(PRODUCT_LABEL)
        node_gpus = tuple(
            CandidateGpu(
                uuid=g.uuid,
                model=placement.gpu_model(g.name or label_model or "unknown",
                                          _float(labels.get(MEMORY_LABEL)) if not g.name else None),
                healthy=in_service(g),
                temperature_c=_float((g.sample or {}).get("temperature_c")),
                power_w=_float((g.sample or {}).get("power_w")),
                power_limit_w=_float((g.sample or {}).get("power_limit_w")),
                resource_name=g.resource_name or placement.GPU_RESOURCE,
            )
            for g in world.gpus.get(name, ())
        )
        taints = tuple(Taint(str(t.get("key")), str(t.get("effect")), t.get("value")) for t in spec.get("taints") or [])
        out.append(NodeCandidate(name=name, online=world.nodes.get(name, (False, 0.0))[0], labels=labels,
                                 gpus=node_gpus, gpus_requested=requested.get(name, 0), mig_free=mig_free,
                                 requested=dict(others.get(name) or {}),
                                 taints=taints, unschedulable=bool(spec.get("unschedulable"))))
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


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None

