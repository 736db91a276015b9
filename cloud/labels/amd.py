"""The labels AMD's Kubernetes node labeller (ROCm/k8s-device-plugin, `k8s-node-labeller`) writes
on a node with AMD GPUs, from the fields of `shared.protocol.GpuSummary`, as a pure function.

The labeller counts every AMD GPU of the node per value of a property and writes, for each
property (`createLabels`): the experimental `beta.amd.com/gpu.<property>.<value>` = how many GPUs
have that value, plus `beta.amd.com/gpu.<property>` = the value when all GPUs agree; and the
stable `amd.com/gpu.<property>` = the value when all agree, else `amd.com/gpu.<property>.<value>`
= the count. kgpu writes the properties of the labeller's example DaemonSet (`-vram -cu-count
-simd-count -device-id -family -product-name`) and `amd.com/gpu.driver-version`. Where the status
carries nothing for a property (device id, compute units, family), they come from the model's
entry in `MODELS` (AMD's published figures); a model not listed gets no such label rather than a
guess. The list, its source and what is left out are in docs/node-labels.md.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from cloud.labels.gfd import valid_label
from shared.protocol import GpuSummary

MIB = 1024 * 1024


@dataclass(frozen=True)
class AmdModel:
    """What the labeller reads from sysfs and KFD's topology for one model."""

    device_id: str  # PCI device id, lower-case hex without 0x (/sys/class/drm/cardN/device/device)
    family: str  # the amdgpu family acronym (libdrm's family id): AI for GFX9 (Vega, CDNA 1-3)
    compute_units: int  # simd_count / simd_per_cu of the KFD topology node
    simd_per_cu: int = 4


# model token (in the GPU's name) -> the figures the labeller would read (AMD's product pages and
# the kernel's amdgpu PCI id table)
MODELS: dict[str, AmdModel] = {
    "MI100": AmdModel("738c", "AI", 120),
    "MI210": AmdModel("740f", "AI", 104),
    "MI250": AmdModel("740c", "AI", 208),
    "MI250X": AmdModel("7408", "AI", 220),
    "MI300A": AmdModel("74a0", "AI", 228),
    "MI300X": AmdModel("74a1", "AI", 304),
    "MI325X": AmdModel("74a5", "AI", 304),
}
_TOKEN = re.compile(r"\bMI\d{3}[A-Z]?\b")
_PRODUCT = str.maketrans({" ": "_", "(": None, ")": None})


def amd_model(name: str) -> AmdModel | None:
    found = _TOKEN.search(name.upper())
    return MODELS.get(found.group(0)) if found else None


def _property(kind: str, counts: Counter[str]) -> dict[str, str]:
    """The labeller's `createLabels`: beta per-value counts (+ the value when alone), stable value
    when alone, else stable per-value counts."""
    labels: dict[str, str] = {}
    for value, count in counts.items():
        labels[f"beta.amd.com/gpu.{kind}.{value}"] = str(count)
    if len(counts) == 1:
        [value] = counts
        labels[f"beta.amd.com/gpu.{kind}"] = value
        labels[f"amd.com/gpu.{kind}"] = value
    else:
        labels.update({f"amd.com/gpu.{kind}.{value}": str(count) for value, count in counts.items()})
    return labels


def amd_labels(gpus: Sequence[GpuSummary]) -> dict[str, str]:
    """The AMD node labeller's labels of a node with these (AMD) GPUs; empty for none."""
    if not gpus:
        return {}
    by_kind: dict[str, Counter[str]] = {k: Counter() for k in
                                        ("product-name", "vram", "device-id", "family", "cu-count", "simd-count")}
    for g in gpus:
        product = g.name.strip().translate(_PRODUCT)
        if product:
            by_kind["product-name"][product] += 1
        if g.memory_total_bytes:
            by_kind["vram"][f"{round(g.memory_total_bytes // MIB / 1024)}G"] += 1
        model = amd_model(g.name)
        if model is not None:
            by_kind["device-id"][model.device_id] += 1
            by_kind["family"][model.family] += 1
            by_kind["cu-count"][str(model.compute_units)] += 1
            by_kind["simd-count"][str(model.compute_units * model.simd_per_cu)] += 1
    labels: dict[str, str] = {}
    for kind, counts in by_kind.items():
        if counts:
            labels.update(_property(kind, counts))
    driver = next((g.driver_version for g in sorted(gpus, key=lambda g: g.index) if g.driver_version), None)
    if driver:
        labels["amd.com/gpu.driver-version"] = driver
    return {k: v for k, v in sorted(labels.items()) if valid_label(k, v)}


__all__ = ["MODELS", "AmdModel", "amd_labels", "amd_model"]
