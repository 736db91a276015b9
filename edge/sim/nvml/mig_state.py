"""The simulated driver's MIG state of each board: MIG mode (current and pending), the GPU
instances at their placements and the compute instances in them, and the rules the real driver
enforces when they change. The C symbols over it are in edge/sim/nvml/mig.py.

What the real driver does, and so this one:
- MIG mode is a setting of the board that survives a reboot (`PERSISTED_MIG_MODE`, keyed by GPU
  UUID: a new simulation over the same boards starts with it); GPU and compute instances do not.
- Changing MIG mode while compute processes use the GPU leaves the new mode pending (the call
  succeeds, its activation status says NVML_ERROR_IN_USE) until it is set again on an idle GPU
  or the GPU is reset; on an idle A100/H100 it takes effect at once, without a reboot.
- Disabling MIG while GPU instances exist, destroying an instance that still has compute
  instances, or destroying anything while compute processes run answers NVML_ERROR_IN_USE.
- A GPU instance may only start at its profile's start slots and not overlap another
  (NVML_ERROR_INVALID_ARGUMENT / NVML_ERROR_INSUFFICIENT_RESOURCES).
"""

from __future__ import annotations

import ctypes
import uuid as uuidlib
from dataclasses import dataclass, field

import pynvml

from edge.sim.nvml.abi import Fail
from shared.mig import MigProfile, Placement, fits_with, profiles_for

IN_USE = pynvml.NVML_ERROR_IN_USE
INSUFFICIENT_RESOURCES = pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES

# GPU UUID -> MIG mode, as the board keeps it across reboots (process-wide, like the hardware).
PERSISTED_MIG_MODE: dict[str, bool] = {}

# NVML_COMPUTE_INSTANCE_PROFILE_* -> compute slices
CI_SLICES = {0x0: 1, 0x1: 2, 0x2: 3, 0x3: 4, 0x4: 7, 0x5: 8, 0x6: 6}

# Every handle buffer ever made stays referenced, so a destroyed instance's address is never
# reused by a new one (a stale handle then answers INVALID_ARGUMENT, not another instance).
_BUFFERS: list[ctypes.Array] = []


def new_handle() -> tuple[ctypes.Array, int]:
    buffer = ctypes.create_string_buffer(16)
    _BUFFERS.append(buffer)
    return buffer, ctypes.addressof(buffer)


@dataclass(eq=False)
class SimComputeInstance:
    id: int
    profile_id: int  # NVML_COMPUTE_INSTANCE_PROFILE_*
    start: int  # first compute slice within the GPU instance
    slices: int
    gpu_instance: SimGpuInstance
    uuid: str  # the MIG device's UUID
    handle: int  # the compute instance handle
    device_handle: int  # the MIG device handle (what nvmlDeviceGetMigDeviceHandleByIndex gives)


@dataclass(eq=False)
class SimGpuInstance:
    id: int
    profile: MigProfile
    start: int
    handle: int
    board: SimMigBoard
    computes: dict[int, SimComputeInstance] = field(default_factory=dict)

    @property
    def placement(self) -> Placement:
        return Placement(self.profile, self.start)

    def free_compute_start(self, slices: int) -> int | None:
        used = {s for ci in self.computes.values() for s in range(ci.start, ci.start + ci.slices)}
        for start in range(0, self.profile.slices - slices + 1, slices):
            if not used & set(range(start, start + slices)):
                return start
        return None


def _gi_id(placement: Placement) -> int:
    """The GPU instance ID the real driver gives a placement (nvidia-smi's GI ID column):
    7g at 0 -> 0; 4g/3g -> 1, 2; 2-memory-slice profiles -> 3, 4, 5, 6; 1 memory slice -> 7..13."""
    profile = placement.profile
    if profile.size == 8:
        return 0
    if profile.size == 4:
        return 1 + placement.start // 4
    if profile.size == 2:
        return 3 + placement.start // 2
    return 7 + placement.start


