"""The simulated libnvidia-ml's MIG symbols: MIG mode, GPU instance profiles and placements,
creating and destroying GPU and compute instances, and the MIG device handles (with their UUID,
name and memory). One area of edge/sim/nvml: see its __init__; the state and the driver's rules
are in mig_state.py.

Each C function takes the arguments pynvml passes (nvidia-ml-py's ctypes structs), so the real
pynvml wrappers run unchanged over it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from ctypes import c_char_p, c_uint, c_void_p
from typing import Any

import pynvml

from edge.sim.nvml.abi import (
    INSUFFICIENT_SIZE,
    INVALID_ARGUMENT,
    MIB,
    NO_PERMISSION,
    NOT_FOUND,
    NOT_SUPPORTED,
    SUCCESS,
    VERSION_MISMATCH,
    Exports,
    Fail,
    H,
    P,
    U,
    put,
    put_text,
    room_for,
    unsupported_unless,
)
from edge.sim.nvml.driver import SimDriver
from edge.sim.nvml.mig_state import CI_SLICES, SimComputeInstance, SimGpuInstance, SimMigBoard
from edge.sim.physics import SimGpu
from shared.mig import MEMORY_SLICES

MAX_MIG_DEVICES = 7


class MigHandles:
    """The MIG state of every board of one simulated driver, and its handles."""

    def __init__(self, driver: SimDriver) -> None:
        self.driver = driver
        self.boards = [SimMigBoard.after_boot(gpu.uuid, gpu.profile.name, gpu.profile.mig)
                       for gpu in driver.gpus]
        driver.mig = self  # a GPU reset or a reboot acts on the MIG side too

    def has_instances(self, index: int) -> bool:
        return bool(self.boards[index].instances)

    def after_reset(self, index: int) -> None:
        """A GPU reset makes a pending MIG mode current (the caller checked no instance exists)."""
        board = self.boards[index]
        board.enabled = board.pending

    def after_reboot(self) -> None:
        """Every board as it powers up: the MIG mode it kept, no instances."""
        self.boards = [SimMigBoard.after_boot(gpu.uuid, gpu.profile.name, gpu.profile.mig)
                       for gpu in self.driver.gpus]

    def board(self, handle: int | None) -> tuple[SimGpu, SimMigBoard]:
        """A GPU handle's board; NOT_SUPPORTED when its model has no MIG."""
        gpu = self.driver.gpu(handle)
        board = self.boards[gpu.index]
        unsupported_unless(board.supported)
        return gpu, board

    def gpu_instance(self, handle: int | None) -> SimGpuInstance:
        self.driver.require_init()
        for board in self.boards:
            for instance in board.instances.values():
                if instance.handle == handle:
                    self._reachable(board)
                    return instance
        raise Fail(INVALID_ARGUMENT)

    def compute_instance(self, handle: int | None) -> SimComputeInstance:
        self.driver.require_init()
        for board in self.boards:
            for instance in board.instances.values():
                for compute in instance.computes.values():
                    if compute.handle == handle:
                        self._reachable(board)
                        return compute
        raise Fail(INVALID_ARGUMENT)

    def mig_device(self, handle: int | None) -> SimComputeInstance | None:
        """The MIG device behind a handle; None when it is not a MIG device handle."""
        for board in self.boards:
            for compute in board.mig_devices():
                if compute.device_handle == handle:
                    self.driver.require_init()
                    self._reachable(board)
                    return compute
        return None

    def _reachable(self, board: SimMigBoard) -> SimGpu:
        gpu = self.driver.gpus[self.boards.index(board)]
        return self.driver.gpu(self.driver.handle_of(gpu))

    def gpu_of(self, board: SimMigBoard) -> SimGpu:
        return self._reachable(board)

    def may_change(self) -> None:
        if not self.driver.allow_set:
            raise Fail(NO_PERMISSION)


