"""ClusterPlayer: what a real cluster's kubelet, scheduler, ReplicaSet and DaemonSet controllers
would do, played against the emulated Kubernetes API (kmock has none of them).

Why one player: the demo, the rollout tests and the rollout benchmark each played the DaemonSet
controller their own way. The controller under test only sees the API, so one faithful player
serves all three; where they differ (restart an edge process, publish a simulated node's status,
narrate) they pass hooks.

What it plays, each pass (`step()`):

- kubelet (`kubelet=True`): a pod whose eviction the API accepted is deleted; if a ReplicaSet
  owns it, a replacement (a copy with a new name) is created on another node that fits, as the
  ReplicaSet would after the scheduler placed it;
- scheduler (`scheduler=True`): a pod without a node is bound to the node its affinity names
  (`kubernetes.io/hostname In [...]`), or to the best untainted node with enough free GPUs;
- DaemonSet controller (`OnDelete`, always): a node among `nodes` without a live daemon pod gets
  one from the DaemonSet's current template; `step()` returns them, `on_replaced` gets them.

At a large fleet (bench/rollout_fleet.py), `forget_requests=True` keeps kmock's request history
short (see KubeEmulator.take_requests) and the player's own clients use a connection per worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from kgpu.lab.kube import KubeEmulator, api_client, raw
from kgpu.lab.manifests import (
    EVICTION_OK,
    GPU_COUNT,
    GPU_PRODUCT,
    HOSTNAME,
    ZONE,
    daemon_pod_manifest,
    daemonset_manifest,
    eviction_criteria,
    node_manifest,
    pod_gpus,
)


@dataclass(frozen=True)
class Replaced:
    """A daemon pod the DaemonSet controller made: its node restarts the daemon from `image`."""

    node: str
    pod: str
    image: str

    @property
    def version(self) -> str:
        """The image's tag: what the restarted daemon reports as its version."""
        return self.image.rsplit(":", 1)[1]


def _quiet(_text: str) -> None:
    return None


