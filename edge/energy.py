"""GPU energy per GPU, pod, container and process, the way Kepler splits it: pure accounting.

Each GPU's energy over an interval is the difference of its energy counter. Per GPU, part of it
is **idle** energy: what the GPU draws when it does nothing, a node-level cost no pod caused. The
rest is **active** energy, shared among the processes on the GPU by their SM utilisation.
Processes that map to no pod (host processes), and a busy GPU on which NVML lists no process at
all, give Kepler's "system" share, `unattributed_joules`: active, but nobody's. Every joule of a
counted interval lands in exactly one of idle, a pod, or unattributed, per GPU, so the three
always add up to what that GPU's counter moved by (`gpus[uuid].joules`).

Idle as Kepler means it (`internal/device/gpu/nvidia/collector.go`): a GPU's idle power is its
lowest power reading while no process runs on it, learned per GPU; until one is seen it is 0 and
all energy is active. kgpu learns it only from readings that are idle by every sign NVML gives
(no process *and* GPU utilisation 0 or unknown), so a GPU kept busy by something NVML does not
list never teaches a busy power as idle. An interval in which the GPU idles is idle energy
entirely; a busy interval books `idle power x seconds` (at most the interval's energy) as idle
and the rest as active.
"""

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from edge.pods import PodRef
from shared.gpu import GpuSample
from shared.logs import get_logger

log = get_logger(__name__)

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class PodKey:
    """What a `kgpu_pod_gpu_joules_total` series is labelled with; a container's processes sum here."""

    namespace: str
    pod: str
    container: str


@dataclass(frozen=True)
class KeplerPodKey:
    """A pod as Kepler labels it (`pod_id`, `pod_name`, `pod_namespace`)."""

    uid: str
    namespace: str
    pod: str


@dataclass(frozen=True)
class ProcessKey:
    """A GPU process as Kepler labels it; `pod` is None for a host process."""

    pid: int
    pod: PodRef | None


@dataclass
class GpuEnergy:
    """One GPU's counters since the daemon started, and its power at its latest sample.

    `joules` = `idle_joules` + `attributed_joules` + `unattributed_joules`; active is the last two.
    `power_w` is the latest reading (the interval's average when the GPU reports no power);
    `idle_power_w` the idle power in force then: the GPU's whole power while it idles, its learned
    idle power (0 until learned, never above `power_w`) while it is busy.
    """

    uuid: str
    index: int
    joules: float = 0.0
    idle_joules: float = 0.0
    attributed_joules: float = 0.0
    unattributed_joules: float = 0.0
    power_w: float | None = None
    idle_power_w: float = 0.0
    busy: bool = False

    @property
    def active_joules(self) -> float:
        return self.attributed_joules + self.unattributed_joules

    @property
    def active_power_w(self) -> float | None:
        return None if self.power_w is None else max(self.power_w - self.idle_power_w, 0.0)


class Ledger(Generic[K]):
    """Cumulative joules per key, the average power of the last round, and when each last had a share."""

    def __init__(self) -> None:
        self.joules: dict[K, float] = {}
        self.power_w: dict[K, float] = {}  # average power over the last update only
        self.last_active: dict[K, float] = {}  # monotonic time of the key's last share

    def add(self, key: K, joules: float, watts: float, now: float) -> None:
        self.joules[key] = self.joules.get(key, 0.0) + joules
        self.power_w[key] = self.power_w.get(key, 0.0) + watts
        self.last_active[key] = now

    def forget(self, cutoff: float) -> int:
        stale = [key for key, seen in self.last_active.items() if seen < cutoff]
        for key in stale:
            self.joules.pop(key, None)
            self.power_w.pop(key, None)
            del self.last_active[key]
        return len(stale)


@dataclass
class _Baseline:
    ts: float
    energy_mj: int | None


@dataclass
class _Shares:
    """One round's active energy and power per process (the other levels are sums of it)."""

    joules: dict[ProcessKey, float] = field(default_factory=dict)
    watts: dict[ProcessKey, float] = field(default_factory=dict)