def export_mig(driver: SimDriver, x: Exports) -> None:
    """MIG mode, instances and MIG device handles. Call after export_device: it makes the
    identity and memory symbols answer for MIG device handles too."""
    mig = MigHandles(driver)
    _mode(mig, x)
    _gpu_instances(mig, x)
    _compute_instances(mig, x)
    _mig_devices(mig, x)


def _mode(mig: MigHandles, x: Exports) -> None:
    def get_mode(handle: int | None, current: int | None, pending: int | None) -> int:
        _, board = mig.board(handle)
        put(c_uint, current, int(board.enabled))
        put(c_uint, pending, int(board.pending))
        return SUCCESS

    def set_mode(handle: int | None, mode: int, activation: int | None) -> int:
        gpu, board = mig.board(handle)
        mig.may_change()
        if mode not in (pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_ENABLE):
            raise Fail(INVALID_ARGUMENT)
        put(c_uint, activation, board.set_mode(mode == pynvml.NVML_DEVICE_MIG_ENABLE, bool(gpu.processes)))
        return SUCCESS

    x.export("nvmlDeviceGetMigMode", (H, P, P), get_mode)
    x.export("nvmlDeviceSetMigMode", (H, U, P), set_mode)


def _gpu_instances(mig: MigHandles, x: Exports) -> None:
    """Profiles, placements, capacity, and creating, listing and destroying GPU instances."""

    def profile_info(versioned: bool) -> Callable[[int | None, int, int | None], int]:
        def impl(handle: int | None, index: int, out: int | None) -> int:
            _, board = mig.board(handle)
            if not out:
                raise Fail(INVALID_ARGUMENT)
            if index >= pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT:
                raise Fail(INVALID_ARGUMENT)
            profile = board.profile_by_index(index)
            unsupported_unless(profile is not None)
            assert profile is not None
            info: Any
            if versioned:
                info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t.from_address(out)
                if info.version != pynvml.nvmlGpuInstanceProfileInfo_v2:
                    raise Fail(VERSION_MISMATCH)
                info.name = f"MIG {profile.name}".encode()
            else:
                info = pynvml.c_nvmlGpuInstanceProfileInfo_t.from_address(out)
            info.id = profile.profile_id
            info.isP2pSupported = 0
            info.sliceCount = profile.slices
            info.instanceCount = profile.max_count
            info.multiprocessorCount = profile.multiprocessors
            info.copyEngineCount = profile.slices
            # decoder/encoder/JPEG/OFA counts: media engines are not simulated (left 0)
            info.memorySizeMB = profile.memory_mib
            return SUCCESS
        return impl

    def profile_by_id(handle: int | None, profile_id: int) -> tuple[SimGpu, SimMigBoard, Any]:
        gpu, board = mig.board(handle)
        profile = board.profile_by_id(profile_id)
        if profile is None:
            raise Fail(INVALID_ARGUMENT)
        return gpu, board, profile

    def possible_placements(handle: int | None, profile_id: int, out: int | None,
                            count: int | None) -> int:
        _, _, profile = profile_by_id(handle, profile_id)
        if not room_for(count, out, len(profile.placements)):
            return INSUFFICIENT_SIZE
        array = (pynvml.c_nvmlGpuInstancePlacement_t * len(profile.placements)).from_address(out)
        for slot, start in zip(array, profile.placements):
            slot.start, slot.size = start, profile.size
        return SUCCESS

    def remaining(handle: int | None, profile_id: int, out: int | None) -> int:
        _, board, profile = profile_by_id(handle, profile_id)
        put(c_uint, out, board.remaining(profile) if board.enabled else 0)
        return SUCCESS

    def create(handle: int | None, profile_id: int, out: int | None) -> int:
        _, board, profile = profile_by_id(handle, profile_id)
        mig.may_change()
        put(c_void_p, out, board.create(profile, None).handle)
        return SUCCESS

    def create_with_placement(handle: int | None, profile_id: int, placement: int | None,
                              out: int | None) -> int:
        _, board, profile = profile_by_id(handle, profile_id)
        mig.may_change()
        if not placement:
            raise Fail(INVALID_ARGUMENT)
        wanted = pynvml.c_nvmlGpuInstancePlacement_t.from_address(placement)
        if wanted.size != profile.size:
            raise Fail(INVALID_ARGUMENT)
        put(c_void_p, out, board.create(profile, wanted.start).handle)
        return SUCCESS

    def instances(handle: int | None, profile_id: int, out: int | None, count: int | None) -> int:
        _, board, profile = profile_by_id(handle, profile_id)
        if not out or not count:
            raise Fail(INVALID_ARGUMENT)
        found: list[c_void_p | int | None] = [gi.handle for _, gi in sorted(board.instances.items())
                 if gi.profile.profile_id == profile.profile_id]
        if found:
            (c_void_p * len(found)).from_address(out)[:] = found
        put(c_uint, count, len(found))
        return SUCCESS

    def by_id(handle: int | None, gi_id: int, out: int | None) -> int:
        _, board = mig.board(handle)
        unsupported_unless(board.enabled)
        if gi_id not in board.instances:
            raise Fail(NOT_FOUND)
        put(c_void_p, out, board.instances[gi_id].handle)
        return SUCCESS

    def info(gi_handle: int | None, out: int | None) -> int:
        instance = mig.gpu_instance(gi_handle)
        if not out:
            raise Fail(INVALID_ARGUMENT)
        gpu = mig.gpu_of(instance.board)
        result = pynvml.c_nvmlGpuInstanceInfo_t.from_address(out)
        result.device = ctypes.cast(mig.driver.handle_of(gpu), pynvml.c_nvmlDevice_t)
        result.id = instance.id
        result.profileId = instance.profile.profile_id
        result.placement.start = instance.start
        result.placement.size = instance.profile.size
        return SUCCESS

    def destroy(gi_handle: int | None) -> int:
        instance = mig.gpu_instance(gi_handle)
        mig.may_change()
        instance.board.destroy(instance, bool(mig.gpu_of(instance.board).processes))
        return SUCCESS

    x.export("nvmlDeviceGetGpuInstanceProfileInfo", (H, U, P), profile_info(False))
    x.export("nvmlDeviceGetGpuInstanceProfileInfoV", (H, U, P), profile_info(True))
    x.export("nvmlDeviceGetGpuInstancePossiblePlacements_v2", (H, U, P, P), possible_placements)
    x.export("nvmlDeviceGetGpuInstanceRemainingCapacity", (H, U, P), remaining)
    x.export("nvmlDeviceCreateGpuInstance", (H, U, P), create)
    x.export("nvmlDeviceCreateGpuInstanceWithPlacement", (H, U, P, P), create_with_placement)
    x.export("nvmlDeviceGetGpuInstances", (H, U, P, P), instances)
    x.export("nvmlDeviceGetGpuInstanceById", (H, U, P), by_id)
    x.export("nvmlGpuInstanceGetInfo", (H, P), info)
    x.export("nvmlGpuInstanceDestroy", (H,), destroy)


