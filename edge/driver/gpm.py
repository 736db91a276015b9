"""GPM (GPU performance monitoring, Hopper and later): the profiling figures dcgm-exporter exports
as DCGM_FI_PROF_GR_ENGINE_ACTIVE, _PIPE_TENSOR_ACTIVE, _DRAM_ACTIVE, _PCIE_TX_BYTES, _PCIE_RX_BYTES.

A GPM metric is the difference between two samples of the board's counters, so each GPU keeps
its previous sample: every sampling cycle takes a new one and computes the metrics between the
two (the whole interval since the previous cycle). The first cycle after start or after a driver
re-initialisation has nothing to compare with and gives no figures (None, not missing). A board
without GPM (isSupportedDevice = 0, or nvmlGpmSampleGet answers NotSupported) raises
NVMLError_NotSupported, which the driver notes as missing like any other figure.

Not thread-safe: used by NvmlDriver on its one worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pynvml

MIB = 1024 * 1024

# GPM metric -> (GpuSample field, scale from NVML's unit: percent -> ratio, MiB/s -> bytes/s)
METRICS: dict[int, tuple[str, float]] = {
    pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: ("gr_engine_active", 0.01),
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: ("tensor_active", 0.01),
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: ("dram_active", 0.01),
    pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC: ("pcie_tx_bytes_per_s", float(MIB)),
    pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC: ("pcie_rx_bytes_per_s", float(MIB)),
}
FIGURES = [field for field, _ in METRICS.values()]

Call = Callable[..., Any]  # call(fn, *args) -> fn(handle of this GPU, *args)


class GpmReader:
    """Keeps one GPM sample per GPU and turns the next one into metrics."""

    def __init__(self) -> None:
        self._supported: dict[int, bool] = {}
        self._previous: dict[int, Any] = {}

    def read(self, index: int, call: Call) -> dict[str, float | None]:
        """The GPM figures of GPU `index` since its previous call; raises pynvml.NVMLError."""
        if index not in self._supported:
            support = call(pynvml.nvmlGpmQueryDeviceSupport)
            self._supported[index] = bool(support.isSupportedDevice)
        if not self._supported[index]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        sample = pynvml.nvmlGpmSampleAlloc()
        try:
            call(pynvml.nvmlGpmSampleGet, sample)
        except pynvml.NVMLError:
            _free(sample)
            raise
        previous = self._previous.pop(index, None)
        self._previous[index] = sample
        if previous is None:
            return {}
        try:
            return self._metrics(previous, sample)
        except pynvml.NVMLError_InvalidArgument:
            return {}  # the previous sample predates a driver reload: start again from this one
        finally:
            _free(previous)

    @staticmethod
    def _metrics(first: Any, second: Any) -> dict[str, float | None]:
        request = pynvml.c_nvmlGpmMetricsGet_t()
        request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(METRICS)
        request.sample1, request.sample2 = first, second
        for slot, metric_id in enumerate(METRICS):
            request.metrics[slot].metricId = metric_id
        pynvml.nvmlGpmMetricsGet(request)
        out: dict[str, float | None] = {}
        for slot, (field, scale) in enumerate(METRICS.values()):
            metric = request.metrics[slot]
            out[field] = metric.value * scale if metric.nvmlReturn == pynvml.NVML_SUCCESS else None
        return out

    def forget(self, index: int | None = None) -> None:
        """Free the kept samples (of one GPU, or all): a lost GPU, or before nvmlShutdown."""
        for key in [index] if index is not None else list(self._previous):
            sample = self._previous.pop(key, None)
            if sample is not None:
                _free(sample)
        if index is None:
            self._supported.clear()

    def discard(self) -> None:
        """After the driver was re-initialised: its old samples are not ours to free any more."""
        self._previous.clear()
        self._supported.clear()


def _free(sample: Any) -> None:
    try:
        pynvml.nvmlGpmSampleFree(sample)
    except pynvml.NVMLError:
        pass  # the driver went away with it
