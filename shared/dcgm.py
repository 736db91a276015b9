"""dcgm-exporter's series from kgpu's GPU samples: one pure builder both sides can use.

`dcgm_families(node, gpus)` turns each GPU's inventory and latest sample into the metric families
dcgm-exporter would export for it, with dcgm-exporter's names, types, units and labels (`gpu`,
`UUID`, `pci_bus_id`, `device`, `modelName`, `Hostname`, `DCGM_FI_DRIVER_VERSION`) and, where a
pod's process runs on the GPU, its Kubernetes mapping: one series per (GPU, pod, container), with
`pod`, `namespace` and `container`, as dcgm-exporter does for a GPU shared by pods. The edge's
/metrics uses it; a cloud exporter can call it from stored samples (it needs no daemon).

The fields follow dcgm-exporter's default counters (deploy/reference/dcgm-exporter/
default-counters.csv, checked by tests/test_dcgm_counters.py), plus the volatile ECC totals kgpu
has always exported. A figure the GPU does not give is left out, not exported as 0.

Counters keep dcgm-exporter's names (no `_total` suffix): prometheus_client appends `_total` to
every counter, so they are `ExactCounter`s and `exposition()` writes their text itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest

from shared.gpu import GpuInventory, GpuSample

GPU_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION")
POD_LABELS = ("pod", "namespace", "container")
MIB = 1024 * 1024


@dataclass(frozen=True)
class PodOnGpu:
    """A pod's container with a process on the GPU (dcgm-exporter's Kubernetes mapping)."""

    namespace: str
    pod: str
    container: str


@dataclass(frozen=True)
class MigOnGpu:
    """One MIG device of the GPU: dcgm-exporter exports its framebuffer figures as series of
    their own, with the GPU's labels plus `GPU_I_PROFILE` and `GPU_I_ID`."""

    profile: str  # 1g.10gb
    gi_id: int
    used_mib: float | None = None
    total_mib: float | None = None


@dataclass(frozen=True)
class DcgmGpu:
    """What the builder needs about one GPU. `last_xid` is not in a sample: the edge keeps it."""

    inventory: GpuInventory
    sample: GpuSample | None
    last_xid: int | None = None
    pods: Sequence[PodOnGpu] = field(default_factory=tuple)
    mig: Sequence[MigOnGpu] = field(default_factory=tuple)


def _mig_free(mig: MigOnGpu) -> float | None:
    return None if mig.used_mib is None or mig.total_mib is None else max(0.0, mig.total_mib - mig.used_mib)


# The fields dcgm-exporter also exports per MIG device (GPU_I_PROFILE, GPU_I_ID)
MIG_FIELDS: dict[str, Callable[[MigOnGpu], float | None]] = {
    "DCGM_FI_DEV_FB_USED": lambda m: m.used_mib,
    "DCGM_FI_DEV_FB_FREE": _mig_free,
}


@dataclass(frozen=True)
class DcgmField:
    name: str
    type: str  # "gauge" or "counter", as in dcgm-exporter's list
    help: str
    value: Callable[[DcgmGpu], float | None]


def _s(read: Callable[[GpuSample], Any], scale: float = 1.0) -> Callable[[DcgmGpu], float | None]:
    """A figure of the sample, scaled; None when the sample or the figure is absent."""
    def value(gpu: DcgmGpu) -> float | None:
        if gpu.sample is None or gpu.sample.lost:
            return None
        figure = read(gpu.sample)
        return None if figure is None else float(figure) * scale
    return value


def _xid(gpu: DcgmGpu) -> float:
    return float(gpu.last_xid or 0)


def _flag(flag: bool | None) -> int | None:
    return None if flag is None else int(flag)


