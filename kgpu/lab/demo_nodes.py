"""The demo's nodes (kgpu/demo.py): which GPU model each simulates, and the Kubernetes labels and
resource its Node is seeded with.

The first four are the story's NVIDIA nodes (`--scenario` uses each: the XID migration between
H100s, a thermal spike, a node cut off, MIG on the A100s); from the fifth on, the fleet mixes
vendors: a Jetson Orin NX, an AMD Instinct MI210 and an Intel Data Center GPU Flex 170, each
simulated at its real interface (edge/sim/jetson, amd, intel), then again. Where a vendor's
simulation is not installed in this tree, its node simulates an H100 instead, and the demo says so.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from kgpu.lab.manifests import EDGE_ROLE, GPU_COUNT, GPU_MEMORY, GPU_PRESENT, GPU_PRODUCT, HOSTNAME, ZONE


@dataclass(frozen=True)
class DemoModel:
    """One `--sim-model` as the demo seeds its Node."""

    vendor: str  # nvidia | amd | intel
    sim: str  # the simulation package under edge.sim (nvml's is edge.sim itself: "")
    resource: str  # the extended resource its device plugin advertises
    gpus: int  # GPUs per node of this model
    product: str | None = None  # GFD's nvidia.com/gpu.product (NVIDIA discrete GPUs: the Node starts with it)
    memory_mib: int | None = None


MODELS: dict[str, DemoModel] = {
    "H100": DemoModel("nvidia", "", "nvidia.com/gpu", 4, "NVIDIA-H100-80GB-HBM3", 81559),
    "A100": DemoModel("nvidia", "", "nvidia.com/gpu", 4, "NVIDIA-A100-SXM4-80GB", 81920),
    "ORIN-NX": DemoModel("nvidia", "jetson", "nvidia.com/gpu", 1),
    "MI210": DemoModel("amd", "amd", "amd.com/gpu", 2),
    "FLEX170": DemoModel("intel", "intel", "gpu.intel.com/i915", 1),
}
MIXED = ("ORIN-NX", "MI210", "FLEX170")  # the fifth node on
STORY_NODES = 4
FALLBACK = "H100"


@dataclass
class NodeSpec:
    name: str
    zone: str
    model: str
    gpus: int

    @property
    def spec(self) -> DemoModel:
        return MODELS[self.model]


def sim_installed(package: str) -> bool:
    """Whether this tree has the vendor's simulation (`edge.sim.<package>`); NVML's always."""
    return not package or importlib.util.find_spec(f"edge.sim.{package}") is not None


def node_specs(count: int, note: Callable[[str], None] = lambda _: None,
               installed: Callable[[str], bool] = sim_installed) -> list[NodeSpec]:
    """edge-01..: zones a/b alternate by halves; the story's four (4/2/3 GPUs in turn, the fourth
    an A100, the others H100s), then the mixed vendors in turn (`MIXED`), each falling back to an
    H100 (and `note` saying why) where its simulation is missing."""
    specs = []
    for i in range(count):
        if i < STORY_NODES:
            model, gpus = ("A100" if i % 4 == 3 else "H100"), (4, 2, 3)[i % 3]
        else:
            model = MIXED[(i - STORY_NODES) % len(MIXED)]
            if not installed(MODELS[model].sim):
                note(f"kgpu demo: edge.sim.{MODELS[model].sim} is not installed here: edge-{i + 1:02d} simulates "
                     f"{FALLBACK}s instead of {model}")
                model = FALLBACK
            gpus = MODELS[model].gpus if model != FALLBACK else 2
        specs.append(NodeSpec(name=f"edge-{i + 1:02d}", zone="zone-a" if i < (count + 1) // 2 else "zone-b",
                              model=model, gpus=gpus))
    return specs


def node_labels(spec: NodeSpec) -> dict[str, str]:
    """The labels a node starts with: every edge node its role, zone and hostname; an NVIDIA
    discrete GPU node also the GFD labels an operator's GFD would have written before kgpu (the
    controller then writes each vendor's own labels from the node's status)."""
    labels = {EDGE_ROLE: "", ZONE: spec.zone, HOSTNAME: spec.name}
    model = spec.spec
    if model.product is not None:
        labels.update({GPU_PRESENT: "true", GPU_PRODUCT: model.product, GPU_COUNT: str(spec.gpus),
                       GPU_MEMORY: str(model.memory_mib)})
    return labels


__all__ = ["MIXED", "MODELS", "DemoModel", "NodeSpec", "node_labels", "node_specs", "sim_installed"]
