"""MIG through NVML: reading a GPU's MIG mode and devices, and applying a layout.

`MigDriver.apply` turns a `MigLayout` into NVML calls as `nvidia-mig-parted` does: destroy every
compute and GPU instance, set MIG mode, create each GPU instance at the placement
`shared.mig.place` chose and one full compute instance in it. The driver refuses what it must
(NoPermission in an unprivileged container, InUse while compute processes run, a mode change left
pending until the GPU is idle or reset); those come back as `DriverRefused` with NVML's reason.

Blocking: runs on the driver runner's thread (`runner.call(mig.apply, ...)`), like NvmlDriver.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import pynvml

from edge.devices.base import DriverError, DriverRefused
from edge.driver.nvml import NvmlDriver, code_name
from shared.logs import get_logger
from shared.mig import ImpossibleLayout, Placement, place, profiles_for
from shared.partitioning import MigLayout

log = get_logger(__name__)

T = TypeVar("T")

# What the driver legitimately refuses: reported as advisory, with NVML's reason.
_REFUSED: tuple[type[Exception], ...] = (
    pynvml.NVMLError_NoPermission,
    pynvml.NVMLError_NotSupported,
    pynvml.NVMLError_InvalidArgument,
    pynvml.NVMLError_InUse,
    pynvml.NVMLError_InsufficientResources,
    pynvml.NVMLError_ResetRequired,
    pynvml.NVMLError_FunctionNotFound,
)
_NO_MIG: tuple[type[Exception], ...] = (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound)


@dataclass(frozen=True)
class MigDeviceInfo:
    """One MIG device (a compute instance in a GPU instance)."""

    uuid: str  # MIG-...
    profile: str  # 1g.10gb
    gi_id: int
    ci_id: int
    memory_total_bytes: int
    start: int  # the GPU instance's first memory slice


@dataclass(frozen=True)
class MigState:
    """A GPU's MIG side as NVML reports it."""

    supported: bool
    enabled: bool
    pending_enabled: bool  # pending != current: a GPU reset (or an idle GPU) is needed
    devices: tuple[MigDeviceInfo, ...]
    gpu_name: str = ""  # the product name, to tell `all-<profile>` from a mixed layout

    def layout_label(self) -> str:
        """What exists, as MigLayout.label() writes a layout: disabled / all-.. / mixed ..."""
        if not self.enabled:
            return "disabled"
        counts = Counter(d.profile for d in self.devices)
        if not counts:
            return "enabled (no MIG devices)"
        if len(counts) == 1:
            (name, count), = counts.items()
            table = {p.name: p for p in profiles_for(self.gpu_name) or ()}
            if name in table and count == table[name].max_count:
                return f"all-{name}"
        return MigLayout(mode="mixed", counts=dict(counts)).label()


NOT_SUPPORTED = MigState(supported=False, enabled=False, pending_enabled=False, devices=())


