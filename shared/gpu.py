"""What the edge knows about a GPU: its inventory, one sample of it, and its health.

Every figure of a sample is optional: a driver may not support it (NotSupported) or may not let
us read it (NoPermission). A missing figure is `None` and its name is listed in `missing`, so a
reader can tell "not supported" from "zero".
"""

from enum import StrEnum

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
    power_limit_min_w: float | None = None
    power_limit_max_w: float | None = None
    power_limit_default_w: float | None = None
    supported_memory_clocks_mhz: list[int] = Field(default_factory=list)
    supported_sm_clocks_mhz: list[int] = Field(default_factory=list)  # for the highest memory clock
    numa_node: int | None = None
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
    processes: list[ProcessSample] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)


class XidEvent(WireModel):
    """An XID error delivered by the NVML event set."""

    index: int = Field(ge=0)
    uuid: str
    xid: int = Field(ge=0)
    ts: float
