"""`kgpu demo`: a whole kgpu fleet on one machine, no cluster, no GPU.

What runs, all owned by the demo and stopped by Ctrl-C (SIGINT), SIGTERM or SIGHUP, each part from
the lab (kgpu/lab/, the `lab` extra):

* a broker: mosquitto, or the embedded Python broker amqtt when mosquitto is missing, on a free
  loopback port, with its own config and persistence in the demo's temp dir (lab/broker.py);
* an emulated Kubernetes API (kmock's KubernetesEmulator, on a background event loop; lab/kube.py)
  seeded with the edge GPU nodes, a few GPU pods, the `kgpu-edge` DaemonSet (OnDelete, one pod per
  node) and a `GPUPowerPolicy`;
* `kgpu cloud run --kubeconfig <the emulator's>` on SQLite, serving the API on --http (9420);
* one `kgpu edge run --backend sim --mqtt ... --device-plugin` per node: the story's four simulate
  H100s and A100s; from the fifth on (`--nodes 7`) a Jetson Orin NX, an AMD MI210 and an Intel Flex
  170 join, each at its vendor's interface (kgpu/lab/demo_nodes.py),
  with a kubelet stand-in (lab/kubelet.py) in a thread for its device plugin. Each edge
  reaches the broker through its own loopback TCP relay (its "uplink", lab/broker.py), which the
  scenario cuts to take exactly one node off the network while its daemon keeps running and deciding;
* the lab's ClusterPlayer (lab/cluster.py) in a thread, playing what a real cluster's kubelet,
  scheduler, ReplicaSet and DaemonSet controllers would do in the emulator: an evicted pod is
  deleted (an owned one is recreated on another node, as its ReplicaSet would), a pod with no node
  is bound to the node its affinity names, and a deleted daemon pod is recreated from the
  DaemonSet's current template; here its node's edge process is then restarted reporting the
  template's version (`KGPU_SIM_DAEMON_VERSION`);
* the GPU pods' processes (lab/workloads.py): each seeded GPU pod runs one process per GPU on its
  node's simulated GPUs, with a fake proc root and a pod list per node, so that the edges attribute
  energy and per-pod metrics to the pods; a process leaves its GPU when its pod leaves the node.
Each node's GPUs have their own UUIDs (the node name seeds them); printed commands name kgpu by path.

`--scenario` plays a narrated story (thermal spike, XID 79 migration, a node cut off, a rollout
with that node offline, its return and replay, GPU partitioning: kgpu/demo_partitioning.py) and
exits 0 when every step succeeded. This module
holds only the demo's own parts: which nodes and pods, the processes' flags, the story.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kgpu import demo_partitioning
from kgpu.lab.broker import BrokerProcess, Uplinks, start_broker
from kgpu.lab.cluster import ClusterPlayer, Replaced
from kgpu.lab.demo_nodes import NodeSpec, node_labels, node_specs
from kgpu.lab.kube import KubeEmulator, raw
from kgpu.lab.kubelet import KubeletThread
from kgpu.lab.manifests import EDGE_ROLE, EVICTION_OK, eviction_criteria, gpu_pod_manifest, node_manifest
from kgpu.lab.processes import (
    Child,
    LabError,
    free_port,
    get_json,
    http_json,
    reserve_port,
    wait_for,
)
from kgpu.lab.workloads import PodListServer, Workloads
from shared import __version__

NS, DAEMONSET = "kgpu", "kgpu-edge"
DS_LABELS = {"app": "kgpu-edge"}
IMAGE_REPO = "kgpu/edge"
POLICY_NAME = "edge-fleet"
HEALTH_QUIET_PERIOD_S = 90  # demo pace: a GPU recovers after 90 s without a fault (the product's default: 5 min)


def kgpu_command() -> str:
    """How to run this kgpu from a fresh shell: the venv's own `kgpu` script by its path (a fresh
    shell has no venv on its PATH), else this interpreter with `-m kgpu`."""
    script = Path(sys.executable).with_name("kgpu")
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m kgpu"


class DemoError(LabError):
    """Something the demo needs did not happen; the message says what."""


@dataclass
class DemoOptions:
    nodes: int = 4
    http: int = 9420
    scenario: bool = False
    fast: bool = False
    keep: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)


def wait(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.3) -> Any:
    """The lab's wait_for, where a process still starting or a partial answer means "not yet"."""
    return wait_for(check, timeout, interval, what, ignore=(OSError, ValueError, KeyError))


