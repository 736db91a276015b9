"""The simulated libnvidia-ml's device and inventory symbols: the library itself (init,
shutdown, error strings, versions), finding devices (by index, UUID, PCI bus id), each board's
identity (name, UUID, serial, PCI, compute capability, NUMA) and its memory and
utilisation. One area of edge/sim/nvml: see its __init__ for why the symbols are split.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from ctypes import c_char_p, c_int, c_uint, c_void_p

import pynvml

from edge.sim.nvml.abi import (
    INVALID_ARGUMENT,
    MIB,
    NOT_FOUND,
    SUCCESS,
    VERSION_MISMATCH,
    Exports,
    Fail,
    H,
    P,
    U,
    as_uint,
    put,
    put_text,
    unsupported_unless,
)
from edge.sim.nvml.driver import SimDriver
from edge.sim.physics import SimGpu
from edge.sim.profiles import CUDA_DRIVER_VERSION, DRIVER_VERSION, NVML_VERSION

_ARCHITECTURE = {"hopper": pynvml.NVML_DEVICE_ARCH_HOPPER, "ampere": pynvml.NVML_DEVICE_ARCH_AMPERE,
                 "turing": pynvml.NVML_DEVICE_ARCH_TURING}

# What the real nvmlErrorString says for codes pynvml has no text of its own for.
_ERROR_TEXTS = {
    pynvml.NVML_ERROR_IN_USE: "In use by another client",
    pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES: "Insufficient resources",
    pynvml.NVML_ERROR_NOT_FOUND: "Not Found",
}


def export_device(driver: SimDriver, x: Exports) -> None:
    """Library, devices, identity, memory and utilisation."""
    _library(driver, x)
    _finding_devices(driver, x)
    _identity(driver, x)
    _memory_and_utilisation(driver, x)


def _library(driver: SimDriver, x: Exports) -> None:
    """nvmlInit, nvmlShutdown, error strings and the driver's versions."""

    def init_with_flags(flags: int) -> int:
        if driver.fail_init_with is not None:
            return driver.fail_init_with
        if driver.unloaded:
            driver.unloaded = False  # the reloaded driver answers again
        driver.init_count += 1
        return SUCCESS

    def shutdown() -> int:
        driver.require_init()
        driver.init_count -= 1
        return SUCCESS

    def error_string(code: int) -> int:
        if code not in driver.error_strings:
            text = pynvml.NVMLError._errcode_to_string.get(code) or _ERROR_TEXTS.get(code, "Unknown Error")
            driver.error_strings[code] = ctypes.create_string_buffer(text.encode())
        return ctypes.addressof(driver.error_strings[code])

    def text_getter(value: str) -> Callable[[int | None, int], int]:
        def impl(out: int | None, size: int) -> int:
            driver.require_init()
            put_text(out, size, value)
            return SUCCESS
        return impl

    def cuda_version(out: int | None) -> int:
        driver.require_init()
        put(c_int, out, CUDA_DRIVER_VERSION)
        return SUCCESS

    x.export("nvmlInitWithFlags", (U,), init_with_flags)
    x.export("nvmlInit_v2", (), lambda: init_with_flags(0))
    x.export("nvmlShutdown", (), shutdown)
    x.export("nvmlErrorString", (c_int,), error_string, restype=c_void_p, can_hang=False)
    x.export("nvmlSystemGetDriverVersion", (P, U), text_getter(DRIVER_VERSION))
    x.export("nvmlSystemGetNVMLVersion", (P, U), text_getter(NVML_VERSION))
    x.export("nvmlSystemGetCudaDriverVersion", (P,), cuda_version)
    x.export("nvmlSystemGetCudaDriverVersion_v2", (P,), cuda_version)


def _finding_devices(driver: SimDriver, x: Exports) -> None:
    """The device count and handles by index, UUID and PCI bus id."""

    def device_count(out: int | None) -> int:
        driver.require_init()
        put(c_uint, out, len(driver.gpus))
        return SUCCESS

    def handle_by_index(index: int, out: int | None) -> int:
        driver.require_init()
        if index >= len(driver.gpus):
            raise Fail(INVALID_ARGUMENT)
        driver.give_handle(driver.gpus[index], out)
        return SUCCESS

    def handle_by_uuid(uuid: bytes | None, out: int | None) -> int:
        driver.require_init()
        for gpu in driver.gpus:
            if uuid is not None and gpu.uuid.encode() == uuid:
                driver.give_handle(gpu, out)
                return SUCCESS
        raise Fail(NOT_FOUND)

    def handle_by_bus_id(bus_id: bytes | None, out: int | None) -> int:
        driver.require_init()
        wanted = (bus_id or b"").decode(errors="replace").lower()
        for gpu in driver.gpus:
            full = gpu.pci_bus_id.lower()
            if wanted in (full, full[4:]):  # 8- or 4-digit domain
                driver.give_handle(gpu, out)
                return SUCCESS
        raise Fail(NOT_FOUND)

    x.export("nvmlDeviceGetCount_v2", (P,), device_count)
    x.export("nvmlDeviceGetHandleByIndex_v2", (U, P), handle_by_index)
    x.export("nvmlDeviceGetHandleByUUID", (c_char_p, P), handle_by_uuid)
    x.export("nvmlDeviceGetHandleByPciBusId_v2", (c_char_p, P), handle_by_bus_id)