@dataclass(eq=False)
class SimMigBoard:
    """One GPU's MIG side."""

    gpu_uuid: str
    gpu_name: str
    profiles: tuple[MigProfile, ...] | None  # None: no MIG on this model
    enabled: bool = False
    pending: bool = False
    instances: dict[int, SimGpuInstance] = field(default_factory=dict)

    @classmethod
    def after_boot(cls, gpu_uuid: str, gpu_name: str, mig_capable: bool) -> SimMigBoard:
        """The board as it powers up: the MIG mode it kept, no instances."""
        profiles = profiles_for(gpu_name) if mig_capable else None
        mode = PERSISTED_MIG_MODE.get(gpu_uuid, False) if profiles is not None else False
        return cls(gpu_uuid, gpu_name, profiles, enabled=mode, pending=mode)

    @property
    def supported(self) -> bool:
        return self.profiles is not None

    def profile_by_index(self, gi_profile: int) -> MigProfile | None:
        return next((p for p in self.profiles or () if p.gi_profile_id == gi_profile), None)

    def profile_by_id(self, profile_id: int) -> MigProfile | None:
        return next((p for p in self.profiles or () if p.profile_id == profile_id), None)

    def set_mode(self, enable: bool, busy: bool) -> int:
        """Set MIG mode; answers the activation status (SUCCESS, or IN_USE: left pending)."""
        if not enable and self.instances:
            raise Fail(IN_USE)  # GPU instances exist: they must be destroyed first
        self.pending = enable
        PERSISTED_MIG_MODE[self.gpu_uuid] = enable
        if busy and enable != self.enabled:
            return IN_USE
        self.enabled = enable
        return pynvml.NVML_SUCCESS

    def remaining(self, profile: MigProfile) -> int:
        """How many more instances of `profile` could be created now."""
        placed = [gi.placement for gi in self.instances.values()]
        same = sum(1 for gi in self.instances.values() if gi.profile.profile_id == profile.profile_id)
        compute_left = 7 - sum(p.profile.slices for p in placed)
        count = 0
        for start in profile.placements:
            candidate = Placement(profile, start)
            if fits_with(placed, candidate):
                placed.append(candidate)
                count += 1
        return max(0, min(count, profile.max_count - same, compute_left // profile.slices))

    def create(self, profile: MigProfile, start: int | None) -> SimGpuInstance:
        if not self.enabled:
            raise Fail(pynvml.NVML_ERROR_NOT_SUPPORTED)  # MIG mode is not enabled
        if start is not None and start not in profile.placements:
            raise Fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if self.remaining(profile) == 0:
            raise Fail(INSUFFICIENT_RESOURCES)
        placed = [gi.placement for gi in self.instances.values()]
        starts = [start] if start is not None else list(profile.placements)
        for candidate in (Placement(profile, s) for s in starts):
            if fits_with(placed, candidate):
                _, handle = new_handle()
                instance = SimGpuInstance(_gi_id(candidate), profile, candidate.start, handle, self)
                self.instances[instance.id] = instance
                return instance
        raise Fail(INSUFFICIENT_RESOURCES)

    def destroy(self, instance: SimGpuInstance, busy: bool) -> None:
        if instance.computes or busy:
            raise Fail(IN_USE)
        del self.instances[instance.id]

    def create_compute(self, instance: SimGpuInstance, ci_profile: int) -> SimComputeInstance:
        slices = CI_SLICES.get(ci_profile)
        if slices is None or slices > instance.profile.slices:
            raise Fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        start = instance.free_compute_start(slices)
        if start is None:
            raise Fail(INSUFFICIENT_RESOURCES)
        ci_id = min(set(range(8)) - set(instance.computes))
        name = f"{self.gpu_uuid}/{instance.id}/{ci_id}"
        mig_uuid = "MIG-" + str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"kgpu-sim-mig:{name}"))
        _, handle = new_handle()
        _, device_handle = new_handle()
        compute = SimComputeInstance(ci_id, ci_profile, start, slices, instance, mig_uuid, handle,
                                     device_handle)
        instance.computes[ci_id] = compute
        return compute

    def destroy_compute(self, compute: SimComputeInstance, busy: bool) -> None:
        if busy:
            raise Fail(IN_USE)
        del compute.gpu_instance.computes[compute.id]

    def mig_devices(self) -> list[SimComputeInstance]:
        """Every MIG device (compute instance), by GPU instance ID then compute instance ID."""
        if not self.enabled:
            return []
        return [ci for gi_id in sorted(self.instances)
                for _, ci in sorted(self.instances[gi_id].computes.items())]
