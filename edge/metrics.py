"""Prometheus exposition of the edge daemon's state, read at scrape time.

GPU figures are dcgm-exporter's series, built by shared/dcgm.py (the same builder a cloud
exporter can use): its metric names, types and labels (`gpu`, `UUID`, `pci_bus_id`, `device`,
`modelName`, `Hostname`, `DCGM_FI_DRIVER_VERSION`, and `pod`/`namespace`/`container` for a GPU
a pod's process runs on) so that existing dashboards and alerts work unchanged; those series are
NVIDIA's (vendor nvidia: NVML and Jetson), never an AMD's or an Intel's. Every vendor's figures are
the `kgpu_gpu_*` families, each with a `vendor` label (nvidia, amd, intel). promtool's
linter flags those camelCase label names and dcgm-exporter's counters without `_total`; they are
kept on purpose and are the only lint findings (see tests/test_metrics.py); `render` writes those
counters under their own names. The per-GPU `kgpu_gpu_*` series carry `Hostname` too, so a
dashboard's node selector filters them. Energy per pod follows Kepler's shape; everything else
is `kgpu_*`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.kepler_metrics import KeplerCollector
from edge.pods import PodRef
from shared import __version__
from shared.dcgm import DcgmGpu, PodOnGpu, dcgm_families, exposition
from shared.gpu import Health
from shared.gpu_metrics import figure_families

if TYPE_CHECKING:
    from edge.daemon import EdgeDaemon


class EdgeCollector(Collector):
    def __init__(self, daemon: EdgeDaemon) -> None:
        self.daemon = daemon

    def _pods_by_pid(self) -> dict[int, PodRef]:
        """pid -> pod of the GPU processes the energy accounting has resolved (edge/energy.py); a
        pid seen in two pods (reused) maps to the one that had GPU time last."""
        seen = self.daemon.energy.processes.last_active
        return {key.pid: key.pod for key in sorted(seen, key=seen.__getitem__) if key.pod is not None}

    def _dcgm_gpus(self, pods: dict[int, PodRef]) -> list[DcgmGpu]:
        """Each GPU's view, with the pods whose processes run on it (dcgm-exporter's mapping)."""
        d = self.daemon
        gpus = []
        for view in d.gpus.values():
            if view.inventory.vendor != "nvidia":  # DCGM's names are NVIDIA's: another vendor's are kgpu_gpu_*
                continue
            sample = view.sample
            on_gpu = [] if sample is None else [pods[p.pid] for p in sample.processes if p.pid in pods]
            gpus.append(DcgmGpu(view.inventory, sample, view.last_xid,
                                tuple(PodOnGpu(r.namespace, r.pod, r.container) for r in on_gpu),
                                mig=d.partitions.mig_devices(view.inventory.index)))
        return gpus

    def _per_pod(self, node: str, pods: dict[int, PodRef]) -> Iterator[Metric]:
        """Each container's share of each GPU: its processes' SM utilisation and memory, summed
        (NVML's per-process figures; a process outside any pod is in neither)."""
        labels = ["gpu", "uuid", "Hostname", "pod", "namespace", "container"]
        util = GaugeMetricFamily("kgpu_pod_gpu_utilization_percent",
                                 "SM utilisation of a container's processes on a GPU, summed (in %).", labels=labels)
        memory = GaugeMetricFamily("kgpu_pod_gpu_memory_used_bytes",
                                   "GPU memory used by a container's processes.", labels=labels)
        for index, view in sorted(self.daemon.gpus.items()):
            sample = view.sample
            if sample is None or sample.lost:
                continue
            util_of: dict[PodRef, float] = {}
            memory_of: dict[PodRef, int] = {}
            for process in sample.processes:
                pod = pods.get(process.pid)
                if pod is None:
                    continue
                if process.sm_util_pct is not None:
                    util_of[pod] = util_of.get(pod, 0.0) + process.sm_util_pct
                if process.used_memory_bytes is not None:
                    memory_of[pod] = memory_of.get(pod, 0) + process.used_memory_bytes
            for family, values in ((util, util_of), (memory, memory_of)):
                for pod, value in sorted(values.items(), key=lambda kv: (kv[0].namespace, kv[0].pod, kv[0].container)):
                    family.add_metric([str(index), view.inventory.uuid, node, pod.pod, pod.namespace, pod.container],
                                      float(value))
        yield from (util, memory)

    def _store_families(self) -> Iterator[Metric]:
        """The store's recovery, the outbox bound and the log pruning (edge/store/)."""
        d = self.daemon
        store, recovery = d.store, d.store_recovery
        yield GaugeMetricFamily(
            "kgpu_store_recovered", "1 when this run started on a fresh store: the database file was broken and "
            "moved aside, or cannot be opened (then kgpu_store_persistent is 0).",
            value=1.0 if recovery is not None else 0.0)
        yield GaugeMetricFamily("kgpu_store_persistent", "0 while the daemon runs on a temporary store (its "
                                "database cannot be opened): nothing recorded survives a restart.",
                                value=0.0 if recovery is not None and not recovery.persistent else 1.0)
        yield GaugeMetricFamily("kgpu_store_repairs", "Problems found and repaired at open (a damaged last_seq, a "
                                "database older than its generation file: a new epoch).", value=len(store.notices))
        yield GaugeMetricFamily("kgpu_outbox_bytes", "Size of the events not yet acknowledged by the cloud.",
                                value=store.outbox_bytes())
        yield GaugeMetricFamily("kgpu_outbox_over_bound", "1 while the unacked events exceed outbox_max_events "
                                "or outbox_max_bytes.", value=1.0 if store.outbox_over_bound() else 0.0)
        yield CounterMetricFamily("kgpu_outbox_over_bound_events", "Events recorded while the outbox was over "
                                  "its bound (kept: nothing is dropped).", value=store.outbox_over_bound_events)
        yield CounterMetricFamily("kgpu_outbox_summaries_shrunk", "Offline summaries shrunk in place to keep the "
                                  "outbox within outbox_max_bytes.", value=store.summaries_shrunk)
        yield CounterMetricFamily("kgpu_store_log_rows_pruned", "Decisions and local event copies pruned by age "
                                  "or count (acked ones only).", value=d.log_rows_pruned)

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        node = d.node

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        pods_by_pid = self._pods_by_pid()
        if d.backend.vendor == "nvidia":  # an AMD or Intel node serves no DCGM family at all, not even empty
            yield from dcgm_families(node, self._dcgm_gpus(pods_by_pid))
        yield from self._per_pod(node, pods_by_pid)
        short_labels = ["gpu", "uuid", "Hostname", "vendor"]
        limit = gauge("kgpu_gpu_power_limit_watts", "Enforced power limit.", short_labels)
        throttle = gauge("kgpu_gpu_throttle_reasons", "NVML clocks-event reason bit mask.", short_labels)
        health = gauge("kgpu_gpu_health", "1 for the GPU's current health state.", [*short_labels, "state"])
        steps = gauge("kgpu_gpu_thermal_steps", "Thermal step-downs currently applied.", short_labels)
        saving = gauge("kgpu_gpu_power_saving_active", "1 while power saving lowers the limit.", short_labels)

        for index, view in sorted(d.gpus.items()):
            sample = view.sample
            short = [str(index), view.inventory.uuid, node, view.inventory.vendor]
            for state in Health:
                health.add_metric([*short, state.value], 1.0 if view.health.health is state else 0.0)
            steps.add_metric(short, view.policy_state.thermal_steps)
            saving.add_metric(short, 1.0 if view.policy_state.saving_active else 0.0)
            if sample is None or sample.lost:
                continue
            if sample.power_limit_w is not None:
                limit.add_metric(short, sample.power_limit_w)
            if sample.throttle_reasons is not None:
                throttle.add_metric(short, float(sample.throttle_reasons))
        yield from (limit, throttle, health, steps, saving)
        # every vendor's figures under one set of names (DCGM's are NVIDIA's only): shared with the
        # controller's fleet exporter; the index is the daemon's (a sample's index is the same)
        yield from figure_families(d.node, [DcgmGpu(view.inventory, view.sample) for _, view in sorted(d.gpus.items())])

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
        mig_energy = CounterMetricFamily(
            "kgpu_mig_device_joules", "GPU energy attributed to a MIG device: the board's, shared by compute "
            "slices (an estimate: NVML measures power per board).",
            labels=["gpu", "UUID", "GPU_I_PROFILE", "GPU_I_ID", "mig_uuid", "Hostname"])
        for index, mig, joules in d.partitions.mig_energy():
            parent = d.gpus[index].inventory.uuid if index in d.gpus else ""
            mig_energy.add_metric([str(index), parent, mig.profile, str(mig.gi_id), mig.uuid, node], joules)
        yield mig_energy
        partitioned = GaugeMetricFamily("kgpu_gpu_devices_advertised", "Devices a GPU is advertised as (itself, "
                                        "its time-slicing replicas or its MIG devices), by resource.",
                                        labels=["gpu", "uuid", "Hostname", "vendor", "resource"])
        advertised: dict[tuple[str, str], int] = {}
        for plugged in d.partitions.devices():
            slot = (plugged.gpu_uuid, plugged.resource)
            advertised[slot] = advertised.get(slot, 0) + 1
        index_of = {view.inventory.uuid: str(i) for i, view in d.gpus.items()}
        vendor_of = {view.inventory.uuid: view.inventory.vendor for view in d.gpus.values()}
        for (uuid, resource), count in sorted(advertised.items()):
            partitioned.add_metric([index_of.get(uuid, ""), uuid, node, vendor_of.get(uuid, ""), resource], count)
        yield partitioned
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
        yield from self._store_families()
        yield from d.pod_map.collect()
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
            yield CounterMetricFamily("kgpu_outbox_resent", "Event publishes of a seq this process had published "
                                      "before (after a reconnect or an ack timeout).", value=sync.events_resent)
            yield CounterMetricFamily("kgpu_outbox_ack_timeouts", "Times unacked events were sent again for want "
                                      "of an ack (edge/sync.py resend_wait).", value=sync.ack_timeouts)
            yield GaugeMetricFamily("kgpu_sync_cloud_behind_seconds", "How far behind the cloud was at its last ack "
                                    "(how late it came, or what it said): re-sends wait twice that longer.",
                                    value=sync.cloud_behind_s)
        info = GaugeMetricFamily("kgpu_build_info", "The daemon's version.",
                                 labels=["version", "backend", "driver_version"])
        backend = "sim" if d.settings.backend == "sim" else d.backend.backend  # auto: the one it chose
        info.add_metric([__version__, backend, d.driver_version or ""], 1.0)
        yield info


def make_registry(daemon: EdgeDaemon) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(daemon))
    registry.register(KeplerCollector(daemon))  # Kepler's GPU families: edge/kepler_metrics.py
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text format, with dcgm-exporter's counters under their own names (shared/dcgm.py)."""
    return exposition(registry.collect())
