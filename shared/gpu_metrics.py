"""Every vendor's GPU figures under one set of names, `kgpu_gpu_*{gpu,uuid,Hostname,vendor}`: the
vendor-neutral twins of dcgm-exporter's utilisation, power, temperature, memory, clock and energy
(whose `DCGM_FI_*` names are NVIDIA's: shared/dcgm.py). One pure builder for the edge's /metrics
(edge/metrics.py) and the controller's fleet exporter (cloud/http/fleet_metrics.py), so that both
serve the same families from the same sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shared.dcgm import DcgmGpu
from shared.gpu import GpuSample

LABELS = ["gpu", "uuid", "Hostname", "vendor"]

# name, help, type, the reading of a sample
_FIGURES: tuple[tuple[str, str, str, Callable[[GpuSample], float | None]], ...] = (
    ("kgpu_gpu_utilization_percent", "GPU utilisation (in %).", "gauge", lambda s: s.utilization_pct),
    ("kgpu_gpu_power_watts", "Power draw.", "gauge", lambda s: s.power_w),
    ("kgpu_gpu_temperature_celsius", "GPU temperature.", "gauge", lambda s: s.temperature_c),
    ("kgpu_gpu_memory_used_bytes", "GPU memory used.", "gauge",
     lambda s: None if s.memory_used_bytes is None else float(s.memory_used_bytes)),
    ("kgpu_gpu_clock_mhz", "GPU (SM, graphics) clock.", "gauge",
     lambda s: None if s.sm_clock_mhz is None else float(s.sm_clock_mhz)),
    ("kgpu_gpu_energy_joules", "GPU energy since the driver loaded (the device's counter, or its power "
     "integrated by the backend).", "counter", lambda s: s.energy_mj / 1000.0 if s.energy_mj is not None else None),
)


def figure_families(node: str, gpus: Sequence[DcgmGpu]) -> list[Metric]:
    """Every vendor's sample figures under the edge's `kgpu_gpu_*` names, labelled
    `gpu,uuid,Hostname,vendor`; a lost GPU's, or a figure the sample lacks, has no series."""
    labels = LABELS
    out: list[Metric] = []
    for name, doc, kind, read in _FIGURES:
        family: CounterMetricFamily | GaugeMetricFamily = (
            CounterMetricFamily(name, doc, labels=labels) if kind == "counter"
            else GaugeMetricFamily(name, doc, labels=labels))
        for gpu in gpus:
            s = gpu.sample
            value = None if s is None or s.lost else read(s)
            if value is not None:
                inv = gpu.inventory
                family.add_metric([str(inv.index), inv.uuid, node, inv.vendor], value)
        out.append(family)
    return out
