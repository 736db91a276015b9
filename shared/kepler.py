"""Kepler's GPU metric families, built from plain figures: no I/O, no daemon.

Names, types, help texts and labels are Kepler's own (v0.11.4, `internal/exporter/prometheus/
collector/power_collector.go` and `gpuinfo.go`; the list with its source is kept in
`deploy/reference/kepler/gpu-metrics.json`). The edge serves them from its energy accountant
(`edge/kepler_metrics.py`); anything holding the same figures (the controller, from stored
samples) can serve the same series with this builder.

Per GPU are the node families (`gpu`, `gpu_uuid`, `gpu_name`, `vendor`); the pod, container and
process families carry no GPU label, as in Kepler: a pod on two GPUs is one series. Kepler's
constant label `node_name` is on every series. As in Kepler, a pod, container or process series
is only written while its value is above 0. With `hostname` (the controller's fleet exporter, one
target for every node) every series also carries dcgm-exporter's `Hostname` = the node, the label
an edge scrape adds from the pod's node name, so that rules and dashboards select nodes alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

NODE_NAME = "node_name"
GPU_LABELS = ("gpu", "gpu_uuid", "gpu_name", "vendor")
POD_LABELS = ("pod_id", "pod_name", "pod_namespace", "state")
CONTAINER_LABELS = ("container_id", "container_name", "runtime", "state", "pod_id")
PROCESS_LABELS = ("pid", "comm", "exe", "type", "state", "container_id", "vm_id")

# name -> (type, help, labels); exactly Kepler's, in Kepler's order of declaration
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "kepler_node_gpu_info": ("gauge", "GPU device information for mapping index to UUID/name", GPU_LABELS),
    "kepler_node_gpu_watts": ("gauge", "Total GPU power consumption in watts", GPU_LABELS),
    "kepler_node_gpu_idle_watts": ("gauge", "GPU idle power (auto-detected minimum) in watts", GPU_LABELS),
    "kepler_node_gpu_active_watts": ("gauge", "GPU active power (total - idle) in watts", GPU_LABELS),
    "kepler_node_gpu_joules_total": ("counter", "Energy consumption of gpu at node level in joules", GPU_LABELS),
    "kepler_node_gpu_active_joules_total": (
        "counter", "Energy consumption of gpu in active state at node level in joules", GPU_LABELS),
    "kepler_node_gpu_idle_joules_total": (
        "counter", "Energy consumption of gpu in idle state at node level in joules", GPU_LABELS),
    "kepler_pod_gpu_joules_total": ("counter", "Energy consumption of gpu at pod level in joules", POD_LABELS),
    "kepler_pod_gpu_watts": ("gauge", "Power consumption of gpu at pod level in watts", POD_LABELS),
    "kepler_container_gpu_joules_total": (
        "counter", "Energy consumption of gpu at container level in joules", CONTAINER_LABELS),
    "kepler_container_gpu_watts": ("gauge", "Power consumption of gpu at container level in watts", CONTAINER_LABELS),
    "kepler_process_gpu_joules_total": (
        "counter", "Energy consumption of gpu at process level in joules", PROCESS_LABELS),
    "kepler_process_gpu_watts": ("gauge", "Power consumption of gpu at process level in watts", PROCESS_LABELS),
}

RUNNING = "running"  # Kepler's `state` of a live workload ("terminated" once it has gone)
UNKNOWN_RUNTIME = "unknown"  # Kepler's resource.UnknownRuntime


@dataclass(frozen=True)
class KeplerGpu:
    """One GPU: counters since the exporter started, and watts at its latest reading.

    `joules` = `idle_joules` + `active_joules`. A watts figure of None (no reading, or the GPU's
    last sample lost) leaves the GPU out of the three watts families."""

    index: int
    uuid: str
    name: str
    joules: float
    idle_joules: float
    active_joules: float
    watts: float | None = None
    idle_watts: float | None = None
    active_watts: float | None = None
    vendor: str = "nvidia"


@dataclass(frozen=True)
class KeplerPod:
    uid: str
    name: str
    namespace: str
    joules: float
    watts: float = 0.0
    state: str = RUNNING


@dataclass(frozen=True)
class KeplerContainer:
    container_id: str
    name: str
    pod_uid: str
    joules: float
    watts: float = 0.0
    runtime: str = UNKNOWN_RUNTIME
    state: str = RUNNING


@dataclass(frozen=True)
class KeplerProcess:
    """`type` is Kepler's process type: "container" for a process in a pod, else "regular"."""

    pid: int
    comm: str
    exe: str
    joules: float
    watts: float = 0.0
    container_id: str = ""
    type: str = "regular"
    vm_id: str = ""
    state: str = RUNNING


