"""`kgpu demo`: a whole kgpu fleet on one machine, no cluster, no GPU.

What runs, all owned by the demo and stopped by Ctrl-C (SIGINT), SIGTERM or SIGHUP:

* a broker: mosquitto, or the embedded Python broker amqtt when mosquitto is missing, on a free
  loopback port, with its own config and persistence in the demo's temp dir;
* an emulated Kubernetes API (kmock's KubernetesEmulator, on a background event loop) seeded with
  the edge GPU nodes, a few GPU pods, the `kgpu-edge` DaemonSet (OnDelete, one pod per node) and a
  `GPUPowerPolicy`;
* `kgpu cloud run --kubeconfig <the emulator's>` on SQLite, serving the API on --http (9420);
* one `kgpu edge run --backend sim --mqtt ...` per node (2-4 simulated H100/A100 each). Each edge
  reaches the broker through its own loopback TCP relay (its "uplink"), which the scenario cuts to
  take exactly one node off the network while its daemon keeps running and deciding;
* a thread that plays what a real cluster's kubelet, scheduler, ReplicaSet and DaemonSet
  controllers would do in the emulator: an evicted pod is deleted (an owned one is recreated on
  another node, as its ReplicaSet would), a pod with no node is bound to the node its affinity
  names, and a deleted daemon pod is recreated from the DaemonSet's current template, its node's
  edge process restarted reporting the template's version (`KGPU_SIM_DAEMON_VERSION`).

`--scenario` plays a narrated story (thermal spike, XID 79 migration, a node cut off, a rollout
with that node offline, its return and replay) and exits 0 when every step succeeded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from shared import __version__

NS, DAEMONSET = "kgpu", "kgpu-edge"
DS_LABELS = {"app": "kgpu-edge"}
IMAGE_REPO = "kgpu/edge"
POLICY_NAME = "edge-fleet"
GPU_PRESENT = "nvidia.com/gpu.present"
EDGE_ROLE = "node-role.kubernetes.io/edge"
ZONE = "topology.kubernetes.io/zone"
HOSTNAME = "kubernetes.io/hostname"
PRODUCTS = {"H100": ("NVIDIA-H100-80GB-HBM3", 81559), "A100": ("NVIDIA-A100-SXM4-80GB", 81920)}
MOSQUITTO_HINT = ("kgpu demo needs the mosquitto MQTT broker on PATH: "
                  "`sudo apt-get install mosquitto` (Debian/Ubuntu), `sudo dnf install mosquitto` (Fedora) "
                  "or `brew install mosquitto` (macOS)")


class DemoError(Exception):
    """Something the demo needs did not happen; the message says what."""


@dataclass
class DemoOptions:
    nodes: int = 4
    http: int = 9420
    scenario: bool = False
    fast: bool = False
    keep: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)


@dataclass
class NodeSpec:
    name: str
    zone: str
    model: str
    gpus: int


def node_specs(count: int) -> list[NodeSpec]:
    """edge-01..: zones a/b alternate by halves, 4/2/3/4... GPUs, every fourth node A100."""
    specs = []
    for i in range(count):
        specs.append(NodeSpec(name=f"edge-{i + 1:02d}", zone="zone-a" if i < (count + 1) // 2 else "zone-b",
                              model="A100" if i % 4 == 3 else "H100", gpus=(4, 2, 3)[i % 3]))
    return specs


# Ports the demo has handed out or promised (the controller's --http): a port picked by binding
# port 0 is free only until someone binds it, so never hand the same one out twice.
_RESERVED_PORTS: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _RESERVED_PORTS:
            _RESERVED_PORTS.add(port)
            return port


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError, KeyError) as exc:  # a process still starting, a partial answer
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def http_json(method: str, url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    try:
        return status, json.loads(payload)
    except json.JSONDecodeError:
        return status, payload.decode(errors="replace")


def get_json(url: str) -> Any:
    status, body = http_json("GET", url)
    if status != 200:
        raise ValueError(f"GET {url}: {status} {body}")
    return body


# ---- child processes ----------------------------------------------------------------------


def _dies_with_the_demo(args: list[str]) -> list[str]:
    """`args` run so that the child gets SIGTERM if the demo dies without stopping it (kill -9):
    Linux's parent-death signal, set by util-linux's setpriv, which then execs the command (same
    pid). Where setpriv is missing, as on macOS, the command as it is."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--", *args] if setpriv else args


