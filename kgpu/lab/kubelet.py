"""A kubelet stand-in for device plugins: the real `Registration` service of the kubelet's
device-plugin API v1beta1 (edge/deviceplugin/proto/api.proto) on `DIR/kubelet.sock`.

It does what the kubelet's device manager does with a plugin, over real unix sockets:

- `Register`: checks the version and the endpoint (a file name in DIR), dials the plugin back at
  `DIR/<endpoint>` and calls `GetDevicePluginOptions`, refusing the registration when the plugin
  does not answer (the kubelet does the same: a plugin must serve before it registers);
- then opens `ListAndWatch` and keeps the latest device list per resource (`health()`,
  `wait_until`), as the kubelet keeps allocatable up to date from it;
- `allocate()` and `preferred_allocation()` call the plugin as the kubelet does at pod admission;
- `restart()` does what a kubelet restart does to the directory: every socket in it is deleted,
  the plugins' included, a fresh kubelet.sock is served and every registration is forgotten;
- with `pod_resources_socket`, the kubelet's pod-resources API v1 (edge/podresources/proto/api.proto)
  on that socket: `List` answers from the allocations made through `allocate(..., pod="ns/name")`
  (the pod the test says the kubelet admitted; `release()` when it is gone), and
  `GetAllocatableResources` from the devices the plugins listed. Allocations survive `restart()`,
  as the kubelet's device-manager checkpoint does. `pod_resources_fault` makes every call fail,
  `pod_resources_delay_s` answer late.

Use it from asyncio (`async with KubeletStandIn(dir) as kubelet`) or from blocking code
(`with KubeletThread(dir) as kubelet`, the same stand-in on its own loop in a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from edge.deviceplugin.devices import API_VERSION, KUBELET_SOCKET
from edge.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from edge.podresources.v1 import api_pb2 as podresources_pb2
from edge.podresources.v1 import api_pb2_grpc as podresources_grpc
from kgpu.lab.processes import TimedOut
from shared.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")
DIAL_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Registration:
    version: str
    endpoint: str
    resource_name: str
    pre_start_required: bool
    get_preferred_allocation_available: bool
    options_answered: bool  # get_preferred_allocation_available as GetDevicePluginOptions said it


@dataclass(frozen=True)
class SeenDevice:
    id: str
    health: str
    numa_nodes: tuple[int, ...]


@dataclass(frozen=True)
class Allocated:
    """One container's AllocateResponse."""

    envs: dict[str, str]
    cdi_devices: list[str]


@dataclass(frozen=True)
class PodAllocation:
    """Devices of one resource that one Allocate gave one container of a pod."""

    namespace: str
    pod: str
    container: str
    resource: str
    device_ids: tuple[str, ...]


@dataclass
class _Plugin:
    registration: Registration
    channel: grpc.aio.Channel
    stream: asyncio.Task[None] | None = None


