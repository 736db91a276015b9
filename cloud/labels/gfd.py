"""GPU Feature Discovery's node labels from a node's status, as a pure function (no I/O).

`labels_for(gpus)` gives the `nvidia.com/...` labels NVIDIA GPU Feature Discovery (GFD) would
write on a node with these GPUs, with GFD's names and value formats, from the fields of
`shared.protocol.GpuSummary` only (and NVIDIA's MIG profile table in shared/mig.py for a MIG
device's multiprocessors). The list, its source and what is left out (what the status does not
carry: compute capability, machine type, MIG engines) are in
deploy/reference/gpu-feature-discovery/README.md.

kgpu's device plugin advertises MIG devices as `nvidia.com/mig-<profile>` (GFD's `mixed`
strategy), so `nvidia.com/mig.strategy` is `mixed` on a node with a MIG-enabled GPU and `none`
otherwise. Every key and value is checked against Kubernetes' label syntax; one that does not
pass (a MIG profile such as `1g.10gb+me`, whose `+` no label key may hold) is left out.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from shared.mig import ImpossibleLayout, compute_slices, mig_resource, profile_named
from shared.protocol import GpuSummary

PREFIX = "nvidia.com/"
GPU = "nvidia.com/gpu"
MIB = 1024 * 1024

# Kubernetes' label syntax: a DNS subdomain prefix, a name of at most 63, a value of at most 63.
_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_SANITISE_RE = re.compile(r"[^A-Za-z0-9\-_. ]")

# NVML's architecture names as the edge reports them -> GFD's family names
_FAMILIES = {"ada": "ada-lovelace", "ada lovelace": "ada-lovelace", "ada-lovelace": "ada-lovelace"}


def sanitise(text: str) -> str:
    """GFD's `sanitise`: drop characters other than A-Za-z0-9-_. and space, join words with `-`."""
    return "-".join(_SANITISE_RE.sub("", text).split())


def valid_label(key: str, value: str) -> bool:
    prefix, _, name = key.rpartition("/")
    return bool(prefix) and bool(_NAME_RE.match(name)) and bool(_VALUE_RE.match(value))


# A Jetson edge's platform -> its GPU's architecture, for an edge that does not name it: GFD on
# Tegra (its CUDA resource manager) takes the family from the compute capability (Orin 8.7 is
# ampere, Xavier 7.2 volta, Thor blackwell)
_JETSON_ARCHITECTURES = {"jetson-orin": "ampere", "jetson-xavier": "volta", "jetson-thor": "blackwell"}


def _family(architecture: str | None, platform: str | None = None) -> str | None:
    if not architecture:
        architecture = _JETSON_ARCHITECTURES.get((platform or "").lower())
    if not architecture:
        return None
    text = architecture.strip().lower()
    return _FAMILIES.get(text, sanitise(text).lower()) or None


def _version_parts(version: str | None, count: int) -> list[str] | None:
    """`550.107.02` -> ["550", "107", "02"]; None when it is not `X.Y[.Z]` of digits."""
    if not version:
        return None
    parts = version.strip().split(".")
    if not 2 <= len(parts) <= count or not all(p.isdigit() for p in parts):
        return None
    return parts


def _main_model(gpus: Sequence[GpuSummary]) -> str:
    """The model most GPUs of the node have (ties: the one at the lowest index)."""
    counts = Counter(g.name for g in gpus)
    first: dict[str, int] = {}
    for g in sorted(gpus, key=lambda g: g.index):
        first.setdefault(g.name, g.index)
    return min(counts, key=lambda name: (-counts[name], first[name]))


def labels_for(gpus: Sequence[GpuSummary]) -> dict[str, str]:
    """The GFD labels of a node with these GPUs (empty for none)."""
    if not gpus:
        return {}
    labels: dict[str, str] = {f"{GPU}.present": "true"}
    model = _main_model(gpus)
    same = sorted((g for g in gpus if g.name == model), key=lambda g: g.index)
    first = same[0]
    full = [g for g in same if not g.mig_mode]
    product = sanitise(model)
    if full:  # GFD's full-GPU labeler (with sharing) wins over the MIG-enabled one
        replicas = max(g.replicas or 1 for g in full)
        shared = replicas > 1
        labels.update({f"{GPU}.product": product + ("-SHARED" if shared else ""), f"{GPU}.replicas": str(replicas),
                       f"{GPU}.sharing-strategy": "time-slicing" if shared else "none"})
    else:
        labels.update({f"{GPU}.product": product, f"{GPU}.replicas": "0", f"{GPU}.sharing-strategy": "none"})
    labels[f"{GPU}.count"] = str(len(same))
    if first.memory_total_bytes:
        labels[f"{GPU}.memory"] = str(first.memory_total_bytes // MIB)
    family = _family(first.architecture, first.platform)
    if family:
        labels[f"{GPU}.family"] = family

    driver = _version_parts(first.driver_version, 3)
    if driver is not None:
        major, minor, rev = driver[0], driver[1], driver[2] if len(driver) > 2 else ""
        labels.update({"nvidia.com/cuda.driver-version.major": major, "nvidia.com/cuda.driver-version.minor": minor,
                       "nvidia.com/cuda.driver-version.revision": rev,
                       "nvidia.com/cuda.driver-version.full": ".".join(driver),
                       "nvidia.com/cuda.driver.major": major, "nvidia.com/cuda.driver.minor": minor,
                       "nvidia.com/cuda.driver.rev": rev})
    cuda = _version_parts(first.cuda_version, 3)
    if cuda is not None:
        labels.update({"nvidia.com/cuda.runtime-version.major": cuda[0],
                       "nvidia.com/cuda.runtime-version.minor": cuda[1],
                       "nvidia.com/cuda.runtime-version.full": ".".join(cuda[:2]),
                       "nvidia.com/cuda.runtime.major": cuda[0], "nvidia.com/cuda.runtime.minor": cuda[1]})

    # mig_mode None means "no MIG", or an edge older than these fields (no memory either): say
    # nothing about MIG for such an edge rather than something false
    if any(g.mig_mode is not None or g.memory_total_bytes is not None for g in gpus):
        labels["nvidia.com/mig.capable"] = "true" if any(g.mig_mode is not None for g in gpus) else "false"
    mig_enabled = any(g.mig_mode for g in gpus)
    labels["nvidia.com/mig.strategy"] = "mixed" if mig_enabled else "none"
    profiles: dict[str, list[tuple[GpuSummary, int | None]]] = {}
    for g in gpus:
        if not g.mig_mode:
            continue
        for device in g.mig_devices:
            profiles.setdefault(device.profile, []).append((g, device.memory_total_bytes))
    for profile, devices in sorted(profiles.items()):
        key = mig_resource(profile)
        parent, memory = devices[0]
        slices = compute_slices(profile)
        values = {"count": str(len(devices)), "product": f"{sanitise(parent.name)}-MIG-{sanitise(profile)}",
                  "replicas": "1", "sharing-strategy": "none"}
        if memory:
            values["memory"] = str(memory // MIB)
        if slices is not None:
            values["slices.gi"] = values["slices.ci"] = str(slices)
        try:  # NVIDIA's profile table (shared/mig.py) knows the multiprocessors of a known model's profile
            values["multiprocessors"] = str(profile_named(parent.name, profile).multiprocessors)
        except ImpossibleLayout:
            pass
        labels.update({f"{key}.{suffix}": value for suffix, value in values.items()})
    return {k: v for k, v in sorted(labels.items()) if valid_label(k, v)}
