"""The simulated libnvidia-ml's GPM (GPU performance monitoring) symbols: the profiling metrics
dcgm-exporter exports as DCGM_FI_PROF_* (graphics engine, tensor pipe and DRAM activity, PCIe
traffic). One area of edge/sim/nvml: see its __init__.

GPM works as on the real driver: a caller allocates sample buffers (nvmlGpmSampleAlloc), fills
one now and one later (nvmlGpmSampleGet) and asks for metrics between the two
(nvmlGpmMetricsGet); each sample is a snapshot of the board's activity counters, and a metric is
their difference over the time between the snapshots. Only Hopper and later have GPM: on a T4,
A10 or A100 nvmlGpmQueryDeviceSupport says isSupportedDevice = 0 and nvmlGpmSampleGet answers
NOT_SUPPORTED.
"""

from __future__ import annotations

import ctypes
from ctypes import c_void_p
from dataclasses import dataclass

import pynvml

from edge.sim.nvml.abi import (
    INVALID_ARGUMENT,
    MIB,
    NOT_SUPPORTED,
    SUCCESS,
    VERSION_MISMATCH,
    Exports,
    Fail,
    H,
    P,
    put,
    unsupported_unless,
)
from edge.sim.nvml.driver import SimDriver
from edge.sim.physics import SimGpu


@dataclass
class _Snapshot:
    gpu_index: int
    t: float
    gr_active_s: float
    tensor_active_s: float
    dram_active_s: float
    pcie_tx_bytes: float
    pcie_rx_bytes: float


@dataclass
class _Buffer:
    memory: ctypes.Array
    snapshot: _Snapshot | None = None


def _snapshot(gpu: SimGpu) -> _Snapshot:
    return _Snapshot(gpu.index, gpu.last_t, gpu.gr_active_s, gpu.tensor_active_s,
                     gpu.dram_active_s, gpu.pcie_tx_bytes, gpu.pcie_rx_bytes)


def _metric(metric_id: int, first: _Snapshot, second: _Snapshot) -> float:
    """One metric between two snapshots of one GPU; Fail(NOT_SUPPORTED) for one we do not model."""
    dt = second.t - first.t

    def busy(before: float, after: float) -> float:
        return min(100.0, max(0.0, 100.0 * (after - before) / dt))

    if metric_id == pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL:
        return busy(first.gr_active_s, second.gr_active_s)
    if metric_id == pynvml.NVML_GPM_METRIC_SM_UTIL:
        return busy(first.gr_active_s, second.gr_active_s)
    if metric_id == pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL:
        return busy(first.tensor_active_s, second.tensor_active_s)
    if metric_id == pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL:
        return busy(first.dram_active_s, second.dram_active_s)
    if metric_id == pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC:
        return (second.pcie_tx_bytes - first.pcie_tx_bytes) / dt / MIB
    if metric_id == pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC:
        return (second.pcie_rx_bytes - first.pcie_rx_bytes) / dt / MIB
    raise Fail(NOT_SUPPORTED)


def export_gpm(driver: SimDriver, x: Exports) -> None:
    """Device support, sample buffers, samples and the metrics between two of them."""
    buffers: dict[int, _Buffer] = {}

    def query_support(handle: int | None, out: int | None) -> int:
        gpu = driver.gpu(handle)
        if not out:
            raise Fail(INVALID_ARGUMENT)
        support = pynvml.c_nvmlGpmSupport_t.from_address(out)
        if support.version != pynvml.NVML_GPM_SUPPORT_VERSION:
            raise Fail(VERSION_MISMATCH)
        support.isSupportedDevice = int(gpu.profile.gpm)
        return SUCCESS

    def sample_alloc(out: int | None) -> int:
        driver.require_init()
        memory = ctypes.create_string_buffer(16)
        put(c_void_p, out, ctypes.addressof(memory))
        buffers[ctypes.addressof(memory)] = _Buffer(memory)
        return SUCCESS

    def sample_free(address: int | None) -> int:
        if buffers.pop(address or 0, None) is None:
            raise Fail(INVALID_ARGUMENT)
        return SUCCESS

    def sample_get(handle: int | None, address: int | None) -> int:
        gpu = driver.gpu(handle)
        unsupported_unless(gpu.profile.gpm)
        buffer = buffers.get(address or 0)
        if buffer is None:
            raise Fail(INVALID_ARGUMENT)
        buffer.snapshot = _snapshot(gpu)
        return SUCCESS

    def metrics_get(out: int | None) -> int:
        driver.require_init()
        if not out:
            raise Fail(INVALID_ARGUMENT)
        request = pynvml.c_nvmlGpmMetricsGet_t.from_address(out)
        if request.version != pynvml.NVML_GPM_METRICS_GET_VERSION:
            raise Fail(VERSION_MISMATCH)
        if request.numMetrics > pynvml.NVML_GPM_METRIC_MAX:
            raise Fail(INVALID_ARGUMENT)
        samples = []
        for pointer in (request.sample1, request.sample2):
            address = ctypes.cast(pointer, c_void_p).value or 0
            buffer = buffers.get(address)
            if buffer is None or buffer.snapshot is None:
                raise Fail(INVALID_ARGUMENT)
            samples.append(buffer.snapshot)
        first, second = samples
        if first.gpu_index != second.gpu_index or second.t <= first.t:
            raise Fail(INVALID_ARGUMENT)
        for i in range(request.numMetrics):
            metric = request.metrics[i]
            try:
                metric.value = _metric(metric.metricId, first, second)
                metric.nvmlReturn = SUCCESS
            except Fail as failure:
                metric.value = 0.0
                metric.nvmlReturn = failure.code
        return SUCCESS

    x.export("nvmlGpmQueryDeviceSupport", (H, P), query_support)
    x.export("nvmlGpmSampleAlloc", (P,), sample_alloc)
    x.export("nvmlGpmSampleFree", (P,), sample_free)
    x.export("nvmlGpmSampleGet", (H, P), sample_get)
    x.export("nvmlGpmMetricsGet", (P,), metrics_get)