def _compute_instances(mig: MigHandles, x: Exports) -> None:
    """Compute instance profiles, and creating, listing and destroying compute instances."""

    def profile_info(versioned: bool) -> Callable[[int | None, int, int, int | None], int]:
        def impl(gi_handle: int | None, index: int, engine: int, out: int | None) -> int:
            instance = mig.gpu_instance(gi_handle)
            if not out or engine != pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED:
                raise Fail(INVALID_ARGUMENT)
            slices = CI_SLICES.get(index)
            unsupported_unless(slices is not None and slices <= instance.profile.slices)
            assert slices is not None
            gi = instance.profile
            result: Any
            if versioned:
                result = pynvml.c_nvmlComputeInstanceProfileInfo_v2_t.from_address(out)
                if result.version != pynvml.nvmlComputeInstanceProfileInfo_v2:
                    raise Fail(VERSION_MISMATCH)
                result.name = (f"MIG {gi.name}" if slices == gi.slices
                               else f"MIG {slices}c.{gi.name}").encode()
            else:
                result = pynvml.c_nvmlComputeInstanceProfileInfo_t.from_address(out)
            result.id = index
            result.sliceCount = slices
            result.instanceCount = gi.slices // slices
            result.multiprocessorCount = gi.multiprocessors * slices // gi.slices
            result.sharedCopyEngineCount = gi.slices
            return SUCCESS
        return impl

    def create(gi_handle: int | None, ci_profile: int, out: int | None) -> int:
        instance = mig.gpu_instance(gi_handle)
        mig.may_change()
        put(c_void_p, out, instance.board.create_compute(instance, ci_profile).handle)
        return SUCCESS

    def computes(gi_handle: int | None, ci_profile: int, out: int | None, count: int | None) -> int:
        instance = mig.gpu_instance(gi_handle)
        if not out or not count:
            raise Fail(INVALID_ARGUMENT)
        found: list[c_void_p | int | None] = [
            ci.handle for _, ci in sorted(instance.computes.items()) if ci.profile_id == ci_profile]
        if found:
            (c_void_p * len(found)).from_address(out)[:] = found
        put(c_uint, count, len(found))
        return SUCCESS

    def destroy(ci_handle: int | None) -> int:
        compute = mig.compute_instance(ci_handle)
        mig.may_change()
        board = compute.gpu_instance.board
        board.destroy_compute(compute, bool(mig.gpu_of(board).processes))
        return SUCCESS

    def info(ci_handle: int | None, out: int | None) -> int:
        compute = mig.compute_instance(ci_handle)
        if not out:
            raise Fail(INVALID_ARGUMENT)
        result = pynvml.c_nvmlComputeInstanceInfo_t.from_address(out)
        result.device = ctypes.cast(mig.driver.handle_of(mig.gpu_of(compute.gpu_instance.board)),
                                    pynvml.c_nvmlDevice_t)
        result.gpuInstance = ctypes.cast(compute.gpu_instance.handle, pynvml.c_nvmlGpuInstance_t)
        result.id = compute.id
        result.profileId = compute.profile_id
        result.placement.start = compute.start
        result.placement.size = compute.slices
        return SUCCESS

    x.export("nvmlGpuInstanceGetComputeInstanceProfileInfo", (H, U, U, P), profile_info(False))
    x.export("nvmlGpuInstanceGetComputeInstanceProfileInfoV", (H, U, U, P), profile_info(True))
    x.export("nvmlGpuInstanceCreateComputeInstance", (H, U, P), create)
    x.export("nvmlGpuInstanceGetComputeInstances", (H, U, P, P), computes)
    x.export("nvmlComputeInstanceDestroy", (H,), destroy)
    x.export("nvmlComputeInstanceGetInfo_v2", (H, P), info)


