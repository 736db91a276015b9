"""The Kubernetes objects the lab creates in the emulated API: nodes, GPU pods, the edge daemon's
DaemonSet and its pods, and a kubeconfig for the emulator.

Why one place: the demo, the tests and the benchmarks seed the same kinds of objects, and the
controller reads them as a real cluster would write them (owner references, `OnDelete`, labels
the scheduler and the migration look at). Plain dicts, as they travel on the wire.
"""

from __future__ import annotations

import uuid
from typing import Any

# Well-known node labels (Kubernetes, NVIDIA GPU feature discovery)
HOSTNAME = "kubernetes.io/hostname"
ZONE = "topology.kubernetes.io/zone"
EDGE_ROLE = "node-role.kubernetes.io/edge"
GPU_PRESENT = "nvidia.com/gpu.present"
GPU_PRODUCT = "nvidia.com/gpu.product"
GPU_COUNT = "nvidia.com/gpu.count"
GPU_MEMORY = "nvidia.com/gpu.memory"
GPU_RESOURCE = "nvidia.com/gpu"

EVICTION_OK = {"kind": "Status", "apiVersion": "v1", "status": "Success"}


def eviction_criteria(namespace: str, pod: str) -> str:
    """kmock's criteria for the eviction subresource of one pod (see KubeEmulator.react)."""
    return f"post /api/v1/namespaces/{namespace}/pods/{pod}/eviction"


def kubeconfig_document(url: str, name: str = "kgpu-demo") -> dict[str, Any]:
    """A kubeconfig for an API server at `url` with a dummy token (the emulator checks none)."""
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": {"server": url}}],
        "users": [{"name": "demo", "user": {"token": "demo"}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": "demo"}}],
    }


def node_manifest(name: str, labels: dict[str, str] | None = None, *, ready: bool = True,
                  gpus: int | None = None, resource: str = GPU_RESOURCE) -> dict[str, Any]:
    """A node, Ready or not; with `gpus`, that many `resource` (its vendor's: `nvidia.com/gpu`,
    `amd.com/gpu`, `gpu.intel.com/i915`) in capacity and allocatable."""
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if gpus is not None:
        status["capacity"] = {resource: str(gpus)}
        status["allocatable"] = {resource: str(gpus)}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}},
            "status": status}


def gpu_pod_manifest(name: str, node: str, *, namespace: str = "default", gpus: int = 1,
                     owner: tuple[str, str, str] | None = None, labels: dict[str, str] | None = None,
                     image: str = "work:1", uid: str | None = None, priority_class: str | None = None,
                     node_selector: dict[str, str] | None = None) -> dict[str, Any]:
    """A running pod on `node` with one container asking for `gpus` GPUs (none: no resources).
    `owner` is (kind, name, uid) of its controller (a Job's apiVersion is batch/v1)."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if uid is not None:
        metadata["uid"] = uid
    metadata["labels"] = labels or {}
    if owner:
        kind, owner_name, owner_uid = owner
        metadata["ownerReferences"] = [{"apiVersion": "batch/v1" if kind == "Job" else "apps/v1", "kind": kind,
                                        "name": owner_name, "uid": owner_uid, "controller": True}]
    resources = {"limits": {GPU_RESOURCE: str(gpus)}} if gpus else {}
    spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "main", "image": image, "resources": resources}]}
    if priority_class:
        spec["priorityClassName"] = priority_class
    if node_selector:
        spec["nodeSelector"] = node_selector
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec, "status": {"phase": "Running"}}


def pod_gpus(pod: dict[str, Any]) -> int:
    """The GPUs a pod asks for, over its containers."""
    return sum(int((c.get("resources") or {}).get("limits", {}).get(GPU_RESOURCE, 0))
               for c in pod["spec"]["containers"])


def daemonset_manifest(namespace: str, name: str, labels: dict[str, str], image: str) -> dict[str, Any]:
    """The edge daemon's DaemonSet as the controller expects it: `OnDelete`, so that the rollout
    engine decides when each node's pod is replaced, with one container called `edge`."""
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"selector": {"matchLabels": labels}, "updateStrategy": {"type": "OnDelete"},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "edge", "image": image}]}}}}


def daemon_pod_manifest(namespace: str, daemonset: str, labels: dict[str, str], name: str, node: str,
                        image: str) -> dict[str, Any]:
    """A running pod of that DaemonSet on `node`. kmock has no DaemonSet controller: the lab's
    ClusterPlayer (kgpu/lab/cluster.py) creates these."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "labels": labels,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": daemonset,
                                          "uid": f"{daemonset}-uid", "controller": True}]},
        "spec": {"nodeName": node, "containers": [{"name": "edge", "image": image}]},
        "status": {"phase": "Running"}}
