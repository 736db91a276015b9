"""kgpu as the kubelet's device plugin (edge/deviceplugin/), driven by the kubelet stand-in
(kgpu/lab/kubelet.py, the real Registration service from the upstream proto) over real unix
sockets: registration, the device list and its health both ways without a restart, allocate,
preferred allocation, resources appearing and disappearing, a kubelet restart, stop.

The manager's input is a `ListSource`: the DeviceSource interface the daemon implements (a list
and an asyncio.Event), not a stand-in for any of our code.
"""

from __future__ import annotations

import asyncio
import filecmp
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest

from edge.deviceplugin.allocation import UnknownDevice, allocate, preferred_allocation
from edge.deviceplugin.devices import PluginDevice, replica_id, socket_name
from edge.deviceplugin.manager import DevicePluginManager
from edge.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from kgpu.lab.kubelet import KubeletStandIn, KubeletThread
from kgpu.lab.processes import wait_for

ROOT = Path(__file__).resolve().parent.parent
GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"
MIG = "nvidia.com/mig-1g.10gb"
A, B, C, D = (f"GPU-{n}0000000-0000-0000-0000-00000000000{n}" for n in range(4))
MIG_A = "MIG-a0000000-0000-0000-0000-000000000001"
TIMEOUT = 30.0  # generous: CI is a busy 2-core box; nothing here waits that long when all is well


def gpu(uuid: str, numa: int | None, healthy: bool = True) -> PluginDevice:
    return PluginDevice(id=uuid, gpu_uuid=uuid, visible_id=uuid, healthy=healthy, numa_node=numa, resource=GPU)


def replicas(uuid: str, count: int, numa: int | None = 0) -> list[PluginDevice]:
    return [PluginDevice(id=replica_id(uuid, n), gpu_uuid=uuid, visible_id=uuid, healthy=True, numa_node=numa,
                         resource=SHARED) for n in range(count)]


@dataclass
class ListSource:
    """The DeviceSource interface: the daemon's device list and its change event."""

    items: list[PluginDevice]
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def devices(self) -> list[PluginDevice]:
        return list(self.items)

    def set(self, items: list[PluginDevice]) -> None:
        self.items = list(items)
        self.changed.set()