def _mig_devices(mig: MigHandles, x: Exports) -> None:
    """MIG device handles, and the identity and memory symbols answering for them."""

    def max_count(handle: int | None, out: int | None) -> int:
        gpu = mig.driver.gpu(handle)
        put(c_uint, out, MAX_MIG_DEVICES if mig.boards[gpu.index].supported else 0)
        return SUCCESS

    def by_index(handle: int | None, index: int, out: int | None) -> int:
        _, board = mig.board(handle)
        devices = board.mig_devices()
        if not board.enabled or index >= MAX_MIG_DEVICES:
            raise Fail(INVALID_ARGUMENT)
        if index >= len(devices):
            raise Fail(NOT_FOUND)
        put(c_void_p, out, devices[index].device_handle)
        return SUCCESS

    def is_mig(handle: int | None, out: int | None) -> int:
        if mig.mig_device(handle) is None:
            mig.driver.gpu(handle)  # a bad handle answers INVALID_ARGUMENT
            put(c_uint, out, 0)
        else:
            put(c_uint, out, 1)
        return SUCCESS

    def mig_only(read: Callable[[SimComputeInstance], int]) -> Callable[[int | None, int | None], int]:
        def impl(handle: int | None, out: int | None) -> int:
            device = mig.mig_device(handle)
            if device is None:
                mig.driver.gpu(handle)
                raise Fail(NOT_SUPPORTED)  # not a MIG device
            put(c_uint, out, read(device))
            return SUCCESS
        return impl

    def parent(handle: int | None, out: int | None) -> int:
        device = mig.mig_device(handle)
        if device is None:
            raise Fail(INVALID_ARGUMENT)
        put(c_void_p, out, mig.driver.handle_of(mig.gpu_of(device.gpu_instance.board)))
        return SUCCESS

    x.export("nvmlDeviceGetMaxMigDeviceCount", (H, P), max_count)
    x.export("nvmlDeviceGetMigDeviceHandleByIndex", (H, U, P), by_index)
    x.export("nvmlDeviceIsMigDeviceHandle", (H, P), is_mig)
    x.export("nvmlDeviceGetGpuInstanceId", (H, P), mig_only(lambda d: d.gpu_instance.id))
    x.export("nvmlDeviceGetComputeInstanceId", (H, P), mig_only(lambda d: d.id))
    x.export("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", (H, P), parent)
    _identity_of_mig_devices(mig, x)


