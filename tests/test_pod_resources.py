"""Which pod uses which GPU (edge/podresources/): the kubelet's pod-resources API v1, served by the
kubelet stand-in (kgpu/lab/kubelet.py) over a real unix socket from the allocations it made
through kgpu's real device plugin, and the fallback from NVML's PIDs through a fake /proc (real
files) and a real HTTP pod list to pod names.

Device IDs of every kind fold into their GPU: whole GPUs, MIG devices, time-slicing replicas
`<uuid>::<n>`. A GPU that could not be read keeps its last known pods; an absent socket, a stale
one and a kubelet that answers with an error fall back, counted, and never raise.
"""

from __future__ import annotations

import asyncio
import filecmp
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from edge.deviceplugin.devices import PluginDevice, replica_id
from edge.deviceplugin.manager import DevicePluginManager
from edge.deviceplugin.v1beta1 import api_pb2 as deviceplugin_pb2
from edge.podresources import GpuPodMap
from edge.podresources.podmap import gpu_of, pods_by_gpu
from edge.podresources.v1 import api_pb2, api_pb2_grpc
from edge.pods import PodRef, PodResolver
from kgpu.lab.kubelet import KubeletStandIn
from tests.helpers.pod_list import PodListServer

ROOT = Path(__file__).resolve().parent.parent
GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"
MIG = "nvidia.com/mig-1g.10gb"
A, B, C = (f"GPU-{n}0000000-0000-0000-0000-00000000000{n}" for n in range(3))
MIG_C1, MIG_C2 = (f"MIG-c000000{n}-0000-0000-0000-00000000000{n}" for n in (1, 2))
TIMEOUT = 30.0  # generous: CI is a busy 2-core box; nothing waits that long when all is well


@dataclass
class ListSource:
    """The DeviceSource interface the daemon implements: its device list and its change event."""

    items: list[PluginDevice]
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def devices(self) -> list[PluginDevice]:
        return list(self.items)


def node_devices() -> list[PluginDevice]:
    """A: a whole GPU; B: two time-slicing replicas; C: two MIG devices."""
    whole = PluginDevice(id=A, gpu_uuid=A, visible_id=A, healthy=True, numa_node=0, resource=GPU)
    shared = [PluginDevice(id=replica_id(B, n), gpu_uuid=B, visible_id=B, healthy=True, numa_node=1,
                           resource=SHARED) for n in range(2)]
    mig = [PluginDevice(id=m, gpu_uuid=C, visible_id=m, healthy=True, numa_node=None, resource=MIG)
           for m in (MIG_C1, MIG_C2)]
    return [whole, *shared, *mig]


def device_map(devices: list[PluginDevice]) -> dict[str, str]:
    """What the daemon hands refresh(): every advertised ID and every GPU UUID -> the GPU."""
    return {d.id: d.gpu_uuid for d in devices} | {d.gpu_uuid: d.gpu_uuid for d in devices}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A unix socket path must fit in 107 bytes; pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="kgpu-pr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def plugin_and_kubelet(directory: Path) -> AsyncIterator[KubeletStandIn]:
    """The stand-in kubelet (device plugins and pod-resources) with kgpu's device plugin registered."""
    plugins = directory / "device-plugins"
    kubelet = KubeletStandIn(plugins, pod_resources_socket=directory / "pod-resources" / "kubelet.sock")
    manager = DevicePluginManager(ListSource(node_devices()), plugins)
    stop = asyncio.Event()
    async with kubelet:
        task = asyncio.create_task(manager.run(stop))
        try:
            listed = {GPU: 1, SHARED: 2, MIG: 2}
            await kubelet.wait_until(lambda: all(len(kubelet.devices(r)) == n for r, n in listed.items()),
                                     TIMEOUT, "every resource listed")
            yield kubelet
        finally:
            stop.set()
            await asyncio.wait_for(task, TIMEOUT)


# ---- the stubs and the folding -------------------------------------------------------------------


