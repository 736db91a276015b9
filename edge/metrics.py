"""Prometheus exposition of the edge daemon's state, read at scrape time.

GPU figures use dcgm-exporter's metric and label names (`DCGM_FI_DEV_*`, labels `gpu`, `UUID`,
`device`, `modelName`, `Hostname`) so that existing dashboards and alerts work unchanged.
promtool's linter flags those camelCase label names; they are kept on purpose and are the only
lint findings (see tests/test_metrics.py). `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` is exposed as a
gauge: Prometheus' text format gives counters a `_total` suffix, which would break the name.
Energy per pod follows Kepler's shape; everything else is `kgpu_*`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared import __version__
from shared.gpu import Health

if TYPE_CHECKING:
    from edge.daemon import EdgeDaemon

DCGM_LABELS = ["gpu", "UUID", "device", "modelName", "Hostname"]
MIB = 1024 * 1024


class EdgeCollector(Collector):
    def __init__(self, daemon: EdgeDaemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        node = d.node

        def gauge(name: str, doc: str, labels: list[str] | None = None, unit: str = "") -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels if labels is not None else DCGM_LABELS, unit=unit)

        temp = gauge("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).")
        power = gauge("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).")
        util = gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).")
        mem_util = gauge("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).")
        fb_used = gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).")
        fb_free = gauge("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).")
        sm_clock = gauge("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).")
        mem_clock = gauge("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).")
        energy = gauge("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Total energy consumption since boot (in mJ).")
        xid = gauge("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.")
        ecc_dbe = gauge("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Total number of double-bit volatile ECC errors.")
        ecc_sbe = gauge("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Total number of single-bit volatile ECC errors.")
        limit = gauge("kgpu_gpu_power_limit_watts", "Enforced power limit.", ["gpu", "uuid"])
        throttle = gauge("kgpu_gpu_throttle_reasons", "NVML clocks-event reason bit mask.", ["gpu", "uuid"])
        health = gauge("kgpu_gpu_health", "1 for the GPU's current health state.", ["gpu", "uuid", "state"])
        steps = gauge("kgpu_gpu_thermal_steps", "Thermal step-downs currently applied.", ["gpu", "uuid"])
        saving = gauge("kgpu_gpu_power_saving_active", "1 while power saving lowers the limit.", ["gpu", "uuid"])

        for index, view in sorted(d.gpus.items()):
            inv, sample = view.inventory, view.sample
            dcgm = [str(index), inv.uuid, f"nvidia{index}", inv.name, node]
            short = [str(index), inv.uuid]
            for state in Health:
                health.add_metric([*short, state.value], 1.0 if view.health.health is state else 0.0)
            steps.add_metric(short, view.policy_state.thermal_steps)
            saving.add_metric(short, 1.0 if view.policy_state.saving_active else 0.0)
            xid.add_metric(dcgm, float(view.last_xid or 0))
            if sample is None or sample.lost:
                continue
            for family, value in (
                (temp, sample.temperature_c),
                (power, sample.power_w),
                (util, sample.utilization_pct),
                (mem_util, sample.memory_util_pct),
                (fb_used, None if sample.memory_used_bytes is None else sample.memory_used_bytes / MIB),
                (fb_free, None if sample.memory_free_bytes is None else sample.memory_free_bytes / MIB),
                (sm_clock, sample.sm_clock_mhz),
                (mem_clock, sample.memory_clock_mhz),
                (energy, sample.energy_mj),
                (ecc_dbe, sample.ecc_dbe_volatile),
                (ecc_sbe, sample.ecc_sbe_volatile),
            ):
                if value is not None:
                    family.add_metric(dcgm, float(value))
            if sample.power_limit_w is not None:
                limit.add_metric(short, sample.power_limit_w)
            if sample.throttle_reasons is not None:
                throttle.add_metric(short, float(sample.throttle_reasons))
        yield from (temp, power, util, mem_util, fb_used, fb_free, sm_clock, mem_clock, energy, xid,
                    ecc_dbe, ecc_sbe, limit, throttle, health, steps, saving)

        xids = CounterMetricFamily("kgpu_xid_errors", "XID errors seen, by GPU and XID.", labels=["gpu", "xid"])
        for (index, code), count in sorted(d.counters.xids.items()):
            xids.add_metric([str(index), str(code)], count)
        yield xids

        decisions = CounterMetricFamily(
            "kgpu_decisions", "Decisions taken, by rule, action and outcome.", labels=["rule", "action", "outcome"]
        )
        for (rule, action, outcome), count in sorted(d.counters.decisions.items()):
            decisions.add_metric([rule, action, outcome], count)
        yield decisions

        pods = CounterMetricFamily(
            "kgpu_pod_gpu_joules", "GPU energy attributed to a container (Kepler-style).",
            labels=["pod_name", "pod_namespace", "container_name"],
        )
        by_pod = sorted(d.energy.pod_joules.items(), key=lambda kv: (kv[0].namespace, kv[0].pod, kv[0].container))
        for key, joules in by_pod:
            pods.add_metric([key.pod, key.namespace, key.container], joules)
        yield pods
        yield CounterMetricFamily("kgpu_node_gpu_idle_joules", "GPU idle energy of the node.",
                                  value=d.energy.idle_joules)
        yield CounterMetricFamily(
            "kgpu_node_gpu_unattributed_joules", "Active GPU energy of processes outside any pod.",
            value=d.energy.unattributed_joules,
        )

        policy = GaugeMetricFamily("kgpu_policy_version", "Version of the power policy in force.",
                                   labels=["policy", "source"])
        policy.add_metric([d.policy.name, d.policy_source], d.policy.version)
        yield policy
        yield GaugeMetricFamily("kgpu_outbox_depth", "Events in the outbox not yet acknowledged by the cloud.",
                                value=d.outbox_depth)
        yield GaugeMetricFamily("kgpu_driver_up", "1 when the GPU driver answers.",
                                value=1.0 if d.driver_reachable else 0.0)
        yield CounterMetricFamily("kgpu_driver_call_timeouts", "NVML calls that ran past their bound.",
                                  value=d.runner.timeouts)
        yield CounterMetricFamily("kgpu_store_errors", "Failed writes to the edge store.",
                                  value=d.counters.store_errors)
        yield CounterMetricFamily(
            "kgpu_events_dropped", "Events lost because the store stayed unwritable past the memory bound.",
            value=d.counters.events_dropped,
        )
        yield CounterMetricFamily(
            "kgpu_events_truncated", "Events whose long texts were cut to fit the MQTT message size limit.",
            value=d.store.events_truncated,
        )
        yield GaugeMetricFamily("kgpu_store_degraded", "1 while the edge store cannot be written.",
                                value=1.0 if d.store_problem else 0.0)
        yield CounterMetricFamily("kgpu_sampling_cycles", "Sampling cycles run.", value=d.counters.cycles)
        yield CounterMetricFamily(
            "kgpu_sampling_cycle_seconds", "Time spent in sampling cycles.", value=d.counters.cycle_seconds_sum
        )
        sync = d.sync
        if sync is not None:
            yield GaugeMetricFamily("kgpu_mqtt_connected", "1 while the link to the broker is up.",
                                    value=1.0 if sync.mqtt is not None and sync.mqtt.connected else 0.0)
            yield GaugeMetricFamily("kgpu_outbox_acked_seq", "Highest seq the cloud has acknowledged.",
                                    value=sync.acked_upto)
            rejected = CounterMetricFamily("kgpu_sync_rejected", "Messages from the cloud refused, by reason.",
                                           labels=["reason"])
            for reason, count in sorted(sync.rejected.items()):
                rejected.add_metric([reason], count)
            yield rejected
        info = GaugeMetricFamily("kgpu_build_info", "The daemon's version.",
                                 labels=["version", "backend", "driver_version"])
        info.add_metric([__version__, d.settings.backend, d.driver_version or ""], 1.0)
        yield info


def make_registry(daemon: EdgeDaemon) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(daemon))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