class EnergyAccountant:
    """Cumulative energy per GPU, pod, container and process, fed one round of samples at a time.

    All counters only grow, so they can be exported as Prometheus counters as they are.
    """

    def __init__(self, max_power_interval_s: float = 60.0) -> None:
        """`max_power_interval_s`: the longest interval integrated from power_w when a GPU has no
        energy counter; one power reading says little about minutes it did not see."""
        self.max_power_interval_s = max_power_interval_s
        self.gpus: dict[str, GpuEnergy] = {}  # by GPU uuid
        self.idle_power_w: dict[str, float] = {}  # learned, by GPU uuid: lowest idle reading
        self.pods: Ledger[PodKey] = Ledger()  # kgpu_pod_gpu_joules_total (a container, by names)
        self.kepler_pods: Ledger[KeplerPodKey] = Ledger()
        self.containers: Ledger[PodRef] = Ledger()
        self.processes: Ledger[ProcessKey] = Ledger()
        self._baselines: dict[str, _Baseline] = {}
        self._counted: set[str] = set()  # GPUs with at least one counted interval

    # the kgpu_* view, kept for its API and metrics
    @property
    def pod_joules(self) -> dict[PodKey, float]:
        return self.pods.joules

    @property
    def pod_power_w(self) -> dict[PodKey, float]:
        return self.pods.power_w

    @property
    def pod_last_active(self) -> dict[PodKey, float]:
        return self.pods.last_active

    @property
    def idle_joules(self) -> float:
        return math.fsum(g.idle_joules for g in self.gpus.values())

    @property
    def unattributed_joules(self) -> float:
        return math.fsum(g.unattributed_joules for g in self.gpus.values())

    @property
    def gpu_joules(self) -> dict[str, float]:
        """Energy counted per GPU uuid (= its split total); only GPUs with a counted interval."""
        return {uuid: g.joules for uuid, g in self.gpus.items() if g.joules or uuid in self._counted}

    def idle_power_for(self, sample: GpuSample) -> float | None:
        """The idle power in force at `sample` (None without a power reading): all of its power
        while the GPU idles, its learned idle power (0 until learned, at most the reading) while busy."""
        if sample.lost or sample.power_w is None or not sample.power_w >= 0:  # NaN too
            return None
        if not _busy(sample):
            return sample.power_w
        return min(self.idle_power_w.get(sample.uuid, 0.0), sample.power_w)

    def with_split(self, sample: GpuSample) -> GpuSample:
        """`sample` with its GPU's idle/active split (`idle_power_w`, `idle_joules`, `active_joules`),
        as the telemetry carries it to the controller's fleet exporter; unchanged for a GPU not
        yet accounted. Call after `update` with the same round."""
        gpu = self.gpus.get(sample.uuid)
        if gpu is None:
            return sample
        return sample.model_copy(update={"idle_power_w": self.idle_power_for(sample),
                                         "idle_joules": gpu.idle_joules, "active_joules": gpu.active_joules})

    def update(
        self, samples: Sequence[GpuSample], resolve: Callable[[int], PodRef | None]
    ) -> None:
        """Account one round of samples (any number of GPUs) since the previous round.

        A GPU's first sample only sets its baseline. A lost sample is ignored and the baseline
        kept, so the next good sample's counter difference still counts the energy of the gap.
        A counter that went backwards (driver reload, GPU reset) re-baselines without counting.
        Without an energy counter, power_w × dt stands in. `resolve` is called once per PID
        per round; if it raises, the process counts as unattributed.
        """
        resolved: dict[int, PodRef | None] = {}

        def lookup(pid: int) -> PodRef | None:
            if pid not in resolved:
                try:
                    resolved[pid] = resolve(pid)
                except Exception:
                    log.exception("resolving a GPU process failed", extra={"pid": pid})
                    resolved[pid] = None
            return resolved[pid]

        shares = _Shares()
        for sample in samples:
            if sample.lost:
                continue
            gpu = self.gpus.get(sample.uuid)
            if gpu is None:
                gpu = self.gpus[sample.uuid] = GpuEnergy(sample.uuid, sample.index)
            gpu.index = sample.index
            busy = _busy(sample)
            if not busy:
                self._learn_idle(sample)
            interval = self._interval(sample)
            joules, dt = interval if interval is not None else (0.0, 0.0)
            average = joules / dt if interval is not None and dt > 0 else None
            gpu.busy = busy
            idle_w = self.idle_power_for(sample)
            if idle_w is not None:
                gpu.power_w, gpu.idle_power_w = sample.power_w, idle_w
            else:  # no reading: the interval's average stands in
                gpu.power_w = average
                gpu.idle_power_w = 0.0 if average is None else (
                    min(self.idle_power_w.get(sample.uuid, 0.0), average) if busy else average)
            if interval is not None:
                self._counted.add(sample.uuid)
                self._split(sample, gpu, busy, joules, dt, lookup, shares)
        self._book(shares)

    def _learn_idle(self, sample: GpuSample) -> None:
        if sample.power_w is not None and sample.power_w >= 0:
            known = self.idle_power_w.get(sample.uuid)
            if known is None or sample.power_w < known:
                self.idle_power_w[sample.uuid] = sample.power_w

    def _interval(self, sample: GpuSample) -> tuple[float, float] | None:
        """(joules, seconds) since this GPU's previous sample, moving the baseline; None: skip."""
        previous = self._baselines.get(sample.uuid)
        self._baselines[sample.uuid] = _Baseline(sample.ts, sample.energy_mj)
        if previous is None:
            return None
        dt = sample.ts - previous.ts
        if not dt > 0:
            log.debug("GPU sample not newer than the last, skipped", extra={"gpu": sample.uuid})
            return None
        if sample.energy_mj is not None and previous.energy_mj is not None:
            delta_mj = sample.energy_mj - previous.energy_mj
            if delta_mj < 0:
                log.warning(
                    "GPU energy counter went backwards (driver reload?); re-baselined",
                    extra={
                        "gpu": sample.uuid,
                        "previous_mj": previous.energy_mj,
                        "now_mj": sample.energy_mj,
                    },
                )
                return None
            return delta_mj / 1000.0, dt
        if sample.power_w is not None and sample.power_w >= 0 and dt <= self.max_power_interval_s:
            return sample.power_w * dt, dt
        return None

    def _split(
        self,
        sample: GpuSample,
        gpu: GpuEnergy,
        busy: bool,
        joules: float,
        dt: float,
        lookup: Callable[[int], PodRef | None],
        shares: _Shares,
    ) -> None:
        """Book `joules` of one GPU to its idle, unattributed and the processes' shares."""
        gpu.joules += joules
        if not busy:
            gpu.idle_joules += joules
            return
        idle = min(joules, self.idle_power_w.get(sample.uuid, 0.0) * dt)
        active = joules - idle
        gpu.idle_joules += idle
        processes = sample.processes
        if not processes:  # busy, but NVML lists nobody: Kepler's "system" share
            gpu.unattributed_joules += active
            return

        utils = [_usable(p.sm_util_pct) for p in processes]
        total_util = math.fsum(utils)
        if total_util > 0:
            weights = [u / total_util for u in utils]
        else:
            weights = [1.0 / len(processes)] * len(processes)
        for process, weight in zip(processes, weights, strict=True):
            share = active * weight
            ref = lookup(process.pid)
            if ref is None:
                gpu.unattributed_joules += share
            else:
                gpu.attributed_joules += share
            key = ProcessKey(process.pid, ref)
            shares.joules[key] = shares.joules.get(key, 0.0) + share
            shares.watts[key] = shares.watts.get(key, 0.0) + share / dt

    def _book(self, shares: _Shares) -> None:
        """Add one round's process shares to every level; power is the last round's only."""
        now = time.monotonic()
        for ledger in (self.pods, self.kepler_pods, self.containers, self.processes):
            ledger.power_w.clear()
        for key, joules in shares.joules.items():
            watts = shares.watts[key]
            self.processes.add(key, joules, watts, now)
            ref = key.pod
            if ref is None:
                continue
            self.containers.add(ref, joules, watts, now)
            self.kepler_pods.add(KeplerPodKey(ref.pod_uid, ref.namespace, ref.pod), joules, watts, now)
            self.pods.add(PodKey(ref.namespace, ref.pod, ref.container), joules, watts, now)

    def forget_idle_pods(self, idle_for_s: float, now: float | None = None) -> int:
        """Drop the counters of pods, containers and processes with no GPU energy for
        `idle_for_s` (monotonic seconds); returns how many `kgpu_pod_gpu_joules_total` went.

        Without this a node running many short jobs would keep a counter, and a Prometheus
        series, for every pod (and PID) it ever ran. Prometheus keeps what it scraped; one that
        comes back starts from 0, which `increase()`/`rate()` read as a counter reset."""
        cutoff = (time.monotonic() if now is None else now) - idle_for_s
        for ledger in (self.kepler_pods, self.containers, self.processes):
            ledger.forget(cutoff)
        return self.pods.forget(cutoff)

    def snapshot(self) -> dict:
        """JSON-ready view for the API: counters in joules, pods largest first."""
        pods = sorted(self.pod_joules.items(), key=lambda kv: (-kv[1], kv[0].namespace, kv[0].pod))
        gpu_joules = self.gpu_joules
        return {
            "pods": [
                {
                    "namespace": key.namespace,
                    "pod": key.pod,
                    "container": key.container,
                    "joules": joules,
                    "power_w": self.pod_power_w.get(key, 0.0),
                }
                for key, joules in pods
            ],
            "idle_joules": self.idle_joules,
            "unattributed_joules": self.unattributed_joules,
            "total_joules": math.fsum(gpu_joules.values()),
            "gpu_joules": gpu_joules,
            "idle_power_w": dict(self.idle_power_w),
        }


def _busy(sample: GpuSample) -> bool:
    """Work on the GPU by any sign NVML gives: a process, or utilisation above 0."""
    util = sample.utilization_pct
    return bool(sample.processes) or (util is not None and util > 0)


def _usable(util: float | None) -> float:
    """A utilisation to weigh by: None, NaN and negatives count as zero."""
    if util is None or not util > 0 or math.isinf(util):
        return 0.0
    return util
