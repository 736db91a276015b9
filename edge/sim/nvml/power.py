"""The simulated libnvidia-ml's power and clock symbols: power draw, energy and the power limit
(read and set), temperatures and thresholds, clocks (read, supported, locked), performance
state and throttle reasons. One area of edge/sim/nvml: see its __init__.
"""

from __future__ import annotations

from collections.abc import Callable
from ctypes import c_uint, c_ulonglong

import pynvml

from edge.sim.nvml.abi import (
    INVALID_ARGUMENT,
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
    as_uint,
    put,
    write_list,
)
from edge.sim.nvml.driver import SimDriver
from edge.sim.physics import SUPPORTED_REASONS, SimGpu

_VIDEO_CLOCK_RATIO = 0.886  # video clock relative to the SM clock on these boards


def export_power(driver: SimDriver, x: Exports) -> None:
    """Power and energy, temperature, clocks."""
    _power_and_energy(driver, x)
    _temperature(driver, x)
    _clocks(driver, x)


def _power_and_energy(driver: SimDriver, x: Exports) -> None:
    """Power draw, energy, and the power limit: read, its bounds, set."""

    def milliwatts(watts: float) -> int:
        return as_uint(watts * 1000)

    def limit_constraints(handle: int | None, low: int | None, high: int | None) -> int:
        gpu = driver.gpu(handle)
        put(c_uint, low, milliwatts(gpu.profile.power_min_w))
        put(c_uint, high, milliwatts(gpu.profile.power_max_w))
        return SUCCESS

    def set_power_limit(handle: int | None, limit_mw: int) -> int:
        gpu = driver.gpu(handle)
        if not driver.allow_set:
            raise Fail(NO_PERMISSION)
        p = gpu.profile
        if not milliwatts(p.power_min_w) <= limit_mw <= milliwatts(p.power_max_w):
            raise Fail(INVALID_ARGUMENT)
        gpu.set_power_limit_w(limit_mw / 1000)
        return SUCCESS

    x.scalar("nvmlDeviceGetPowerUsage", c_uint, lambda g: milliwatts(g.power_w))
    x.scalar("nvmlDeviceGetTotalEnergyConsumption", c_ulonglong, lambda g: int(g.energy_mj))
    x.scalar("nvmlDeviceGetPowerManagementMode", c_uint, lambda g: pynvml.NVML_FEATURE_ENABLED)
    x.scalar("nvmlDeviceGetPowerManagementLimit", c_uint, lambda g: milliwatts(g.power_limit_w))
    x.scalar("nvmlDeviceGetPowerManagementDefaultLimit", c_uint,
             lambda g: milliwatts(g.profile.power_default_w))
    x.scalar("nvmlDeviceGetEnforcedPowerLimit", c_uint,
             lambda g: milliwatts(g.enforced_power_limit_w))
    x.export("nvmlDeviceGetPowerManagementLimitConstraints", (H, P, P), limit_constraints)
    x.export("nvmlDeviceSetPowerManagementLimit", (H, U), set_power_limit)


