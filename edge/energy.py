"""GPU energy per pod, the way Kepler splits it: pure accounting over samples, no I/O.

Each GPU's energy over an interval is the difference of its energy counter. Part of it is idle
energy (what the GPU draws with nothing on it; a node-level cost no pod caused); the rest is
active energy, shared among the processes on the GPU by their SM utilisation. Processes that map
to no pod (host processes) get Kepler's "system" share, `unattributed_joules`. Every joule of a
counted interval lands in exactly one of idle, a pod, or unattributed, so the three always add
up to what the GPUs' counters moved by (`gpu_joules`).
"""

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edge.pods import PodRef
from shared.gpu import GpuSample
from shared.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class PodKey:
    """What a Prometheus series is labelled with; processes of one container sum up here."""

    namespace: str
    pod: str
    container: str


@dataclass
class _Baseline:
    ts: float
    energy_mj: int | None


class EnergyAccountant:
    """Cumulative energy per pod, idle and unattributed, fed one round of samples at a time.

    All counters only grow, so they can be exported as Prometheus counters as they are.

    Idle power is learned, not configured: per GPU, the lowest power_w seen in a sample with no
    process on it. Until a GPU has been seen empty it has no entry in `idle_power_w` and its idle
    share of busy intervals is 0, so pods carry all of it; a GPU that is never empty never
    learns one. Intervals with no process go wholly to idle whatever is learned.
    """

    def __init__(self, max_power_interval_s: float = 60.0) -> None:
        """`max_power_interval_s`: the longest interval integrated from power_w when a GPU has no
        energy counter; one power reading says little about minutes it did not see."""
        self.max_power_interval_s = max_power_interval_s
        self.pod_joules: dict[PodKey, float] = {}
        self.idle_joules: float = 0.0
        self.unattributed_joules: float = 0.0
        self.gpu_joules: dict[str, float] = {}  # per GPU uuid: energy counted (= the split total)
        self.idle_power_w: dict[str, float] = {}
        self.pod_power_w: dict[PodKey, float] = {}  # average power over the last update only
        self._baselines: dict[str, _Baseline] = {}
        self.pod_last_active: dict[PodKey, float] = {}  # monotonic time of the pod's last share

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

        power: dict[PodKey, float] = {}
        for sample in samples:
            if sample.lost:
                continue
            self._learn_idle(sample)
            interval = self._interval(sample)
            if interval is None:
                continue
            joules, dt = interval
            for key, share in self._split(sample, joules, dt, lookup).items():
                power[key] = power.get(key, 0.0) + share / dt
        self.pod_power_w = power

    def _learn_idle(self, sample: GpuSample) -> None:
        if not sample.processes and sample.power_w is not None and sample.power_w >= 0:
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
        joules: float,
        dt: float,
        lookup: Callable[[int], PodRef | None],
    ) -> dict[PodKey, float]:
        """Book `joules` of one GPU to idle, pods and unattributed; return the pods' shares."""
        self.gpu_joules[sample.uuid] = self.gpu_joules.get(sample.uuid, 0.0) + joules
        processes = sample.processes
        if not processes:
            self.idle_joules += joules
            return {}
        idle = min(joules, self.idle_power_w.get(sample.uuid, 0.0) * dt)
        active = joules - idle
        self.idle_joules += idle

        utils = [_usable(p.sm_util_pct) for p in processes]
        total_util = math.fsum(utils)
        if total_util > 0:
            weights = [u / total_util for u in utils]
        else:
            weights = [1.0 / len(processes)] * len(processes)

        shares: dict[PodKey, float] = {}
        for process, weight in zip(processes, weights, strict=True):
            share = active * weight
            ref = lookup(process.pid)
            if ref is None:
                self.unattributed_joules += share
                continue
            key = PodKey(ref.namespace, ref.pod, ref.container)
            shares[key] = shares.get(key, 0.0) + share
        now = time.monotonic()
        for key, share in shares.items():
            self.pod_joules[key] = self.pod_joules.get(key, 0.0) + share
            self.pod_last_active[key] = now
        return shares

    def forget_idle_pods(self, idle_for_s: float, now: float | None = None) -> int:
        """Drop the counters of pods with no GPU energy for `idle_for_s` (monotonic seconds).

        Without this a node running many short jobs would keep a counter, and a Prometheus
        series, for every pod it ever ran. Prometheus keeps what it scraped; a pod that comes back
        starts from 0, which `increase()`/`rate()` read as a counter reset."""
        cutoff = (time.monotonic() if now is None else now) - idle_for_s
        stale = [key for key, seen in self.pod_last_active.items() if seen < cutoff]
        for key in stale:
            self.pod_joules.pop(key, None)
            self.pod_power_w.pop(key, None)
            del self.pod_last_active[key]
        return len(stale)

    def snapshot(self) -> dict:
        """JSON-ready view for the API: counters in joules, pods largest first."""
        pods = sorted(self.pod_joules.items(), key=lambda kv: (-kv[1], kv[0].namespace, kv[0].pod))
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
            "total_joules": math.fsum(self.gpu_joules.values()),
            "gpu_joules": dict(self.gpu_joules),
            "idle_power_w": dict(self.idle_power_w),
        }


def _usable(util: float | None) -> float:
    """A utilisation to weigh by: None, NaN and negatives count as zero."""
    if util is None or not util > 0 or math.isinf(util):
        return 0.0
    return util
