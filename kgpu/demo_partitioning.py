"""The demo's partitioning step (issue 13): a `GPUPartitioning` object splits the A100s into MIG
devices and time-slices the H100s; each edge applies it and advertises the result through its
device plugin to a kubelet stand-in (kgpu/lab/kubelet.py); the controller writes GFD's labels.

Kept apart from kgpu/demo.py (which starts a `KubeletThread` per node and calls `run`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from kgpu.lab.kube import KubeEmulator
from kgpu.lab.kubelet import KubeletThread
from kgpu.lab.manifests import EDGE_ROLE
from kgpu.lab.processes import get_json, wait_for

NAME = "edge-sharing"
A100 = "NVIDIA A100-SXM4-80GB"
MIG_PROFILE = "1g.10gb"
REPLICAS = 4
SHOWN_LABELS = ("nvidia.com/gpu.product", "nvidia.com/gpu.count", "nvidia.com/gpu.replicas",
                "nvidia.com/mig.strategy", f"nvidia.com/mig-{MIG_PROFILE}.count")


class NodeLike(Protocol):
    name: str
    model: str
    gpus: int


def plugin_dir(node_dir: Path) -> Path:
    """A node's device-plugin directory (short: a unix socket path holds at most 107 bytes)."""
    directory = node_dir / "dp"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def run(kube: KubeEmulator, kubelets: dict[str, KubeletThread], specs: list[NodeLike], base: str,
        sick: str, say: Callable[[str], None], timeout: float) -> str:
    """Create the object, wait for every edge to advertise its share, print what the kubelet and
    the node labels now say."""
    kube.custom.create_cluster_custom_object("kgpu.io", "v1alpha1", "gpupartitionings", {
        "apiVersion": "kgpu.io/v1alpha1", "kind": "GPUPartitioning", "metadata": {"name": NAME, "generation": 1},
        "spec": {"nodeSelector": {EDGE_ROLE: ""}, "priority": 10,
                 "models": {A100: {"mig": f"all-{MIG_PROFILE}"},
                            "*": {"timeSlicing": {"replicas": REPLICAS}}}}})
    say(f"  GPUPartitioning {NAME!r}: {A100} -> all-{MIG_PROFILE} (MIG); any other model -> {REPLICAS} "
        "time-slicing replicas per GPU")
    mig_resource = f"nvidia.com/mig-{MIG_PROFILE}"

    def advertised(spec: NodeLike) -> bool:
        kubelet = kubelets[spec.name]
        if spec.model == "A100":
            return len(kubelet.health(mig_resource)) == 7 * spec.gpus
        return len(kubelet.health("nvidia.com/gpu")) == REPLICAS * spec.gpus

    for spec in specs:
        wait_for(_bind(advertised, spec), timeout=timeout, what=f"{spec.name}'s devices at its kubelet")
        kubelet = kubelets[spec.name]
        resource = mig_resource if spec.model == "A100" else "nvidia.com/gpu"
        health = kubelet.health(resource)
        unhealthy = sorted(device for device, state in health.items() if state != "Healthy")
        why = " (its GPU 0 failed with XID 79 in step 3)" if spec.name == sick else ""
        say(f"  {spec.name} ({spec.model} x{spec.gpus}): kubelet sees {len(health)} {resource} devices"
            + (f", {len(unhealthy)} unhealthy{why}" if unhealthy else ", all healthy"))
    for spec in specs[:2] + [s for s in specs if s.model == "A100"][:1]:
        labels: dict[str, Any] = wait_for(_bind(lambda s: _labels(kube, s), spec), timeout=timeout,
                                          what=f"GFD labels on {spec.name}")
        say(f"  node {spec.name} labels: " + ", ".join(f"{k.removeprefix('nvidia.com/')}={labels[k]}"
                                                      for k in SHOWN_LABELS if k in labels))
    state = get_json(f"{base}/api/v1/partitioning")
    names = {spec.name for spec in specs}  # the NVIDIA nodes it partitioned (a mixed fleet has others)
    applied = sum(1 for n in state["nodes"] if n.get("applied") and n.get("node") in names)
    return f"{applied}/{len(specs)} nodes applied {NAME}; MIG and replicas advertised to each node's kubelet"


def _bind(check: Callable[[NodeLike], Any], spec: NodeLike) -> Callable[[], Any]:
    return lambda: check(spec)


def _labels(kube: KubeEmulator, spec: NodeLike) -> dict[str, Any] | None:
    """The node's labels once they show its share (the labeller may write them over two passes)."""
    labels: dict[str, Any] = kube.core.read_node(spec.name).metadata.labels or {}
    if spec.model == "A100":
        return labels if labels.get("nvidia.com/mig.strategy") == "mixed" else None
    return labels if labels.get("nvidia.com/gpu.replicas") == str(REPLICAS) else None