def _identity_of_mig_devices(mig: MigHandles, x: Exports) -> None:
    """nvmlDeviceGetName/UUID/MemoryInfo on a MIG device handle, and HandleByUUID with a MIG
    UUID; a GPU goes on to the implementation in device.py (which must be exported first)."""

    def memory(device: SimComputeInstance) -> tuple[int, int]:
        """(total, used) bytes: the instance's memory, and its share of the board's use."""
        gpu = mig.gpu_of(device.gpu_instance.board)
        profile = device.gpu_instance.profile
        total = profile.memory_mib * MIB
        used = min(total, round(gpu.memory_used_mib * profile.size / MEMORY_SLICES) * MIB)
        return total, used

    def text(name: str, read: Callable[[SimComputeInstance], str]) -> None:
        fallback = x.table[name]

        def impl(handle: int | None, out: int | None, size: int) -> int:
            device = mig.mig_device(handle)
            if device is None:
                return int(fallback(handle, out, size))
            put_text(out, size, read(device))
            return SUCCESS

        x.export(name, (H, P, U), impl)

    def memory_info(name: str, write: Callable[[SimComputeInstance, int], None]) -> None:
        fallback = x.table[name]

        def impl(handle: int | None, out: int | None) -> int:
            device = mig.mig_device(handle)
            if device is None:
                return int(fallback(handle, out))
            if not out:
                raise Fail(INVALID_ARGUMENT)
            write(device, out)
            return SUCCESS

        x.export(name, (H, P), impl)

    def memory_v1(device: SimComputeInstance, out: int) -> None:
        result = pynvml.c_nvmlMemory_t.from_address(out)
        result.total, result.used = memory(device)
        result.free = result.total - result.used

    def memory_v2(device: SimComputeInstance, out: int) -> None:
        result = pynvml.c_nvmlMemory_v2_t.from_address(out)
        if result.version != pynvml.nvmlMemory_v2:
            raise Fail(VERSION_MISMATCH)
        result.total, result.used = memory(device)
        result.reserved = 0
        result.free = result.total - result.used

    by_uuid_fallback = x.table["nvmlDeviceGetHandleByUUID"]

    def handle_by_uuid(uuid: bytes | None, out: int | None) -> int:
        for board in mig.boards:
            for device in board.mig_devices():
                if uuid is not None and device.uuid.encode() == uuid:
                    mig.gpu_of(board)
                    put(c_void_p, out, device.device_handle)
                    return SUCCESS
        return int(by_uuid_fallback(uuid, out))

    x.export("nvmlDeviceGetHandleByUUID", (c_char_p, P), handle_by_uuid)
    text("nvmlDeviceGetName",
         lambda d: f"{d.gpu_instance.board.gpu_name} MIG {d.gpu_instance.profile.name}")
    text("nvmlDeviceGetUUID", lambda d: d.uuid)
    memory_info("nvmlDeviceGetMemoryInfo", memory_v1)
    memory_info("nvmlDeviceGetMemoryInfo_v2", memory_v2)