@pytest.fixture
def plugin_dir() -> Iterator[Path]:
    """A short directory: a unix socket path must fit in 107 bytes, pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="kgpu-dp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def running(manager: DevicePluginManager) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(manager.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


def sockets(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.is_socket()}


# ---- the stubs ----------------------------------------------------------------------------------


def test_committed_stubs_are_what_the_script_generates(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) generates the stubs")
    committed = ROOT / "edge/deviceplugin/v1beta1"
    out = subprocess.run([str(ROOT / "scripts/gen_protos.sh"), str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable}, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["__init__.py", "api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path, committed, names, shallow=False)
    # the stubs name the generator's version: a different grpcio-tools is a difference too
    generated_by = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", (committed / "api_pb2_grpc.py").read_text())
    assert (mismatch, errors) == ([], []), (
        f"{mismatch or errors} differ: run scripts/gen_protos.sh and commit the result (committed stubs from "
        f"grpcio-tools {generated_by and generated_by[1]}, installed {importlib.metadata.version('grpcio-tools')})")
    assert "from . import api_pb2 as api__pb2" in (committed / "api_pb2_grpc.py").read_text()


# ---- the pure decisions -------------------------------------------------------------------------


def test_allocate_maps_replicas_back_to_their_gpu_and_refuses_unknown_ids() -> None:
    devices = {d.id: d for d in replicas(B, 3) + replicas(A, 2)}
    got = allocate([replica_id(B, 2), replica_id(A, 0), replica_id(B, 0)], devices)
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": f"{A},{B}"}
    assert got.cdi_devices == [f"nvidia.com/gpu={A}", f"nvidia.com/gpu={B}"]
    mig = PluginDevice(id=MIG_A, gpu_uuid=A, visible_id=MIG_A, healthy=True, numa_node=0, resource=MIG)
    assert allocate([MIG_A], {MIG_A: mig}).cdi_devices == [f"nvidia.com/gpu={MIG_A}"]
    with pytest.raises(UnknownDevice, match="GPU-nope"):
        allocate([replica_id(A, 0), "GPU-nope"], devices)


def test_preferred_allocation_must_include_then_numa_then_distinct_gpus() -> None:
    gpus = {d.id: d for d in [gpu(A, 0), gpu(B, 1), gpu(C, 0), gpu(D, 1)]}
    everything = [A, B, C, D]
    # B is on node 1: D (node 1) comes before A and C (node 0)
    assert preferred_allocation(everything, [B], 2, gpus) == [B, D]
    # nothing required: the node with the most available devices, here node 0 (A, C, and not B)
    assert preferred_allocation([A, B, C], [], 2, gpus) == [A, C]
    # must-include is never dropped, even beyond the size asked
    assert preferred_allocation(everything, [D, B], 1, gpus) == [D, B]
    shared = {d.id: d for d in replicas(A, 3, numa=0) + replicas(B, 3, numa=0) + replicas(C, 3, numa=1)}
    # replicas: spread over distinct GPUs of the same NUMA node before doubling up on one
    got = preferred_allocation(list(shared), [replica_id(A, 1)], 3, shared)
    assert got[0] == replica_id(A, 1)
    assert [shared[i].gpu_uuid for i in got] == [A, B, A]


# ---- the plugin over real sockets ------------------------------------------------------------------


async def test_registers_lists_devices_and_follows_health_both_ways(plugin_dir: Path) -> None:
    source = ListSource([gpu(A, 0), gpu(B, 1), gpu(C, None)])
    async with KubeletStandIn(plugin_dir) as kubelet, running(DevicePluginManager(source, plugin_dir)):
        registration = await kubelet.wait_until(lambda: kubelet.registration(GPU), TIMEOUT, "registration")
        assert registration.version == "v1beta1"
        assert registration.endpoint == socket_name(GPU) == "kgpu-nvidia-com-gpu.sock"
        assert registration.get_preferred_allocation_available and registration.options_answered
        assert not registration.pre_start_required
        assert (plugin_dir / registration.endpoint).is_socket()

        await kubelet.wait_until(lambda: len(kubelet.devices(GPU)) == 3, TIMEOUT, "the device list")
        assert {d.id: (d.health, d.numa_nodes) for d in kubelet.devices(GPU)} == {
            A: ("Healthy", (0,)), B: ("Healthy", (1,)), C: ("Healthy", ())}

        # B goes unhealthy (an XID), then recovers: both reach the kubelet on the same stream
        source.set([gpu(A, 0), gpu(B, 1, healthy=False), gpu(C, None)])
        await kubelet.wait_until(lambda: kubelet.health(GPU).get(B) == "Unhealthy", TIMEOUT, "B unhealthy")
        assert kubelet.health(GPU)[A] == "Healthy"
        source.set([gpu(A, 0), gpu(B, 1), gpu(C, None)])
        await kubelet.wait_until(lambda: kubelet.health(GPU).get(B) == "Healthy", TIMEOUT, "B healthy again")
        assert len(kubelet.registrations) == 1, "health changes must not re-register (nothing restarted)"

        allocated = await kubelet.allocate(GPU, [B, A])
        assert allocated.envs == {"NVIDIA_VISIBLE_DEVICES": f"{A},{B}"}
        assert allocated.cdi_devices == [f"nvidia.com/gpu={A}", f"nvidia.com/gpu={B}"]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await kubelet.allocate(GPU, ["GPU-not-ours"])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # nothing else on B's NUMA node: A (node 0) and C (unknown) tie, and ties go by GPU
        assert await kubelet.preferred_allocation(GPU, [A, B, C], [B], 2) == [B, A]

    assert sockets(plugin_dir) == set(), "stop removes the plugin's socket (and the stand-in its own)"


async def test_replicas_and_mig_resources_come_and_go(plugin_dir: Path) -> None:
    source = ListSource(replicas(A, 2) + replicas(B, 2))
    mig = PluginDevice(id=MIG_A, gpu_uuid=A, visible_id=MIG_A, healthy=True, numa_node=0, resource=MIG)
    async with KubeletStandIn(plugin_dir) as kubelet, running(DevicePluginManager(source, plugin_dir)):
        await kubelet.wait_until(lambda: len(kubelet.devices(SHARED)) == 4, TIMEOUT, "the shared devices")
        allocated = await kubelet.allocate(SHARED, [replica_id(B, 1), replica_id(B, 0)])
        assert allocated.envs == {"NVIDIA_VISIBLE_DEVICES": B}, "two replicas of one GPU give that GPU once"
        all_replicas = [d.id for d in kubelet.devices(SHARED)]
        preferred = await kubelet.preferred_allocation(SHARED, all_replicas, [], 2)
        assert {p.split("::")[0] for p in preferred} == {A, B}, "replicas spread over distinct GPUs"

        source.set(source.items + [mig])  # a MIG layout applied: a new resource, a new socket
        await kubelet.wait_until(lambda: kubelet.devices(MIG), TIMEOUT, "the MIG resource")
        assert kubelet.registration(MIG).endpoint == "kgpu-nvidia-com-mig-1g-10gb.sock"
        assert (await kubelet.allocate(MIG, [MIG_A])).cdi_devices == [f"nvidia.com/gpu={MIG_A}"]

        source.set(replicas(A, 2) + replicas(B, 2))  # the layout removed: its socket goes
        await kubelet.wait_until(lambda: socket_name(MIG) not in sockets(plugin_dir), TIMEOUT, "MIG socket gone")
        assert socket_name(SHARED) in sockets(plugin_dir)


async def test_register_is_refused_when_the_plugin_does_not_serve(plugin_dir: Path) -> None:
    async with KubeletStandIn(plugin_dir) as kubelet:
        async with grpc.aio.insecure_channel(f"unix://{kubelet.socket}") as channel:
            stub = api_pb2_grpc.RegistrationStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Register(api_pb2.RegisterRequest(version="v1beta1", endpoint="nobody.sock",
                                                            resource_name=GPU), timeout=TIMEOUT)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Register(api_pb2.RegisterRequest(version="v1alpha", endpoint="x.sock",
                                                            resource_name=GPU), timeout=TIMEOUT)
    assert "cannot dial" in kubelet.rejections[0] and "unsupported version" in kubelet.rejections[1]
    assert kubelet.registration(GPU) is None


def test_waits_for_the_kubelet_and_registers_again_after_it_restarts(plugin_dir: Path) -> None:
    """Blocking, as the lead's end-to-end test with a real edge process will be: the stand-in runs
    in its own thread (KubeletThread), the manager on a loop of its own."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    source = ListSource([gpu(A, 0), gpu(B, 0)])
    directory = plugin_dir / "dp"  # not there yet: the plugin logs it and retries
    manager = DevicePluginManager(source, directory, retry_max_s=1.0)

    async def main() -> None:
        await manager.run(stop)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        directory.mkdir()
        # no kubelet yet: the plugin serves its socket and keeps retrying the registration
        wait_for(lambda: socket_name(GPU) in sockets(directory), TIMEOUT, what="the plugin's socket")
        with KubeletThread(directory) as kubelet:
            wait_for(lambda: kubelet.registration(GPU), TIMEOUT, what="registration once the kubelet is up")
            wait_for(lambda: len(kubelet.health(GPU)) == 2, TIMEOUT, what="the device list")
            kubelet.restart()  # every socket in the directory deleted, the plugin's included
            wait_for(lambda: len(kubelet.kubelet.registrations) == 2, TIMEOUT,
                     what="registration after the kubelet restarted")
            assert (directory / socket_name(GPU)).is_socket(), "a fresh socket is served"
            wait_for(lambda: kubelet.health(GPU) == {A: "Healthy", B: "Healthy"}, TIMEOUT, what="devices again")
            assert kubelet.allocate(GPU, [A]).envs == {"NVIDIA_VISIBLE_DEVICES": A}
            unhealthy = [replace(gpu(A, 0), healthy=False), gpu(B, 0)]
            loop.call_soon_threadsafe(source.set, unhealthy)
            wait_for(lambda: kubelet.health(GPU).get(A) == "Unhealthy", TIMEOUT, what="A unhealthy after restart")
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(TIMEOUT)
        loop.close()
    assert not thread.is_alive()
    assert sockets(directory) == set(), "stop removes the plugin's socket"
