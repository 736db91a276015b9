"""What the daemon hands the device plugin, and the API's constants.

The constants repeat `proto/constants.go` of k8s.io/kubelet (kept next to the proto) in Python.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

API_VERSION = "v1beta1"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
DEFAULT_KUBELET_DIR = Path("/var/lib/kubelet/device-plugins")
KUBELET_SOCKET = "kubelet.sock"
DEFAULT_RESOURCE = "nvidia.com/gpu"
CDI_KIND = "nvidia.com/gpu"  # the CDI kind of nvidia-ctk's generated spec: nvidia.com/gpu=<UUID>
REPLICA_SEPARATOR = "::"  # time-slicing replica IDs: <GPU UUID>::<n>


@dataclass(frozen=True)
class PluginDevice:
    """One device the kubelet may hand to a container."""

    id: str  # GPU UUID, "<UUID>::<n>" for a time-slicing replica, or the MIG device UUID
    gpu_uuid: str  # the physical GPU (replicas map back to it; MIG devices to their parent)
    visible_id: str  # what NVIDIA_VISIBLE_DEVICES / CDI carry: the GPU UUID, or the MIG device UUID
    healthy: bool
    numa_node: int | None
    resource: str  # nvidia.com/gpu, nvidia.com/gpu.shared, nvidia.com/mig-1g.10gb, amd.com/gpu, ...
    # the backend that reads the GPU (edge/devices/): what a container is given for it (allocation.py)
    backend: str = "nvml"
    # AMD and Intel: the GPU's DRM nodes (/dev/dri/cardN, /dev/dri/renderDN), handed to the container
    device_nodes: tuple[str, ...] = ()


class DeviceSource(Protocol):
    """The daemon's side: every device of every resource, and an event set after any change."""

    changed: asyncio.Event  # set by the daemon after any change of devices(); the plugin clears it

    def devices(self) -> list[PluginDevice]: ...


def drm_nodes(sysfs_root: Path, pci_bus_id: str) -> tuple[str, ...]:
    """The /dev/dri nodes of the GPU at `pci_bus_id` (its `drm/` directory in sysfs: card*,
    renderD*), as a container needs them; () when it has none or sysfs cannot tell."""
    if not pci_bus_id or ":" not in pci_bus_id:
        return ()
    domain, rest = pci_bus_id.split(":", 1)
    try:
        bdf = f"{int(domain, 16):04x}:{rest}".lower()  # NVML's 8-digit domain, sysfs's 4
    except ValueError:
        return ()
    try:
        names = sorted(entry.name for entry in (sysfs_root / "sys/bus/pci/devices" / bdf / "drm").iterdir())
    except OSError:
        return ()
    return tuple(f"/dev/dri/{name}" for name in names if name.startswith(("card", "renderD")))


def replica_id(gpu_uuid: str, n: int) -> str:
    """The device ID of time-slicing replica `n` of a GPU."""
    return f"{gpu_uuid}{REPLICA_SEPARATOR}{n}"


def socket_name(resource: str) -> str:
    """The plugin's socket file for a resource: `kgpu-nvidia-com-gpu.sock` for nvidia.com/gpu.

    One socket per resource, named after it, so that a restarted daemon takes its own sockets
    back and never touches another plugin's (NVIDIA's is `nvidia-gpu.sock`)."""
    return "kgpu-" + re.sub(r"[^A-Za-z0-9_-]", "-", resource) + ".sock"


def by_resource(devices: list[PluginDevice]) -> dict[str, list[PluginDevice]]:
    """Devices grouped by resource name, each group in ID order (a stable ListAndWatch)."""
    groups: dict[str, list[PluginDevice]] = {}
    for device in devices:
        groups.setdefault(device.resource, []).append(device)
    return {resource: sorted(group, key=lambda d: d.id) for resource, group in sorted(groups.items())}
