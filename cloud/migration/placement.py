"""Where GPU work moved off a failing node should go: a pure scorer, no I/O, no clock.

`score(pod, candidates)` returns every candidate, the acceptable ones first (best first) and then
the rejected ones, each with the reasons, so a migration's record can say why a node was chosen
and why the others were not. `order_pods` says which pod moves first; `assign` places several
pods one after another, each taking GPUs the next one can no longer have.

Hard rules (a candidate failing any is rejected, every failed rule is listed):

* not the failing node itself, online in the fleet store (its kgpu edge reports), not cordoned;
* every NoSchedule/NoExecute taint tolerated by the pod;
* the pod's `nodeSelector` and required node affinity (`matchExpressions` with In, NotIn, Exists,
  DoesNotExist, Gt, Lt; terms ORed, expressions ANDed) hold on the node's labels;
* GPUs of the vendor the pod asks for: the whole-GPU resource of its request (`GPU_RESOURCES`:
  `nvidia.com/gpu` for NVIDIA incl. Jetson, `amd.com/gpu`, `gpu.intel.com/i915`, `gpu.intel.com/xe`)
  is the one the candidate GPU's device plugin advertises (its status's `resource_name`; none
  from an edge older than the device layer: `nvidia.com/gpu`). A pod asking several vendors'
  resources (unheard of) is placed by the first of them that it asks for, counting all.
* enough free GPUs, counted as the scheduler counts `nvidia.com/gpu`: each healthy GPU of a
  compatible model not in MIG mode is `replicas` devices (time-slicing: the GPU's own figure, else
  the node's GFD label `nvidia.com/gpu.replicas`, else 1), less the devices requested by the pods
  bound there (counted against the healthy ones: we cannot tell which GPU a pod holds), and never
  more than the node's `nvidia.com/gpu` allocatable when known. The other vendors' resources are
  counted alike (one device per GPU unless the GPU reports replicas), less what bound pods request
  of that resource (`NodeCandidate.requested`). A GPU in MIG mode advertises MIG
  devices, not `nvidia.com/gpu` (the mixed strategy kgpu's device plugin uses).
* MIG devices (`nvidia.com/mig-<profile>`) as the scheduler counts them: the node's allocatable
  less what bound pods request (`mig_free`); without an allocatable for that profile, the healthy
  MIG devices of that profile its GPUs report (or the node's GFD label
  `nvidia.com/mig-<profile>.count`) less what bound pods request (`mig_requested`).

Compatibility: the same model family (`FAMILIES`: H100/H200/H800/GH200 are Hopper, A100/A800 are
one family, A10/A10G another, L40/L40S another, every other model is its own family) and at least
the source GPU's memory. An unknown source model (e.g. the node went offline before it reported)
accepts any model; an unknown memory on either side is not held against the candidate.

Preferences (the score of an acceptable candidate, higher is better, ties broken by node name):
same zone (`topology.kubernetes.io/zone`) as the failing node +40; the exact same model +10;
temperature headroom of the hottest usable GPU below 85 °C, +0.5 per °C (at most +30); power
headroom, mean of (limit - draw) / limit over the usable GPUs, up to +20; spare GPUs left after the
pod lands, +2.5 each (at most +10), which spreads moved work rather than packing it.

Priority (`order_pods`): the higher `spec.priority` first (resolved from `priorityClassName` by the
API server), then training before unclassified before inference, then larger GPU requests first
(they are the hardest to place), then by namespace/name. The class is the pod label
`kgpu.io/workload-class` (`training` or `inference`); without it, a `priorityClassName` containing
"training" or "inference" decides.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shared.mig import MIG_RESOURCE_PREFIX

GPU_RESOURCE = "nvidia.com/gpu"
# every vendor's whole-GPU extended resource (edge/devices/base.py `DeviceBackend.resource_name`)
GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu", "gpu.intel.com/i915", "gpu.intel.com/xe")
MIG_PREFIX = MIG_RESOURCE_PREFIX
ZONE_LABEL = "topology.kubernetes.io/zone"
HOSTNAME_LABEL = "kubernetes.io/hostname"
WORKLOAD_CLASS_LABEL = "kgpu.io/workload-class"
PRODUCT_LABEL = "nvidia.com/gpu.product"  # GPU Feature Discovery, e.g. NVIDIA-H100-80GB-HBM3
MEMORY_LABEL = "nvidia.com/gpu.memory"  # GPU Feature Discovery, MiB
REPLICAS_LABEL = "nvidia.com/gpu.replicas"  # GPU Feature Discovery: devices per GPU (time-slicing)

TEMP_REFERENCE_C = 85.0
WEIGHT_ZONE = 40.0
WEIGHT_EXACT_MODEL = 10.0
WEIGHT_TEMP_PER_C = 0.5
MAX_TEMP_BONUS = 30.0
WEIGHT_POWER = 20.0
WEIGHT_SPARE_GPU = 2.5
MAX_SPARE_BONUS = 10.0

CLASS_RANK = {"training": 0, None: 1, "inference": 2}

# model token -> family; a token not listed is its own family
FAMILIES: dict[str, str] = {
    "H100": "hopper", "H200": "hopper", "H800": "hopper", "GH200": "hopper",
    "A100": "a100", "A800": "a100",
    "A10": "a10", "A10G": "a10",
    "L40": "l40", "L40S": "l40",
    "B100": "blackwell", "B200": "blackwell", "GB200": "blackwell",
}
# memory when the name does not say it (GiB), for the common datacenter boards
DEFAULT_MEMORY_GIB: dict[str, float] = {
    "H100": 80, "H200": 141, "H800": 80, "GH200": 96, "A100": 40, "A800": 80, "A10": 24,
    "A10G": 24, "A30": 24, "A40": 48, "L4": 24, "L40": 48, "L40S": 48, "T4": 16, "V100": 16,
    "P100": 16, "B200": 180,
}
_MODEL_TOKEN = re.compile(r"^(?:[A-Z]{1,3}\d{1,4}[A-Z]?)$")
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)\s*GB", re.IGNORECASE)
_VENDOR_WORDS = {"NVIDIA", "TESLA", "GEFORCE", "QUADRO", "RTX", "PCIE", "SXM", "SXM4", "SXM5", "NVL"}


# ---- GPU models -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuModel:
    """A GPU model as far as placement cares: its family and its memory."""

    name: str
    family: str
    token: str
    memory_gib: float | None


def gpu_model(name: str, memory_mib: float | None = None) -> GpuModel:
    """Parse "NVIDIA H100 80GB HBM3", "NVIDIA-A100-SXM4-40GB", "Tesla T4" into a GpuModel."""
    words = [w for w in re.split(r"[\s\-_/]+", name.upper()) if w]
    token = next((w for w in words if w not in _VENDOR_WORDS and _MODEL_TOKEN.match(w)), None)
    if token is None:
        token = " ".join(w for w in words if w not in {"NVIDIA"}) or name.upper()
    memory: float | None
    found = _MEMORY.search(name)
    if found:
        memory = float(found.group(1))
    elif memory_mib is not None:
        memory = round(memory_mib / 1024, 1)
    else:
        memory = DEFAULT_MEMORY_GIB.get(token)
    return GpuModel(name=name, family=FAMILIES.get(token, token), token=token, memory_gib=memory)


def compatible(source: GpuModel | None, target: GpuModel) -> tuple[bool, str]:
    """Whether work from a `source` GPU can run on `target`, and why (see the module doc)."""
    if source is None:
        return True, "source model unknown: any model accepted"
    if source.family != target.family:
        return False, f"{target.token} is not in the {source.token} family ({source.family})"
    if source.memory_gib is not None and target.memory_gib is not None and target.memory_gib < source.memory_gib:
        return False, f"{target.token} has {target.memory_gib:g} GiB < {source.memory_gib:g} GiB of {source.token}"
    if source.token == target.token and source.memory_gib == target.memory_gib:
        return True, f"same model {target.token}"
    return True, f"{target.token} compatible with {source.token}"


# ---- scheduling constraints -----------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """One node selector requirement (a `matchExpressions` entry)."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        op = self.operator
        if op == "In":
            return value is not None and value in self.values
        if op == "NotIn":
            return value is None or value not in self.values
        if op == "Exists":
            return value is not None
        if op == "DoesNotExist":
            return value is None
        if op in ("Gt", "Lt") and value is not None and len(self.values) == 1:
            try:
                have, bound = int(value), int(self.values[0])
            except ValueError:
                return False
            return have > bound if op == "Gt" else have < bound
        return False  # unknown operator: never satisfied (the API server would refuse it)

    def __str__(self) -> str:
        if self.operator in ("Exists", "DoesNotExist"):
            return f"{self.key} {self.operator}"
        return f"{self.key} {self.operator} {list(self.values)}"


