"""An emulated Kubernetes API server on loopback (kmock's KubernetesEmulator) for tests.

The emulator runs on its own event loop in a background thread, so the code under test (which
uses the blocking `kubernetes` client, in threads or in another process) talks to it over real
HTTP. Tests play kubelet and the DaemonSet controller by creating and deleting objects with
`self.api` (a real kubernetes ApiClient).

Seen with kmock 0.8: field selectors are ignored (filter pods by spec.nodeName yourself); patches
merge dicts and replace lists; objects get no resourceVersion (no optimistic concurrency); the
eviction subresource needs a reaction declared by the test (`react(...)`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubernetes import client

from kgpu.demo import KubeEmulator as _DemoKubeEmulator


class KubeEmulator(_DemoKubeEmulator):
    """The demo's emulator (kgpu/demo.py), plus what tests need to play the cluster around it."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir)
        self.coordination = client.CoordinationV1Api(self.api)

    def requests(self) -> list[Any]:
        """Every request the emulator has served (kmock's requests)."""
        return self.requests_since(0)[0]

    # ---- seeding, as kubelet and the controllers of a real cluster would --------------------

    def add_node(self, name: str, labels: dict[str, str] | None = None, ready: bool = True) -> None:
        self.core.create_node({"apiVersion": "v1", "kind": "Node",
                               "metadata": {"name": name, "labels": labels or {}},
                               "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})

    def add_pod(self, name: str, node: str, *, namespace: str = "default", gpus: int = 1,
                owner_kind: str | None = "ReplicaSet", labels: dict[str, str] | None = None,
                priority_class: str | None = None, node_selector: dict[str, str] | None = None) -> None:
        metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels or {}}
        if owner_kind:
            metadata["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner_kind, "name": f"{name}-owner",
                                            "uid": f"uid-{name}", "controller": True}]
        resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
        spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "main", "image": "work:1", "resources": resources}]}
        if priority_class:
            spec["priorityClassName"] = priority_class
        if node_selector:
            spec["nodeSelector"] = node_selector
        self.core.create_namespaced_pod(namespace, {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                                                    "spec": spec, "status": {"phase": "Running"}})
