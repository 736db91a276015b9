"""The simulated libamd_smi's functions, as ctypes callbacks the C forwarders call.

Each callback's C prototype is taken from the bindings' own declaration (`amdsmi_wrapper.<name>
.argtypes`, pointers as plain addresses), and each output is written through the bindings' own
ctypes Structure (`amdsmi_wrapper.struct_amdsmi_power_info_t.from_address(...)`), so the memory the
Python bindings read back is laid out exactly as they expect. Units are amdsmi's: powers in W
(power_info) and uW (power caps), clocks MHz (clk_freq: Hz), VRAM MB, energy in counter ticks of
`ENERGY_RESOLUTION_UJ`, temperatures degrees C.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from typing import Any

from edge.sim.amd.driver import (
    BUSY,
    DRIVER_NOT_LOADED,
    INSUFFICIENT_SIZE,
    INVAL,
    NOT_SUPPORTED,
    OUT_OF_RESOURCES,
    PERF_AUTO,
    PERF_DETERMINISM,
    PERF_MANUAL,
    SUCCESS,
    UNKNOWN_ERROR,
    AmdSimDriver,
    Fail,
)
from edge.sim.amd.profiles import AMDGPU_DRIVER_VERSION
from edge.sim.physics import SimGpu

log = logging.getLogger("edge.sim.amd")

ENERGY_RESOLUTION_UJ = 15.259  # uJ per tick of the energy accumulator (what MI200/MI300 report)
EDGE_BELOW_HOTSPOT_C = 12.0  # the edge sensor reads cooler than the junction under load
UINT16_NA = 0xFFFF  # what amdsmi writes into a power/activity field the board does not fill
UINT32_NA = 0xFFFFFFFF
MB = 1024 * 1024  # amdsmi's "MB" for VRAM is MiB
PROCESS_NAME = b"python3"

TEMP_EDGE, TEMP_HOTSPOT, TEMP_VRAM = 0, 1, 2
TEMP_CURRENT, TEMP_CRITICAL, TEMP_EMERGENCY, TEMP_SHUTDOWN = 0, 5, 7, 14
CLK_GFX, CLK_MEM = 0, 4

# Callbacks stay referenced for the life of the process: the C table may still point at one.
_KEEP_ALIVE: list[Any] = []


def _zeroed(struct: Any, address: int | None) -> Any:
    if not address:
        raise Fail(INVAL)
    ctypes.memset(address, 0, ctypes.sizeof(struct))
    return struct.from_address(address)


def _put(ctype: Any, address: int | None, value: Any) -> None:
    if not address:
        raise Fail(INVAL)
    ctype.from_address(address).value = value


def _text(value: str) -> bytes:
    return value.encode()


class Symbols:
    """name -> implementation over one simulated driver; `callbacks(wrapper)` makes them C-callable."""

    def __init__(self, driver: AmdSimDriver, wrapper: Any, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.d = driver
        self._w = wrapper  # amdsmi.amdsmi_wrapper: its Structures and prototypes
        self.wall_clock = wall_clock
        self.impls: dict[str, Callable[..., int]] = {
            name.removeprefix("_sym_"): getattr(self, name) for name in dir(self) if name.startswith("_sym_")}

    # ----- wiring -----------------------------------------------------------------------------

    def callbacks(self) -> dict[str, Any]:
        """C symbol name -> CFUNCTYPE callback with the wrapper's prototype."""
        table = {}
        for name, impl in self.impls.items():
            bound = getattr(self._w, name)
            argtypes = [_c_type(t) for t in bound.argtypes]
            prototype = ctypes.CFUNCTYPE(ctypes.c_uint32, *argtypes)
            callback = prototype(self._guarded(name, impl))
            _KEEP_ALIVE.append(callback)
            table[name] = callback
        return table

    def _guarded(self, name: str, impl: Callable[..., int]) -> Callable[..., int]:
        driver = self.d

        def guarded(*args: Any) -> int:
            if not driver.answering.is_set():
                driver.answering.wait()  # a hung driver: block, holding no lock, until released
            try:
                with driver.lock:
                    return impl(*args)
            except Fail as failure:
                return failure.code
            except Exception:  # a bug here must not read as success
                log.exception("simulated %s failed", name)
                return UNKNOWN_ERROR

        return guarded

    # ----- library and discovery ------------------------------------------------------------------

    def _sym_amdsmi_init(self, flags: int) -> int:
        if self.d.unloaded:
            return DRIVER_NOT_LOADED
        self.d.init_count += 1
        return SUCCESS

    def _sym_amdsmi_shut_down(self) -> int:
        self.d.require_init()
        self.d.init_count -= 1
        return SUCCESS

    def _list(self, values: list[int], count: int | None, out: int | None) -> int:
        """amdsmi's two-call protocol: no buffer -> the count; else fill up to `*count`."""
        if not count:
            raise Fail(INVAL)
        room = ctypes.c_uint32.from_address(count).value
        ctypes.c_uint32.from_address(count).value = len(values) if not out else min(room, len(values))
        if out:
            for i, value in enumerate(values[:room]):
                ctypes.c_void_p.from_address(out + i * ctypes.sizeof(ctypes.c_void_p)).value = value
        return SUCCESS

    def _sym_amdsmi_get_socket_handles(self, count: int | None, out: int | None) -> int:
        self.d.require_init()
        return self._list(self.d.socket_handles(), count, out)

    def _sym_amdsmi_get_processor_handles(self, socket: int | None, count: int | None, out: int | None) -> int:
        gpu = self.d.gpu_of_socket(socket)
        return self._list([self.d.handle_of(gpu)], count, out)

    def _sym_amdsmi_get_processor_type(self, handle: int | None, out: int | None) -> int:
        self.d.gpu(handle)
        _put(ctypes.c_uint32, out, 1)  # AMDSMI_PROCESSOR_TYPE_AMD_GPU
        return SUCCESS

    # ----- identity ------------------------------------------------------------------------------

    def _sym_amdsmi_get_gpu_device_bdf(self, handle: int | None, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        domain, bus, rest = gpu.pci_bus_id.split(":")
        device, function = rest.split(".")
        value = int(function, 16) | int(device, 16) << 3 | int(bus, 16) << 8 | int(domain, 16) << 16
        _put(ctypes.c_uint64, out, value)  # union amdsmi_bdf_t: function:3 device:5 bus:8 domain:48
        return SUCCESS

    def _sym_amdsmi_get_gpu_device_uuid(self, handle: int | None, length: int | None, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        data = gpu.uuid.removeprefix("AMD-").encode() + b"\0"
        if not length or not out:
            raise Fail(INVAL)
        room = ctypes.c_uint32.from_address(length).value
        ctypes.c_uint32.from_address(length).value = len(data)
        if room < len(data):
            return INSUFFICIENT_SIZE
        ctypes.memmove(out, data, len(data))
        return SUCCESS

    def _sym_amdsmi_get_gpu_asic_info(self, handle: int | None, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        board = self.d.board(gpu)
        info = _zeroed(self._w.struct_amdsmi_asic_info_t, out)
        info.market_name = _text(board.market_name)
        info.vendor_id = 0x1002
        info.vendor_name = b"Advanced Micro Devices Inc. [AMD/ATI]"
        info.subvendor_id = 0x1002
        info.device_id = board.device_id
        info.rev_id = 0
        info.asic_serial = _text(gpu.serial)
        info.oam_id = gpu.index if board.platform == "instinct" and board.current_power else UINT32_NA
        info.num_of_compute_units = board.compute_units
        info.target_graphics_version = board.gfx_version
        info.subsystem_id = 0x0C34
        return SUCCESS

    def _sym_amdsmi_get_gpu_driver_info(self, handle: int | None, out: int | None) -> int:
        self.d.gpu(handle)
        info = _zeroed(self._w.struct_amdsmi_driver_info_t, out)
        info.driver_name = b"amdgpu"
        info.driver_version = _text(AMDGPU_DRIVER_VERSION)
        info.driver_date = b"2015/01/01 00:00"
        return SUCCESS

    def _sym_amdsmi_get_xgmi_info(self, handle: int | None, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        board = self.d.board(gpu)
        if not board.xgmi_links:
            raise Fail(NOT_SUPPORTED)
        info = _zeroed(self._w.struct_amdsmi_xgmi_info_t, out)
        info.xgmi_lanes = 16
        info.xgmi_hive_id = 0x5A1E000000000000 | len(self.d.gpus)
        info.xgmi_node_id = gpu.index
        info.index = gpu.index
        return SUCCESS

    def _sym_amdsmi_topo_get_numa_node_number(self, handle: int | None, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        _put(ctypes.c_uint32, out, 0 if gpu.index < max(1, len(self.d.gpus) // 2) else 1)
        return SUCCESS

    # ----- memory ---------------------------------------------------------------------------------

    def _sym_amdsmi_get_gpu_vram_info(self, handle: int | None, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        board = self.d.board(gpu)
        info = _zeroed(self._w.struct_amdsmi_vram_info_t, out)
        info.vram_type = board.vram_type
        info.vram_vendor = b"SAMSUNG"
        info.vram_size = gpu.profile.memory_total_mib  # MB
        info.vram_bit_width = board.vram_bit_width
        info.vram_max_bandwidth = board.vram_max_bandwidth_gb_s
        return SUCCESS

    def _sym_amdsmi_get_gpu_vram_usage(self, handle: int | None, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        usage = _zeroed(self._w.struct_amdsmi_vram_usage_t, out)
        usage.vram_total = gpu.profile.memory_total_mib  # MB
        usage.vram_used = gpu.memory_used_mib
        return SUCCESS

    # ----- power and energy -----------------------------------------------------------------------

    def _sym_amdsmi_get_power_cap_info(self, handle: int | None, sensor: int, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        if sensor != 0:
            raise Fail(INVAL)
        p = gpu.profile
        info = _zeroed(self._w.struct_amdsmi_power_cap_info_t, out)
        info.power_cap = round(gpu.power_limit_w * 1e6)  # uW
        info.default_power_cap = round(p.power_default_w * 1e6)
        info.dpm_cap = p.max_sm_clock_mhz
        info.min_power_cap = round(p.power_min_w * 1e6)
        info.max_power_cap = round(p.power_max_w * 1e6)
        return SUCCESS

    def _sym_amdsmi_set_power_cap(self, handle: int | None, sensor: int, cap_uw: int) -> int:
        gpu = self.d.gpu(handle)
        self.d.require_permission()
        p = gpu.profile
        if sensor != 0 or not round(p.power_min_w * 1e6) <= cap_uw <= round(p.power_max_w * 1e6):
            raise Fail(INVAL)  # as the amdgpu hwmon power1_cap refuses it (EINVAL)
        gpu.set_power_limit_w(cap_uw / 1e6)
        return SUCCESS

    def _sym_amdsmi_get_power_info(self, handle: int | None, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        board = self.d.board(gpu)
        info = _zeroed(self._w.struct_amdsmi_power_info_t, out)
        watts = round(gpu.power_w)
        info.socket_power = watts
        info.current_socket_power = watts if board.current_power else UINT32_NA
        info.average_socket_power = UINT32_NA if board.current_power else watts
        info.gfx_voltage = 700 + round(200 * gpu.load_pct / 100)  # mV
        info.soc_voltage = 800
        info.mem_voltage = 1100 if board.vram_type == 4 else 1200
        info.power_limit = round(gpu.power_limit_w)  # W
        return SUCCESS

    def _sym_amdsmi_get_energy_count(self, handle: int | None, energy: int | None, resolution: int | None,
                                     timestamp: int | None) -> int:
        gpu = self.d.gpu(handle)
        _put(ctypes.c_uint64, energy, int(gpu.energy_mj * 1000 / ENERGY_RESOLUTION_UJ))
        _put(ctypes.c_float, resolution, ENERGY_RESOLUTION_UJ)
        _put(ctypes.c_uint64, timestamp, int(self.wall_clock() * 1e9))
        return SUCCESS

    # ----- temperature, activity, errors ----------------------------------------------------------

    def _sym_amdsmi_get_temp_metric(self, handle: int | None, sensor: int, metric: int, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        board = self.d.board(gpu)
        p = gpu.profile
        if sensor == TEMP_EDGE and not board.edge_sensor:
            raise Fail(NOT_SUPPORTED)
        if sensor not in (TEMP_EDGE, TEMP_HOTSPOT, TEMP_VRAM):
            raise Fail(NOT_SUPPORTED)
        if metric == TEMP_CURRENT:
            if sensor == TEMP_HOTSPOT:
                value = gpu.temperature_c
            elif sensor == TEMP_VRAM:
                value = gpu.memory_temperature_c
            else:
                value = gpu.temperature_c - EDGE_BELOW_HOTSPOT_C * (gpu.power_w / p.max_board_w)
        elif metric == TEMP_CRITICAL:
            value = p.slowdown_c
        elif metric in (TEMP_EMERGENCY, TEMP_SHUTDOWN):
            value = p.shutdown_c
        else:
            raise Fail(NOT_SUPPORTED)
        _put(ctypes.c_int64, out, round(value))
        return SUCCESS

    def _sym_amdsmi_get_gpu_activity(self, handle: int | None, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        usage = _zeroed(self._w.struct_amdsmi_engine_usage_t, out)
        usage.gfx_activity = round(gpu.load_pct)
        usage.umc_activity = gpu.memory_util_pct
        usage.mm_activity = UINT16_NA  # the video engines are not modelled
        return SUCCESS

    def _sym_amdsmi_get_gpu_total_ecc_count(self, handle: int | None, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        counts = _zeroed(self._w.struct_amdsmi_error_count_t, out)
        counts.correctable_count = gpu.ecc_sbe_volatile
        counts.uncorrectable_count = gpu.ecc_dbe_volatile
        counts.deferred_count = 0
        return SUCCESS

    def _sym_amdsmi_get_gpu_pci_replay_counter(self, handle: int | None, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        _put(ctypes.c_uint64, out, gpu.pcie_replays)
        return SUCCESS

    def _sym_amdsmi_get_gpu_process_list(self, handle: int | None, count: int | None, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        if not count:
            raise Fail(INVAL)
        room = ctypes.c_uint32.from_address(count).value
        ctypes.c_uint32.from_address(count).value = len(gpu.processes)
        if not out:
            return SUCCESS
        entry_type = self._w.struct_amdsmi_proc_info_t
        for i, process in enumerate(gpu.processes[:room]):
            entry = _zeroed(entry_type, out + i * ctypes.sizeof(entry_type))
            entry.name = PROCESS_NAME
            entry.pid = process.pid
            entry.mem = process.used_memory_mib * MB
            entry.engine_usage.gfx = int(gpu.gr_active_s * 1e9 * process.sm_util / max(gpu.load_pct, 1.0))
            entry.memory_usage.vram_mem = process.used_memory_mib * MB
            entry.cu_occupancy = round(self.d.board(gpu).compute_units * process.sm_util / 100)
        return OUT_OF_RESOURCES if room < len(gpu.processes) else SUCCESS

    # ----- clocks ---------------------------------------------------------------------------------

    def _range(self, gpu: SimGpu) -> tuple[int, int]:
        p = gpu.profile
        return gpu.locked_clocks or (p.min_sm_clock_mhz, p.max_sm_clock_mhz)

    def _sym_amdsmi_get_clock_info(self, handle: int | None, clk: int, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        if clk not in (CLK_GFX, CLK_MEM):
            raise Fail(NOT_SUPPORTED)
        info = _zeroed(self._w.struct_amdsmi_clk_info_t, out)
        if clk == CLK_GFX:
            low, high = self._range(gpu)
            info.clk = gpu.reported_sm_clock_mhz
            info.min_clk, info.max_clk = low, high
            info.clk_locked = 1 if gpu.locked_clocks else 0
            info.clk_deep_sleep = 1 if gpu.load_pct <= 0 else 0
        else:
            info.clk = info.min_clk = info.max_clk = gpu.memory_clock_mhz
            info.clk_locked = 0
            info.clk_deep_sleep = 0
        return SUCCESS

    def _sym_amdsmi_get_clk_freq(self, handle: int | None, clk: int, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        p = gpu.profile
        if clk == CLK_GFX:
            levels = sorted(p.graphics_clocks_mhz[p.memory_clocks_mhz[0]])
            now = gpu.reported_sm_clock_mhz
        elif clk == CLK_MEM:
            levels, now = sorted(p.memory_clocks_mhz), gpu.memory_clock_mhz
        else:
            raise Fail(NOT_SUPPORTED)
        levels = levels[:33]  # AMDSMI_MAX_NUM_FREQUENCIES
        freq = _zeroed(self._w.struct_amdsmi_frequencies_t, out)
        freq.has_deep_sleep = clk == CLK_GFX
        freq.num_supported = len(levels)
        freq.current = min(range(len(levels)), key=lambda i: abs(levels[i] - now))
        for i, mhz in enumerate(levels):
            freq.frequency[i] = mhz * 1_000_000  # Hz
        return SUCCESS

    def _sym_amdsmi_set_gpu_clk_range(self, handle: int | None, min_mhz: int, max_mhz: int, clk: int) -> int:
        gpu = self.d.gpu(handle)
        self.d.require_permission()
        if clk != CLK_GFX:
            raise Fail(NOT_SUPPORTED)
        p = gpu.profile
        if not p.min_sm_clock_mhz <= min_mhz <= max_mhz <= p.max_sm_clock_mhz:
            raise Fail(INVAL)
        gpu.lock_clocks(min_mhz, max_mhz)
        self.d.perf_levels[gpu.index] = PERF_MANUAL
        return SUCCESS

    def _sym_amdsmi_set_gpu_perf_determinism_mode(self, handle: int | None, clk_mhz: int) -> int:
        gpu = self.d.gpu(handle)
        self.d.require_permission()
        p = gpu.profile
        if not p.min_sm_clock_mhz <= clk_mhz <= p.max_sm_clock_mhz:
            raise Fail(INVAL)
        gpu.lock_clocks(p.min_sm_clock_mhz, clk_mhz)
        self.d.perf_levels[gpu.index] = PERF_DETERMINISM
        return SUCCESS

    def _sym_amdsmi_set_gpu_perf_level(self, handle: int | None, level: int) -> int:
        gpu = self.d.gpu(handle)
        self.d.require_permission()
        if level not in range(9):
            raise Fail(INVAL)
        if level == PERF_AUTO:
            gpu.reset_clocks()  # the driver's automatic DPM: the whole clock range again
        self.d.perf_levels[gpu.index] = level
        return SUCCESS

    def _sym_amdsmi_get_gpu_perf_level(self, handle: int | None, out: int | None) -> int:
        gpu = self.d.gpu(handle)
        _put(ctypes.c_uint32, out, self.d.perf_levels[gpu.index])
        return SUCCESS

    # ----- reset ----------------------------------------------------------------------------------

    def _sym_amdsmi_reset_gpu(self, handle: int | None) -> int:
        gpu = self.d.gpu(handle)  # a GPU that fell off the bus cannot be reset through it either
        self.d.require_permission()
        if gpu.processes:
            return BUSY  # amdgpu refuses a reset while a process holds the GPU
        self.d.reset(gpu)
        return SUCCESS


def _c_type(declared: Any) -> Any:
    """A prototype's argument type for the callback: pointers as plain addresses."""
    if declared is ctypes.c_void_p or (isinstance(declared, type) and issubclass(declared, ctypes._Pointer)):
        return ctypes.c_void_p
    if declared is ctypes.c_char_p:
        return ctypes.c_void_p
    return declared