# ---- the fleet ------------------------------------------------------------------------------


class Demo:
    def __init__(self, options: DemoOptions) -> None:
        self.o = options
        self.out = options.out
        self.workdir = Path(tempfile.mkdtemp(prefix="kgpu-demo-"))
        (self.workdir / "logs").mkdir()
        self.specs = node_specs(options.nodes, note=self.say)
        self.base = f"http://127.0.0.1:{options.http}"
        reserve_port(options.http)  # the controller binds it later: keep the demo's own picks off it
        self.broker: BrokerProcess | None = None
        self.cloud: Child | None = None
        self.kube: KubeEmulator | None = None
        self.cluster: ClusterPlayer | None = None
        self.uplinks: Uplinks | None = None
        self.edges: dict[str, Child] = {}
        self.kubelets: dict[str, KubeletThread] = {}  # one kubelet stand-in per node, for its device plugin
        self.edge_ports: dict[str, int] = {}
        self.uplink_ports: dict[str, int] = {}
        self.versions: dict[str, str] = {}
        self.pids_seen: list[int] = []
        self.pod_lists: PodListServer | None = None  # each node's pod list, as its kubelet would serve it
        self.workloads = Workloads(self.proc_root, self.edge_url)  # the GPU pods' processes
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="kgpu-demo")
        self._restarting: set[str] = set()

    @property
    def cluster_errors(self) -> list[str]:
        return self.cluster.errors if self.cluster is not None else []

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _spawned(self, child: Any) -> Any:
        """`child` (a Child or a broker) has started: tell its pid (tests/test_demo.py reads these)."""
        self.pids_seen.append(child.pid)
        self.say(f"[kgpu-demo] pid {child.pid} {child.name}")
        return child

    # -- start ----------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            socket.create_server(("127.0.0.1", self.o.http)).close()
        except OSError as exc:
            raise DemoError(f"port {self.o.http} is busy ({exc.strerror}); pick another with --http PORT") from None
        self.broker = self._spawned(start_broker(self.workdir / "broker", self.workdir / "logs" / "broker.log"))
        broker_port = self.broker.port
        self.kube = KubeEmulator(self.workdir)
        # kubelet, scheduler, ReplicaSet and DaemonSet controllers; a new daemon pod restarts its edge
        self.cluster = ClusterPlayer(self.kube, [s.name for s in self.specs], namespace=NS, daemonset=DAEMONSET,
                                     labels=DS_LABELS, kubelet=True, scheduler=True, narrate=self.say,
                                     defer=self._restarting.__contains__, workers=8)
        self.seed()
        self.pod_lists = PodListServer(self.all_pods).start()
        self.uplinks = Uplinks(broker_port)
        self.cluster.start(self._on_replaced, interval=0.5)
        self.cloud = self._spawned(Child("controller", [
            sys.executable, "-m", "kgpu", "cloud", "run", "--mqtt", f"mqtt://127.0.0.1:{broker_port}",
            "--db", f"sqlite:///{self.workdir / 'fleet.db'}", "--http", f"127.0.0.1:{self.o.http}",
            "--kubeconfig", str(self.kube.kubeconfig)], self.workdir / "logs" / "controller.log", env={
            "KGPU_NAMESPACE": NS, "KGPU_DAEMONSET": DAEMONSET, "KGPU_LOG_JSON": "true", "PYTHONUNBUFFERED": "1",
            "KGPU_MQTT_CLIENT_ID": f"kgpu-controller-demo-{os.getpid()}", "KGPU_LEASE_DURATION": "6",
            "KGPU_LEASE_RENEW_INTERVAL": "2", "KGPU_MIGRATION_GRACE": "60",
            # a demo on loopback: changes (the rollout below) without a token; a cluster sets one
            "KGPU_API_INSECURE": "true"}).start())
        for spec in self.specs:
            self.kubelets[spec.name] = KubeletThread(demo_partitioning.plugin_dir(self.workdir / spec.name)).start()
            self.uplink_ports[spec.name] = self.uplinks.add(spec.name)
            self.edge_ports[spec.name] = free_port()
            self._start_edge(spec, __version__)
        wait(self._controller_up, 30, "the controller's API")
        wait(self._all_online, 45, f"all {len(self.specs)} nodes online at the controller")
        self.workloads.place_pods(self.all_pods())  # then taken off a GPU when their pod leaves its node
        self.workloads.sweep_until(self.all_pods, self._stop, self.say)

    def _controller_up(self) -> bool:
        if self.cloud is not None and not self.cloud.alive():
            raise DemoError(f"the controller exited:\n{self.cloud.log_tail()}")
        return http_json("GET", self.base + "/healthz", timeout=2)[0] == 200

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in get_json(self.base + "/api/v1/nodes")["nodes"]}

    def _all_online(self) -> bool:
        listed = self.nodes()
        return all(listed.get(s.name, {}).get("online") for s in self.specs)

    def _start_edge(self, spec: NodeSpec, version: str) -> None:
        node_dir = self.workdir / spec.name
        node_dir.mkdir(exist_ok=True)
        config = node_dir / "edge.yaml"
        # Demo pace: statuses every 2 s, a GPU recovers after 90 s quiet; the rest is the product default.
        # GPU processes map to the demo's pods through the node's fake proc root and pod list.
        assert self.pod_lists is not None
        config.write_text(f"status_interval: 2\nhealth_quiet_period: {HEALTH_QUIET_PERIOD_S}\n"
                          f"proc_root: {json.dumps(str(self.proc_root(spec.name)))}\n"
                          f"pod_list_url: {json.dumps(self.pod_lists.url(spec.name))}\n")
        child = Child(f"edge {spec.name} v{version}", [
            sys.executable, "-m", "kgpu", "edge", "run", "--node", spec.name, "--backend", "sim",
            "--sim-gpus", str(spec.gpus), "--sim-model", spec.model, "--db", str(node_dir / "edge.db"),
            "--http", f"127.0.0.1:{self.edge_ports[spec.name]}", "--interval", "1",
            "--mqtt", f"mqtt://127.0.0.1:{self.uplink_ports[spec.name]}", "--config", str(config),
            "--device-plugin", "--kubelet-dir", str(demo_partitioning.plugin_dir(node_dir))],
            self.workdir / "logs" / f"{spec.name}.log",
            env={"KGPU_SIM_DAEMON_VERSION": version, "KGPU_LOG_JSON": "true", "PYTHONUNBUFFERED": "1"}).start()
        with self._lock:
            self.edges[spec.name] = child
            self.versions[spec.name] = version
        self._spawned(child)

    def edge_url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.edge_ports[node]}"

    def proc_root(self, node: str) -> Path:
        """The node's fake /proc: a `cgroup` and `comm` per simulated GPU process (kgpu/lab/workloads.py)."""
        return self.workdir / node / "proc"

    def all_pods(self) -> list[dict[str, Any]]:
        assert self.kube is not None
        return list(raw(self.kube.core.list_pod_for_all_namespaces)["items"])

    # -- seeding the emulated cluster -------------------------------------------------------------

    def seed(self) -> None:
        kube = self.kube
        assert kube is not None
        for spec in self.specs:
            kube.core.create_node(node_manifest(spec.name, node_labels(spec), gpus=spec.gpus,
                                                resource=spec.spec.resource))
        assert self.cluster is not None
        self.cluster.seed(f"{IMAGE_REPO}:{__version__}", add_nodes=False)  # the DaemonSet and its pods
        first = self.specs[0].name
        second = self.specs[1 % len(self.specs)].name
        third = self.specs[2 % len(self.specs)].name
        self._create_gpu_pod("llm-train-6d8f9c7b5-x2lqp", first, gpus=2, cls="training",
                             owner=("ReplicaSet", "llm-train-6d8f9c7b5"))
        self._create_gpu_pod("vision-infer", first, gpus=1, cls="inference", owner=None)
        self._create_gpu_pod("asr-infer-7c9d5f6b8-k4m2n", second, gpus=1, cls="inference",
                             owner=("ReplicaSet", "asr-infer-7c9d5f6b8"))
        self._create_gpu_pod("embed-batch-q7w2z", third, gpus=1, cls="batch", owner=("Job", "embed-batch"))
        kube.custom.create_cluster_custom_object("kgpu.io", "v1alpha1", "gpupowerpolicies", {
            "apiVersion": "kgpu.io/v1alpha1", "kind": "GPUPowerPolicy",
            "metadata": {"name": POLICY_NAME, "generation": 1},
            "spec": {"nodeSelector": {EDGE_ROLE: ""}, "priority": 10,  # every edge node, whatever its GPUs' vendor
                     "powerSaving": {"enabled": True, "utilizationThreshold": 10, "capPercent": 70,
                                     "sustainPeriod": "60s"},
                     "thermalThrottling": {"maxTempC": 80, "criticalTempC": 92, "stepPercent": 10,
                                           "stepInterval": "5s", "coolDownPeriod": "60s", "hysteresisC": 5}}})

    def _create_gpu_pod(self, name: str, node: str, *, gpus: int, cls: str, owner: tuple[str, str] | None,
                        namespace: str = "default") -> None:
        """A workload pod whose eviction the API accepts (the player then plays kubelet)."""
        assert self.kube is not None
        self.kube.core.create_namespaced_pod(namespace, gpu_pod_manifest(
            name, node, namespace=namespace, gpus=gpus, uid=str(uuid.uuid4()),
            labels={"kgpu.io/workload-class": cls, "app": name.split("-")[0]}, image=f"registry.local/{cls}:1",
            owner=(owner[0], owner[1], f"uid-{owner[1]}") if owner else None))
        self.kube.react(eviction_criteria(namespace, name), 201, EVICTION_OK)

    # -- the DaemonSet controller made a new daemon pod: its node's edge restarts ----------------

    def _on_replaced(self, replaced: list[Replaced]) -> None:
        """In the player's thread: each node whose daemon pod was recreated restarts its edge from
        the new template's version (in the pool; the player holds the node back meanwhile)."""
        by_name = {s.name: s for s in self.specs}
        for r in replaced:
            self.say(f"  [cluster] daemon pod on {r.node} deleted: new pod from {r.image}, edge restarting")
            self._restarting.add(r.node)
            self._pool.submit(self._restart_edge, by_name[r.node], r.version)

    def _restart_edge(self, spec: NodeSpec, version: str) -> None:
        try:
            with self._lock:
                old = self.edges.get(spec.name)
            if old is not None:
                old.stop()
            if not self._stop.is_set():
                self._start_edge(spec, version)
        finally:
            self._restarting.discard(spec.name)

    # -- stop -----------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        if self.cluster is not None:
            self.cluster.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            edges = list(self.edges.values())
        for child in [*edges, self.cloud, self.broker]:  # edges first, so they leave while the broker listens
            if child is not None:
                child.stop()
        for kubelet in self.kubelets.values():
            kubelet.stop()
        if self.uplinks is not None:
            self.uplinks.stop()
        if self.pod_lists is not None:
            self.pod_lists.stop()
        if self.kube is not None:
            self.kube.stop()
        if self.o.keep:
            self.say(f"kgpu demo: kept {self.workdir} (logs in {self.workdir / 'logs'})")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- what to try ----------------------------------------------------------------------------

    def print_intro(self) -> None:
        first = self.specs[0].name
        e1 = self.edge_url(first)
        kgpu, quiet = kgpu_command(), HEALTH_QUIET_PERIOD_S
        self.say(f"""
kgpu demo — {len(self.specs)} simulated GPU edge nodes, a controller and an emulated Kubernetes API
(the commands below work as they are in any shell on this machine)

  dashboard / API     {self.base}/        (the controller)
  fleet               {kgpu} get nodes --server {self.base}
  fleet as JSON       curl -s {self.base}/api/v1/nodes | python3 -m json.tool
  events, decisions   curl -s '{self.base}/api/v1/events?limit=20'
  migrations          curl -s {self.base}/api/v1/migrations
  policies            curl -s {self.base}/api/v1/policies
  live MQTT view      {kgpu} watch --mqtt mqtt://127.0.0.1:{self.uplink_ports[first]}
  health quiet period {quiet} s (demo pace: a GPU is healthy again {quiet} s after its last fault;
                      the setting health_quiet_period, 5 min by default on a real node)
""")
        for spec in self.specs:
            self.say(f"  {spec.name}  {spec.zone}  {spec.gpus}x {spec.model}   edge API {self.edge_url(spec.name)}")
        for w in self.workloads.placed:
            self.say(f"  pod {w.namespace}/{w.pod} on {w.node} GPU {w.gpu}: process {w.pid}")
        self.say(f"  energy per pod      curl -s {e1}/metrics | grep kgpu_pod")
        post = "curl -s -H 'Content-Type: application/json'"
        self.say(f"""
  heat up a GPU       {post} {e1}/api/v1/sim/gpus/0 -d '{{"utilization": 100, "ambient_c": 55}}'
  XID 79 (migrates)   {post} {e1}/api/v1/sim/gpus/1 -d '{{"xid": 79}}'
  its decisions       curl -s {e1}/api/v1/decisions
  roll out a version  {post} {self.base}/api/v1/rollouts -d '{{"image": "{IMAGE_REPO}:0.2.0", "maxUnavailable": 1}}'

Data and logs in {self.workdir}{' (kept)' if self.o.keep else ' (removed on exit; --keep keeps them)'}.
Ctrl-C stops everything.
""")


