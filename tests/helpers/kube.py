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

import asyncio
import concurrent.futures
import threading
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client


class KubeEmulator:
    def __init__(self, workdir: Path) -> None:
        import kmock

        self._kmock = kmock
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.emulator: Any = None
        self.url = ""
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("the Kubernetes emulator did not start")
        self.kubeconfig = workdir / "kubeconfig"
        workdir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "test"}}],
        }))
        configuration = client.Configuration()
        configuration.host = self.url
        self.api = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.coordination = client.CoordinationV1Api(self.api)

    async def _serve(self) -> None:
        kmock = self._kmock
        self._stopping = asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self.loop = asyncio.get_running_loop()
            self._ready.set()
            await self._stopping.wait()

    def on_loop(self, fn: Any) -> Any:
        """Run `fn()` on the emulator's loop (kmock's DSL is not thread-safe) and return its result."""
        assert self.loop is not None

        async def run() -> Any:
            return fn()

        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return future.result(10)

    def react(self, criteria: str, *payload: Any) -> None:
        """Declare a kmock reaction, e.g. react("post /api/v1/namespaces/ns/pods/p/eviction", 429, {...})."""
        def declare() -> None:
            reaction = self.emulator[criteria]
            for item in payload:
                reaction = reaction << item

        self.on_loop(declare)

    def requests(self) -> list[Any]:
        return list(self.on_loop(lambda: list(self.emulator)))  # kmock: iterating gives the requests

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

    def stop(self) -> None:
        if self.loop is not None and self._stopping is not None:
            self.loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)
        self.api.close()
