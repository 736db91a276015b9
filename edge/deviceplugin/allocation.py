"""The device plugin's decisions, as pure functions: what a container gets for the devices the
kubelet allocated, and which devices to prefer when the kubelet asks.

Replicas (`<UUID>::<n>`) and MIG devices carry `visible_id`, the ID the NVIDIA container runtime
understands (the GPU UUID, or the MIG device UUID): several replicas of one GPU give that GPU once.
A Jetson's one integrated GPU is `all` to the NVIDIA runtime (its CSV mode, and the CDI spec
`nvidia-ctk cdi generate` writes there). An AMD or Intel GPU is given as its DRM device nodes (and
AMD's /dev/kfd), as AMD's and Intel's own device plugins give them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edge.deviceplugin.devices import CDI_KIND, PluginDevice

VISIBLE_DEVICES_ENV = "NVIDIA_VISIBLE_DEVICES"
AMD_KFD = "/dev/kfd"  # ROCm's compute interface: every AMD GPU container needs it


class UnknownDevice(ValueError):
    """The kubelet asked for a device this plugin does not advertise (any more)."""


@dataclass(frozen=True)
class ContainerAllocation:
    envs: dict[str, str]
    cdi_devices: list[str]  # fully qualified CDI names, e.g. nvidia.com/gpu=GPU-8f6...
    device_nodes: list[str] = field(default_factory=list)  # AMD, Intel: /dev paths given as they are


def allocate(device_ids: Sequence[str], devices: Mapping[str, PluginDevice]) -> ContainerAllocation:
    """NVIDIA_VISIBLE_DEVICES = the sorted unique visible IDs of the devices asked for, and one CDI
    device `nvidia.com/gpu=<visible id>` for each (a Jetson's: `all`); AMD and Intel GPUs: their
    DRM nodes (and /dev/kfd for AMD) as device specs. Raises UnknownDevice naming the unknown IDs."""
    unknown = sorted(set(device_ids) - set(devices))
    if unknown:
        raise UnknownDevice(f"unknown device IDs: {', '.join(unknown)}")
    backends = {devices[i].backend for i in device_ids}
    if backends & {"amd", "intel"}:
        nodes = {node for i in device_ids for node in devices[i].device_nodes}
        if "amd" in backends:
            nodes.add(AMD_KFD)
        return ContainerAllocation(envs={}, cdi_devices=[], device_nodes=sorted(nodes))
    if backends == {"jetson"}:
        return ContainerAllocation(envs={VISIBLE_DEVICES_ENV: "all"}, cdi_devices=[f"{CDI_KIND}=all"])
    visible = sorted({devices[i].visible_id for i in device_ids})
    return ContainerAllocation(
        envs={VISIBLE_DEVICES_ENV: ",".join(visible)},
        cdi_devices=[f"{CDI_KIND}={v}" for v in visible],
    )


def preferred_allocation(available: Sequence[str], must_include: Sequence[str], size: int,
                         devices: Mapping[str, PluginDevice]) -> list[str]:
    """`size` device IDs out of `available`: the must-include ones first, then devices on the NUMA
    node(s) of those (or, with none, on the NUMA node that has the most available devices), and
    among equals the devices of the GPU least used so far, so that replicas spread over distinct
    GPUs. IDs this plugin does not know come last. Deterministic: ties go by GPU, then ID."""
    chosen = list(dict.fromkeys(must_include))
    if len(chosen) >= size:
        return chosen
    candidates = [i for i in dict.fromkeys(available) if i not in set(chosen)]
    used = Counter(devices[i].gpu_uuid for i in chosen if i in devices)
    numa = {devices[i].numa_node for i in chosen if i in devices} - {None}
    if not numa:
        per_node = Counter(devices[i].numa_node for i in candidates
                           if i in devices and devices[i].numa_node is not None)
        if per_node:
            numa = {min(per_node, key=lambda n: (-per_node[n], n))}

    def rank(device_id: str) -> tuple[int, int, str, str]:
        device = devices.get(device_id)
        if device is None:
            return (2, 0, "", device_id)
        return (0 if device.numa_node in numa else 1, used[device.gpu_uuid], device.gpu_uuid, device_id)

    while len(chosen) < size and candidates:
        best = min(candidates, key=rank)
        candidates.remove(best)
        chosen.append(best)
        if best in devices:
            used[devices[best].gpu_uuid] += 1
    return chosen
