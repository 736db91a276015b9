"""GPU processes that belong to pods, for a lab with no container runtime: what lets the demo's
edges attribute energy to pods and export per-pod metrics.

An edge maps a GPU process to its pod through `<proc_root>/<pid>/cgroup` and names the pod from a
pod list in Kubernetes JSON (edge/pods.py). Here each node gets a small fake proc root (a `cgroup`
file as the systemd cgroup driver with containerd writes it, and a `comm`), the simulated GPU is
told that the process runs on it (`POST /api/v1/sim/gpus/{i}` with `processes`), and one loopback
server lists each node's pods from the emulated API (`/nodes/<node>/pods`) with the container IDs
the cgroups name. When a pod leaves its node (evicted, deleted), its processes leave the GPU, as
the kubelet stopping the container would: a GPU with a process on it refuses a reset.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import OpenApiException
from urllib3.exceptions import HTTPError

from kgpu.lab.manifests import pod_gpus
from kgpu.lab.processes import LabError, http_json

# What listing the emulator's pods raises while it stops or restarts
LIST_ERRORS = (OSError, ValueError, KeyError, OpenApiException, HTTPError)

FIRST_PID = 41000  # made-up host PIDs: only the fake proc root and the simulated GPU know them
# (SM load %, memory MiB) of each process, by the pod's `kgpu.io/workload-class`
WORK = {"training": (85.0, 61440), "inference": (35.0, 18432), "batch": (60.0, 30720)}


def container_id(pod_uid: str) -> str:
    """A stable 64-hex container ID for the pod's (only) container."""
    return hashlib.sha256(pod_uid.encode()).hexdigest()


def cgroup_line(pod_uid: str) -> str:
    """`/proc/<pid>/cgroup` of a process in the pod's container (cgroup v2, systemd driver)."""
    return (f"0::/kubepods.slice/kubepods-pod{pod_uid.replace('-', '_')}.slice/"
            f"cri-containerd-{container_id(pod_uid)}.scope\n")


def pod_list(pods: list[dict[str, Any]], node: str) -> dict[str, Any]:
    """The pods bound to `node` as the kubelet's `/pods` lists them, with container statuses."""
    items = []
    for pod in pods:
        spec, meta = pod.get("spec") or {}, pod.get("metadata") or {}
        if spec.get("nodeName") != node or not meta.get("uid"):
            continue
        statuses = [{"name": c["name"], "containerID": f"containerd://{container_id(meta['uid'])}", "ready": True}
                    for c in spec.get("containers") or []]
        items.append({"metadata": {k: meta.get(k) for k in ("name", "namespace", "uid")},
                      "spec": {"nodeName": node}, "status": {"phase": "Running", "containerStatuses": statuses}})
    return {"kind": "PodList", "apiVersion": "v1", "items": items}


@dataclass(frozen=True)
class Workload:
    """One process of a pod on one GPU of its node."""

    node: str
    namespace: str
    pod: str
    uid: str
    pid: int
    gpu: int
    sm_util: float
    memory_mib: int


class PodListServer:
    """Each node's pod list on loopback, read from the emulated API at every request."""

    def __init__(self, list_pods: Callable[[], list[dict[str, Any]]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) != 3 or parts[0] != "nodes" or parts[2] != "pods":
                    self.send_error(404)
                    return
                try:
                    body = json.dumps(pod_list(list_pods(), parts[1])).encode()
                except LIST_ERRORS as exc:  # the emulator stopping: the edge keeps its last list
                    self.send_error(503, str(exc)[:200])
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kgpu-lab-podlist", daemon=True)

    def url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.port}/nodes/{node}/pods"

    def start(self) -> PodListServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


class Workloads:
    """The processes of the GPU pods, placed on their nodes' simulated GPUs and taken off when a
    pod leaves its node (`sweep`, from a thread that lists the pods)."""

    def __init__(self, proc_root: Callable[[str], Path], edge_url: Callable[[str], str]) -> None:
        self.proc_root = proc_root
        self.edge_url = edge_url
        self.placed: list[Workload] = []
        self._next_pid = FIRST_PID

    def place_pods(self, pods: list[dict[str, Any]]) -> None:
        """Each bound GPU pod runs one process per GPU it asks for, on its node's first free GPUs, with
        the load of its workload class."""
        used: dict[str, int] = {}
        for pod in pods:
            meta, node, gpus = pod["metadata"], (pod.get("spec") or {}).get("nodeName"), pod_gpus(pod)
            if not node or not gpus or not meta.get("uid"):
                continue
            first = used.get(node, 0)
            used[node] = first + gpus
            sm_util, memory = WORK.get((meta.get("labels") or {}).get("kgpu.io/workload-class", ""), WORK["batch"])
            self.place(node, meta.get("namespace") or "default", meta["name"], meta["uid"],
                       list(range(first, first + gpus)), sm_util=sm_util, memory_mib=memory)

    def sweep_until(self, list_pods: Callable[[], list[dict[str, Any]]], stop: threading.Event,
                    say: Callable[[str], None], interval: float = 1.0) -> threading.Thread:
        """A thread that sweeps every `interval` until `stop` (or nothing is left placed)."""

        def loop() -> None:
            while not stop.wait(interval) and self.placed:
                try:
                    for w in self.sweep(list_pods()):
                        say(f"  [cluster] {w.namespace}/{w.pod} left {w.node}: its process {w.pid} left GPU {w.gpu}")
                except (LabError, *LIST_ERRORS) as exc:  # the emulator or an edge restarting: next time
                    if not stop.is_set():
                        say(f"  [cluster] GPU processes not updated yet: {exc}")

        thread = threading.Thread(target=loop, name="kgpu-lab-workloads", daemon=True)
        thread.start()
        return thread

    def place(self, node: str, namespace: str, pod: str, uid: str, gpus: list[int], *, sm_util: float,
              memory_mib: int) -> list[Workload]:
        """One process per GPU of the pod (data-parallel work), written into the node's proc root and
        reported by the simulated GPU."""
        placed = []
        for gpu in gpus:
            w = Workload(node, namespace, pod, uid, self._next_pid, gpu, sm_util, memory_mib)
            self._next_pid += 1
            directory = self.proc_root(node) / str(w.pid)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "cgroup").write_text(cgroup_line(uid))
            (directory / "comm").write_text(pod.split("-")[0] + "\n")
            self._set_processes(node, gpu, [w])
            placed.append(w)
        self.placed.extend(placed)
        return placed

    def sweep(self, pods: list[dict[str, Any]]) -> list[Workload]:
        """Take off the GPUs the processes whose pod is no longer on their node; returns them."""
        here = {(p["metadata"].get("uid"), (p.get("spec") or {}).get("nodeName")) for p in pods}
        gone = [w for w in self.placed if (w.uid, w.node) not in here]
        for w in gone:
            self._set_processes(w.node, w.gpu, [])
            self.placed.remove(w)
        return gone

    def _set_processes(self, node: str, gpu: int, workloads: list[Workload]) -> None:
        processes = [{"pid": w.pid, "used_memory_mib": w.memory_mib, "sm_util": w.sm_util} for w in workloads]
        status, body = http_json("POST", f"{self.edge_url(node)}/api/v1/sim/gpus/{gpu}", {"processes": processes})
        if status != 200:
            raise LabError(f"placing processes on {node} GPU {gpu}: {status} {body}")