HOSTNAME = "Hostname"
NODE_FAMILIES = tuple(name for name in FAMILIES if name.startswith("kepler_node_gpu_"))


def _family(name: str, extra: Sequence[str] = ()) -> CounterMetricFamily | GaugeMetricFamily:
    kind, doc, labels = FAMILIES[name]
    if kind == "counter":
        return CounterMetricFamily(name, doc, labels=[*labels, NODE_NAME, *extra])
    return GaugeMetricFamily(name, doc, labels=[*labels, NODE_NAME, *extra])


def kepler_families(
    node: str,
    gpus: Iterable[KeplerGpu],
    pods: Iterable[KeplerPod] = (),
    containers: Iterable[KeplerContainer] = (),
    processes: Iterable[KeplerProcess] = (),
    *,
    hostname: bool = False,
    only: Sequence[str] = tuple(FAMILIES),
) -> list[Metric]:
    """Every Kepler GPU family (each one, even when it has no series yet), for one node; with
    `only`, those families (e.g. `NODE_FAMILIES`), in Kepler's order. `hostname`: every series
    also carries `Hostname` = `node`."""
    extra = (node,) if hostname else ()
    fam = {name: _family(name, (HOSTNAME,) if hostname else ()) for name in FAMILIES if name in only}

    def add(name: str, labels: Sequence[str], value: float) -> None:
        if name in fam:
            fam[name].add_metric([*labels, node, *extra], value)

    for g in sorted(gpus, key=lambda g: g.index):
        labels: tuple[str, ...] = (str(g.index), g.uuid, g.name, g.vendor)
        add("kepler_node_gpu_info", labels, 1.0)
        for name, value in (("kepler_node_gpu_watts", g.watts), ("kepler_node_gpu_idle_watts", g.idle_watts),
                            ("kepler_node_gpu_active_watts", g.active_watts)):
            if value is not None:
                add(name, labels, value)
        add("kepler_node_gpu_joules_total", labels, g.joules)
        add("kepler_node_gpu_active_joules_total", labels, g.active_joules)
        add("kepler_node_gpu_idle_joules_total", labels, g.idle_joules)
    for p in sorted(pods, key=lambda p: (p.namespace, p.name, p.uid)):
        labels = (p.uid, p.name, p.namespace, p.state)
        _add_positive(add, "kepler_pod_gpu", labels, p.joules, p.watts)
    for c in sorted(containers, key=lambda c: (c.pod_uid, c.name, c.container_id)):
        labels = (c.container_id, c.name, c.runtime, c.state, c.pod_uid)
        _add_positive(add, "kepler_container_gpu", labels, c.joules, c.watts)
    for pr in sorted(processes, key=lambda pr: (pr.pid, pr.container_id)):
        labels = (str(pr.pid), pr.comm, pr.exe, pr.type, pr.state, pr.container_id, pr.vm_id)
        _add_positive(add, "kepler_process_gpu", labels, pr.joules, pr.watts)
    return list(fam.values())


def _add_positive(
    add: Callable[[str, Sequence[str], float], None], prefix: str, labels: Sequence[str], joules: float, watts: float
) -> None:
    """Kepler writes a workload's series only while its value is above 0."""
    if watts > 0:
        add(f"{prefix}_watts", labels, watts)
    if joules > 0:
        add(f"{prefix}_joules_total", labels, joules)
