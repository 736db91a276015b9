"""An emulated Kubernetes API server on loopback: kmock's KubernetesEmulator on its own event loop
in a background thread, with a kubeconfig file for the controller and a real `kubernetes` client.

Why: the controller is tested with the real kubernetes client over real HTTP, never a patched
client, and the demo needs a cluster on a laptop. kmock (the `lab` extra) is that API server; this
module runs it where blocking code (the client, in threads or in another process) can reach it.
Nobody plays kubelet or the controllers here: see kgpu/lab/cluster.py.

kmock 0.8 as seen: field selectors are ignored (filter pods by spec.nodeName yourself); patches
merge dicts and replace lists; objects get no resourceVersion (no optimistic concurrency); the
eviction subresource answers only with a reaction declared by the caller (`react(...)`).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import yaml
from kubernetes import client

from kgpu.lab.manifests import gpu_pod_manifest, kubeconfig_document, node_manifest
from kgpu.lab.processes import LabError


def raw(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a kubernetes client method and return its answer as plain JSON (no model objects:
    faster, and what a controller sees on the wire)."""
    return json.loads(fn(*args, _preload_content=False).data)


def api_client(url: str, pool: int | None = None) -> client.ApiClient:
    """A kubernetes ApiClient for `url`; `pool` connections at most (one per thread that uses it)."""
    configuration = client.Configuration()
    configuration.host = url
    if pool is not None:
        configuration.connection_pool_maxsize = pool
    return client.ApiClient(configuration)


class KubeEmulator:
    """kmock's KubernetesEmulator, served on loopback from a background thread.

    `kubeconfig` is a file for `kgpu cloud run --kubeconfig`; `core`, `apps`, `custom` and
    `coordination` are real kubernetes clients for the caller."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.emulator: Any = None
        self.url = ""
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(15) or self._error is not None:
            raise LabError(f"the Kubernetes emulator did not start: {self._error!r}")
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(kubeconfig_document(self.url)))
        self.api = api_client(self.url)
        # Any: the lab hands the client plain dicts (as on the wire), which its typing does not list
        self.core: Any = client.CoreV1Api(self.api)
        self.apps: Any = client.AppsV1Api(self.api)
        self.custom: Any = client.CustomObjectsApi(self.api)
        self.coordination: Any = client.CoordinationV1Api(self.api)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self.loop = asyncio.get_running_loop()
            self._ready.set()
            await self._stopping.wait()

    # ---- kmock's own interface, on its loop -------------------------------------------------

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the emulator's loop (kmock's DSL is not thread-safe)."""
        assert self.loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def react(self, criteria: str, *payload: Any) -> None:
        """Declare a reaction, e.g. `react('post /api/v1/namespaces/NS/pods/P/eviction', 201, {...})`."""
        def declare() -> None:
            reaction = self.emulator[criteria]
            for item in payload:
                reaction = reaction << item

        self.on_loop(declare)

    def requests_since(self, start: int) -> tuple[list[Any], int]:
        """The requests served after the first `start` ones, and how many were served in all."""
        def take() -> tuple[list[Any], int]:
            everything = list(self.emulator)  # kmock: iterating gives the requests served
            return everything[start:], len(everything)

        return self.on_loop(take)

    def requests(self) -> list[Any]:
        """Every request the emulator has served (and not forgotten)."""
        return self.requests_since(0)[0]

    def take_requests(self) -> list[Any]:
        """Every request served so far, then forgotten. kmock 0.8 matches each request against
        every request it has served (quadratic: at 500 nodes the emulator, not the controller,
        took a whole core); a long run drops that history now and then. Uses kmock's private
        list: nothing public clears it."""
        def take() -> list[Any]:
            served = self.emulator._requests  # private: see the docstring
            taken = list(served)
            served.clear()
            return taken

        return self.on_loop(take)

    def raw(self, fn: Callable[..., Any], *args: Any) -> Any:
        return raw(fn, *args)

    # ---- seeding, as kubelet and the controllers of a real cluster would ----------------------

    def add_node(self, name: str, labels: dict[str, str] | None = None, ready: bool = True) -> None:
        self.core.create_node(node_manifest(name, labels, ready=ready))

    def add_pod(self, name: str, node: str, *, namespace: str = "default", gpus: int = 1,
                owner_kind: str | None = "ReplicaSet", labels: dict[str, str] | None = None,
                priority_class: str | None = None, node_selector: dict[str, str] | None = None) -> None:
        """A running pod on `node` asking for `gpus` GPUs, owned (by default) by a ReplicaSet."""
        self.core.create_namespaced_pod(namespace, gpu_pod_manifest(
            name, node, namespace=namespace, gpus=gpus,
            owner=(owner_kind, f"{name}-owner", f"uid-{name}") if owner_kind else None, labels=labels,
            priority_class=priority_class, node_selector=node_selector))

    def stop(self) -> None:
        """Stop serving (a second call does nothing)."""
        if self.loop is not None and self._stopping is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)
        self.api.close()
