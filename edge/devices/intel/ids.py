"""Intel discrete GPUs by PCI device id: the marketing name, the platform kgpu reports, and the
extended resource Intel's device plugin advertises for the driver bound to the card.

Only ids we could tie to a product are listed (Intel's ARK pages and the kernel's
include/drm/intel/pciids.h: INTEL_ATS_M_IDS, INTEL_DG2_IDS, INTEL_PVC_IDS, INTEL_BMG_IDS); another
Intel card is still managed, named "Intel GPU 0x<id>" with the platform from its id family.
"""

from __future__ import annotations

from dataclasses import dataclass

INTEL_PCI_VENDOR = 0x8086
DRIVERS = ("i915", "xe")
# What the Intel GPU device plugin (intel/intel-device-plugins-for-kubernetes) advertises per driver.
RESOURCE_BY_DRIVER = {"i915": "gpu.intel.com/i915", "xe": "gpu.intel.com/xe"}


@dataclass(frozen=True)
class IntelModel:
    name: str
    platform: str  # "flex", "max" or "arc"


KNOWN: dict[int, IntelModel] = {
    # Data Center GPU Flex (ATS-M, Xe-HPG): one GPU per Flex 170 card, two per Flex 140 card.
    0x56C0: IntelModel("Intel Data Center GPU Flex 170", "flex"),
    0x56C1: IntelModel("Intel Data Center GPU Flex 140", "flex"),
    # Data Center GPU Max (Ponte Vecchio, Xe-HPC).
    0x0BD5: IntelModel("Intel Data Center GPU Max 1550", "max"),
    0x0BD6: IntelModel("Intel Data Center GPU Max 1550", "max"),
    0x0BDA: IntelModel("Intel Data Center GPU Max 1100", "max"),
    # Arc A-series (DG2, Alchemist) and B-series (Battlemage).
    0x56A0: IntelModel("Intel Arc A770", "arc"),
    0x56A1: IntelModel("Intel Arc A750", "arc"),
    0x56A5: IntelModel("Intel Arc A380", "arc"),
    0xE20B: IntelModel("Intel Arc B580", "arc"),
    0xE20C: IntelModel("Intel Arc B570", "arc"),
}


def platform_of(device_id: int) -> str | None:
    """flex / max / arc from the id family; None for an Intel GPU outside them (an integrated one)."""
    if device_id in KNOWN:
        return KNOWN[device_id].platform
    if 0x56C0 <= device_id <= 0x56CF:
        return "flex"
    if 0x0BD0 <= device_id <= 0x0BDF:
        return "max"
    if 0x5690 <= device_id <= 0x56BF or 0xE200 <= device_id <= 0xE2FF:
        return "arc"
    return None


# The GPU architecture by platform and id family, GFD-style (lower case), for GpuInventory.architecture.
def architecture_of(device_id: int) -> str | None:
    if 0xE200 <= device_id <= 0xE2FF:
        return "xe2-hpg"  # Battlemage
    return {"flex": "xe-hpg", "arc": "xe-hpg", "max": "xe-hpc"}.get(platform_of(device_id) or "")


def name_of(device_id: int) -> str:
    model = KNOWN.get(device_id)
    return model.name if model is not None else f"Intel GPU 0x{device_id:04x}"
