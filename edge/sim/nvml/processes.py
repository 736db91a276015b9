"""The simulated libnvidia-ml's process symbols: the compute (and empty graphics and MPS)
process lists, per-process utilisation samples and the system's process names. One area of
edge/sim/nvml: see its __init__.
"""

from __future__ import annotations

from collections.abc import Callable

import pynvml

from edge.sim.nvml.abi import (
    INSUFFICIENT_SIZE,
    INVALID_ARGUMENT,
    MIB,
    NO_INSTANCE,
    NOT_FOUND,
    SUCCESS,
    ULL,
    Exports,
    Fail,
    H,
    P,
    U,
    as_uint,
    put_text,
    room_for,
)
from edge.sim.nvml.driver import SimDriver

_PROCESS_NAME = "/usr/bin/python3"


def export_processes(driver: SimDriver, x: Exports) -> None:
    """Process lists, utilisation samples and process names."""
    _process_lists(driver, x)
    _process_names(driver, x)


def _process_lists(driver: SimDriver, x: Exports) -> None:
    """The processes running on a GPU and their utilisation samples."""

    def running_processes(compute: bool) -> Callable[[int | None, int | None, int | None], int]:
        def impl(handle: int | None, count: int | None, out: int | None) -> int:
            gpu = driver.gpu(handle)
            procs = gpu.processes if compute else []
            if not room_for(count, out, len(procs)):
                return INSUFFICIENT_SIZE if procs else SUCCESS
            if not procs:
                return SUCCESS
            infos = (pynvml.c_nvmlProcessInfo_v3_t * len(procs)).from_address(out)
            for info, proc in zip(infos, procs):
                info.pid = proc.pid
                info.usedGpuMemory = proc.used_memory_mib * MIB
                info.gpuInstanceId = NO_INSTANCE
                info.computeInstanceId = NO_INSTANCE
            return SUCCESS
        return impl

    def process_utilization(handle: int | None, out: int | None, count: int | None,
                            last_seen_us: int) -> int:
        gpu = driver.gpu(handle)
        if not count:
            raise Fail(INVALID_ARGUMENT)
        now_us = int((driver.epoch_offset + driver.clock()) * 1_000_000)
        if not gpu.processes or now_us <= last_seen_us:
            raise Fail(NOT_FOUND)  # what NVML says when nothing was sampled since then
        procs = gpu.processes
        if not room_for(count, out, len(procs)):
            return INSUFFICIENT_SIZE
        samples = (pynvml.c_nvmlProcessUtilizationSample_t * len(procs)).from_address(out)
        mem_ratio = gpu.profile.memory_util_per_load
        for sample, proc in zip(samples, procs):
            sample.pid = proc.pid
            sample.timeStamp = now_us
            sample.smUtil = as_uint(proc.sm_util)
            sample.memUtil = as_uint(proc.sm_util * mem_ratio)
            sample.encUtil = 0
            sample.decUtil = 0
        return SUCCESS

    x.export("nvmlDeviceGetComputeRunningProcesses_v3", (H, P, P), running_processes(True))
    x.export("nvmlDeviceGetGraphicsRunningProcesses_v3", (H, P, P), running_processes(False))
    x.export("nvmlDeviceGetMPSComputeRunningProcesses_v3", (H, P, P), running_processes(False))
    x.export("nvmlDeviceGetProcessUtilization", (H, P, P, ULL), process_utilization)


def _process_names(driver: SimDriver, x: Exports) -> None:
    """The name of a process that runs on a simulated GPU."""

    def process_name(pid: int, out: int | None, size: int) -> int:
        driver.require_init()
        if not any(p.pid == pid for g in driver.gpus for p in g.processes):
            raise Fail(NOT_FOUND)
        put_text(out, size, _PROCESS_NAME)
        return SUCCESS

    x.export("nvmlSystemGetProcessName", (U, P, U), process_name)
