"""One DevicePlugin gRPC service for one resource name, served on a unix socket.

`ResourceService` answers the kubelet (options, ListAndWatch, Allocate, GetPreferredAllocation)
from the latest device list it was given; it outlives the sockets it is served on, so that a
re-served socket (after a kubelet restart) answers with the same devices at once.
`PluginSocket` is the grpc.aio server on `DIR/kgpu-<resource>.sock` and the registration of
that socket at `DIR/kubelet.sock`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from edge.deviceplugin.allocation import UnknownDevice, allocate, preferred_allocation
from edge.deviceplugin.devices import API_VERSION, HEALTHY, KUBELET_SOCKET, UNHEALTHY, PluginDevice, socket_name
from edge.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from shared.logs import get_logger

log = get_logger(__name__)

REGISTER_TIMEOUT_S = 10.0
# The longest unix socket path Linux takes (sun_path is 108 bytes, NUL included).
MAX_SOCKET_PATH = 107


def plugin_options() -> api_pb2.DevicePluginOptions:
    """Sent with Register and answered to GetDevicePluginOptions: the kubelet checks both."""
    return api_pb2.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)


def device_message(device: PluginDevice) -> api_pb2.Device:
    topology = None
    if device.numa_node is not None:
        topology = api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=device.numa_node)])
    return api_pb2.Device(ID=device.id, health=HEALTHY if device.healthy else UNHEALTHY, topology=topology)


class ResourceService(api_pb2_grpc.DevicePluginServicer):
    """The DevicePlugin service of one resource."""

    def __init__(self, resource: str, devices: list[PluginDevice]) -> None:
        self.resource = resource
        self._devices = {d.id: d for d in devices}
        self._order = [d.id for d in devices]
        self._wake = asyncio.Event()  # replaced on every change; the old one is set
        self._closed = False

    @property
    def devices(self) -> list[PluginDevice]:
        return [self._devices[i] for i in self._order]

    def update(self, devices: list[PluginDevice]) -> bool:
        """Take a new device list; every open ListAndWatch sends it. False when nothing changed."""
        if devices == self.devices:
            return False
        self._devices = {d.id: d for d in devices}
        self._order = [d.id for d in devices]
        self._notify()
        return True

    def close(self) -> None:
        """End every open ListAndWatch (the resource is gone, or the plugin stops)."""
        self._closed = True
        self._notify()

    def _notify(self) -> None:
        woken, self._wake = self._wake, asyncio.Event()
        woken.set()

    def _list(self) -> api_pb2.ListAndWatchResponse:
        return api_pb2.ListAndWatchResponse(devices=[device_message(d) for d in self.devices])

    async def GetDevicePluginOptions(self, request: api_pb2.Empty, context: Any) -> api_pb2.DevicePluginOptions:
        return plugin_options()

    async def ListAndWatch(self, request: api_pb2.Empty, context: Any) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        log.info("ListAndWatch opened", extra={"resource": self.resource, "devices": len(self._order)})
        while not self._closed:
            wake = self._wake  # taken before the list is built: a change in between wakes us
            yield self._list()
            await wake.wait()
        log.info("ListAndWatch closed", extra={"resource": self.resource})

    async def Allocate(self, request: api_pb2.AllocateRequest, context: Any) -> api_pb2.AllocateResponse:
        responses = []
        for container in request.container_requests:
            try:
                allocation = allocate(list(container.devices_ids), self._devices)
            except UnknownDevice as exc:
                log.warning("Allocate refused", extra={"resource": self.resource, "reason": str(exc)})
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.resource}: {exc}")
                raise  # abort raises; this keeps type checkers sure the loop does not go on
            responses.append(api_pb2.ContainerAllocateResponse(
                envs=allocation.envs, cdi_devices=[api_pb2.CDIDevice(name=n) for n in allocation.cdi_devices],
                devices=[api_pb2.DeviceSpec(container_path=path, host_path=path, permissions="rw")
                         for path in allocation.device_nodes]))
            log.info("allocated", extra={"resource": self.resource, "devices": list(container.devices_ids),
                                         "visible": allocation.envs, "device_nodes": allocation.device_nodes})
        return api_pb2.AllocateResponse(container_responses=responses)

    async def GetPreferredAllocation(self, request: api_pb2.PreferredAllocationRequest,
                                     context: Any) -> api_pb2.PreferredAllocationResponse:
        responses = [
            api_pb2.ContainerPreferredAllocationResponse(deviceIDs=preferred_allocation(
                list(c.available_deviceIDs), list(c.must_include_deviceIDs), c.allocation_size, self._devices))
            for c in request.container_requests
        ]
        return api_pb2.PreferredAllocationResponse(container_responses=responses)

    async def PreStartContainer(self, request: api_pb2.PreStartContainerRequest,
                                context: Any) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


class PluginSocket:
    """The gRPC server of one resource on `DIR/kgpu-<resource>.sock`, and its registration."""

    def __init__(self, service: ResourceService, kubelet_dir: Path) -> None:
        self.service = service
        self.kubelet_dir = kubelet_dir
        self.path = kubelet_dir / socket_name(service.resource)
        self._server: grpc.aio.Server | None = None
        self._inode: int | None = None  # of the socket we serve: a new file there is not ours
        self.kubelet_inode: int | None = None  # of kubelet.sock when we registered

    @property
    def serving(self) -> bool:
        return self._server is not None

    def socket_present(self) -> bool:
        """Our socket file is still there (the kubelet deletes every socket when it restarts)."""
        return self._inode is not None and _inode(self.path) == self._inode

    def kubelet_replaced(self) -> bool:
        """kubelet.sock is another file than the one we registered at (the kubelet restarted)."""
        return _inode(self.kubelet_dir / KUBELET_SOCKET) != self.kubelet_inode

    async def serve(self) -> None:
        """Serve on a fresh socket (a stale file of that name, ours from before, is replaced)."""
        if len(str(self.path)) > MAX_SOCKET_PATH:
            raise OSError(f"socket path longer than {MAX_SOCKET_PATH} bytes: {self.path}")
        if not self.kubelet_dir.is_dir():
            raise OSError(f"no device-plugin directory {self.kubelet_dir} (is the kubelet's directory mounted?)")
        self.path.unlink(missing_ok=True)
        server = grpc.aio.server()
        api_pb2_grpc.add_DevicePluginServicer_to_server(self.service, server)
        try:
            server.add_insecure_port(f"unix://{self.path}")
        except RuntimeError as exc:  # grpc's way of saying the bind failed
            raise OSError(f"cannot listen on {self.path}: {exc}") from exc
        await server.start()
        self._server = server
        self._inode = _inode(self.path)
        log.info("device plugin serving", extra={"resource": self.service.resource, "socket": str(self.path)})

    async def register(self) -> None:
        """Register at DIR/kubelet.sock. Raises grpc.aio.AioRpcError or OSError when it cannot."""
        kubelet_socket = self.kubelet_dir / KUBELET_SOCKET
        inode = _inode(kubelet_socket)
        if inode is None:
            raise OSError(f"no kubelet socket at {kubelet_socket}")
        request = api_pb2.RegisterRequest(version=API_VERSION, endpoint=self.path.name,
                                          resource_name=self.service.resource, options=plugin_options())
        async with grpc.aio.insecure_channel(f"unix://{kubelet_socket}") as channel:
            await api_pb2_grpc.RegistrationStub(channel).Register(request, timeout=REGISTER_TIMEOUT_S)
        self.kubelet_inode = inode
        log.info("registered with the kubelet", extra={"resource": self.service.resource,
                                                       "endpoint": self.path.name, "kubelet": str(kubelet_socket)})

    async def close(self, remove: bool = True) -> None:
        """Stop serving; with `remove`, delete the socket file if it is still ours."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=0.5)
        if remove and self._inode is not None and _inode(self.path) == self._inode:
            self.path.unlink(missing_ok=True)
        self._inode = None
        self.kubelet_inode = None
