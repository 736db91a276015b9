"""NVIDIA's MIG profile tables and where a layout's GPU instances go (pure; no I/O).

The tables are those of NVIDIA's MIG user guide ("Supported MIG Profiles") and of
`nvidia-smi mig -lgip` / `-lgipp` on the boards (kept with their source in
deploy/reference/nvidia-mig/). A GPU has 7 compute slices and 8 memory slices; a GPU instance
occupies `size` memory slices from a start slot its profile allows, and instances may not
overlap. `place` decides whether a layout fits and where each instance goes, so the cloud can
refuse an impossible layout before it reaches a node and the edge creates exactly what it checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from shared.partitioning import MigLayout

MEMORY_SLICES = 8
COMPUTE_SLICES = 7
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"  # NVIDIA's `mixed` strategy: one resource per profile
_COMPUTE_SLICES_RE = re.compile(r"^(\d+)g\.")


def mig_resource(profile: str) -> str:
    """The resource MIG devices of a profile are advertised as: nvidia.com/mig-1g.10gb."""
    return f"{MIG_RESOURCE_PREFIX}{profile}"


def compute_slices(profile: str) -> int | None:
    """3 for 3g.40gb: the compute slices a profile's name says it holds; None for a name without."""
    found = _COMPUTE_SLICES_RE.match(profile)
    return int(found.group(1)) if found else None

# NVML's profile indexes (pynvml.NVML_GPU_INSTANCE_PROFILE_* / NVML_COMPUTE_INSTANCE_PROFILE_*),
# written out so that shared/ does not import pynvml.
GI_1_SLICE, GI_2_SLICE, GI_3_SLICE, GI_4_SLICE, GI_7_SLICE = 0x0, 0x1, 0x2, 0x3, 0x4
GI_1_SLICE_REV1, GI_1_SLICE_REV2 = 0x7, 0x9  # +me (media extensions); 1 slice with 2 memory slices
CI_1_SLICE, CI_2_SLICE, CI_3_SLICE, CI_4_SLICE, CI_7_SLICE = 0x0, 0x1, 0x2, 0x3, 0x4


@dataclass(frozen=True)
class MigProfile:
    """One GPU instance profile of one board, as NVML describes it."""

    name: str  # "1g.10gb" (NVML's profile name without the "MIG " prefix)
    gi_profile_id: int  # the index nvmlDeviceGetGpuInstanceProfileInfo takes (NVML_GPU_INSTANCE_PROFILE_*)
    ci_profile_id: int  # the full compute instance profile of that GI (NVML_COMPUTE_INSTANCE_PROFILE_*)
    slices: int  # compute slices (1..7)
    memory_mib: int  # memorySizeMB as NVML reports it
    max_count: int  # instances of this profile per GPU
    placements: tuple[int, ...]  # allowed start slots (memory slices)
    size: int  # memory slices the placement occupies
    profile_id: int  # the profile's ID (nvmlGpuInstanceProfileInfo_t.id; nvidia-smi's "ID" column):
    # what nvmlDeviceCreateGpuInstance and the placement calls take
    multiprocessors: int = 0  # SMs of the instance


def _table(rows: Iterable[tuple[str, int, int, int, int, int, tuple[int, ...], int, int, int]]
           ) -> tuple[MigProfile, ...]:
    return tuple(MigProfile(name, gi, ci, slices, mib, count, starts, size, pid, sms)
                 for name, gi, ci, slices, mib, count, starts, size, pid, sms in rows)


_ALL7 = (0, 1, 2, 3, 4, 5, 6)

# name, GI profile, CI profile, compute slices, memory MiB, max count, start slots, memory slices,
# profile ID, SMs. Memory: `nvidia-smi mig -lgip` GiB x 1024 (driver 535/550).
A100_40GB = _table([
    ("1g.5gb", GI_1_SLICE, CI_1_SLICE, 1, 4864, 7, _ALL7, 1, 19, 14),
    ("1g.5gb+me", GI_1_SLICE_REV1, CI_1_SLICE, 1, 4864, 1, _ALL7, 1, 20, 14),
    ("1g.10gb", GI_1_SLICE_REV2, CI_1_SLICE, 1, 9856, 4, (0, 2, 4, 6), 2, 15, 14),
    ("2g.10gb", GI_2_SLICE, CI_2_SLICE, 2, 9856, 3, (0, 2, 4), 2, 14, 28),
    ("3g.20gb", GI_3_SLICE, CI_3_SLICE, 3, 20096, 2, (0, 4), 4, 9, 42),
    ("4g.20gb", GI_4_SLICE, CI_4_SLICE, 4, 20096, 1, (0,), 4, 5, 56),
    ("7g.40gb", GI_7_SLICE, CI_7_SLICE, 7, 40448, 1, (0,), 8, 0, 98),
])
A100_80GB = _table([
    ("1g.10gb", GI_1_SLICE, CI_1_SLICE, 1, 9728, 7, _ALL7, 1, 19, 14),
    ("1g.10gb+me", GI_1_SLICE_REV1, CI_1_SLICE, 1, 9728, 1, _ALL7, 1, 20, 14),
    ("1g.20gb", GI_1_SLICE_REV2, CI_1_SLICE, 1, 19968, 4, (0, 2, 4, 6), 2, 15, 14),
    ("2g.20gb", GI_2_SLICE, CI_2_SLICE, 2, 19968, 3, (0, 2, 4), 2, 14, 28),
    ("3g.40gb", GI_3_SLICE, CI_3_SLICE, 3, 40192, 2, (0, 4), 4, 9, 42),
    ("4g.40gb", GI_4_SLICE, CI_4_SLICE, 4, 40192, 1, (0,), 4, 5, 56),
    ("7g.80gb", GI_7_SLICE, CI_7_SLICE, 7, 80896, 1, (0,), 8, 0, 98),
])
H100_80GB = _table([
    ("1g.10gb", GI_1_SLICE, CI_1_SLICE, 1, 9984, 7, _ALL7, 1, 19, 16),
    ("1g.10gb+me", GI_1_SLICE_REV1, CI_1_SLICE, 1, 9984, 1, _ALL7, 1, 20, 16),
    ("1g.20gb", GI_1_SLICE_REV2, CI_1_SLICE, 1, 20096, 4, (0, 2, 4, 6), 2, 15, 26),
    ("2g.20gb", GI_2_SLICE, CI_2_SLICE, 2, 20096, 3, (0, 2, 4), 2, 14, 32),
    ("3g.40gb", GI_3_SLICE, CI_3_SLICE, 3, 40448, 2, (0, 4), 4, 9, 60),
    ("4g.40gb", GI_4_SLICE, CI_4_SLICE, 4, 40448, 1, (0,), 4, 5, 64),
    ("7g.80gb", GI_7_SLICE, CI_7_SLICE, 7, 81152, 1, (0,), 8, 0, 132),
])

