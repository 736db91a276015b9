"""The labels Intel's GPU NodeFeatureRules (intel/intel-device-plugins-for-kubernetes,
deployments/nfd/overlays/node-feature-rules/) make Node Feature Discovery write on a node with
Intel GPUs, from the fields of `shared.protocol.GpuSummary`, as a pure function.

`intel.feature.node.kubernetes.io/gpu=true` (rule `intel.gpu`: an Intel display device driven by
i915 or xe); per PCI device `gpu.intel.com/device-id.<class>-<device>.present=true` and, per PCI
class, `gpu.intel.com/device-id.<class>-<first device>.count` = the devices of that class (the
generic rules); for the data-centre models the platform rules know, `gpu.intel.com/family`,
`gpu.intel.com/product` (Flex and Max) and `gpu.intel.com/device.count`. The status does not
carry the PCI class and device id: they come from the model's entry in `MODELS` (the ids the
rules match on); a model not listed gets only the `gpu` label. The list, its source and what is
left out are in docs/node-labels.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from cloud.labels.gfd import valid_label
from shared.protocol import GpuSummary

GPU_FEATURE = "intel.feature.node.kubernetes.io/gpu"


@dataclass(frozen=True)
class IntelModel:
    pci_class: str  # 0380 (display controller: Flex, Max) or 0300 (VGA: Arc)
    device_id: str  # lower-case hex, as NFD's pci.device feature gives it
    family: str | None  # gpu.intel.com/family of the platform rules (None: the rules name none)
    product: str | None  # gpu.intel.com/product (None: the rules name none)


# "<family word> <number>" in the GPU's name -> what the platform-labeling rules match and write
MODELS: dict[str, IntelModel] = {
    "FLEX 170": IntelModel("0380", "56c0", "Flex_Series", "Flex_170"),
    "FLEX 140": IntelModel("0380", "56c1", "Flex_Series", "Flex_140"),
    "MAX 1550": IntelModel("0380", "0bd5", "Max_Series", "Max_1550"),
    "MAX 1100": IntelModel("0380", "0bda", "Max_Series", "Max_1100"),
    "ARC A770": IntelModel("0300", "56a0", "A_Series", None),
    "ARC A750": IntelModel("0300", "56a1", "A_Series", None),
    "ARC A380": IntelModel("0300", "56a5", "A_Series", None),
}
_TOKEN = re.compile(r"\b(FLEX|MAX|ARC)\s*(A?\d{3,4})\b")


def intel_model(name: str) -> IntelModel | None:
    found = _TOKEN.search(name.upper())
    return MODELS.get(f"{found.group(1)} {found.group(2)}") if found else None


def intel_labels(gpus: Sequence[GpuSummary]) -> dict[str, str]:
    """NFD's labels (Intel's GPU rules) of a node with these (Intel) GPUs; empty for none."""
    if not gpus:
        return {}
    labels: dict[str, str] = {GPU_FEATURE: "true"}
    models = [m for m in (intel_model(g.name) for g in sorted(gpus, key=lambda g: g.index)) if m is not None]
    for m in models:
        labels[f"gpu.intel.com/device-id.{m.pci_class}-{m.device_id}.present"] = "true"
    for pci_class in sorted({m.pci_class for m in models}):
        of_class = [m for m in models if m.pci_class == pci_class]
        labels[f"gpu.intel.com/device-id.{pci_class}-{of_class[0].device_id}.count"] = str(len(of_class))
    for m in models:  # the platform rules: each matching model's rule writes its own labels
        if m.family:
            labels["gpu.intel.com/family"] = m.family
        if m.product:
            labels["gpu.intel.com/product"] = m.product
            labels["gpu.intel.com/device.count"] = str(sum(1 for o in models if o.device_id == m.device_id))
    return {k: v for k, v in sorted(labels.items()) if valid_label(k, v)}


__all__ = ["GPU_FEATURE", "MODELS", "IntelModel", "intel_labels", "intel_model"]
