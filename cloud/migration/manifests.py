"""The Kubernetes side of a migration, pure: which pods are GPU work to move, what placement
gets to know about pods and nodes, and the objects sent to the API server (the node's taint list,
an eviction, the recreated copy of a bare pod).

No I/O: the manager reads the cluster and sends what these functions build.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cloud.migration import placement
from cloud.migration.model import OFFLINE_SUBJECT, Migration, World, gpu_healthy
from cloud.migration.placement import (
    HOSTNAME_LABEL,
    MEMORY_LABEL,
    PRODUCT_LABEL,
    CandidateGpu,
    GpuModel,
    NodeCandidate,
    PodNeeds,
    Taint,
)

TAINT_KEY = "kgpu.io/gpu-unhealthy"
TAINT_EFFECT = "NoSchedule"
MIGRATION_ANNOTATION = "kgpu.io/migration"
MIGRATED_FROM_ANNOTATION = "kgpu.io/migrated-from"


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
        finished = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        if not node or finished or meta.get("deletionTimestamp"):
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
        mig_free = {r: placement.quantity(q) - mig_used[name].get(r, 0)
                    for r, q in allocatable.items() if r.startswith(placement.MIG_PREFIX)}
        label_model = labels.get(PRODUCT_LABEL)
        node_gpus = tuple(
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
        out.append(NodeCandidate(name=name, online=world.nodes.get(name, (False, 0.0))[0], labels=labels,
                                 gpus=node_gpus, gpus_requested=requested.get(name, 0), mig_free=mig_free,
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