def _identity(driver: SimDriver, x: Exports) -> None:
    """Each board's name, UUID, serial, PCI info, architecture and NUMA node."""

    def device_text(
        read: Callable[[SimGpu], str],
    ) -> Callable[[int | None, int | None, int], int]:
        def impl(handle: int | None, out: int | None, size: int) -> int:
            put_text(out, size, read(driver.gpu(handle)))
            return SUCCESS
        return impl

    def pci_info(handle: int | None, out: int | None) -> int:
        gpu = driver.gpu(handle)
        if not out:
            raise Fail(INVALID_ARGUMENT)
        info = pynvml.nvmlPciInfo_t.from_address(out)
        domain, bus, rest = gpu.pci_bus_id.split(":")
        info.busIdLegacy = f"{int(domain, 16):04X}:{bus}:{rest}".encode()
        info.busId = gpu.pci_bus_id.encode()
        info.domain = int(domain, 16)
        info.bus = int(bus, 16)
        info.device = int(rest.split(".")[0], 16)
        info.pciDeviceId = gpu.profile.pci_device_id
        info.pciSubSystemId = (gpu.profile.pci_device_id & 0xFFFF0000) | 0x10DE
        return SUCCESS

    def compute_capability(handle: int | None, major: int | None, minor: int | None) -> int:
        gpu = driver.gpu(handle)
        put(c_int, major, gpu.profile.compute_capability[0])
        put(c_int, minor, gpu.profile.compute_capability[1])
        return SUCCESS

    def numa_node(gpu: SimGpu) -> int:
        unsupported_unless(gpu.profile.numa_from_nvml)
        return 0 if gpu.index < max(1, len(driver.gpus) // 2) else 1

    x.export("nvmlDeviceGetName", (H, P, U), device_text(lambda g: g.profile.name))
    x.export("nvmlDeviceGetUUID", (H, P, U), device_text(lambda g: g.uuid))
    x.export("nvmlDeviceGetSerial", (H, P, U), device_text(lambda g: g.serial))
    x.export("nvmlDeviceGetPciInfo_v3", (H, P), pci_info)
    x.export("nvmlDeviceGetCudaComputeCapability", (H, P, P), compute_capability)
    x.scalar("nvmlDeviceGetIndex", c_uint, lambda g: g.index)
    x.scalar("nvmlDeviceGetMinorNumber", c_uint, lambda g: g.index)
    x.scalar("nvmlDeviceGetArchitecture", c_uint,
             lambda g: _ARCHITECTURE.get(g.profile.architecture, pynvml.NVML_DEVICE_ARCH_UNKNOWN))
    x.scalar("nvmlDeviceGetNumaNodeId", c_int, numa_node)
    x.scalar("nvmlDeviceGetPersistenceMode", c_uint, lambda g: pynvml.NVML_FEATURE_ENABLED)
    x.scalar("nvmlDeviceGetComputeMode", c_uint, lambda g: pynvml.NVML_COMPUTEMODE_DEFAULT)
    x.scalar("nvmlDeviceGetFanSpeed", c_uint,
             lambda g: unsupported_unless(False))  # passively cooled data-centre boards
    # MIG mode and the MIG device handles: edge/sim/nvml/mig.py


def _memory_and_utilisation(driver: SimDriver, x: Exports) -> None:
    """Memory in use (v1 and v2 structs) and GPU and memory utilisation."""

    def memory_info(handle: int | None, out: int | None) -> int:
        gpu = driver.gpu(handle)
        if not out:
            raise Fail(INVALID_ARGUMENT)
        memory = pynvml.c_nvmlMemory_t.from_address(out)
        memory.total = gpu.profile.memory_total_mib * MIB
        memory.used = gpu.memory_used_mib * MIB
        memory.free = memory.total - memory.used
        return SUCCESS

    def memory_info_v2(handle: int | None, out: int | None) -> int:
        gpu = driver.gpu(handle)
        if not out:
            raise Fail(INVALID_ARGUMENT)
        memory = pynvml.c_nvmlMemory_v2_t.from_address(out)
        if memory.version != pynvml.nvmlMemory_v2:
            raise Fail(VERSION_MISMATCH)
        memory.total = gpu.profile.memory_total_mib * MIB
        memory.reserved = gpu.profile.memory_reserved_mib * MIB
        memory.used = (gpu.memory_used_mib - gpu.profile.memory_reserved_mib) * MIB
        memory.free = memory.total - memory.reserved - memory.used
        return SUCCESS

    def utilization(handle: int | None, out: int | None) -> int:
        gpu = driver.gpu(handle)
        if not out:
            raise Fail(INVALID_ARGUMENT)
        rates = pynvml.c_nvmlUtilization_t.from_address(out)
        rates.gpu = as_uint(gpu.load_pct)
        rates.memory = as_uint(gpu.memory_util_pct)
        return SUCCESS

    x.export("nvmlDeviceGetMemoryInfo", (H, P), memory_info)
    x.export("nvmlDeviceGetMemoryInfo_v2", (H, P), memory_info_v2)
    x.export("nvmlDeviceGetUtilizationRates", (H, P), utilization)
