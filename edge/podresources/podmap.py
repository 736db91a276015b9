"""GpuPodMap: which pods use which GPU, refreshed once a cycle.

Two sources, best first:

- the kubelet's pod-resources API (`List`): every device allocated to every pod, running or not,
  of every resource (whole GPUs, time-slicing replicas, MIG devices; NVIDIA's plugin or kgpu's),
  folded into the physical GPU. Authoritative: a pod whose process has not started yet, or has
  crashed, still holds its GPU.
- NVML's processes on each GPU -> their cgroup -> the pod (edge/pods.py's PodResolver): only pods
  running GPU work now. A GPU that could not be read this cycle (lost) keeps its last known pods,
  because a fault must still know what ran there.

Neither source ever raises into the daemon: a failure is counted, logged once per change of
state, and the map falls back (or keeps what it knew).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edge.deviceplugin.devices import REPLICA_SEPARATOR
from edge.podresources.client import PodResourcesUnavailable, list_pod_devices
from edge.pods import PodRef
from shared.logs import get_logger

log = get_logger(__name__)

Source = Literal["pod-resources", "processes"]
SOURCES: tuple[Source, ...] = ("pod-resources", "processes")
_LEGACY_MIG_PREFIX = "MIG-GPU-"  # pre-R470 MIG device IDs: MIG-GPU-<uuid>/<gi>/<ci>


def gpu_of(device_id: str, devices: Mapping[str, str], gpus: Iterable[str] = ()) -> str | None:
    """The physical GPU a device ID of the pod-resources API stands for; None for a device that is
    not one of this node's GPUs (another resource: a NIC, an FPGA, a GPU we do not know).

    `devices` maps every ID the node advertises (GPU UUID, MIG device UUID, replica) to its GPU;
    a time-slicing replica `<id>::<n>` folds into whatever `<id>` folds into, and a GPU UUID in
    `gpus` stands for itself even when no plugin advertises it (NVIDIA's plugin, kgpu's off)."""
    known = set(gpus)
    parent = devices.get(device_id)
    if parent is not None:
        return parent
    base = device_id.split(REPLICA_SEPARATOR, 1)[0]
    parent = devices.get(base)
    if parent is not None:
        return parent
    if base in known:
        return base
    if base.startswith(_LEGACY_MIG_PREFIX) and "/" in base:
        legacy_parent = base[len("MIG-"):].split("/", 1)[0]
        if legacy_parent in known or legacy_parent in devices.values():
            return legacy_parent
    return None


def pods_by_gpu(pods: Iterable[tuple[str, Iterable[str]]], devices: Mapping[str, str],
                gpus: Iterable[str] = ()) -> dict[str, set[str]]:
    """GPU UUID -> the pods ("namespace/name") holding any of its devices, from (pod, device IDs)."""
    known = set(gpus) | set(devices.values())
    found: dict[str, set[str]] = {}
    for pod, device_ids in pods:
        for device_id in device_ids:
            gpu = gpu_of(device_id, devices, known)
            if gpu is not None:
                found.setdefault(gpu, set()).add(pod)
    return found


def pod_name(ref: PodRef) -> str:
    """"namespace/name"; without a pod list the resolver gives "unknown/<pod UID>"."""
    return f"{ref.namespace}/{ref.pod}"


class GpuPodMap:
    """Pods per GPU for the status (GpuSummary.pods) and the remediation ladder (who to drain)."""

    def __init__(self, socket: Path | None, resolve_pod: Callable[[int], PodRef | None] | None, *,
                 timeout_s: float = 5.0) -> None:
        self.socket = socket
        self.resolve_pod = resolve_pod
        self.timeout_s = timeout_s
        self._pods: dict[str, tuple[str, ...]] = {}
        self._source: Source | None = None
        # why pod-resources was not used, per refresh: "absent", "unavailable", "timeout", ...
        self.fallbacks: Counter[str] = Counter()
        # reads that failed outright, so the map kept what it knew: "pod-resources", "processes"
        self.errors: Counter[str] = Counter()
        self._state: str | None = None  # the situation last logged, to log once per change

    # ---- reads -----------------------------------------------------------------------------------

    def pods_of(self, gpu_uuid: str) -> list[str]:
        """The pods using this GPU (whole, one of its MIG devices, or a replica), sorted."""
        return list(self._pods.get(gpu_uuid, ()))

    def snapshot(self) -> dict[str, list[str]]:
        """GPU UUID -> its pods, for every GPU the map knows (GPUs without pods included)."""
        return {gpu: list(pods) for gpu, pods in sorted(self._pods.items())}

    @property
    def source(self) -> Source | None:
        """Where the map came from at the last refresh that produced one; None: nothing known."""
        return self._source

    # ---- the refresh -----------------------------------------------------------------------------

    async def refresh(self, devices: Mapping[str, str], processes: Mapping[str, Sequence[int] | None],
                      resolved: Mapping[int, PodRef | None] | None = None) -> None:
        """Read the pods of every GPU again. `devices`: every device ID the node advertises or could
        (GPU UUID, MIG device UUID, replica) -> its GPU UUID; `processes`: GPU UUID -> the PIDs on
        it now, or None when the GPU could not be read this cycle (its last known pods are kept);
        `resolved`: PIDs the caller resolved to their pods this cycle already (the daemon's energy
        accounting), not read from /proc again. Never raises; blocking reads run in a thread,
        bounded by timeout_s."""
        gpus = set(devices.values()) | set(processes)
        reason: str | None = "disabled"
        detail = "no pod-resources socket configured"
        if self.socket is not None:
            try:
                listed = await asyncio.wait_for(asyncio.to_thread(self._list, self.socket),
                                                self.timeout_s + 1.0)
            except TimeoutError:
                reason, detail = "timeout", f"List took longer than {self.timeout_s:g}s"
            except PodResourcesUnavailable as exc:
                reason, detail = exc.reason, exc.detail
            except Exception as exc:  # noqa: BLE001 - whatever it is, the daemon goes on
                reason, detail = "error", repr(exc)
            else:
                found = pods_by_gpu(listed, devices, gpus)
                self._pods = {gpu: tuple(sorted(found.get(gpu, ()))) for gpu in sorted(gpus)}
                self._source = "pod-resources"
                self._note("pod-resources", None, "")
                return
            self.fallbacks[reason] += 1
            if reason not in ("absent", "disabled"):
                self.errors["pod-resources"] += 1
        await self._from_processes(gpus, processes, reason, detail, resolved or {})

    def _list(self, socket: Path) -> list[tuple[str, tuple[str, ...]]]:
        return [(f"{p.namespace}/{p.name}", tuple(device_id for _, device_id in p.devices))
                for p in list_pod_devices(socket, self.timeout_s)]

    async def _from_processes(self, gpus: set[str], processes: Mapping[str, Sequence[int] | None],
                              reason: str | None, detail: str, resolved: Mapping[int, PodRef | None]) -> None:
        if self.resolve_pod is None:
            self._note("none", reason, detail)
            return
        readable = {gpu: list(pids) for gpu, pids in processes.items() if pids is not None}
        known = all(pid in resolved for pids in readable.values() for pid in pids)
        resolve = resolved.__getitem__ if known else self.resolve_pod

        def names() -> dict[str, set[str]]:
            found: dict[str, set[str]] = {}
            for gpu, pids in readable.items():
                refs = (resolve(pid) for pid in pids)
                found[gpu] = {pod_name(ref) for ref in refs if ref is not None}
            return found

        try:  # every PID resolved already: no /proc read, no thread
            found = names() if known else await asyncio.wait_for(asyncio.to_thread(names), self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - a timeout or a resolver bug: keep what we knew
            self.errors["processes"] += 1
            why = "timeout" if isinstance(exc, TimeoutError) else repr(exc)
            self._note("processes-failed", reason, f"{detail}; processes -> pods failed: {why}")
            return
        pods: dict[str, tuple[str, ...]] = {}
        for gpu in sorted(gpus):
            if gpu in found:
                pods[gpu] = tuple(sorted(found[gpu]))
            else:  # not read this cycle (lost) or not reported: the last known pods stay
                pods[gpu] = self._pods.get(gpu, ())
        self._pods = pods
        self._source = "processes"
        self._note("processes", reason, detail)

    def _note(self, source: str, reason: str | None, detail: str) -> None:
        """Log where the map comes from, once per change of that situation."""
        state = f"{source}:{reason}"
        if state == self._state:
            return
        first = self._state is None
        self._state = state
        extra = {"source": source, "reason": reason, "detail": detail, "socket": str(self.socket)}
        if source == "pod-resources":
            log.info("GPU pod map from the kubelet's pod-resources API", extra=extra)
        elif reason in (None, "absent", "disabled") and source == "processes":
            level = "info" if first or reason == "disabled" else "warning"
            getattr(log, level)("GPU pod map from NVML processes (pods running GPU work only)", extra=extra)
        else:
            log.warning("GPU pod map degraded", extra=extra)

    # ---- metrics ---------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """kgpu_pod_map_fallbacks_total{reason}, kgpu_pod_map_errors_total{source} and the source."""
        fallbacks = CounterMetricFamily(
            "kgpu_pod_map_fallbacks", "Refreshes of the GPU pod map that could not use the kubelet's "
            "pod-resources API, by reason.", labels=["reason"])
        for reason, count in sorted(self.fallbacks.items()):
            fallbacks.add_metric([reason], count)
        yield fallbacks
        errors = CounterMetricFamily(
            "kgpu_pod_map_errors", "Reads of the GPU pod map that failed, by source.", labels=["source"])
        for source, count in sorted(self.errors.items()):
            errors.add_metric([source], count)
        yield errors
        current = GaugeMetricFamily("kgpu_pod_map_source", "Where the GPU pod map comes from (1 = this one).",
                                    labels=["source"])
        for source in SOURCES:
            current.add_metric([source], 1.0 if self._source == source else 0.0)
        yield current

