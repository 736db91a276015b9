"""A blocking client of the kubelet's pod-resources API v1 (`List`), over its unix socket.

Blocking on purpose: GpuPodMap calls it from a thread (asyncio.to_thread), one short call per
cycle, with a fresh channel each time, so that a kubelet restart (a new socket file) costs
nothing but one failed cycle. grpc and the stubs are imported on the first call only: a node
without the socket never loads them.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
# What the API's consumers allow an answer (node-feature-discovery, resource-topology-exporter, from
# the kubelet's node e2e tests): 16 MiB; gRPC's default of 4 MiB is small for a node with many pods.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class PodDevices:
    """One pod of `List` and every device its containers hold, of every resource."""

    namespace: str
    name: str
    devices: tuple[tuple[str, str], ...]  # (resource name, device ID)


class PodResourcesUnavailable(Exception):
    """`List` could not be read; `reason` is short and stable (a metric label)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_socket(socket: Path) -> None:
    """Raise PodResourcesUnavailable unless `socket` is a unix socket (absent: the kubelet does not
    serve the API, e.g. KubeEdge's edged without its feature gate)."""
    try:
        mode = socket.stat().st_mode
    except FileNotFoundError:
        raise PodResourcesUnavailable("absent", f"no socket at {socket}") from None
    except OSError as exc:
        raise PodResourcesUnavailable("unreadable", f"{socket}: {exc}") from exc
    if not stat.S_ISSOCK(mode):
        raise PodResourcesUnavailable("not-a-socket", f"{socket} is not a unix socket")


def list_pod_devices(socket: Path, timeout_s: float) -> list[PodDevices]:
    """Every pod the kubelet reports with the devices of its containers (pods without any device
    are left out). Raises PodResourcesUnavailable, nothing else, when the answer cannot be had."""
    check_socket(socket)  # first: without the socket, grpc (12 MiB) is never loaded
    import grpc

    from edge.podresources.v1 import api_pb2, api_pb2_grpc

    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    try:
        with grpc.insecure_channel(f"unix://{socket}", options=options) as channel:
            response = api_pb2_grpc.PodResourcesListerStub(channel).List(
                api_pb2.ListPodResourcesRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        name = code.name.lower() if code is not None else "rpc-error"
        raise PodResourcesUnavailable(name, details or name) from exc
    except (OSError, ValueError) as exc:
        raise PodResourcesUnavailable("error", repr(exc)) from exc
    pods = []
    for pod in response.pod_resources:
        devices = tuple((d.resource_name, device_id) for container in pod.containers
                        for d in container.devices for device_id in d.device_ids)
        if devices:
            pods.append(PodDevices(namespace=pod.namespace or "default", name=pod.name, devices=devices))
    return pods