class Child:
    """One process owned by the demo, in its own process group (Ctrl-C reaches only the demo,
    which then stops the children in order), logging to a file in the demo's dir. If the demo is
    killed outright, its children get SIGTERM (`_dies_with_the_demo`)."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.args, self.log_path, self.env = name, args, log_path, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it; closed right after the fork
        try:
            self.proc = subprocess.Popen(_dies_with_the_demo(self.args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(self.env or {})}, process_group=0)
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.path.exists(candidate):
            return candidate
    return None


def start_broker(workdir: Path) -> tuple[Child, int]:
    """mosquitto when it is installed, otherwise the embedded Python broker amqtt (the `demo`
    extra); KGPU_DEMO_BROKER=mosquitto|amqtt forces one."""
    choice = os.environ.get("KGPU_DEMO_BROKER", "auto")
    if choice not in ("auto", "mosquitto", "amqtt"):
        raise DemoError(f"KGPU_DEMO_BROKER must be auto, mosquitto or amqtt, not {choice!r}")
    if choice != "amqtt" and mosquitto_binary() is not None:
        return start_mosquitto(workdir)
    if choice != "mosquitto" and importlib.util.find_spec("amqtt") is not None:
        return start_amqtt(workdir)
    raise DemoError(MOSQUITTO_HINT + ", or install the embedded broker: pip install 'kgpu[demo]'")


def start_amqtt(workdir: Path) -> tuple[Child, int]:
    broker_dir = workdir / "broker"
    broker_dir.mkdir()
    port = free_port()
    config = broker_dir / "amqtt.yaml"
    config.write_text(
        "listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:%d\n"
        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n" % port
    )
    child = Child("broker", [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(config)],
                  workdir / "logs" / "broker.log").start()
    _wait_listening(child, port, "amqtt")
    return child, port


def _wait_listening(child: Child, port: int, name: str) -> None:
    def listening() -> bool:
        if not child.alive():
            raise DemoError(f"{name} exited: {child.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_for(listening, 15, f"{name} to listen", interval=0.05)


def start_mosquitto(workdir: Path) -> tuple[Child, int]:
    binary = mosquitto_binary()
    if binary is None:
        raise DemoError(MOSQUITTO_HINT)
    broker_dir = workdir / "broker"
    broker_dir.mkdir()
    port = free_port()
    lines = [
        "per_listener_settings false", "persistence true", f"persistence_location {broker_dir}/",
        "autosave_interval 1", f"log_dest file {broker_dir / 'mosquitto.log'}",
        "log_type error", "log_type warning", "log_type notice", "max_queued_messages 100000",
        f"listener {port} 127.0.0.1", "allow_anonymous true",
    ]
    if os.geteuid() == 0:  # as root mosquitto would switch to its own user, who can't read our temp dir
        lines.insert(0, "user root")
    config = broker_dir / "mosquitto.conf"
    config.write_text("\n".join(lines) + "\n")
    child = Child("broker", [binary, "-c", str(config)], workdir / "logs" / "broker.log").start()
    _wait_listening(child, port, "mosquitto")
    return child, port


# ---- the emulated Kubernetes API ----------------------------------------------------------


def daemonset_manifest(namespace: str, name: str, labels: dict[str, str], image: str) -> dict[str, Any]:
    """The edge daemon's DaemonSet as the controller expects it: `OnDelete`, so that the rollout
    engine decides when each node's pod is replaced, with one container called `edge`."""
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"selector": {"matchLabels": labels}, "updateStrategy": {"type": "OnDelete"},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "edge", "image": image}]}}}}