# In the order of dcgm-exporter's default-counters.csv (DCGM_FI_DRIVER_VERSION is a label).
FIELDS: tuple[DcgmField, ...] = (
    DcgmField("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", _s(lambda s: s.sm_clock_mhz)),
    DcgmField("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).",
              _s(lambda s: s.memory_clock_mhz)),
    DcgmField("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C).",
              _s(lambda s: s.memory_temperature_c)),
    DcgmField("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", _s(lambda s: s.temperature_c)),
    DcgmField("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", _s(lambda s: s.power_w)),
    DcgmField("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter",
              "Total energy consumption since boot (in mJ).", _s(lambda s: s.energy_mj)),
    DcgmField("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries.",
              _s(lambda s: s.pcie_replays)),
    DcgmField("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", _s(lambda s: s.utilization_pct)),
    DcgmField("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).",
              _s(lambda s: s.memory_util_pct)),
    DcgmField("DCGM_FI_DEV_ENC_UTIL", "gauge", "Encoder utilization (in %).", _s(lambda s: s.encoder_util_pct)),
    DcgmField("DCGM_FI_DEV_DEC_UTIL", "gauge", "Decoder utilization (in %).", _s(lambda s: s.decoder_util_pct)),
    DcgmField("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.", _xid),
    DcgmField("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).",
              _s(lambda s: s.memory_free_bytes, 1 / MIB)),
    DcgmField("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).",
              _s(lambda s: s.memory_used_bytes, 1 / MIB)),
    DcgmField("DCGM_FI_DEV_FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB).",
              _s(lambda s: s.memory_reserved_bytes, 1 / MIB)),
    DcgmField("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter", "Total number of single-bit volatile ECC errors.",
              _s(lambda s: s.ecc_sbe_volatile)),
    DcgmField("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors.",
              _s(lambda s: s.ecc_dbe_volatile)),
    DcgmField("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "counter",
              "Total number of NVLink bandwidth counters for all lanes.", _s(lambda s: s.nvlink_kib)),
    DcgmField("DCGM_FI_DEV_VGPU_LICENSE_STATUS", "gauge", "vGPU License status",
              _s(lambda s: s.vgpu_license_status)),
    DcgmField("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter",
              "Number of remapped rows for uncorrectable errors", _s(lambda s: s.remapped_rows_uncorrectable)),
    DcgmField("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter",
              "Number of remapped rows for correctable errors", _s(lambda s: s.remapped_rows_correctable)),
    DcgmField("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed",
              _s(lambda s: _flag(s.remap_failure))),
    DcgmField("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", "Ratio of time the graphics engine is active.",
              _s(lambda s: s.gr_engine_active)),
    DcgmField("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge", "Ratio of cycles the tensor (HMMA) pipe is active.",
              _s(lambda s: s.tensor_active)),
    DcgmField("DCGM_FI_PROF_DRAM_ACTIVE", "gauge",
              "Ratio of cycles the device memory interface is active sending or receiving data.",
              _s(lambda s: s.dram_active)),
    DcgmField("DCGM_FI_PROF_PCIE_TX_BYTES", "gauge",
              "The rate of data transmitted over the PCIe bus - including both protocol headers and data "
              "payloads - in bytes per second.", _s(lambda s: s.pcie_tx_bytes_per_s)),
    DcgmField("DCGM_FI_PROF_PCIE_RX_BYTES", "gauge",
              "The rate of data received over the PCIe bus - including both protocol headers and data "
              "payloads - in bytes per second.", _s(lambda s: s.pcie_rx_bytes_per_s)),
)
LABEL_FIELDS = ("DCGM_FI_DRIVER_VERSION",)


class ExactCounter(Metric):
    """A counter exposed under its own name, as dcgm-exporter does (`exposition()` writes it)."""

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(name, documentation, "counter")


def gpu_labels(node: str, inventory: GpuInventory) -> dict[str, str]:
    """dcgm-exporter's labels of one GPU (before the Kubernetes mapping)."""
    return {
        "gpu": str(inventory.index),
        "UUID": inventory.uuid,
        "pci_bus_id": inventory.pci_bus_id,
        "device": f"nvidia{inventory.index}",
        "modelName": inventory.name,
        "Hostname": node,
        "DCGM_FI_DRIVER_VERSION": inventory.driver_version,
    }


def series_labels(node: str, gpu: DcgmGpu) -> list[dict[str, str]]:
    """One label set per series of this GPU: one per pod container on it, or one without pods."""
    base = gpu_labels(node, gpu.inventory)
    pods = sorted(set(gpu.pods), key=lambda p: (p.namespace, p.pod, p.container))
    if not pods:
        return [base]
    return [base | {"pod": p.pod, "namespace": p.namespace, "container": p.container} for p in pods]


def dcgm_families(node: str, gpus: Iterable[DcgmGpu]) -> list[Metric]:
    """Every DCGM family of `node`'s GPUs (a family with no series is still returned, empty)."""
    gpus = sorted(gpus, key=lambda g: g.inventory.index)
    families: list[Metric] = []
    for spec in FIELDS:
        family = ExactCounter(spec.name, spec.help) if spec.type == "counter" else Metric(
            spec.name, spec.help, "gauge")
        for gpu in gpus:
            value = spec.value(gpu)
            if value is not None:
                for labels in series_labels(node, gpu):
                    family.add_sample(spec.name, labels, value)
            per_mig = MIG_FIELDS.get(spec.name)
            for mig in (gpu.mig if per_mig is not None else ()):
                mig_value = per_mig(mig) if per_mig is not None else None
                if mig_value is not None:
                    instance = {"GPU_I_PROFILE": mig.profile, "GPU_I_ID": str(mig.gi_id)}
                    family.add_sample(spec.name, gpu_labels(node, gpu.inventory) | instance, mig_value)
        families.append(family)
    return families


class _One:
    def __init__(self, metric: Metric) -> None:
        self.metric = metric

    def collect(self) -> list[Metric]:
        return [self.metric]


def exposition(metrics: Iterable[Metric]) -> bytes:
    """Prometheus text of `metrics`, with every `ExactCounter` under its own name."""
    parts: list[bytes] = []
    for metric in metrics:
        if isinstance(metric, ExactCounter):
            as_gauge = Metric(metric.name, metric.documentation, "gauge")
            as_gauge.samples = metric.samples
            text = generate_latest(_One(as_gauge)).decode()
            parts.append(text.replace(f"# TYPE {metric.name} gauge\n",
                                      f"# TYPE {metric.name} counter\n", 1).encode())
        else:
            parts.append(generate_latest(_One(metric)))
    return b"".join(parts)