def _temperature(driver: SimDriver, x: Exports) -> None:
    """The GPU's temperature and its thresholds."""

    def temperature(handle: int | None, sensor: int, out: int | None) -> int:
        gpu = driver.gpu(handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise Fail(INVALID_ARGUMENT)
        put(c_uint, out, as_uint(gpu.temperature_c))
        return SUCCESS

    def temperature_v(handle: int | None, out: int | None) -> int:
        gpu = driver.gpu(handle)
        if not out:
            raise Fail(INVALID_ARGUMENT)
        reading = pynvml.c_nvmlTemperature_v1_t.from_address(out)
        if reading.version != pynvml.nvmlTemperature_v1:
            raise Fail(VERSION_MISMATCH)
        if reading.sensorType != pynvml.NVML_TEMPERATURE_GPU:
            raise Fail(INVALID_ARGUMENT)
        reading.temperature = round(gpu.temperature_c)
        return SUCCESS

    def threshold(handle: int | None, kind: int, out: int | None) -> int:
        p = driver.gpu(handle).profile
        values = {
            pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: p.shutdown_c,
            pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: p.slowdown_c,
            pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX: p.max_operating_c,
        }
        if p.remapped_rows:  # HBM boards report a memory limit too
            values[pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX] = p.shutdown_c + 3
        if kind not in values:
            raise Fail(NOT_SUPPORTED if kind < pynvml.NVML_TEMPERATURE_THRESHOLD_COUNT
                        else INVALID_ARGUMENT)
        put(c_uint, out, as_uint(values[kind]))
        return SUCCESS

    x.export("nvmlDeviceGetTemperature", (H, U, P), temperature)
    x.export("nvmlDeviceGetTemperatureV", (H, P), temperature_v)
    x.export("nvmlDeviceGetTemperatureThreshold", (H, U, P), threshold)


def _clocks(driver: SimDriver, x: Exports) -> None:
    """Clocks (current, maximum, supported, locked), performance state and throttle reasons."""

    def clock_of(gpu: SimGpu, kind: int, maximum: bool) -> int:
        p = gpu.profile
        sm = p.max_sm_clock_mhz if maximum else gpu.reported_sm_clock_mhz
        if kind in (pynvml.NVML_CLOCK_GRAPHICS, pynvml.NVML_CLOCK_SM):
            return sm
        if kind == pynvml.NVML_CLOCK_MEM:
            return p.memory_clocks_mhz[0] if maximum else gpu.memory_clock_mhz
        if kind == pynvml.NVML_CLOCK_VIDEO:
            return round(sm * _VIDEO_CLOCK_RATIO)
        raise Fail(INVALID_ARGUMENT)

    def clock_info(maximum: bool) -> Callable[[int | None, int, int | None], int]:
        def impl(handle: int | None, kind: int, out: int | None) -> int:
            put(c_uint, out, clock_of(driver.gpu(handle), kind, maximum))
            return SUCCESS
        return impl

    def memory_clocks(handle: int | None, count: int | None, out: int | None) -> int:
        return write_list(driver.gpu(handle).profile.memory_clocks_mhz, count, out)

    def graphics_clocks(handle: int | None, memory_mhz: int, count: int | None,
                        out: int | None) -> int:
        table = driver.gpu(handle).profile.graphics_clocks_mhz
        if memory_mhz not in table:
            raise Fail(NOT_FOUND)
        return write_list(table[memory_mhz], count, out)

    def lock_clocks(handle: int | None, min_mhz: int, max_mhz: int) -> int:
        gpu = driver.gpu(handle)
        if not driver.allow_set:
            raise Fail(NO_PERMISSION)
        p = gpu.profile

        def resolve(mhz: int) -> int:
            if mhz >= pynvml.NVML_CLOCK_LIMIT_ID_RANGE_START:  # TDP / unlimited
                return p.max_sm_clock_mhz
            return min(max(mhz, p.min_sm_clock_mhz), p.max_sm_clock_mhz)

        if min_mhz > max_mhz:
            raise Fail(INVALID_ARGUMENT)
        gpu.lock_clocks(resolve(min_mhz), resolve(max_mhz))
        return SUCCESS

    def reset_locked_clocks(handle: int | None) -> int:
        gpu = driver.gpu(handle)
        if not driver.allow_set:
            raise Fail(NO_PERMISSION)
        gpu.reset_clocks()
        return SUCCESS

    def pstate(gpu: SimGpu) -> int:
        idle = gpu.load_pct <= 0 and len(gpu.profile.memory_clocks_mhz) > 1
        return pynvml.NVML_PSTATE_8 if idle else pynvml.NVML_PSTATE_0

    x.export("nvmlDeviceGetClockInfo", (H, U, P), clock_info(maximum=False))
    x.export("nvmlDeviceGetMaxClockInfo", (H, U, P), clock_info(maximum=True))
    x.export("nvmlDeviceGetSupportedMemoryClocks", (H, P, P), memory_clocks)
    x.export("nvmlDeviceGetSupportedGraphicsClocks", (H, U, P, P), graphics_clocks)
    x.export("nvmlDeviceSetGpuLockedClocks", (H, U, U), lock_clocks)
    x.export("nvmlDeviceResetGpuLockedClocks", (H,), reset_locked_clocks)
    x.scalar("nvmlDeviceGetPerformanceState", c_uint, pstate)
    x.scalar("nvmlDeviceGetPowerState", c_uint, pstate)
    for name in ("nvmlDeviceGetCurrentClocksEventReasons",
                 "nvmlDeviceGetCurrentClocksThrottleReasons"):
        x.scalar(name, c_ulonglong, lambda g: g.throttle_reasons)
    for name in ("nvmlDeviceGetSupportedClocksEventReasons",
                 "nvmlDeviceGetSupportedClocksThrottleReasons"):
        x.scalar(name, c_ulonglong, lambda g: SUPPORTED_REASONS)
