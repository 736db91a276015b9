"""Reading the figures behind dcgm-exporter's default counters that the core sample does not
need: memory temperature and NVLink traffic (NVML field values), reserved framebuffer, PCIe
replays, encoder and decoder utilisation, and the vGPU licence. GPM's profiling metrics are in
edge/driver/gpm.py.

`read_extras` is given the driver's `read` (one call, None and a `missing` entry, logged once,
when the GPU or driver cannot give it) and `note` (the same for a figure whose call succeeded but
whose field answered an error, as NVML field values do one by one). It returns GpuSample fields.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pynvml

Read = Callable[..., Any]  # read(figures, fn, *args) -> the call's answer, or None
Note = Callable[[Sequence[str], Exception], None]

_RAW_THROUGHPUT = (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_RAW_TX,
                   pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_RAW_RX)


def _field_ok(value: Any, figure: str, note: Note) -> bool:
    if value.nvmlReturn == pynvml.NVML_SUCCESS:
        return True
    note([figure], pynvml.NVMLError(value.nvmlReturn))
    return False


def read_extras(read: Read, note: Note) -> dict[str, Any]:
    """The extra GpuSample fields of one GPU (absent ones None)."""
    out: dict[str, Any] = {}
    memory = read(["memory_reserved_bytes"], pynvml.nvmlDeviceGetMemoryInfo, pynvml.nvmlMemory_v2)
    out["memory_reserved_bytes"] = memory.reserved if memory is not None else None
    out["pcie_replays"] = read(["pcie_replays"], pynvml.nvmlDeviceGetPcieReplayCounter)
    encoder = read(["encoder_util_pct"], pynvml.nvmlDeviceGetEncoderUtilization)
    out["encoder_util_pct"] = float(encoder[0]) if encoder is not None else None
    decoder = read(["decoder_util_pct"], pynvml.nvmlDeviceGetDecoderUtilization)
    out["decoder_util_pct"] = float(decoder[0]) if decoder is not None else None
    out["vgpu_license_status"] = _vgpu_license(read)
    out.update(_field_values(read, note))
    return out


def _field_values(read: Read, note: Note) -> dict[str, Any]:
    """Memory temperature and the NVLink traffic summed over every link, TX and RX."""
    out: dict[str, Any] = {"memory_temperature_c": None, "nvlink_kib": None}
    values = read(["memory_temperature_c", "nvlink_kib"], pynvml.nvmlDeviceGetFieldValues,
                  [pynvml.NVML_FI_DEV_MEMORY_TEMP, pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT])
    if values is None:
        return out
    temperature, links = values[0], values[1]
    if _field_ok(temperature, "memory_temperature_c", note):
        out["memory_temperature_c"] = float(temperature.value.uiVal)
    if not _field_ok(links, "nvlink_kib", note):
        return out
    count = links.value.uiVal
    if count == 0:  # a PCIe card: no NVLink to count
        note(["nvlink_kib"], pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED))
        return out
    wanted = [(field, link) for link in range(count) for field in _RAW_THROUGHPUT]
    traffic = read(["nvlink_kib"], pynvml.nvmlDeviceGetFieldValues, wanted)
    if traffic is None:
        return out
    if all(_field_ok(value, "nvlink_kib", note) for value in traffic):
        out["nvlink_kib"] = sum(int(value.value.ullVal) for value in traffic)
    return out


def _vgpu_license(read: Read) -> int | None:
    """1 when a vGPU guest holds a licence, 0 otherwise; outside a vGPU guest (bare metal,
    passthrough) there is no licence to hold and dcgm-exporter reports 0 as well."""
    mode = read(["vgpu_license_status"], pynvml.nvmlDeviceGetVirtualizationMode)
    if mode is None:
        return None
    if mode != pynvml.NVML_GPU_VIRTUALIZATION_MODE_VGPU:
        return 0
    features = read(["vgpu_license_status"], pynvml.nvmlDeviceGetGridLicensableFeatures_v4)
    if features is None:
        return None
    listed = features.gridLicensableFeatures[: features.licensableFeaturesCount]
    return 1 if any(f.featureEnabled and f.featureState for f in listed) else 0