class KubeletStandIn:
    """The kubelet's side of the device-plugin API, on `directory/kubelet.sock`, and with
    `pod_resources_socket` its pod-resources API on that socket."""

    def __init__(self, directory: Path, pod_resources_socket: Path | None = None) -> None:
        self.directory = Path(directory).absolute()
        self.pod_resources_socket = Path(pod_resources_socket).absolute() if pod_resources_socket else None
        self._server: grpc.aio.Server | None = None
        self._pod_resources_server: grpc.aio.Server | None = None
        # what List answers: replaced whole, never changed in place (read from the server's loop)
        self.allocations: tuple[PodAllocation, ...] = ()
        # set by a test: every pod-resources call fails with this code and message
        self.pod_resources_fault: tuple[grpc.StatusCode, str] | None = None
        self.pod_resources_delay_s = 0.0  # set by a test: a kubelet that answers late
        self.pod_resources_calls = 0  # List and GetAllocatableResources calls answered or failed
        self._plugins: dict[str, _Plugin] = {}
        # Read from any thread: replaced whole, never changed in place.
        self._devices: dict[str, tuple[SeenDevice, ...]] = {}
        self.registrations: list[Registration] = []  # every accepted Register, in order, across restarts
        self.rejections: list[str] = []  # why each refused Register was refused

    @property
    def socket(self) -> Path:
        return self.directory / KUBELET_SOCKET

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        server = grpc.aio.server()
        api_pb2_grpc.add_RegistrationServicer_to_server(_RegistrationService(self), server)
        if server.add_insecure_port(f"unix://{self.socket}") == 0:
            raise OSError(f"cannot listen on {self.socket}")
        await server.start()
        self._server = server
        log.info("kubelet stand-in serving", extra={"socket": str(self.socket)})
        if self.pod_resources_socket is not None:
            await self._serve_pod_resources(self.pod_resources_socket)

    async def _serve_pod_resources(self, socket: Path) -> None:
        socket.parent.mkdir(parents=True, exist_ok=True)
        socket.unlink(missing_ok=True)
        server = grpc.aio.server()
        podresources_grpc.add_PodResourcesListerServicer_to_server(_PodResourcesService(self), server)
        if server.add_insecure_port(f"unix://{socket}") == 0:
            raise OSError(f"cannot listen on {socket}")
        await server.start()
        self._pod_resources_server = server
        log.info("kubelet stand-in serving pod-resources", extra={"socket": str(socket)})

    async def stop(self) -> None:
        for resource in list(self._plugins):
            await self._forget(resource)
        self._devices = {}
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
        self.socket.unlink(missing_ok=True)
        if self._pod_resources_server is not None:
            await self._pod_resources_server.stop(grace=None)
            self._pod_resources_server = None
        if self.pod_resources_socket is not None:
            self.pod_resources_socket.unlink(missing_ok=True)

    async def restart(self) -> None:
        """What a kubelet restart does: every socket in the directory deleted (the plugins' too),
        registrations and device lists forgotten, a fresh kubelet.sock served."""
        await self.stop()
        for path in self.directory.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
        await self.start()

    async def __aenter__(self) -> KubeletStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- what the tests look at -------------------------------------------------------------------

    def registration(self, resource: str) -> Registration | None:
        """The live registration of `resource` (None before it registers, or after a restart)."""
        plugin = self._plugins.get(resource)
        return plugin.registration if plugin else None

    def resources(self) -> list[str]:
        return sorted(self._plugins)

    def devices(self, resource: str) -> tuple[SeenDevice, ...]:
        """The latest ListAndWatch list of `resource`."""
        return self._devices.get(resource, ())

    def health(self, resource: str) -> dict[str, str]:
        """Device ID -> Healthy/Unhealthy, from the latest list."""
        return {d.id: d.health for d in self.devices(resource)}

    async def wait_until(self, check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
        """Poll `check()` on the loop until it is truthy; TimedOut naming `what` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimedOut(f"timed out after {timeout:g}s waiting for {what}; last value: {result!r}")
            await asyncio.sleep(0.05)

    # ---- calls to the plugin, as at pod admission -------------------------------------------------

    def _stub(self, resource: str) -> api_pb2_grpc.DevicePluginStub:
        plugin = self._plugins.get(resource)
        if plugin is None:
            raise LookupError(f"no device plugin registered for {resource}")
        return api_pb2_grpc.DevicePluginStub(plugin.channel)

    async def allocate(self, resource: str, device_ids: list[str], pod: str | None = None,
                       container: str = "main") -> Allocated:
        """Allocate as at pod admission; with `pod` ("namespace/name"), the devices are the pod's
        container's from then on, in what pod-resources' List answers."""
        if pod is not None and pod.count("/") != 1:
            raise ValueError(f"pod must be namespace/name, not {pod!r}")
        request = api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=device_ids)])
        response = await self._stub(resource).Allocate(request, timeout=CALL_TIMEOUT_S)
        answer = response.container_responses[0]
        if pod is not None:
            namespace, name = pod.split("/")
            self.allocations = (*self.allocations,
                                PodAllocation(namespace, name, container, resource, tuple(device_ids)))
        return Allocated(envs=dict(answer.envs), cdi_devices=[c.name for c in answer.cdi_devices])

    def release(self, pod: str) -> None:
        """The pod is gone: its devices leave List (the kubelet lists active pods only)."""
        namespace, _, name = pod.partition("/")
        self.allocations = tuple(a for a in self.allocations if (a.namespace, a.pod) != (namespace, name))

    async def preferred_allocation(self, resource: str, available: list[str], must_include: list[str],
                                   size: int) -> list[str]:
        request = api_pb2.PreferredAllocationRequest(container_requests=[api_pb2.ContainerPreferredAllocationRequest(
            available_deviceIDs=available, must_include_deviceIDs=must_include, allocation_size=size)])
        response = await self._stub(resource).GetPreferredAllocation(request, timeout=CALL_TIMEOUT_S)
        return list(response.container_responses[0].deviceIDs)

    # ---- the kubelet's side of Register -----------------------------------------------------------

    async def _accept(self, request: api_pb2.RegisterRequest) -> str | None:
        """Register's checks and dial-back; the reason of a refusal, or None once accepted."""
        if request.version != API_VERSION:
            return f"unsupported version {request.version!r} (this kubelet speaks {API_VERSION})"
        if not request.resource_name or not request.endpoint or "/" in request.endpoint:
            return f"bad registration: resource {request.resource_name!r}, endpoint {request.endpoint!r}"
        endpoint = self.directory / request.endpoint
        channel = grpc.aio.insecure_channel(f"unix://{endpoint}")
        try:
            options = await api_pb2_grpc.DevicePluginStub(channel).GetDevicePluginOptions(
                api_pb2.Empty(), timeout=DIAL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            await channel.close()
            return f"cannot dial the device plugin at {endpoint}: {exc.code().name} {exc.details()}"
        await self._forget(request.resource_name)  # a plugin registering again replaces its old endpoint
        registration = Registration(
            version=request.version, endpoint=request.endpoint, resource_name=request.resource_name,
            pre_start_required=request.options.pre_start_required,
            get_preferred_allocation_available=request.options.get_preferred_allocation_available,
            options_answered=options.get_preferred_allocation_available)
        plugin = _Plugin(registration, channel)
        plugin.stream = asyncio.create_task(self._watch(plugin), name=f"ListAndWatch {request.resource_name}")
        self._plugins[request.resource_name] = plugin
        self.registrations = [*self.registrations, registration]
        log.info("device plugin registered", extra={"resource": request.resource_name, "endpoint": request.endpoint})
        return None

    async def _watch(self, plugin: _Plugin) -> None:
        resource = plugin.registration.resource_name
        try:
            async for response in api_pb2_grpc.DevicePluginStub(plugin.channel).ListAndWatch(api_pb2.Empty()):
                seen = tuple(SeenDevice(d.ID, d.health, tuple(n.ID for n in d.topology.nodes))
                             for d in response.devices)
                self._devices = {**self._devices, resource: seen}
        except grpc.aio.AioRpcError as exc:
            log.info("ListAndWatch ended", extra={"resource": resource, "reason": exc.code().name})

    async def _forget(self, resource: str) -> None:
        plugin = self._plugins.pop(resource, None)
        if plugin is None:
            return
        if plugin.stream is not None:
            plugin.stream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await plugin.stream
        await plugin.channel.close()
        self._devices = {r: d for r, d in self._devices.items() if r != resource}


class _RegistrationService(api_pb2_grpc.RegistrationServicer):
    def __init__(self, kubelet: KubeletStandIn) -> None:
        self._kubelet = kubelet

    async def Register(self, request: api_pb2.RegisterRequest, context: Any) -> api_pb2.Empty:
        refusal = await self._kubelet._accept(request)
        if refusal is not None:
            self._kubelet.rejections.append(refusal)
            log.warning("device plugin registration refused", extra={"reason": refusal})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
        return api_pb2.Empty()


class _PodResourcesService(podresources_grpc.PodResourcesListerServicer):
    """The kubelet's pod-resources API v1: List and GetAllocatableResources. Get is not served
    (kgpu does not call it): the stand-in answers UNIMPLEMENTED."""

    def __init__(self, kubelet: KubeletStandIn) -> None:
        self._kubelet = kubelet

    async def _check(self, context: Any) -> None:
        self._kubelet.pod_resources_calls += 1
        if self._kubelet.pod_resources_delay_s:
            await asyncio.sleep(self._kubelet.pod_resources_delay_s)
        fault = self._kubelet.pod_resources_fault
        if fault is not None:
            await context.abort(fault[0], fault[1])

    def _numa(self, resource: str, device_ids: tuple[str, ...]) -> podresources_pb2.TopologyInfo | None:
        seen = {d.id: d for d in self._kubelet.devices(resource)}
        nodes = sorted({n for i in device_ids if i in seen for n in seen[i].numa_nodes})
        return podresources_pb2.TopologyInfo(nodes=[podresources_pb2.NUMANode(ID=n) for n in nodes]) if nodes else None

    async def List(self, request: podresources_pb2.ListPodResourcesRequest,
                   context: Any) -> podresources_pb2.ListPodResourcesResponse:
        await self._check(context)
        pods: dict[tuple[str, str], dict[str, list[podresources_pb2.ContainerDevices]]] = {}
        for a in self._kubelet.allocations:
            devices = podresources_pb2.ContainerDevices(resource_name=a.resource, device_ids=list(a.device_ids),
                                                        topology=self._numa(a.resource, a.device_ids))
            pods.setdefault((a.namespace, a.pod), {}).setdefault(a.container, []).append(devices)
        return podresources_pb2.ListPodResourcesResponse(pod_resources=[
            podresources_pb2.PodResources(namespace=namespace, name=name, containers=[
                podresources_pb2.ContainerResources(name=container, devices=devices)
                for container, devices in containers.items()])
            for (namespace, name), containers in pods.items()])

    async def GetAllocatableResources(self, request: podresources_pb2.AllocatableResourcesRequest,
                                      context: Any) -> podresources_pb2.AllocatableResourcesResponse:
        """Every device the plugins list, healthy or not (the device manager's allDevices)."""
        await self._check(context)
        kubelet = self._kubelet
        return podresources_pb2.AllocatableResourcesResponse(devices=[
            podresources_pb2.ContainerDevices(resource_name=resource, device_ids=[d.id],
                                              topology=self._numa(resource, (d.id,)))
            for resource in kubelet.resources() for d in kubelet.devices(resource)])


class KubeletThread:
    """The stand-in on its own event loop in a background thread, for blocking tests:
    `with KubeletThread(dir) as kubelet: kubelet.wait_for(...); kubelet.allocate(...)`."""

    def __init__(self, directory: Path, pod_resources_socket: Path | None = None) -> None:
        self.kubelet = KubeletStandIn(directory, pod_resources_socket)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kubelet-stand-in", daemon=True)

    def call(self, work: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
        """Run `work()` on the stand-in's loop and return its result."""

        async def run() -> T:
            return await work()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def start(self) -> KubeletThread:
        self._thread.start()
        self.call(self.kubelet.start)
        return self

    def stop(self) -> None:
        try:
            self.call(self.kubelet.stop)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> KubeletThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restart(self) -> None:
        self.call(self.kubelet.restart)

    def allocate(self, resource: str, device_ids: list[str], pod: str | None = None,
                 container: str = "main") -> Allocated:
        return self.call(lambda: self.kubelet.allocate(resource, device_ids, pod, container))

    def release(self, pod: str) -> None:
        self.kubelet.release(pod)

    def preferred_allocation(self, resource: str, available: list[str], must_include: list[str],
                             size: int) -> list[str]:
        return self.call(lambda: self.kubelet.preferred_allocation(resource, available, must_include, size))

    def registration(self, resource: str) -> Registration | None:
        return self.kubelet.registration(resource)

    def health(self, resource: str) -> dict[str, str]:
        return self.kubelet.health(resource)