class ClusterPlayer:
    """Plays the cluster around the emulator for the daemon pods of `nodes` (and, with `kubelet`
    and `scheduler`, for every pod).

    Hooks: `narrate(line)` hears what happened and errors; `defer(node)` true holds back a new
    daemon pod for that node (the demo: its edge is still restarting); `on_replaced([...])` (to
    `start` or `run`) is told of the daemon pods made in a pass."""

    def __init__(self, kube: KubeEmulator, nodes: Iterable[str], *, namespace: str = "kgpu",
                 daemonset: str = "kgpu-edge", labels: dict[str, str] | None = None, kubelet: bool = False,
                 scheduler: bool = False, forget_requests: bool = False,
                 narrate: Callable[[str], None] | None = None, defer: Callable[[str], bool] | None = None,
                 workers: int = 16) -> None:
        self.kube = kube
        self.nodes = list(nodes)
        self.namespace, self.daemonset = namespace, daemonset
        self.labels = dict(labels or {"app": "kgpu-edge"})
        self.kubelet, self.scheduler, self.forget_requests = kubelet, scheduler, forget_requests
        self.narrate = narrate or _quiet
        self.defer = defer
        self._api = api_client(kube.url, pool=workers + 2)  # its own connections, one per worker
        # Any: plain dicts go in (as on the wire), which the client's typing does not list
        self.core: Any = client.CoreV1Api(self._api)
        self.apps: Any = client.AppsV1Api(self._api)
        self.live: dict[str, str] = {}  # daemon pod -> node
        self.deleted: dict[str, list[str]] = defaultdict(list)  # node -> its daemon pods that disappeared
        self.max_down = 0  # most nodes at once without a daemon pod
        self.served = 0  # API requests served and forgotten (forget_requests)
        self.errors: list[str] = []
        self._request_index = 0
        self._counter = itertools.count()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cluster-player")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- seeding --------------------------------------------------------------------------------

    def seed(self, image: str, *, offline: Iterable[str] = (), add_nodes: bool = True) -> ClusterPlayer:
        """The DaemonSet on `image` and a daemon pod on every node; with `add_nodes`, the nodes too
        (Ready unless in `offline`)."""
        self.apps.create_namespaced_daemon_set(
            self.namespace, daemonset_manifest(self.namespace, self.daemonset, self.labels, image))
        down = set(offline)

        def add(node: str) -> tuple[str, str]:
            if add_nodes:
                self.core.create_node(node_manifest(node, ready=node not in down))
            return self.create_daemon_pod(node, image), node

        chunk = 50 if self.forget_requests else len(self.nodes) or 1  # forgetting as it goes: see the docstring
        self.live = {}
        for start in range(0, len(self.nodes), chunk):
            self.live.update(self._pool.map(add, self.nodes[start:start + chunk]))
            if self.forget_requests:
                self.served += len(self.kube.take_requests())
        return self

    def create_daemon_pod(self, node: str, image: str) -> str:
        name = f"{self.daemonset}-{node}-{next(self._counter)}"
        self.core.create_namespaced_pod(self.namespace, daemon_pod_manifest(
            self.namespace, self.daemonset, self.labels, name, node, image))
        return name

    def deletions(self) -> dict[str, int]:
        """How many times each node's daemon pod disappeared (was deleted)."""
        return {node: len(self.deleted.get(node, [])) for node in self.nodes}

    # ---- one pass -------------------------------------------------------------------------------

    def step(self) -> list[Replaced]:
        """One pass of kubelet, scheduler and DaemonSet controller; the daemon pods it made."""
        if self.kubelet or self.forget_requests:
            self._kubelet_pass()
        pods = None
        if self.scheduler:
            pods = raw(self.core.list_pod_for_all_namespaces)["items"]
            self._scheduler_pass(pods)
        return self._daemonset_pass(pods)

    def _kubelet_pass(self) -> None:
        if self.forget_requests:
            requests = self.kube.take_requests()
            self.served += len(requests)
        else:
            requests, self._request_index = self.kube.requests_since(self._request_index)
        if not self.kubelet:
            return
        for r in requests:
            path = str(r.url.path)
            method = str(getattr(r.method, "value", r.method)).upper()  # kmock gives an enum
            if method == "POST" and path.endswith("/eviction"):
                parts = path.strip("/").split("/")  # api v1 namespaces NS pods NAME eviction
                self._evicted(parts[3], parts[5])

    def _scheduler_pass(self, pods: list[dict[str, Any]]) -> None:
        for pod in pods:  # bind a pod that names its node by affinity, or the best fit
            if not pod["spec"].get("nodeName"):
                target = affinity_host(pod) or self.schedule(pod, pods)
                if target:
                    self.core.patch_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                                   {"spec": {"nodeName": target}})
                    pod["spec"]["nodeName"] = target
                    self.narrate(f"  [cluster] scheduler bound {pod['metadata']['namespace']}/"
                                 f"{pod['metadata']['name']} to {target}")

    def _daemonset_pass(self, pods: list[dict[str, Any]] | None) -> list[Replaced]:
        if pods is None:
            pods = raw(self.core.list_namespaced_pod, self.namespace)["items"]
        live = {p["metadata"]["name"]: p["spec"].get("nodeName") for p in pods
                if p["metadata"].get("namespace", self.namespace) == self.namespace
                and all((p["metadata"].get("labels") or {}).get(k) == v for k, v in self.labels.items())}
        for name in set(self.live) - set(live):
            self.deleted[self.live[name]].append(name)
        self.live = live
        missing = sorted(set(self.nodes) - set(live.values()))
        self.max_down = max(self.max_down, len(missing))
        if self.defer is not None:
            missing = [node for node in missing if not self.defer(node)]
        if not missing:
            return []
        ds = raw(self.apps.read_namespaced_daemon_set, self.daemonset, self.namespace)
        image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
        names = list(self._pool.map(lambda n: self.create_daemon_pod(n, image), missing))
        for node, name in zip(missing, names, strict=True):
            self.live[name] = node
        return [Replaced(node, name, image) for node, name in zip(missing, names, strict=True)]

    # ---- kubelet and ReplicaSet -------------------------------------------------------------------

    def _evicted(self, namespace: str, name: str) -> None:
        """Kubelet ends an evicted pod; its owner (a ReplicaSet) makes a replacement elsewhere."""
        try:
            pod = raw(self.core.read_namespaced_pod, name, namespace)
        except Exception:  # noqa: BLE001 - already gone
            return
        self.core.delete_namespaced_pod(name, namespace)
        self.narrate(f"  [cluster] kubelet stopped evicted pod {namespace}/{name}")
        owners = pod["metadata"].get("ownerReferences") or []
        if not owners or owners[0]["kind"] != "ReplicaSet":
            return
        rs = owners[0]["name"]
        pods = raw(self.core.list_pod_for_all_namespaces)["items"]
        target = self.schedule(pod, pods, avoid=pod["spec"].get("nodeName"))
        if target is None:
            self.narrate(f"  [cluster] ReplicaSet {rs}: no node fits a replacement yet")
            return
        new_name = f"{rs}-{uuid.uuid4().hex[:5]}"
        spec = {k: v for k, v in pod["spec"].items() if k != "nodeName"}
        self.core.create_namespaced_pod(namespace, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": new_name, "namespace": namespace, "uid": str(uuid.uuid4()),
                         "labels": pod["metadata"].get("labels") or {}, "ownerReferences": owners},
            "spec": {**spec, "nodeName": target}, "status": {"phase": "Running"}})
        self.kube.react(eviction_criteria(namespace, new_name), 201, EVICTION_OK)
        self.narrate(f"  [cluster] ReplicaSet {rs} recreated it as {namespace}/{new_name} on {target}")

    # ---- scheduler --------------------------------------------------------------------------------

    def schedule(self, pod: dict[str, Any], pods: list[dict[str, Any]], avoid: str | None = None) -> str | None:
        """A small scheduler: untainted nodes matching the selector with enough free GPUs; the
        original GPU product first, then the original zone, then the most free GPUs."""
        used: dict[str, int] = {}
        for p in pods:
            if p["spec"].get("nodeName"):
                used[p["spec"]["nodeName"]] = used.get(p["spec"]["nodeName"], 0) + pod_gpus(p)
        nodes = {n["metadata"]["name"]: n for n in raw(self.core.list_node)["items"]}
        source = nodes.get(avoid or "", {}).get("metadata", {}).get("labels") or {}
        zone, product = source.get(ZONE), source.get(GPU_PRODUCT)
        selector = pod["spec"].get("nodeSelector") or {}
        best: tuple[Any, ...] | None = None
        for name, node in nodes.items():
            labels = node["metadata"].get("labels") or {}
            if name == avoid or (node.get("spec") or {}).get("taints"):
                continue
            if any(labels.get(k) != v for k, v in selector.items()):
                continue
            free = int(labels.get(GPU_COUNT, "0")) - used.get(name, 0)
            if free < pod_gpus(pod):
                continue
            key = (labels.get(GPU_PRODUCT) == product, labels.get(ZONE) == zone, free, name)
            if best is None or key > best:
                best = key
        return str(best[-1]) if best else None

    # ---- running --------------------------------------------------------------------------------

    def _pass(self, on_replaced: Callable[[list[Replaced]], None] | None) -> None:
        try:
            replaced = self.step()
            if replaced and on_replaced is not None:
                on_replaced(replaced)
        except Exception as exc:  # noqa: BLE001 - keep playing; the callers' waits report what is missing
            if not self._stop.is_set():
                self.errors.append(repr(exc))
                self.narrate(f"  [cluster] error (will retry): {exc!r}"[:1500])

    def start(self, on_replaced: Callable[[list[Replaced]], None] | None = None,
              interval: float = 0.5) -> ClusterPlayer:
        """Play in a thread of its own, a pass every `interval` seconds; `on_replaced` runs there."""
        def loop() -> None:
            while not self._stop.is_set():
                self._pass(on_replaced)
                self._stop.wait(interval)

        self._thread = threading.Thread(target=loop, name="cluster-player", daemon=True)
        self._thread.start()
        return self

    async def run(self, on_replaced: Callable[[list[Replaced]], None] | None = None,
                  interval: float = 0.2) -> None:
        """Play until cancelled: each pass in a worker thread, `on_replaced` on the running loop
        (for callers whose state lives on it, such as the fleet simulator)."""
        while True:
            try:
                replaced = await asyncio.to_thread(self.step)
            except Exception as exc:  # noqa: BLE001 - as in _pass
                self.errors.append(repr(exc))
                self.narrate(f"  [cluster] error (will retry): {exc!r}"[:1500])
            else:
                if replaced and on_replaced is not None:
                    on_replaced(replaced)
            await asyncio.sleep(interval)

    def stop(self) -> None:
        """Stop playing (the thread, if started) and close the player's clients."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._api.close()


def affinity_host(pod: dict[str, Any]) -> str | None:
    """The node a pod's required node affinity names by hostname, if any."""
    try:
        terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        for term in terms["nodeSelectorTerms"]:
            for expr in term.get("matchExpressions", []):
                if expr["key"] == HOSTNAME and expr["operator"] == "In":
                    return str(expr["values"][0])
    except (KeyError, TypeError, IndexError):
        pass
    return None