@dataclass(frozen=True)
class Taint:
    key: str
    effect: str
    value: str | None = None

    def __str__(self) -> str:
        return f"{self.key}{'=' + self.value if self.value else ''}:{self.effect}"


@dataclass(frozen=True)
class Toleration:
    key: str | None = None
    operator: str = "Equal"
    value: str | None = None
    effect: str | None = None

    def tolerates(self, taint: Taint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if self.key is None or self.key == "":
            return self.operator == "Exists"  # empty key with Exists tolerates everything
        if self.key != taint.key:
            return False
        return self.operator == "Exists" or (self.value or "") == (taint.value or "")


def selector_terms(affinity: Mapping[str, Any] | None) -> tuple[tuple[Requirement, ...], ...]:
    """Required node affinity terms from a pod spec's `affinity` (camelCase dict)."""
    required = (((affinity or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = []
    for term in required.get("nodeSelectorTerms") or []:
        expressions = tuple(
            Requirement(str(e.get("key", "")), str(e.get("operator", "")), tuple(str(v) for v in e.get("values") or ()))
            for e in (term or {}).get("matchExpressions") or []
        )
        terms.append(expressions)
    return tuple(terms)


def gpu_requests(spec: Mapping[str, Any]) -> tuple[int, dict[str, int]]:
    """(whole GPUs, MIG slices by resource) a pod spec asks for, requests or limits, as the
    scheduler counts them: the sum over containers, or the largest init container if larger."""

    def of(containers: Iterable[Mapping[str, Any]]) -> list[dict[str, int]]:
        out = []
        for c in containers:
            resources = c.get("resources") or {}
            wanted: dict[str, int] = {}
            for part in ("requests", "limits"):
                for name, amount in (resources.get(part) or {}).items():
                    if name in GPU_RESOURCES or name.startswith(MIG_PREFIX):
                        wanted[name] = max(wanted.get(name, 0), quantity(amount))
            out.append(wanted)
        return out

    total: dict[str, int] = {}
    for wanted in of(spec.get("containers") or []):
        for name, amount in wanted.items():
            total[name] = total.get(name, 0) + amount
    for wanted in of(spec.get("initContainers") or []):
        for name, amount in wanted.items():
            total[name] = max(total.get(name, 0), amount)
    gpus = sum(total.pop(name, 0) for name in GPU_RESOURCES)
    return gpus, {k: v for k, v in total.items() if v > 0}


def gpu_resource(spec: Mapping[str, Any]) -> str:
    """The whole-GPU resource a pod spec asks for (its vendor's): the first of GPU_RESOURCES that
    any of its containers requests or limits; `nvidia.com/gpu` when none does."""
    asked = {name for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
             for part in ("requests", "limits")
             for name, amount in (((c.get("resources") or {}).get(part) or {}).items())
             if name in GPU_RESOURCES and quantity(amount) > 0}
    return next((name for name in GPU_RESOURCES if name in asked), GPU_RESOURCE)


def quantity(amount: Any) -> int:
    try:
        return max(0, int(str(amount)))
    except ValueError:
        return 0


def workload_class(labels: Mapping[str, str], priority_class: str | None) -> str | None:
    """training, inference or None: the label first, then the priorityClassName's wording."""
    label = (labels.get(WORKLOAD_CLASS_LABEL) or "").lower()
    if label in ("training", "inference"):
        return label
    name = (priority_class or "").lower()
    if "training" in name:
        return "training"
    if "inference" in name:
        return "inference"
    return None


# ---- inputs and outputs ---------------------------------------------------------------------


@dataclass(frozen=True)
class PodNeeds:
    """What one pod to move needs from a target node."""

    namespace: str
    name: str
    source_node: str
    gpus: int = 0
    mig: Mapping[str, int] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    affinity: tuple[tuple[Requirement, ...], ...] = ()  # required terms, ORed
    tolerations: tuple[Toleration, ...] = ()
    priority: int = 0
    workload_class: str | None = None
    source_zone: str | None = None
    source_gpu: GpuModel | None = None
    resource: str = GPU_RESOURCE  # the whole-GPU resource `gpus` counts (its vendor's: gpu_resource)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class CandidateGpu:
    uuid: str
    model: GpuModel
    healthy: bool = True
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    replicas: int | None = None  # time-slicing: devices advertised per GPU (None: not reported)
    mig_enabled: bool = False  # in MIG mode: no nvidia.com/gpu, only its MIG devices
    mig_devices: Mapping[str, int] = field(default_factory=dict)  # profile (1g.10gb) -> healthy devices
    resource_name: str = GPU_RESOURCE  # what its device plugin advertises it as (amd.com/gpu, ...)


@dataclass(frozen=True)
class NodeCandidate:
    """A node work could move to: Kubernetes facts and the fleet store's GPU view."""

    name: str
    online: bool
    labels: Mapping[str, str] = field(default_factory=dict)
    gpus: tuple[CandidateGpu, ...] = ()
    gpus_requested: int = 0  # nvidia.com/gpu requested by the pods bound there
    mig_free: Mapping[str, int] = field(default_factory=dict)  # from allocatable, less requests
    taints: tuple[Taint, ...] = ()
    unschedulable: bool = False
    gpu_allocatable: int | None = None  # the kubelet's nvidia.com/gpu allocatable (None: unknown)
    mig_requested: Mapping[str, int] = field(default_factory=dict)  # by the pods bound there
    requested: Mapping[str, int] = field(default_factory=dict)  # other vendors' GPU resources, by the pods there

    def requested_of(self, resource: str) -> int:
        """Devices of a whole-GPU resource the pods bound there request."""
        return self.gpus_requested if resource == GPU_RESOURCE else self.requested.get(resource, 0)


def gpu_slots(gpu: CandidateGpu, labels: Mapping[str, str]) -> int:
    """How many `nvidia.com/gpu` devices one GPU advertises: 0 in MIG mode, else its replicas."""
    if gpu.mig_enabled:
        return 0
    if gpu.replicas is not None:
        return max(1, gpu.replicas)
    if gpu.resource_name != GPU_RESOURCE:
        return 1  # GFD's replicas label speaks of nvidia.com/gpu only
    return max(1, quantity(labels.get(REPLICAS_LABEL, "1")))


def mig_available(c: NodeCandidate, resource: str) -> int:
    """Free MIG devices of `resource` (nvidia.com/mig-1g.10gb) on a node, as the scheduler counts."""
    if resource in c.mig_free:
        return c.mig_free[resource]
    profile = resource.removeprefix(MIG_PREFIX)
    reported = [g for g in c.gpus if g.mig_enabled]
    if reported:
        have = sum(g.mig_devices.get(profile, 0) for g in reported if g.healthy)
    else:
        have = quantity(c.labels.get(f"{resource}.count", "0"))
    return max(0, have - c.mig_requested.get(resource, 0))


@dataclass(frozen=True)
class ScoredTarget:
    node: str
    accepted: bool
    score: float
    reasons: tuple[str, ...]
    free_gpus: int = 0


# ---- the scorer -----------------------------------------------------------------------------


def score(pod: PodNeeds, candidates: Sequence[NodeCandidate]) -> list[ScoredTarget]:
    """Every candidate judged for `pod`: acceptable ones best first, then the rejected ones."""
    judged = [_judge(pod, c) for c in candidates]
    accepted = sorted((t for t in judged if t.accepted), key=lambda t: (-t.score, t.node))
    rejected = sorted((t for t in judged if not t.accepted), key=lambda t: t.node)
    return accepted + rejected


def best(pod: PodNeeds, candidates: Sequence[NodeCandidate]) -> ScoredTarget | None:
    ranked = score(pod, candidates)
    return ranked[0] if ranked and ranked[0].accepted else None


def _judge(pod: PodNeeds, c: NodeCandidate) -> ScoredTarget:
    why_not: list[str] = []
    if c.name == pod.source_node:
        why_not.append("the failing node")
    if not c.online:
        why_not.append("offline (no kgpu edge reporting)")
    if c.unschedulable:
        why_not.append("cordoned")
    for taint in c.taints:
        if taint.effect in ("NoSchedule", "NoExecute") and not any(t.tolerates(taint) for t in pod.tolerations):
            why_not.append(f"taint {taint} not tolerated")
    for key, value in sorted(pod.node_selector.items()):
        if c.labels.get(key) != value:
            why_not.append(f"nodeSelector {key}={value} not met")
    if pod.affinity and not any(all(r.matches(c.labels) for r in term) for term in pod.affinity):
        unmet = sorted({str(r) for term in pod.affinity for r in term if not r.matches(c.labels)})
        why_not.append(f"required node affinity not met ({'; '.join(unmet)})")

    usable: list[CandidateGpu] = []
    model_notes: set[str] = set()
    healthy = [g for g in c.gpus if g.healthy and g.resource_name == pod.resource]
    other_vendor = sum(1 for g in c.gpus if g.resource_name != pod.resource)
    for gpu in healthy:
        ok, note = compatible(pod.source_gpu, gpu.model)
        model_notes.add(note)
        if ok:
            usable.append(gpu)
    usable_slots = sum(gpu_slots(g, c.labels) for g in usable)
    healthy_slots = sum(gpu_slots(g, c.labels) for g in healthy)
    if c.gpu_allocatable is not None and pod.resource == GPU_RESOURCE:
        healthy_slots = min(healthy_slots, c.gpu_allocatable)
    requested = c.requested_of(pod.resource)
    free = max(0, min(usable_slots, healthy_slots - requested))
    if pod.gpus > free:
        shared = usable_slots > len([g for g in usable if gpu_slots(g, c.labels)])
        mig_mode = sum(1 for g in usable if g.mig_enabled)
        what = "GPU(s)" if pod.resource == GPU_RESOURCE else pod.resource
        detail = (f"needs {pod.gpus} {what}, {free} free: {len(usable)} healthy compatible of {len(c.gpus)}"
                  + (f" ({other_vendor} advertised as another vendor's resource)" if other_vendor else "")
                  + (f" ({usable_slots} time-sliced devices)" if shared else "")
                  + (f" ({mig_mode} in MIG mode)" if mig_mode else "")
                  + f", {requested} requested by pods bound there")
        incompatible = sorted(n for n in model_notes if " not " in n or "<" in n)
        why_not.append(detail + (f" ({'; '.join(incompatible)})" if incompatible else ""))
    for resource, amount in sorted(pod.mig.items()):
        have = mig_available(c, resource)
        if amount > have:
            why_not.append(f"needs {amount} {resource}, {have} free")
    if why_not:
        return ScoredTarget(c.name, False, 0.0, tuple(why_not), free)

    total = 0.0
    reasons: list[str] = []
    zone = c.labels.get(ZONE_LABEL)
    if pod.source_zone and zone == pod.source_zone:
        total += WEIGHT_ZONE
        reasons.append(f"same zone {zone} (+{WEIGHT_ZONE:g})")
    elif zone:
        reasons.append(f"zone {zone}")
    used = usable if pod.gpus else healthy
    if pod.gpus and pod.source_gpu is not None and usable:
        if all(g.model.token == pod.source_gpu.token and g.model.memory_gib == pod.source_gpu.memory_gib
               for g in usable):
            total += WEIGHT_EXACT_MODEL
            reasons.append(f"same model {pod.source_gpu.token} (+{WEIGHT_EXACT_MODEL:g})")
        else:
            reasons.extend(sorted(model_notes))
    temps = [g.temperature_c for g in used if g.temperature_c is not None]
    if temps:
        hottest = max(temps)
        bonus = min(MAX_TEMP_BONUS, max(0.0, TEMP_REFERENCE_C - hottest) * WEIGHT_TEMP_PER_C)
        total += bonus
        reasons.append(f"hottest GPU {hottest:.0f} °C (+{bonus:.1f})")
    else:
        reasons.append("temperature unknown (+0)")
    fractions = [max(0.0, min(1.0, (g.power_limit_w - g.power_w) / g.power_limit_w))
                 for g in used if g.power_w is not None and g.power_limit_w]
    if fractions:
        bonus = WEIGHT_POWER * sum(fractions) / len(fractions)
        total += bonus
        reasons.append(f"power headroom {100 * sum(fractions) / len(fractions):.0f}% (+{bonus:.1f})")
    else:
        reasons.append("power unknown (+0)")
    spare = free - pod.gpus
    bonus = min(MAX_SPARE_BONUS, WEIGHT_SPARE_GPU * max(0, spare))
    total += bonus
    reasons.append(f"{spare} GPU(s) spare after placing (+{bonus:g})")
    return ScoredTarget(c.name, True, round(total, 3), tuple(reasons), free)


# ---- several pods ---------------------------------------------------------------------------


def order_pods(pods: Iterable[PodNeeds]) -> list[PodNeeds]:
    """Higher priority first, training before inference, bigger requests first, then by name."""
    return sorted(
        pods,
        key=lambda p: (-p.priority, CLASS_RANK.get(p.workload_class, 1), -(p.gpus + sum(p.mig.values())),
                       p.namespace, p.name),
    )


@dataclass(frozen=True)
class Assignment:
    pod: PodNeeds
    target: ScoredTarget | None
    ranked: tuple[ScoredTarget, ...]


def assign(pods: Iterable[PodNeeds], candidates: Sequence[NodeCandidate]) -> list[Assignment]:
    """Place pods in `order_pods` order; each placement takes its GPUs away from the next pods."""
    pool = {c.name: c for c in candidates}
    out: list[Assignment] = []
    for pod in order_pods(pods):
        ranked = score(pod, list(pool.values()))
        target = ranked[0] if ranked and ranked[0].accepted else None
        if target is not None:
            chosen = pool[target.node]
            mig, mig_requested = dict(chosen.mig_free), dict(chosen.mig_requested)
            for resource, amount in pod.mig.items():
                if resource in mig:
                    mig[resource] -= amount
                else:
                    mig_requested[resource] = mig_requested.get(resource, 0) + amount
            if pod.resource == GPU_RESOURCE:
                chosen = replace(chosen, gpus_requested=chosen.gpus_requested + pod.gpus)
            else:
                chosen = replace(chosen, requested={**chosen.requested,
                                                    pod.resource: chosen.requested_of(pod.resource) + pod.gpus})
            pool[target.node] = replace(chosen, mig_free=mig, mig_requested=mig_requested)
        out.append(Assignment(pod, target, tuple(ranked)))
    return out