# ---- the scenario ---------------------------------------------------------------------------


class Scenario:
    def __init__(self, demo: Demo) -> None:
        self.d = demo
        self.fast = demo.o.fast
        self.failures: list[str] = []
        self.step_no = 0

    def say(self, text: str = "") -> None:
        self.d.say(text)

    def step(self, title: str, fn: Callable[[], str]) -> None:
        if self.step_no and not self.fast:
            time.sleep(6)  # time to read the last step (and to look at the dashboard) before the next
        self.step_no += 1
        self.say(f"\n== step {self.step_no}: {title}")
        started = time.monotonic()
        try:
            summary = fn()
        except (LabError, OSError, ValueError, KeyError) as exc:
            self.failures.append(title)
            self.say(f"== step {self.step_no} FAILED: {exc}")
            return
        self.say(f"== step {self.step_no} OK ({time.monotonic() - started:.0f}s): {summary}")

    def edge(self, node: str, path: str) -> Any:
        return get_json(self.d.edge_url(node) + path)

    def inject(self, node: str, gpu: int, fault: dict[str, Any]) -> None:
        status, body = http_json("POST", f"{self.d.edge_url(node)}/api/v1/sim/gpus/{gpu}", fault)
        if status != 200:
            raise DemoError(f"injecting {fault} on {node} GPU {gpu}: {status} {body}")

    def run(self) -> bool:
        specs = self.d.specs
        self.hot = specs[1 % len(specs)].name
        self.sick = specs[0].name
        self.cut = specs[2 % len(specs)].name
        self.step("the policy reaches every edge", self.policy)
        self.step(f"thermal spike on {self.hot}: the edge throttles on its own", self.thermal)
        self.step(f"XID 79 on {self.sick}: its GPU work migrates", self.xid)
        self.step(f"{self.cut} loses its uplink and keeps deciding", self.cut_off)
        self.step(f"rollout of {IMAGE_REPO}:0.2.0 with {self.cut} offline", self.rollout)
        self.step(f"{self.cut} comes back: it replays what it decided and is upgraded", self.come_back)
        self.step("GPU partitioning: MIG on the A100s, time-slicing on the H100s, seen by each kubelet",
                  self.partitioning)
        ok = not self.failures
        self.say(f"\n== scenario {'complete: every step succeeded' if ok else 'FAILED: ' + ', '.join(self.failures)}")
        return ok

    def partitioning(self) -> str:
        assert self.d.kube is not None
        nvml: list[demo_partitioning.NodeLike] = [s for s in self.d.specs if s.spec.product]  # NVIDIA's discrete GPUs
        return demo_partitioning.run(self.d.kube, self.d.kubelets, nvml, self.d.base, self.sick, self.say, timeout=60)

    def policy(self) -> str:
        def applied() -> bool:
            nodes = self.d.nodes()
            return all(nodes[s.name].get("policy_name") == POLICY_NAME for s in self.d.specs)

        wait(applied, 30, f"policy {POLICY_NAME} applied on every edge")
        local = self.edge(self.d.specs[0].name, "/api/v1/policy")
        self.say(f"  GPUPowerPolicy {POLICY_NAME!r} (CRD) -> controller -> MQTT (retained) -> every edge; "
                 f"{self.d.specs[0].name} reports {json.dumps(local)[:160]}")
        return f"{len(self.d.specs)} edges enforce {POLICY_NAME}"

    def thermal(self) -> str:
        before = {d.get("id") for d in self.edge(self.hot, "/api/v1/decisions")["decisions"]}
        self.say("  heat: 100 % load, 55 °C ambient, GPU at 86 °C (policy maxTempC 80, criticalTempC 92)")
        self.inject(self.hot, 0, {"utilization": 100, "ambient_c": 55, "temperature_c": 86})

        def throttled() -> list[dict[str, Any]]:
            new = [d for d in self.edge(self.hot, "/api/v1/decisions")["decisions"] if d.get("id") not in before]
            return [d for d in new if "therm" in json.dumps(d).lower()]

        found = wait(throttled, 30, f"a thermal decision on {self.hot}")
        for d in found[:3]:
            self.say(f"  decision: {d.get('action') or d.get('kind')}: {d.get('reason') or d.get('detail') or d}")
        self.inject(self.hot, 0, {"utilization": 30, "ambient_c": 25})
        return f"{self.hot} stepped its power limit down itself, no cloud round trip"

    def xid(self) -> str:
        self.say(f"  inject XID 79 (GPU fell off the bus) on {self.sick} GPU 0")
        self.inject(self.sick, 0, {"xid": 79})
        printed = 0

        def done() -> dict[str, Any] | None:
            nonlocal printed
            rows = get_json(f"{self.d.base}/api/v1/migrations?node={self.sick}")["migrations"]
            if not rows:
                return None
            m = rows[0]
            for s in m["steps"][printed:]:
                pod = f" {s['pod']}" if s.get("pod") else ""
                self.say(f"  migration #{m['id']}: {s['step']} {s['outcome']}{pod} {s.get('detail', '')[:110]}")
            printed = len(m["steps"])
            if m["state"] in ("failed", "cancelled"):
                raise DemoError(f"migration {m['state']}")
            return m if m["state"] in ("completed", "recovered") else None

        m = wait(done, 60, f"the migration off {self.sick} to complete", interval=0.5)
        return f"migration #{m['id']} {m['state']}: {self.sick} tainted, its GPU pods moved"

    def cut_off(self) -> str:
        assert self.d.uplinks is not None
        self.d.uplinks.cut(self.cut)
        self.say(f"  {self.cut}'s uplink drops (its TCP connection to the broker is cut; the daemon keeps running)")
        wait(lambda: not self.d.nodes()[self.cut]["online"], 30, f"the controller to see {self.cut} offline")
        self.say(f"  controller: {self.cut} offline")
        self.cut_at = time.time()
        self.inject(self.cut, 0, {"utilization": 100, "ambient_c": 55, "temperature_c": 86})
        found = wait(lambda: [d for d in self.edge(self.cut, "/api/v1/decisions")["decisions"]
                                  if (d.get("ts") or 0) >= self.cut_at], 30, f"{self.cut} deciding offline")
        self.offline_decisions = len(found)
        self.say(f"  {self.cut} decided offline: {found[0].get('action') or found[0].get('kind')}: "
                 f"{found[0].get('reason') or found[0].get('detail') or ''}")
        self.inject(self.cut, 0, {"utilization": 30, "ambient_c": 25})
        return f"{self.cut} offline at the controller, still enforcing its cached policy"

    def rollout(self) -> str:
        status, created = http_json("POST", f"{self.d.base}/api/v1/rollouts", {
            "image": f"{IMAGE_REPO}:0.2.0", "maxUnavailable": 1, "healthTimeout": "60s",
            "failureThreshold": "50%", "waves": {"percentages": [50, 100]}})
        if status != 201:
            raise DemoError(f"POST /api/v1/rollouts: {status} {created}")
        self.rollout_id = created["id"]
        self.say(f"  POST /api/v1/rollouts -> #{self.rollout_id}: {IMAGE_REPO}:0.2.0 over {created.get('nodeCount')} "
                 f"nodes, one at a time")
        online = [s.name for s in self.d.specs if s.name != self.cut]
        last = [""]

        def progressed() -> dict[str, Any] | None:
            r = get_json(f"{self.d.base}/api/v1/rollouts/{self.rollout_id}")
            counts = {k: v for k, v in r["counts"].items() if v}
            line = f"  rollout #{self.rollout_id} {r['state']}: {counts}"
            if line != last[0]:
                self.say(line)
                last[0] = line
            if r["state"] in ("rolling-back", "rolled-back", "cancelled"):
                raise DemoError(f"rollout {r['state']}")
            nodes = self.d.nodes()
            return r if all(nodes[n].get("daemon_version") == "0.2.0" for n in online) else None

        timeout = 150 if not self.fast else 90
        wait(progressed, timeout, "the online nodes upgraded", interval=0.5)
        return f"{len(online)} online nodes run 0.2.0; {self.cut} deferred, not blocking"

    def come_back(self) -> str:
        assert self.d.uplinks is not None
        outage = 10 if self.fast else 60
        left = self.cut_at + outage - time.time()
        if left > 0:
            self.say(f"  ({left:.0f}s more of outage)")
            time.sleep(left)
        self.d.uplinks.restore(self.cut)
        self.say(f"  {self.cut}'s uplink is back after {time.time() - self.cut_at:.0f}s")
        wait(lambda: self.d.nodes()[self.cut]["online"], 30, f"{self.cut} online again")
        replayed = wait(lambda: [e for e in get_json(
            f"{self.d.base}/api/v1/decisions?node={self.cut}&since={self.cut_at}")["decisions"]], 30,
            f"the decisions {self.cut} took offline at the controller")
        keys = [(d.get("seq"), d.get("id"), d.get("ts")) for d in replayed]
        if len(set(keys)) != len(keys):
            raise DemoError(f"{self.cut}'s offline decisions arrived more than once: {keys}")
        self.say(f"  controller received {len(replayed)} decision(s) {self.cut} took while cut off, each once")
        r = wait(lambda: (r := get_json(f"{self.d.base}/api/v1/rollouts/{self.rollout_id}"))
                     and r["state"] not in ("running", "rolling-back") and r, 90,
                     f"{self.cut} upgraded and the rollout finished", interval=0.5)
        if r["state"] != "completed" or self.d.nodes()[self.cut].get("daemon_version") != "0.2.0":
            raise DemoError(f"rollout #{self.rollout_id} {r['state']}: {r['counts']}")
        self.say(f"  rollout #{self.rollout_id} {r['state']}: {({k: v for k, v in r['counts'].items() if v})}")
        return f"{self.cut} replayed its offline decisions and now runs 0.2.0"