def daemon_pod_manifest(namespace: str, daemonset: str, labels: dict[str, str], name: str, node: str,
                        image: str) -> dict[str, Any]:
    """A running pod of that DaemonSet on `node`. kmock has no DaemonSet controller: whoever plays
    it (the demo, the rollout tests and benchmark) creates these."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "labels": labels,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": daemonset,
                                          "uid": f"{daemonset}-uid", "controller": True}]},
        "spec": {"nodeName": node, "containers": [{"name": "edge", "image": image}]},
        "status": {"phase": "Running"}}


class KubeEmulator:
    """kmock's KubernetesEmulator on its own event loop in a background thread, reachable over
    loopback HTTP, with a kubeconfig file for the controller and a kubernetes client for us.

    kmock 0.8 as seen: field selectors are ignored, patches merge dicts and replace lists, no
    resourceVersion, and the eviction subresource answers only with a declared reaction."""

    def __init__(self, workdir: Path) -> None:
        try:
            import kmock
        except ImportError as exc:  # a dependency of kgpu; only a broken install lacks it
            raise DemoError(f"the emulated Kubernetes API needs kmock ({exc}); pip install 'kmock>=0.8'") from None
        from kubernetes import client

        self._kmock = kmock
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.emulator: Any = None
        self.url = ""
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise DemoError(f"the Kubernetes emulator did not start: {self._error!r}")
        self.kubeconfig = workdir / "kubeconfig"
        import yaml

        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kgpu-demo",
            "clusters": [{"name": "kgpu-demo", "cluster": {"server": self.url}}],
            "users": [{"name": "demo", "user": {"token": "demo"}}],
            "contexts": [{"name": "kgpu-demo", "context": {"cluster": "kgpu-demo", "user": "demo"}}],
        }))
        configuration = client.Configuration()
        configuration.host = self.url
        self.api = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        kmock = self._kmock
        self._stopping = asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self.loop = asyncio.get_running_loop()
            self._ready.set()
            await self._stopping.wait()

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the emulator's loop (kmock's DSL is not thread-safe)."""
        assert self.loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def react(self, criteria: str, *payload: Any) -> None:
        def declare() -> None:
            reaction = self.emulator[criteria]
            for item in payload:
                reaction = reaction << item

        self.on_loop(declare)

    def requests_since(self, start: int) -> tuple[list[Any], int]:
        def take() -> tuple[list[Any], int]:
            everything = list(self.emulator)  # kmock: iterating gives the requests served
            return everything[start:], len(everything)

        return self.on_loop(take)

    def raw(self, fn: Callable[..., Any], *args: Any) -> Any:
        return json.loads(fn(*args, _preload_content=False).data)

    def stop(self) -> None:
        """Stop serving (a second call does nothing)."""
        if self.loop is not None and self._stopping is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)
        self.api.close()


# ---- per-node uplinks: loopback TCP relays that can be cut ----------------------------------


