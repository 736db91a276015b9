"""The simulated libnvidia-ml's monitoring extras that dcgm-exporter's default counters need:
NVML field values (memory temperature, PCIe replays, NVLink link count and throughput), the PCIe
replay counter, video encoder and decoder utilisation, and the virtualization mode and vGPU
licence. One area of edge/sim/nvml: see its __init__. GPM (the profiling metrics) is in gpm.py.

Per model (edge/sim/profiles.py), as the real boards answer:
- memory temperature: HBM boards (H100, A100) only; a GDDR board (T4, A10) answers the field with
  NOT_SUPPORTED in its nvmlReturn, the call itself succeeds;
- NVLink: SXM boards (H100: 18 links, A100: 12); a PCIe card reports 0 links and NOT_SUPPORTED
  for the throughput fields;
- encoder/decoder: every board answers; one without NVENC (A100, H100) answers 0 % for the
  encoder. Unsure: whether a real A100/H100 answers 0 % or NOT_SUPPORTED for the encoder
  (nvidia-smi -q prints "Encoder: 0 %" on the A100 listings we know of); docs/gpu-hardware.md
  lists it among what the first session with a real GPU should compare;
- GPU recovery action (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION, added to NVML in R565): what the board
  needs after its present fault, NONE / GPU_RESET / NODE_REBOOT (edge/sim/physics.py: SimFault's
  `recovery`). Answered on every model; a simulation built with `recovery_action_field=False`
  models an older driver, which answers the field with NOT_SUPPORTED in its nvmlReturn (unsure:
  whether a pre-R565 driver says NOT_SUPPORTED or INVALID_ARGUMENT for a field id it does not
  know; docs/gpu-hardware.md's list for the first real GPU should include it). The simulated
  driver still reports version 550 (other tests pin it), though the field needs R565;
- vGPU: every simulated board runs bare metal (virtualization mode NONE), and the grid licence
  query answers NOT_SUPPORTED there, as on a bare-metal data-centre board.
"""

from __future__ import annotations

from collections.abc import Callable
from ctypes import c_int, c_uint

import pynvml

from edge.sim.nvml.abi import (
    INVALID_ARGUMENT,
    NOT_SUPPORTED,
    SUCCESS,
    Exports,
    Fail,
    H,
    P,
    as_uint,
    put,
)
from edge.sim.nvml.driver import SimDriver
from edge.sim.physics import SimGpu

VIDEO_SAMPLING_PERIOD_US = 167_000  # what T4 and A10 boards report for encoder/decoder utilisation
_THROUGHPUT_FIELDS = {
    pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX: "tx",
    pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX: "rx",
    pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_RAW_TX: "tx",
    pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_RAW_RX: "rx",
}
_RAW_OVERHEAD = 1.06  # protocol headers on top of the payload
_ALL_LINKS = 0xFFFFFFFF
_RECOVERY_ACTIONS = {None: pynvml.NVML_GPU_RECOVERY_ACTION_NONE,
                     "reset": pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET,
                     "reboot": pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT}


def export_fields(driver: SimDriver, x: Exports) -> None:
    """Field values, PCIe replays, encoder and decoder, virtualization and vGPU licence."""
    _field_values(driver, x)
    _video_and_pcie(driver, x)
    _virtualization(driver, x)


def _field_value(driver: SimDriver, gpu: SimGpu, field_id: int, scope: int) -> tuple[int, int | float]:
    """(NVML value type, value) of one field; raises Fail(NOT_SUPPORTED) like the board does."""
    p = gpu.profile
    if field_id == pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION:
        if not driver.recovery_action_field:
            raise Fail(NOT_SUPPORTED)
        return pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, _RECOVERY_ACTIONS[gpu.recovery]
    if field_id == pynvml.NVML_FI_DEV_MEMORY_TEMP:
        if not p.hbm:
            raise Fail(NOT_SUPPORTED)
        return pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, as_uint(gpu.memory_temperature_c)
    if field_id == pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER:
        return pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, gpu.pcie_replays
    if field_id == pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT:
        return pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, p.nvlink_links
    if field_id in _THROUGHPUT_FIELDS:
        if not p.nvlink_links:
            raise Fail(NOT_SUPPORTED)
        if scope != _ALL_LINKS and scope >= p.nvlink_links:
            raise Fail(INVALID_ARGUMENT)
        share = 1.0 if scope == _ALL_LINKS else 1.0 / p.nvlink_links  # links carry equal shares
        kib = gpu.nvlink_tx_kib if _THROUGHPUT_FIELDS[field_id] == "tx" else gpu.nvlink_rx_kib
        raw = field_id in (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_RAW_TX,
                           pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_RAW_RX)
        value = kib * share * (_RAW_OVERHEAD if raw else 1.0)
        return pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, int(value)
    raise Fail(NOT_SUPPORTED)


def _field_values(driver: SimDriver, x: Exports) -> None:
    """nvmlDeviceGetFieldValues: each field answers on its own (its nvmlReturn); the call succeeds."""

    def field_values(handle: int | None, count: int, out: int | None) -> int:
        gpu = driver.gpu(handle)
        if count < 0 or (count and not out):
            raise Fail(INVALID_ARGUMENT)
        if not count:
            return SUCCESS
        values = (pynvml.c_nvmlFieldValue_t * count).from_address(out)
        now_us = int((driver.epoch_offset + driver.clock()) * 1_000_000)
        for value in values:
            value.timestamp = now_us
            value.latencyUsec = 0
            try:
                kind, figure = _field_value(driver, gpu, value.fieldId, value.scopeId)
            except Fail as failure:
                value.nvmlReturn = failure.code
                continue
            value.valueType = kind
            value.nvmlReturn = SUCCESS
            if kind == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG:
                value.value.ullVal = int(figure)
            else:
                value.value.uiVal = int(figure)
        return SUCCESS

    x.export("nvmlDeviceGetFieldValues", (H, c_int, P), field_values)


def _video_and_pcie(driver: SimDriver, x: Exports) -> None:
    """Encoder and decoder utilisation and the PCIe replay counter."""

    def video(encoder: bool) -> Callable[[int | None, int | None, int | None], int]:
        def impl(handle: int | None, util: int | None, period: int | None) -> int:
            gpu = driver.gpu(handle)
            put(c_uint, util, as_uint(gpu.encoder_pct if encoder else gpu.decoder_pct))
            put(c_uint, period, VIDEO_SAMPLING_PERIOD_US)
            return SUCCESS
        return impl

    x.export("nvmlDeviceGetEncoderUtilization", (H, P, P), video(encoder=True))
    x.export("nvmlDeviceGetDecoderUtilization", (H, P, P), video(encoder=False))
    x.scalar("nvmlDeviceGetPcieReplayCounter", c_uint, lambda g: g.pcie_replays)


def _virtualization(driver: SimDriver, x: Exports) -> None:
    """Bare metal: virtualization mode NONE; the vGPU licence query is not supported there."""

    def grid_licence(handle: int | None, out: int | None) -> int:
        driver.gpu(handle)
        raise Fail(NOT_SUPPORTED)

    x.scalar("nvmlDeviceGetVirtualizationMode", c_uint,  # an enum: C writes 4 bytes
             lambda g: pynvml.NVML_GPU_VIRTUALIZATION_MODE_NONE)
    x.export("nvmlDeviceGetGridLicensableFeatures_v4", (H, P), grid_licence)