# ---- entry point ----------------------------------------------------------------------------


def run_demo(options: DemoOptions) -> int:
    """Run the demo until Ctrl-C (or, with `scenario`, until the story ends); 0 on success."""
    demo = Demo(options)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig in previous:  # a supervisor's SIGTERM or a closed terminal stop it as Ctrl-C does
        signal.signal(sig, signal.default_int_handler)
    code = 0
    try:
        demo.say(f"kgpu demo: starting {options.nodes} edge nodes, a controller, mosquitto and an emulated "
                 f"Kubernetes API (data in {demo.workdir})")
        demo.start()
        demo.print_intro()
        if options.scenario:
            code = 0 if Scenario(demo).run() else 1
        else:
            demo.say("kgpu demo: ready")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        demo.say("\nkgpu demo: stopping")
    except LabError as exc:
        print(f"kgpu demo: {exc}", file=sys.stderr, flush=True)
        if options.keep or options.scenario:
            options.keep = True
        code = 1 if options.scenario or "mosquitto" not in str(exc) else 2
    finally:
        try:
            demo.stop()
        except KeyboardInterrupt:  # a second Ctrl-C: stop anyway, harder
            for child in [*demo.edges.values(), demo.cloud, demo.broker]:
                if child is not None and child.alive():
                    child.proc.kill()  # type: ignore[union-attr]
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        demo.say("kgpu demo: stopped, nothing left running")
    return code