class Uplinks:
    """One TCP relay per node between its edge and the broker. `cut(node)` aborts the node's
    connections (the broker sees the socket die and publishes the node's will: offline) and
    refuses new ones until `restore(node)`; the edge process itself keeps running."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="uplinks", daemon=True)
        self._thread.start()
        self.down: set[str] = set()
        self._conns: dict[str, set[asyncio.StreamWriter]] = {}
        self._servers: list[asyncio.base_events.Server] = []

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def add(self, node: str) -> int:
        async def open_server() -> int:
            server = await asyncio.start_server(lambda r, w: self._relay(node, r, w), "127.0.0.1", free_port())
            self._servers.append(server)
            return int(server.sockets[0].getsockname()[1])

        self._conns[node] = set()
        return int(self._call(open_server()))

    async def _relay(self, node: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if node in self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
        except OSError:
            writer.transport.abort()
            return
        conns = self._conns[node]
        conns.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            conns.discard(writer)
            conns.discard(up_writer)

    def cut(self, node: str) -> None:
        async def abort() -> None:
            self.down.add(node)
            for w in list(self._conns[node]):
                w.transport.abort()

        self._call(abort())

    def restore(self, node: str) -> None:
        async def up() -> None:
            self.down.discard(node)

        self._call(up())

    def stop(self) -> None:
        async def close() -> None:
            for conns in self._conns.values():
                for w in list(conns):
                    w.transport.abort()
            for server in self._servers:
                server.close()

        try:
            self._call(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)


# ---- the fleet ------------------------------------------------------------------------------


class Demo:
    def __init__(self, options: DemoOptions) -> None:
        self.o = options
        self.out = options.out
        self.workdir = Path(tempfile.mkdtemp(prefix="kgpu-demo-"))
        (self.workdir / "logs").mkdir()
        self.specs = node_specs(options.nodes)
        self.base = f"http://127.0.0.1:{options.http}"
        _RESERVED_PORTS.add(options.http)  # the controller binds it later: keep the demo's own picks off it
        self.broker: Child | None = None
        self.cloud: Child | None = None
        self.kube: KubeEmulator | None = None
        self.uplinks: Uplinks | None = None
        self.edges: dict[str, Child] = {}
        self.edge_ports: dict[str, int] = {}
        self.uplink_ports: dict[str, int] = {}
        self.versions: dict[str, str] = {}
        self.pids_seen: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._cluster_thread: threading.Thread | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="kgpu-demo")
        self._restarting: set[str] = set()
        self._counter = itertools.count(1)
        self._request_index = 0
        self.cluster_errors: list[str] = []

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _spawned(self, child: Child) -> Child:
        self.pids_seen.append(child.pid)
        self.say(f"[kgpu-demo] pid {child.pid} {child.name}")
        return child

    # -- start ----------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            socket.create_server(("127.0.0.1", self.o.http)).close()
        except OSError as exc:
            raise DemoError(f"port {self.o.http} is busy ({exc.strerror}); pick another with --http PORT") from None
        self.broker, broker_port = start_broker(self.workdir)
        self._spawned(self.broker)
        self.kube = KubeEmulator(self.workdir)
        self.seed()
        self.uplinks = Uplinks(broker_port)
        self._cluster_thread = threading.Thread(target=self._play_cluster, name="kgpu-demo-cluster", daemon=True)
        self._cluster_thread.start()
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
            self.uplink_ports[spec.name] = self.uplinks.add(spec.name)
            self.edge_ports[spec.name] = free_port()
            self._start_edge(spec, __version__)
        wait_for(self._controller_up, 30, "the controller's API")
        wait_for(self._all_online, 45, f"all {len(self.specs)} nodes online at the controller")

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
        config.write_text("status_interval: 2\nhealth_quiet_period: 90\n")
        child = Child(f"edge {spec.name} v{version}", [
            sys.executable, "-m", "kgpu", "edge", "run", "--node", spec.name, "--backend", "sim",
            "--sim-gpus", str(spec.gpus), "--sim-model", spec.model, "--db", str(node_dir / "edge.db"),
            "--http", f"127.0.0.1:{self.edge_ports[spec.name]}", "--interval", "1",
            "--mqtt", f"mqtt://127.0.0.1:{self.uplink_ports[spec.name]}", "--config", str(config)],
            self.workdir / "logs" / f"{spec.name}.log",
            env={"KGPU_SIM_DAEMON_VERSION": version, "KGPU_LOG_JSON": "true", "PYTHONUNBUFFERED": "1"}).start()
        with self._lock:
            self.edges[spec.name] = child
            self.versions[spec.name] = version
        self._spawned(child)

    def edge_url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.edge_ports[node]}"

    # -- seeding the emulated cluster -------------------------------------------------------------

    def seed(self) -> None:
        kube = self.kube
        assert kube is not None
        for spec in self.specs:
            product, memory = PRODUCTS[spec.model]
            kube.core.create_node({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": spec.name, "labels": {
                    EDGE_ROLE: "", GPU_PRESENT: "true", ZONE: spec.zone, HOSTNAME: spec.name,
                    "nvidia.com/gpu.product": product, "nvidia.com/gpu.count": str(spec.gpus),
                    "nvidia.com/gpu.memory": str(memory)}},
                "status": {"conditions": [{"type": "Ready", "status": "True"}],
                           "capacity": {"nvidia.com/gpu": str(spec.gpus)},
                           "allocatable": {"nvidia.com/gpu": str(spec.gpus)}}})
        kube.apps.create_namespaced_daemon_set(
            NS, daemonset_manifest(NS, DAEMONSET, DS_LABELS, f"{IMAGE_REPO}:{__version__}"))
        for spec in self.specs:
            self._create_daemon_pod(spec.name, f"{IMAGE_REPO}:{__version__}")
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
            "spec": {"nodeSelector": {EDGE_ROLE: "", GPU_PRESENT: "true"}, "priority": 10,
                     "powerSaving": {"enabled": True, "utilizationThreshold": 10, "capPercent": 70,
                                     "sustainPeriod": "60s"},
                     "thermalThrottling": {"maxTempC": 80, "criticalTempC": 92, "stepPercent": 10,
                                           "stepInterval": "5s", "coolDownPeriod": "60s", "hysteresisC": 5}}})

    def _create_daemon_pod(self, node: str, image: str) -> None:
        assert self.kube is not None
        name = f"{DAEMONSET}-{uuid.uuid4().hex[:5]}"
        self.kube.core.create_namespaced_pod(NS, daemon_pod_manifest(NS, DAEMONSET, DS_LABELS, name, node, image))

    def _create_gpu_pod(self, name: str, node: str, *, gpus: int, cls: str, owner: tuple[str, str] | None,
                        namespace: str = "default") -> None:
        assert self.kube is not None
        metadata: dict[str, Any] = {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                                    "labels": {"kgpu.io/workload-class": cls, "app": name.split("-")[0]}}
        if owner:
            metadata["ownerReferences"] = [{"apiVersion": "batch/v1" if owner[0] == "Job" else "apps/v1",
                                            "kind": owner[0], "name": owner[1], "uid": f"uid-{owner[1]}",
                                            "controller": True}]
        self.kube.core.create_namespaced_pod(namespace, {
            "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": f"registry.local/{cls}:1",
                                                       "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
            "status": {"phase": "Running"}})
        self.kube.react(f"post /api/v1/namespaces/{namespace}/pods/{name}/eviction",
                        201, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

    # -- playing kubelet, scheduler, ReplicaSet and DaemonSet controllers --------------------------

    def _play_cluster(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._cluster_step()
            except Exception as exc:  # noqa: BLE001 - keep playing; the narration shows what is missing
                if not self._stop.is_set():
                    self.cluster_errors.append(repr(exc))
                    self.say(f"  [cluster] error (will retry): {exc!r}"[:1500])

    def _cluster_step(self) -> None:
        kube = self.kube
        assert kube is not None
        requests, self._request_index = kube.requests_since(self._request_index)
        for r in requests:
            path = str(r.url.path)
            method = str(getattr(r.method, "value", r.method)).upper()  # kmock gives an enum
            if method == "POST" and path.endswith("/eviction"):
                parts = path.strip("/").split("/")  # api v1 namespaces NS pods NAME eviction
                self._evicted(parts[3], parts[5])
        pods = kube.raw(kube.core.list_pod_for_all_namespaces)["items"]
        for pod in pods:  # the scheduler: bind a pod that names its node by affinity
            if not pod["spec"].get("nodeName"):
                target = self._affinity_host(pod) or self._schedule(pod, pods)
                if target:
                    kube.core.patch_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                                   {"spec": {"nodeName": target}})
                    self.say(f"  [cluster] scheduler bound {pod['metadata']['namespace']}/"
                             f"{pod['metadata']['name']} to {target}")
        ds = kube.raw(kube.apps.read_namespaced_daemon_set, DAEMONSET, NS)
        image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
        covered = {p["spec"].get("nodeName") for p in pods
                   if p["metadata"]["namespace"] == NS and p["metadata"].get("labels", {}).get("app") == "kgpu-edge"}
        for spec in self.specs:
            if spec.name not in covered and spec.name not in self._restarting:
                self._create_daemon_pod(spec.name, image)  # the DaemonSet controller (OnDelete)
                version = image.rsplit(":", 1)[1]
                self.say(f"  [cluster] daemon pod on {spec.name} deleted: new pod from {image}, edge restarting")
                self._restarting.add(spec.name)
                self._pool.submit(self._restart_edge, spec, version)

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

    def _evicted(self, namespace: str, name: str) -> None:
        """Kubelet ends an evicted pod; its owner (a ReplicaSet) makes a replacement elsewhere."""
        kube = self.kube
        assert kube is not None
        try:
            pod = kube.raw(kube.core.read_namespaced_pod, name, namespace)
        except Exception:  # noqa: BLE001 - already gone
            return
        kube.core.delete_namespaced_pod(name, namespace)
        self.say(f"  [cluster] kubelet stopped evicted pod {namespace}/{name}")
        owners = pod["metadata"].get("ownerReferences") or []
        if owners and owners[0]["kind"] == "ReplicaSet":
            rs = owners[0]["name"]
            pods = kube.raw(kube.core.list_pod_for_all_namespaces)["items"]
            target = self._schedule(pod, pods, avoid=pod["spec"].get("nodeName"))
            if target is None:
                self.say(f"  [cluster] ReplicaSet {rs}: no node fits a replacement yet")
                return
            gpus = int(pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            new_name = f"{rs}-{uuid.uuid4().hex[:5]}"
            self._create_gpu_pod(new_name, target, gpus=gpus, owner=("ReplicaSet", rs), namespace=namespace,
                                 cls=pod["metadata"].get("labels", {}).get("kgpu.io/workload-class", "training"))
            self.say(f"  [cluster] ReplicaSet {rs} recreated it as {namespace}/{new_name} on {target}")

    @staticmethod
    def _affinity_host(pod: dict[str, Any]) -> str | None:
        try:
            terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            for term in terms["nodeSelectorTerms"]:
                for expr in term.get("matchExpressions", []):
                    if expr["key"] == HOSTNAME and expr["operator"] == "In":
                        return str(expr["values"][0])
        except (KeyError, TypeError, IndexError):
            pass
        return None

    def _schedule(self, pod: dict[str, Any], pods: list[dict[str, Any]], avoid: str | None = None) -> str | None:
        """A small scheduler: untainted nodes matching the selector with enough free GPUs; the
        original GPU product first, then the original zone, then the most free GPUs."""
        kube = self.kube
        assert kube is not None

        def want(p: dict[str, Any]) -> int:
            return sum(int((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0))
                       for c in p["spec"]["containers"])

        used: dict[str, int] = {}
        for p in pods:
            if p["spec"].get("nodeName"):
                used[p["spec"]["nodeName"]] = used.get(p["spec"]["nodeName"], 0) + want(p)
        nodes = {n["metadata"]["name"]: n for n in kube.raw(kube.core.list_node)["items"]}
        source = nodes.get(avoid or "", {}).get("metadata", {}).get("labels") or {}
        zone, product = source.get(ZONE), source.get("nvidia.com/gpu.product")
        selector = pod["spec"].get("nodeSelector") or {}
        best: tuple[Any, ...] | None = None
        for name, node in nodes.items():
            labels = node["metadata"].get("labels") or {}
            if name == avoid or (node.get("spec") or {}).get("taints"):
                continue
            if any(labels.get(k) != v for k, v in selector.items()):
                continue
            free = int(labels.get("nvidia.com/gpu.count", "0")) - used.get(name, 0)
            if free < want(pod):
                continue
            key = (labels.get("nvidia.com/gpu.product") == product, labels.get(ZONE) == zone, free, name)
            if best is None or key > best:
                best = key
        return str(best[-1]) if best else None

    # -- stop -----------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        if self._cluster_thread is not None:
            self._cluster_thread.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            edges = list(self.edges.values())
        for child in [*edges, self.cloud, self.broker]:  # edges first, so they leave while the broker listens
            if child is not None:
                child.stop()
        if self.uplinks is not None:
            self.uplinks.stop()
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
        self.say(f"""
