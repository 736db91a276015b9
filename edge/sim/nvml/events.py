"""The simulated libnvidia-ml's error and event symbols: ECC mode and counters, remapped rows,
and event sets (create, register, wait, free) through which injected XID and ECC faults are
delivered. One area of edge/sim/nvml: see its __init__.
"""

from __future__ import annotations

import ctypes
import time
from ctypes import c_uint, c_ulonglong, c_void_p

import pynvml

from edge.sim.nvml.abi import (
    INVALID_ARGUMENT,
    NO_INSTANCE,
    NOT_SUPPORTED,
    SUCCESS,
    TIMEOUT,
    ULL,
    UNINITIALIZED,
    Exports,
    Fail,
    H,
    P,
    U,
    put,
    unsupported_unless,
)
from edge.sim.nvml.driver import EventSet, SimDriver


def export_events(driver: SimDriver, x: Exports) -> None:
    """ECC errors and the event sets faults are delivered through."""
    _ecc(driver, x)
    _event_sets(driver, x)


def _ecc(driver: SimDriver, x: Exports) -> None:
    """ECC mode, ECC error counters and remapped rows."""

    def ecc_mode(handle: int | None, current: int | None, pending: int | None) -> int:
        driver.gpu(handle)
        put(c_uint, current, pynvml.NVML_FEATURE_ENABLED)
        put(c_uint, pending, pynvml.NVML_FEATURE_ENABLED)
        return SUCCESS

    def ecc_total(handle: int | None, error_type: int, counter: int, out: int | None) -> int:
        gpu = driver.gpu(handle)
        corrected, uncorrected = (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                                  pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
        counts = {
            (corrected, pynvml.NVML_VOLATILE_ECC): gpu.ecc_sbe_volatile,
            (uncorrected, pynvml.NVML_VOLATILE_ECC): gpu.ecc_dbe_volatile,
            (corrected, pynvml.NVML_AGGREGATE_ECC): gpu.ecc_sbe_aggregate,
            (uncorrected, pynvml.NVML_AGGREGATE_ECC): gpu.ecc_dbe_aggregate,
        }
        if (error_type, counter) not in counts:
            raise Fail(INVALID_ARGUMENT)
        put(c_ulonglong, out, counts[(error_type, counter)])
        return SUCCESS

    def remapped_rows(handle: int | None, corr: int | None, unc: int | None,
                      pending: int | None, failure: int | None) -> int:
        gpu = driver.gpu(handle)
        unsupported_unless(gpu.profile.remapped_rows)
        put(c_uint, corr, gpu.remapped_correctable)
        put(c_uint, unc, gpu.remapped_uncorrectable)
        put(c_uint, pending, int(gpu.remap_pending))
        put(c_uint, failure, int(gpu.remap_failure))
        return SUCCESS

    x.export("nvmlDeviceGetEccMode", (H, P, P), ecc_mode)
    x.export("nvmlDeviceGetTotalEccErrors", (H, U, U, P), ecc_total)
    x.export("nvmlDeviceGetRemappedRows", (H, P, P, P, P), remapped_rows)


def _event_sets(driver: SimDriver, x: Exports) -> None:
    """Event sets: create, register a GPU's event types, wait (XID, ECC), free."""

    def event_set_create(out: int | None) -> int:
        driver.require_init()
        event_set = EventSet(buffer=ctypes.create_string_buffer(16))
        put(c_void_p, out, event_set.address)
        with driver.events:
            driver.event_sets[event_set.address] = event_set
        return SUCCESS

    def register_events(handle: int | None, event_types: int, set_address: int | None) -> int:
        gpu = driver.gpu(handle)
        if event_types & ~gpu.supported_event_types:
            raise Fail(NOT_SUPPORTED)
        with driver.events:
            event_set = driver.event_sets.get(set_address or 0)
            if event_set is None:
                raise Fail(INVALID_ARGUMENT)
            event_set.registrations[gpu.index] = (
                event_set.registrations.get(gpu.index, 0) | event_types
            )
        return SUCCESS

    def event_set_wait(set_address: int | None, out: int | None, timeout_ms: int) -> int:
        """Blocks on the event condition only, never on the model lock."""
        if not out:
            raise Fail(INVALID_ARGUMENT)
        deadline = time.monotonic() + timeout_ms / 1000
        with driver.events:
            event_set = driver.event_sets.get(set_address or 0)
            if event_set is None:
                return UNINITIALIZED if not driver.initialised else INVALID_ARGUMENT
            while not event_set.queue:
                if event_set.stale or not driver.initialised:
                    return UNINITIALIZED
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return TIMEOUT
                driver.events.wait(remaining)
            if event_set.stale or not driver.initialised:
                return UNINITIALIZED
            index, event_type, data = event_set.queue.popleft()
        event = pynvml.c_nvmlEventData_t.from_address(out)
        event.device = ctypes.cast(driver.handle_of(driver.gpus[index]), pynvml.c_nvmlDevice_t)
        event.eventType = event_type
        event.eventData = data
        event.gpuInstanceId = NO_INSTANCE
        event.computeInstanceId = NO_INSTANCE
        return SUCCESS

    def event_set_free(set_address: int | None) -> int:
        with driver.events:
            event_set = driver.event_sets.pop(set_address or 0, None)
            if event_set is None:
                return INVALID_ARGUMENT
            event_set.stale = True
            driver.events.notify_all()
        return SUCCESS

    x.scalar("nvmlDeviceGetSupportedEventTypes", c_ulonglong, lambda g: g.supported_event_types)
    x.export("nvmlEventSetCreate", (P,), event_set_create)
    x.export("nvmlDeviceRegisterEvents", (H, ULL, P), register_events)
    x.export("nvmlEventSetWait_v2", (P, P, U), event_set_wait, locked=False)
    x.export("nvmlEventSetFree", (P,), event_set_free, locked=False)