def profile_of(mig_device_name: str) -> str:
    """"NVIDIA A100-SXM4-40GB MIG 1g.5gb" (nvmlDeviceGetName of a MIG device) -> "1g.5gb"."""
    return mig_device_name.rsplit("MIG ", 1)[-1].strip()


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class MigDriver:
    """MIG reading and layout changes over an NvmlDriver's handles (its thread only)."""

    def __init__(self, driver: NvmlDriver) -> None:
        self._driver = driver

    # ----- NVML calls ----------------------------------------------------------------------

    def _call(self, index: int, action: str, fn: Callable[..., T], *args: Any) -> T:
        """fn(GPU handle, *args) with NVML's failures as DriverRefused / DriverError."""
        return self._wrap(index, action, lambda: self._driver._device_call(index, fn, *args))

    @staticmethod
    def _wrap(index: int, action: str, attempt: Callable[[], T]) -> T:
        try:
            return attempt()
        except _REFUSED as error:
            raise DriverRefused(code_name(error), f"gpu {index}: {action}: {error}") from error
        except pynvml.NVMLError as error:
            raise DriverError(code_name(error), f"gpu {index}: {action}: {error}") from error

    # ----- reading -------------------------------------------------------------------------

    def read(self, index: int) -> MigState:
        """MIG mode (current and pending) and the MIG devices of GPU `index`."""
        try:
            current, pending = self._driver._device_call(index, pynvml.nvmlDeviceGetMigMode)
        except _NO_MIG:
            return NOT_SUPPORTED
        except pynvml.NVMLError as error:
            raise DriverError(code_name(error), f"gpu {index}: read MIG mode: {error}") from error
        name = _text(self._call(index, "read name", pynvml.nvmlDeviceGetName))
        enabled = current == pynvml.NVML_DEVICE_MIG_ENABLE
        devices = tuple(info for info, _ in self._mig_devices(index)) if enabled else ()
        return MigState(supported=True, enabled=enabled,
                        pending_enabled=pending == pynvml.NVML_DEVICE_MIG_ENABLE,
                        devices=devices, gpu_name=name)

    def _mig_devices(self, index: int) -> list[tuple[MigDeviceInfo, Any]]:
        """Every MIG device of the GPU with its handle, by GPU instance then compute instance."""
        most = self._call(index, "count MIG devices", pynvml.nvmlDeviceGetMaxMigDeviceCount)
        found = []
        for position in range(most):
            try:
                handle = self._driver._device_call(index, pynvml.nvmlDeviceGetMigDeviceHandleByIndex,
                                                   position)
            except (pynvml.NVMLError_NotFound, pynvml.NVMLError_InvalidArgument):
                continue
            found.append((self._device_info(index, handle), handle))
        return sorted(found, key=lambda pair: (pair[0].gi_id, pair[0].ci_id))

    def _device_info(self, index: int, handle: Any) -> MigDeviceInfo:
        def read() -> MigDeviceInfo:
            gi_id = pynvml.nvmlDeviceGetGpuInstanceId(handle)
            gpu_instance = self._driver._device_call(index, pynvml.nvmlDeviceGetGpuInstanceById, gi_id)
            return MigDeviceInfo(
                uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                profile=profile_of(_text(pynvml.nvmlDeviceGetName(handle))),
                gi_id=gi_id,
                ci_id=pynvml.nvmlDeviceGetComputeInstanceId(handle),
                memory_total_bytes=pynvml.nvmlDeviceGetMemoryInfo(handle).total,
                start=pynvml.nvmlGpuInstanceGetInfo(gpu_instance).placement.start,
            )
        return self._wrap(index, "read MIG device", read)

    def memory_used(self, index: int) -> dict[str, int]:
        """MIG device UUID -> memory used (bytes), from nvmlDeviceGetMemoryInfo on its handle."""
        used = {}
        for info, handle in self._mig_devices(index):
            memory = self._wrap(index, "read MIG memory", partial(pynvml.nvmlDeviceGetMemoryInfo, handle))
            used[info.uuid] = int(memory.used)
        return used

    # ----- changing ------------------------------------------------------------------------

    def apply(self, index: int, gpu_name: str, layout: MigLayout) -> MigState:
        """Give GPU `index` exactly `layout`; nothing changes when it already has it.

        Raises ImpossibleLayout (it does not fit, or the model has no MIG) before touching the
        GPU, and DriverRefused / DriverError with NVML's reason when the driver refuses a step."""
        placements = place(gpu_name, layout)
        state = self.read(index)
        want_enabled = layout.mode != "disabled"
        if not state.supported:
            if want_enabled:
                raise ImpossibleLayout(f"{gpu_name} does not support MIG (NVML: NotSupported)")
            return state
        if self._already(state, want_enabled, placements):
            return state
        log.info("gpu %d: applying MIG layout %s (had %s)", index, layout.label(), state.layout_label(),
                 extra={"gpu": index, "layout": layout.label()})
        if state.enabled:
            self._destroy_all(index)
        if state.enabled != want_enabled or state.pending_enabled != want_enabled:
            self._set_mode(index, want_enabled)
        for placement in placements:
            self._create(index, placement)
        return self.read(index)

    @staticmethod
    def _already(state: MigState, want_enabled: bool, placements: list[Placement]) -> bool:
        if state.enabled != want_enabled or state.pending_enabled != want_enabled:
            return False
        if not want_enabled:
            return True
        return Counter(d.profile for d in state.devices) == Counter(p.profile.name for p in placements) \
            and len({d.gi_id for d in state.devices}) == len(state.devices)

    def _destroy_all(self, index: int) -> None:
        """Destroy every compute instance, then every GPU instance (InUse while work runs).
        The profiles come from NVML, so instances of a profile kgpu has no table for go too."""
        for profile_index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                info = self._driver._device_call(index, pynvml.nvmlDeviceGetGpuInstanceProfileInfo, profile_index)
            except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_InvalidArgument):
                continue  # a profile this GPU does not have
            except pynvml.NVMLError as error:
                raise DriverError(code_name(error), f"gpu {index}: read MIG profiles: {error}") from error
            for gpu_instance in self._gpu_instances(index, info.id, info.instanceCount):
                for ci_profile in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
                    for compute in self._compute_instances(index, gpu_instance, ci_profile):
                        self._wrap(index, "destroy compute instance",
                                   partial(pynvml.nvmlComputeInstanceDestroy, compute))
                self._wrap(index, f"destroy GPU instance (profile {info.id})",
                           partial(pynvml.nvmlGpuInstanceDestroy, gpu_instance))

    def _gpu_instances(self, index: int, profile_id: int, most: int) -> list[Any]:
        array = (pynvml.c_nvmlGpuInstance_t * max(most, 1))()
        count = ctypes.c_uint(0)
        self._call(index, "list GPU instances", pynvml.nvmlDeviceGetGpuInstances, profile_id, array,
                   ctypes.byref(count))
        return [array[i] for i in range(count.value)]

    def _compute_instances(self, index: int, gpu_instance: Any, ci_profile: int) -> list[Any]:
        array = (pynvml.c_nvmlComputeInstance_t * 8)()
        count = ctypes.c_uint(0)
        try:
            pynvml.nvmlGpuInstanceGetComputeInstances(gpu_instance, ci_profile, array, ctypes.byref(count))
        except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_InvalidArgument):
            return []  # a profile this GPU instance cannot hold
        except pynvml.NVMLError as error:
            raise DriverError(code_name(error), f"gpu {index}: list compute instances: {error}") from error
        return [array[i] for i in range(count.value)]

    def _set_mode(self, index: int, enable: bool) -> None:
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if enable else pynvml.NVML_DEVICE_MIG_DISABLE
        word = "enable" if enable else "disable"
        status = self._call(index, f"{word} MIG mode", pynvml.nvmlDeviceSetMigMode, mode)
        if status != pynvml.NVML_SUCCESS:
            reason = pynvml.NVMLError(status)
            raise DriverRefused(code_name(reason), f"gpu {index}: {word} MIG mode is pending a GPU reset "
                                                   f"(activation: {reason})")
        current, _ = self._call(index, "read MIG mode", pynvml.nvmlDeviceGetMigMode)
        if (current == pynvml.NVML_DEVICE_MIG_ENABLE) != enable:
            raise DriverRefused("ResetRequired", f"gpu {index}: {word} MIG mode is pending a GPU reset")

    def _create(self, index: int, placement: Placement) -> None:
        profile = placement.profile
        where = pynvml.c_nvmlGpuInstancePlacement_t(start=placement.start, size=profile.size)
        gpu_instance = self._call(index, f"create GPU instance {profile.name} at slot {placement.start}",
                                  pynvml.nvmlDeviceCreateGpuInstanceWithPlacement, profile.profile_id,
                                  ctypes.byref(where))
        self._wrap(index, f"create compute instance in {profile.name}",
                   lambda: pynvml.nvmlGpuInstanceCreateComputeInstance(gpu_instance, profile.ci_profile_id))