def test_committed_stubs_are_what_the_script_generates_and_load_beside_the_device_plugin_s(
        tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) generates the stubs")
    committed = ROOT / "edge/podresources/v1"
    out = subprocess.run([str(ROOT / "scripts/gen_protos.sh"), "podresources", str(tmp_path)], capture_output=True,
                         text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["__init__.py", "api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path, committed, names, shallow=False)
    assert (mismatch, errors) == ([], []), f"{mismatch or errors} differ: run scripts/gen_protos.sh, commit the result"
    # the vendored proto is upstream's, byte for byte, and both APIs load into one process: protobuf's
    # pool holds one file per name, and upstream calls both files api.proto
    assert "service PodResourcesLister {" in (ROOT / "edge/podresources/proto/api.proto").read_text()
    assert api_pb2.DESCRIPTOR.name == "k8s.io/kubelet/pkg/apis/podresources/v1/api.proto"
    assert deviceplugin_pb2.DESCRIPTOR.name == "api.proto"
    assert api_pb2.DESCRIPTOR.package == "v1" and deviceplugin_pb2.DESCRIPTOR.package == "v1beta1"


def test_device_ids_fold_into_their_gpu() -> None:
    devices = device_map(node_devices())
    assert gpu_of(A, devices) == A
    assert gpu_of(replica_id(B, 1), devices) == B
    assert gpu_of(replica_id(B, 7), devices) == B, "a replica the node no longer advertises is still B's"
    assert gpu_of(MIG_C2, devices) == C
    assert gpu_of(replica_id(A, 0), devices) == A, "NVIDIA's plugin names replicas of A the same way"
    assert gpu_of("MIG-" + C + "/1/0", devices) == C, "pre-R470 MIG IDs name their parent"
    assert gpu_of("0000:3b:00.1", devices) is None, "another resource's device (a NIC's VF)"
    assert gpu_of("GPU-not-on-this-node", devices) is None
    assert gpu_of("GPU-elsewhere", {}, gpus=["GPU-elsewhere"]) == "GPU-elsewhere"
    found = pods_by_gpu([("ml/train", [A, "0000:3b:00.1"]), ("ml/infer", [replica_id(B, 0), MIG_C1]),
                         ("net/router", ["0000:3b:00.2"])], devices)
    assert found == {A: {"ml/train"}, B: {"ml/infer"}, C: {"ml/infer"}}


# ---- pod-resources over a real socket --------------------------------------------------------------


async def test_pods_from_the_kubelet_pod_resources_api(short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with plugin_and_kubelet(short_dir) as kubelet:
        await kubelet.allocate(GPU, [A], pod="ml/train-0", container="trainer")
        await kubelet.allocate(SHARED, [replica_id(B, 0)], pod="ml/infer-a")
        await kubelet.allocate(SHARED, [replica_id(B, 1)], pod="vision/infer-b")
        await kubelet.allocate(MIG, [MIG_C1], pod="ml/infer-a", container="sidecar")
        await kubelet.allocate(MIG, [MIG_C2])  # admitted for a pod the test does not name: not listed
        assert kubelet.pod_resources_socket is not None

        pod_map = GpuPodMap(kubelet.pod_resources_socket, None, timeout_s=TIMEOUT)
        assert pod_map.source is None and pod_map.pods_of(A) == []
        devices = device_map(node_devices())
        # B could not be read this cycle: pod-resources knows its allocations all the same
        with caplog.at_level(logging.INFO, logger="edge.podresources.podmap"):
            await pod_map.refresh(devices, {A: [], B: None, C: [4242]})
            await pod_map.refresh(devices, {A: [], B: None, C: [4242]})
        assert pod_map.source == "pod-resources"
        assert pod_map.snapshot() == {A: ["ml/train-0"], B: ["ml/infer-a", "vision/infer-b"], C: ["ml/infer-a"]}
        assert pod_map.pods_of(B) == ["ml/infer-a", "vision/infer-b"]
        assert pod_map.fallbacks == {} and pod_map.errors == {}
        assert [r.getMessage() for r in caplog.records if r.name == "edge.podresources.podmap"] == [
            "GPU pod map from the kubelet's pod-resources API"], "logged once, not per refresh"

        # the pod goes; a kubelet restart keeps the others (the device manager's checkpoint)
        kubelet.release("vision/infer-b")
        await kubelet.restart()
        await pod_map.refresh(devices, {A: [], B: [], C: []})
        assert pod_map.snapshot() == {A: ["ml/train-0"], B: ["ml/infer-a"], C: ["ml/infer-a"]}

        # GetAllocatableResources: every device the plugins listed, with its NUMA node
        await kubelet.wait_until(lambda: len(kubelet.devices(MIG)) == 2, TIMEOUT, "the plugin back after restart")
        async with grpc.aio.insecure_channel(f"unix://{kubelet.pod_resources_socket}") as channel:
            stub = api_pb2_grpc.PodResourcesListerStub(channel)
            allocatable = await stub.GetAllocatableResources(api_pb2.AllocatableResourcesRequest(), timeout=TIMEOUT)
            listed = await stub.List(api_pb2.ListPodResourcesRequest(), timeout=TIMEOUT)
        assert {(d.resource_name, tuple(d.device_ids), tuple(n.ID for n in d.topology.nodes))
                for d in allocatable.devices} == {
            (GPU, (A,), (0,)), (SHARED, (replica_id(B, 0),), (1,)), (SHARED, (replica_id(B, 1),), (1,)),
            (MIG, (MIG_C1,), ()), (MIG, (MIG_C2,), ())}
        infer = next(p for p in listed.pod_resources if p.name == "infer-a")
        assert infer.namespace == "ml"
        assert {c.name: [(d.resource_name, list(d.device_ids)) for d in c.devices] for c in infer.containers} == {
            "main": [(SHARED, [replica_id(B, 0)])], "sidecar": [(MIG, [MIG_C1])]}


async def test_a_kubelet_that_errors_falls_back_to_processes_and_comes_back(
        short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    proc = fake_proc(short_dir / "proc")
    with PodListServer() as server:
        server.body = json.dumps(POD_LIST).encode()
        resolver = PodResolver(proc, server.url)
        async with plugin_and_kubelet(short_dir) as kubelet:
            await kubelet.allocate(GPU, [A], pod="ml/train-0")
            await kubelet.allocate(MIG, [MIG_C1], pod="ml/idle-c")  # allocated, no process running yet
            kubelet.pod_resources_fault = (grpc.StatusCode.INTERNAL, "podresources: something broke")
            pod_map = GpuPodMap(kubelet.pod_resources_socket, resolver.resolve, timeout_s=TIMEOUT)
            devices = device_map(node_devices())
            with caplog.at_level(logging.INFO, logger="edge.podresources.podmap"):
                await pod_map.refresh(devices, {A: [TRAIN_PID, HOST_PID], B: [INFER_PID], C: []})
                await pod_map.refresh(devices, {A: [TRAIN_PID, HOST_PID], B: [INFER_PID], C: []})
                assert pod_map.source == "processes"
                # the fallback sees only pods running GPU work now: ml/idle-c is not on C
                assert pod_map.snapshot() == {A: ["ml/train-0"], B: ["vision/infer-b"], C: []}
                assert pod_map.fallbacks == {"internal": 2} and pod_map.errors == {"pod-resources": 2}
                assert kubelet.pod_resources_calls == 2

                kubelet.pod_resources_fault = None
                await pod_map.refresh(devices, {A: [TRAIN_PID], B: [INFER_PID], C: []})
            assert pod_map.source == "pod-resources"
            assert pod_map.snapshot() == {A: ["ml/train-0"], B: [], C: ["ml/idle-c"]}
            logged = [(r.levelno, r.getMessage(), r.__dict__["detail"]) for r in caplog.records
                      if r.name == "edge.podresources.podmap"]

            # a kubelet that answers later than the bound: the call gives up, the processes answer
            kubelet.pod_resources_delay_s = TIMEOUT
            impatient = GpuPodMap(kubelet.pod_resources_socket, resolver.resolve, timeout_s=0.2)
            await impatient.refresh(devices, {A: [TRAIN_PID], B: [INFER_PID], C: []})
            assert impatient.source == "processes" and impatient.fallbacks == {"deadline_exceeded": 1}
            assert impatient.pods_of(C) == [], "the processes see no pod on C"
    assert [(level, message) for level, message, _ in logged] == [
        (logging.WARNING, "GPU pod map degraded"), (logging.INFO, "GPU pod map from the kubelet's pod-resources API")]
    assert "podresources: something broke" in logged[0][2]
    metrics = {(m.name, tuple(s.labels.items()), s.value) for m in pod_map.collect() for s in m.samples}
    assert ("kgpu_pod_map_fallbacks", (("reason", "internal"),), 2.0) in metrics
    assert ("kgpu_pod_map_source", (("source", "pod-resources"),), 1.0) in metrics


# ---- the processes fallback ----------------------------------------------------------------------

TRAIN_UID = "1234abcd-5678-90ef-1234-567890abcdef"
INFER_UID = "abcdef12-3456-7890-abcd-ef1234567890"
TRAIN_CID, INFER_CID = "a" * 64, "b" * 64
TRAIN_PID, INFER_PID, HOST_PID = 4242, 4343, 1
POD_LIST = {"kind": "PodList", "items": [
    {"metadata": {"name": "train-0", "namespace": "ml", "uid": TRAIN_UID},
     "status": {"containerStatuses": [{"name": "trainer", "containerID": f"containerd://{TRAIN_CID}"}]}},
    {"metadata": {"name": "infer-b", "namespace": "vision", "uid": INFER_UID},
     "status": {"containerStatuses": [{"name": "main", "containerID": f"containerd://{INFER_CID}"}]}},
]}


def fake_proc(root: Path) -> Path:
    """/proc/<pid>/cgroup of two pods' processes and a host process, as real files."""
    cgroups = {
        TRAIN_PID: f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                   f"{TRAIN_UID.replace('-', '_')}.slice/cri-containerd-{TRAIN_CID}.scope\n",
        INFER_PID: f"0::/kubepods/besteffort/pod{INFER_UID}/{INFER_CID}\n",
        HOST_PID: "0::/init.scope\n",
    }
    for pid, text in cgroups.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cgroup").write_text(text)
    return root


async def test_processes_keep_the_last_known_pods_of_a_gpu_that_could_not_be_read(
        short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    proc = fake_proc(short_dir / "proc")
    stale = short_dir / "stale.sock"  # a socket file nobody listens on: a kubelet that died
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()
    with PodListServer() as server:
        server.body = json.dumps(POD_LIST).encode()
        resolver = PodResolver(proc, server.url)
        absent = GpuPodMap(short_dir / "nothing-here" / "kubelet.sock", resolver.resolve, timeout_s=TIMEOUT)
        dead = GpuPodMap(stale, resolver.resolve, timeout_s=TIMEOUT)
        devices = {A: A, B: B, MIG_C1: C}
        with caplog.at_level(logging.INFO, logger="edge.podresources.podmap"):
            for pod_map in (absent, dead):
                await pod_map.refresh(devices, {A: [TRAIN_PID, HOST_PID, 99999], B: [INFER_PID], C: []})
                assert pod_map.source == "processes"
                assert pod_map.snapshot() == {A: ["ml/train-0"], B: ["vision/infer-b"], C: []}
                # A is lost this cycle: its pods stay known; B was read and its process has gone
                await pod_map.refresh(devices, {A: None, B: [], C: [INFER_PID]})
                assert pod_map.snapshot() == {A: ["ml/train-0"], B: [], C: ["vision/infer-b"]}
                await pod_map.refresh(devices, {A: [], B: [], C: []})
                assert pod_map.snapshot() == {A: [], B: [], C: []}
    assert absent.fallbacks == {"absent": 3} and absent.errors == {}, "no kubelet API is not an error"
    assert dead.fallbacks == {"unavailable": 3} and dead.errors == {"pod-resources": 3}
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "edge.podresources.podmap"]
    assert logged == [(logging.INFO, "GPU pod map from NVML processes (pods running GPU work only)"),
                      (logging.WARNING, "GPU pod map degraded")], "once per map and state, not per refresh"

    # without a pod list the resolver names a pod by its UID; without a socket and a resolver,
    # nothing is known and the source says so
    unnamed = GpuPodMap(None, PodResolver(proc).resolve)
    await unnamed.refresh({A: A}, {A: [TRAIN_PID]})
    assert unnamed.pods_of(A) == [f"unknown/{TRAIN_UID}"] and unnamed.fallbacks == {}
    blind = GpuPodMap(None, None)
    await blind.refresh({A: A}, {A: [TRAIN_PID]})
    assert blind.source is None and blind.pods_of(A) == []


async def test_a_resolver_that_fails_keeps_what_was_known(short_dir: Path) -> None:
    proc = fake_proc(short_dir / "proc")
    resolver = PodResolver(proc)
    broken = False

    def resolve(pid: int) -> PodRef | None:
        if broken:
            raise RuntimeError("cgroup parser bug")
        return resolver.resolve(pid)

    pod_map = GpuPodMap(None, resolve)
    await pod_map.refresh({A: A}, {A: [TRAIN_PID]})
    broken = True
    await pod_map.refresh({A: A}, {A: [INFER_PID]})
    assert pod_map.pods_of(A) == [f"unknown/{TRAIN_UID}"] and pod_map.errors == {"processes": 1}

    # a /proc that hangs (a stuck NFS-backed /proc, a wedged kernel): bounded, and what was known stays
    hanging, release = False, threading.Event()

    def hang(pid: int) -> PodRef | None:
        if hanging:
            release.wait(TIMEOUT)
        return resolver.resolve(pid)

    stuck = GpuPodMap(None, hang, timeout_s=0.2)
    await stuck.refresh({A: A}, {A: [TRAIN_PID]})
    hanging = True
    try:
        await stuck.refresh({A: A}, {A: [INFER_PID]})
    finally:
        release.set()
    assert stuck.pods_of(A) == [f"unknown/{TRAIN_UID}"] and stuck.errors == {"processes": 1}