# Product names as nvmlDeviceGetName reports them. The PCIe boards share their SXM sibling's
# geometry (the guide gives one table per memory size).
TABLES: dict[str, tuple[MigProfile, ...]] = {
    "NVIDIA A100-SXM4-40GB": A100_40GB,
    "NVIDIA A100-PCIE-40GB": A100_40GB,
    "NVIDIA A100-SXM4-80GB": A100_80GB,
    "NVIDIA A100 80GB PCIe": A100_80GB,
    "NVIDIA H100 80GB HBM3": H100_80GB,
    "NVIDIA H100 PCIe": H100_80GB,
}


class ImpossibleLayout(ValueError):
    """A layout a GPU cannot hold; the message is the reason shown to operators."""


@dataclass(frozen=True)
class Placement:
    """One GPU instance of a layout: its profile at memory slice `start`."""

    profile: MigProfile
    start: int

    @property
    def slots(self) -> range:
        return range(self.start, self.start + self.profile.size)


def profiles_for(gpu_name: str) -> tuple[MigProfile, ...] | None:
    """The MIG profiles of a GPU model by product name; None when it has no MIG (or is unknown)."""
    return TABLES.get(gpu_name.strip())


def profile_named(gpu_name: str, name: str) -> MigProfile:
    """One profile of a model by name; ImpossibleLayout naming the valid ones otherwise."""
    profiles = _require_table(gpu_name)
    for profile in profiles:
        if profile.name == name:
            return profile
    raise ImpossibleLayout(f"{name} is not a MIG profile of {gpu_name}; its profiles are "
                           f"{', '.join(p.name for p in profiles)}")


def _require_table(gpu_name: str) -> tuple[MigProfile, ...]:
    profiles = profiles_for(gpu_name)
    if profiles is None:
        raise ImpossibleLayout(f"{gpu_name or 'this GPU'} has no MIG (or no MIG profile table in kgpu; "
                               f"tables for: {', '.join(sorted(TABLES))})")
    return profiles


def place(gpu_name: str, layout: MigLayout) -> list[Placement]:
    """Where each GPU instance of `layout` goes on a GPU of model `gpu_name`, ordered by start
    slot; [] for `disabled`. Raises ImpossibleLayout with the reason when it cannot fit."""
    if layout.mode == "disabled":
        return []
    if layout.mode == "all":
        assert layout.profile is not None  # MigLayout guarantees it
        profile = profile_named(gpu_name, layout.profile)
        wanted = [profile] * profile.max_count
    else:
        wanted = []
        for name, count in sorted(layout.counts.items()):
            profile = profile_named(gpu_name, name)
            if count > profile.max_count:
                raise ImpossibleLayout(f"{gpu_name} holds at most {profile.max_count} x {name}, "
                                       f"{count} asked")
            wanted += [profile] * count
    slices = sum(p.slices for p in wanted)
    if slices > COMPUTE_SLICES:
        raise ImpossibleLayout(f"layout {layout.label()} needs {slices} compute slices; "
                               f"{gpu_name} has {COMPUTE_SLICES}")
    memory = sum(p.size for p in wanted)
    if memory > MEMORY_SLICES:
        raise ImpossibleLayout(f"layout {layout.label()} needs {memory} memory slices; "
                               f"{gpu_name} has {MEMORY_SLICES}")
    # Largest first, each at the lowest start slot that leaves the rest placeable.
    wanted.sort(key=lambda p: (-p.size, -p.slices, p.name))
    found = _search(wanted, frozenset())
    if found is None:
        raise ImpossibleLayout(f"layout {layout.label()} has no valid placement on {gpu_name} "
                               "(the instances' allowed start slots overlap)")
    return sorted(found, key=lambda p: p.start)


def _search(wanted: list[MigProfile], used: frozenset[int]) -> list[Placement] | None:
    if not wanted:
        return []
    profile, rest = wanted[0], wanted[1:]
    for start in profile.placements:
        slots = set(range(start, start + profile.size))
        if slots & used:
            continue
        tail = _search(rest, used | slots)
        if tail is not None:
            return [Placement(profile, start), *tail]
    return None


def fits_with(existing: Iterable[Placement], candidate: Placement) -> bool:
    """True when `candidate` overlaps none of `existing` (the driver's own creation check)."""
    taken = {slot for placement in existing for slot in placement.slots}
    return candidate.start in candidate.profile.placements and not (taken & set(candidate.slots))
