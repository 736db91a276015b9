"""A node's GPU labels whatever its GPUs' vendors, as a pure function: each vendor's GPUs get the
labels that vendor's own labelling tool writes (NVIDIA GPU Feature Discovery, incl. Jetson through
GFD's Tegra path: `gfd`; AMD's node labeller: `amd`; Intel's NFD rules: `intel`).

A GPU's vendor is its status's `vendor`; an edge older than the device layer says nothing and
runs NVIDIA GPUs on NVML. kgpu writes no label of its own for Jetson: GFD's (`nvidia.com/gpu.family`
from the architecture, `nvidia.com/gpu.product` from the module's GPU name) already tell a
Jetson node, and the fleet store keeps the platform (`jetson-orin`) for the API and dashboard.
"""

from __future__ import annotations

from collections.abc import Sequence

from cloud.labels.amd import amd_labels
from cloud.labels.gfd import labels_for
from cloud.labels.intel import intel_labels
from shared.protocol import GpuSummary

# the label prefixes these tools write: the only ones kgpu ever removes (and only keys it wrote)
LABEL_PREFIXES = ("nvidia.com/", "amd.com/", "beta.amd.com/", "gpu.intel.com/", "intel.feature.node.kubernetes.io/")


def vendor_of(gpu: GpuSummary) -> str:
    return gpu.vendor or "nvidia"


def node_labels(gpus: Sequence[GpuSummary]) -> dict[str, str]:
    """The labels of a node with these GPUs (empty for none), each vendor's by its own rules."""
    labels: dict[str, str] = {}
    labels.update(labels_for([g for g in gpus if vendor_of(g) == "nvidia"]))
    labels.update(amd_labels([g for g in gpus if vendor_of(g) == "amd"]))
    labels.update(intel_labels([g for g in gpus if vendor_of(g) == "intel"]))
    return dict(sorted(labels.items()))


__all__ = ["LABEL_PREFIXES", "node_labels", "vendor_of"]
