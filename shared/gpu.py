"""What the edge knows about a GPU: its inventory, one sample of it, and its health.

Every figure of a sample is optional: a driver may not support it (NotSupported) or may not let
us read it (NoPermission). A missing figure is `None` and its name is listed in `missing`, so a
reader can tell "not supported" from "zero".
"""

from enum import StrEnum
from typing import Literal

from pydantic import Field

from shared.wire import WireModel


class Health(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    LOST = "lost"  # the driver says the GPU fell off the bus, or it stopped answering


class GpuInventory(WireModel):
    """Static facts about one GPU, read once at start-up (and again after a re-initialisation)."""

    index: int = Field(ge=0)
    uuid: str
    name: str
    pci_bus_id: str
    memory_total_bytes: int = Field(ge=0)
    driver_version: str
    cuda_version: str | None = None  # e.g. "12.4", from nvmlSystemGetCudaDriverVersion
    mig_mode: bool | None = None  # None: MIG not supported on this GPU
    architecture: str | None = None  # hopper, ampere, ... (nvmlDeviceGetArchitecture; GFD's gpu.family)
    power_limit_min_w: float | None = None
    power_limit_max_w: float | None = None
    power_limit_default_w: float | None = None
    supported_memory_clocks_mhz: list[int] = Field(default_factory=list)
    supported_sm_clocks_mhz: list[int] = Field(default_factory=list)  # for the highest memory clock
    numa_node: int | None = None
    # The device layer (edge/devices/, issue 16): who made the device, which backend reads it, the
    # platform within the vendor ("jetson-orin", "instinct", "flex", ...), the extended resource its
    # device plugin advertises, and what it can do (edge/devices/base.py Capability values).
    vendor: Literal["nvidia", "amd", "intel"] = "nvidia"
    backend: Literal["nvml", "jetson", "amd", "intel"] = "nvml"
    platform: str | None = Field(None, max_length=64)
    resource_name: str | None = Field(None, max_length=253)
    capabilities: list[str] = Field(default_factory=list, max_length=32)
    missing: list[str] = Field(default_factory=list)


class ProcessSample(WireModel):
    """A compute process running on a GPU, as NVML reports it."""

    pid: int = Field(ge=0)
    used_memory_bytes: int | None = None
    sm_util_pct: float | None = None  # from nvmlDeviceGetProcessUtilization, None when unknown


class GpuSample(WireModel):
    """One reading of one GPU. `ts` is unix seconds on the edge's clock."""

    index: int = Field(ge=0)
    uuid: str
    ts: float
    lost: bool = False
    utilization_pct: float | None = None
    memory_util_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None  # the enforced limit
    sm_clock_mhz: int | None = None
    memory_clock_mhz: int | None = None
    throttle_reasons: int | None = None  # nvmlClocksEventReasons bit mask
    energy_mj: int | None = None  # total energy since driver load, millijoules
    ecc_sbe_volatile: int | None = None
    ecc_dbe_volatile: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    # dcgm-exporter's other default counters (all optional: an older edge sends none of them).
    memory_temperature_c: float | None = None  # HBM boards only (NVML_FI_DEV_MEMORY_TEMP)
    memory_reserved_bytes: int | None = None  # framebuffer the driver and firmware keep
    pcie_replays: int | None = None  # PCIe replay counter since driver load
    encoder_util_pct: float | None = None
    decoder_util_pct: float | None = None
    nvlink_kib: int | None = None  # NVLink traffic since driver load, all links, TX + RX, KiB
    vgpu_license_status: int | None = None  # 1 licensed, 0 not (or not a vGPU guest)
    # GPM (Hopper and later): over the sampling interval; None on a board's first sample.
    gr_engine_active: float | None = None  # ratio 0-1
    tensor_active: float | None = None  # ratio 0-1
    dram_active: float | None = None  # ratio 0-1
    pcie_tx_bytes_per_s: float | None = None
    pcie_rx_bytes_per_s: float | None = None
    # Kepler's idle/active split, from the edge's energy accountant (edge/energy.py), so that the
    # controller's fleet exporter can serve `kepler_node_gpu_*` (None from an older edge).
    idle_power_w: float | None = None  # idle power in force at this reading; None without a power reading
    idle_joules: float | None = None  # idle energy since the edge daemon started
    active_joules: float | None = None  # active energy since the edge daemon started
    processes: list[ProcessSample] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)


class XidEvent(WireModel):
    """An XID error delivered by the NVML event set."""

    index: int = Field(ge=0)
    uuid: str
    xid: int = Field(ge=0)
    ts: float