kgpu demo — {len(self.specs)} simulated GPU edge nodes, a controller and an emulated Kubernetes API

  dashboard / API     {self.base}/        (the controller)
  fleet               curl -s {self.base}/api/v1/nodes | python3 -m json.tool
  events, decisions   curl -s '{self.base}/api/v1/events?limit=20'
  migrations          curl -s {self.base}/api/v1/migrations
  policies            curl -s {self.base}/api/v1/policies
  live MQTT view      kgpu watch --mqtt mqtt://127.0.0.1:{self.uplink_ports[first]}
""")
        for spec in self.specs:
            self.say(f"  {spec.name}  {spec.zone}  {spec.gpus}x {spec.model}   edge API {self.edge_url(spec.name)}")
        self.say(f"""
  heat up a GPU       curl -s -H 'Content-Type: application/json' {e1}/api/v1/sim/gpus/0 -d '{{"utilization": 100, "ambient_c": 55}}'
  XID 79 (migrates)   curl -s -H 'Content-Type: application/json' {e1}/api/v1/sim/gpus/1 -d '{{"xid": 79}}'
  its decisions       curl -s {e1}/api/v1/decisions
  roll out a version  curl -s -H 'Content-Type: application/json' {self.base}/api/v1/rollouts -d '{{"image": "{IMAGE_REPO}:0.2.0", "maxUnavailable": 1}}'

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
        except (DemoError, OSError, ValueError, KeyError) as exc:
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
        ok = not self.failures
        self.say(f"\n== scenario {'complete: every step succeeded' if ok else 'FAILED: ' + ', '.join(self.failures)}")
        return ok

    def policy(self) -> str:
        def applied() -> bool:
            nodes = self.d.nodes()
            return all(nodes[s.name].get("policy_name") == POLICY_NAME for s in self.d.specs)

        wait_for(applied, 30, f"policy {POLICY_NAME} applied on every edge")
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

        found = wait_for(throttled, 30, f"a thermal decision on {self.hot}")
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

        m = wait_for(done, 60, f"the migration off {self.sick} to complete", interval=0.5)
        return f"migration #{m['id']} {m['state']}: {self.sick} tainted, its GPU pods moved"

    def cut_off(self) -> str:
        assert self.d.uplinks is not None
        self.d.uplinks.cut(self.cut)
        self.say(f"  {self.cut}'s uplink drops (its TCP connection to the broker is cut; the daemon keeps running)")
        wait_for(lambda: not self.d.nodes()[self.cut]["online"], 30, f"the controller to see {self.cut} offline")
        self.say(f"  controller: {self.cut} offline")
        self.cut_at = time.time()
        self.inject(self.cut, 0, {"utilization": 100, "ambient_c": 55, "temperature_c": 86})
        found = wait_for(lambda: [d for d in self.edge(self.cut, "/api/v1/decisions")["decisions"]
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
        wait_for(progressed, timeout, "the online nodes upgraded", interval=0.5)
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
        wait_for(lambda: self.d.nodes()[self.cut]["online"], 30, f"{self.cut} online again")
        replayed = wait_for(lambda: [e for e in get_json(
            f"{self.d.base}/api/v1/decisions?node={self.cut}&since={self.cut_at}")["decisions"]], 30,
            f"the decisions {self.cut} took offline at the controller")
        keys = [(d.get("seq"), d.get("id"), d.get("ts")) for d in replayed]
        if len(set(keys)) != len(keys):
            raise DemoError(f"{self.cut}'s offline decisions arrived more than once: {keys}")
        self.say(f"  controller received {len(replayed)} decision(s) {self.cut} took while cut off, each once")
        r = wait_for(lambda: (r := get_json(f"{self.d.base}/api/v1/rollouts/{self.rollout_id}"))
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
    except DemoError as exc:
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
