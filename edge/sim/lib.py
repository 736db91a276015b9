"""A simulated libnvidia-ml that pynvml calls exactly as it calls the real one.

`SimulatedNvml.install()` puts a `SimulatedLib` in place of `pynvml.nvmlLib`. Its attributes
are ctypes `CFUNCTYPE` callbacks named like the C symbols pynvml looks up; each writes into the
pointers pynvml passes and returns an NVML return code, so every pynvml wrapper (and every
line of our driver above it) runs unchanged. A symbol we do not implement raises
AttributeError, which pynvml turns into NVMLError_FunctionNotFound, as with an old driver.

Handles are the addresses of small buffers we own, one per GPU and one per event set, so a
pynvml handle is a genuine non-null pointer that maps back to its simulated object.
"""

import ctypes
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from ctypes import CFUNCTYPE, c_char_p, c_int, c_uint, c_ulonglong, c_void_p
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import pynvml

from edge.sim.physics import SUPPORTED_REASONS, SimFault, SimGpu
from edge.sim.profiles import CUDA_DRIVER_VERSION, DRIVER_VERSION, NVML_VERSION, get_profile
from shared.logs import get_logger

log = get_logger(__name__)

Permissions = Literal["root", "none"]

SUCCESS = pynvml.NVML_SUCCESS
UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
INVALID_ARGUMENT = pynvml.NVML_ERROR_INVALID_ARGUMENT
NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
INSUFFICIENT_SIZE = pynvml.NVML_ERROR_INSUFFICIENT_SIZE
TIMEOUT = pynvml.NVML_ERROR_TIMEOUT
GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
VERSION_MISMATCH = pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
UNKNOWN = pynvml.NVML_ERROR_UNKNOWN

_NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId outside MIG
_ARCHITECTURE = {9: pynvml.NVML_DEVICE_ARCH_HOPPER, 8: pynvml.NVML_DEVICE_ARCH_AMPERE,
                 7: pynvml.NVML_DEVICE_ARCH_TURING}
_VIDEO_CLOCK_RATIO = 0.886  # video clock relative to the SM clock on these boards
_PROCESS_NAME = "/usr/bin/python3"

# Every callback ever built stays referenced: a thread may still hold one that pynvml fetched
# before an uninstall, and calling a collected callback would crash the interpreter.
_KEEP_ALIVE: list[Any] = []


class _Fail(Exception):
    """Raised inside an implementation to return an NVML error code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _put(ctype: type, address: int | None, value: Any) -> None:
    if not address:
        raise _Fail(INVALID_ARGUMENT)
    ctype.from_address(address).value = value


def _put_text(address: int | None, size: int, text: str) -> None:
    data = text.encode() + b"\0"
    if not address:
        raise _Fail(INVALID_ARGUMENT)
    if len(data) > size:
        raise _Fail(INSUFFICIENT_SIZE)
    ctypes.memmove(address, data, len(data))


def _uint(value: float) -> int:
    """What a C unsigned counter would hold: rounded, never negative."""
    return max(0, round(value))


class SimulatedLib:
    """The object installed as `pynvml.nvmlLib`: C symbol name -> CFUNCTYPE callback."""

    def __init__(self, functions: dict[str, Any]) -> None:
        self.__dict__["_functions"] = functions

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_functions"][name]
        except KeyError:
            raise AttributeError(f"simulated libnvidia-ml has no symbol {name}") from None

    @property
    def symbols(self) -> list[str]:
        return sorted(self.__dict__["_functions"])


@dataclass
class _EventSet:
    buffer: ctypes.Array
    registrations: dict[int, int] = field(default_factory=dict)  # gpu index -> event type mask
    queue: deque[tuple[int, int, int]] = field(default_factory=deque)  # (gpu, type, data)
    stale: bool = False  # freed, or invalidated by a driver unload

    @property
    def address(self) -> int:
        return ctypes.addressof(self.buffer)


class SimulatedNvml:
    """A node's worth of simulated GPUs behind a simulated libnvidia-ml."""

    def __init__(
        self,
        gpus: int,
        model: str | Sequence[str] = "H100",
        *,
        clock: Callable[[], float] = time.monotonic,
        permissions: Permissions = "root",
        seed: str = "",
        missing_symbols: Iterable[str] = (),
    ) -> None:
        if permissions not in ("root", "none"):
            raise ValueError(f"permissions must be 'root' or 'none', not {permissions!r}")
        models = [model] * gpus if isinstance(model, str) else list(model)
        if gpus < 0 or len(models) != gpus:
            raise ValueError(f"need {gpus} model names (or one for all), got {len(models)}")
        profiles = [get_profile(m) for m in models]
        self.clock = clock
        self.allow_set = permissions == "root"  # False: setters answer NO_PERMISSION
        # An NVML code nvmlInit answers instead of succeeding (e.g. DRIVER_NOT_LOADED): a node
        # whose driver stays away. None: nvmlInit works.
        self.fail_init_with: int | None = None
        self._lock = threading.RLock()  # the model state; never held while waiting for events
        self._events = threading.Condition(threading.Lock())
        self._gpus = [SimGpu(i, p, clock=clock, seed=seed) for i, p in enumerate(profiles)]
        self._handle_buffers = [ctypes.create_string_buffer(16) for _ in self._gpus]
        self._gpu_by_handle = {
            ctypes.addressof(buffer): gpu for buffer, gpu in zip(self._handle_buffers, self._gpus)
        }
        self._event_sets: dict[int, _EventSet] = {}
        self._init_count = 0
        self._driver_unloaded = False
        # Cleared while the simulated driver hangs (SimFault.hung): every call blocks until set.
        self._answering = threading.Event()
        self._answering.set()
        self._epoch_offset = time.time() - clock()  # process samples carry epoch microseconds
        self._error_strings: dict[int, ctypes.Array] = {}
        self._previous_lib: Any = None
        self._installed = False
        functions = self._build_functions()
        for name in missing_symbols:  # models an older libnvidia-ml without them
            if functions.pop(name, None) is None:
                raise ValueError(f"{name} is not a symbol the simulation implements")
        self.lib = SimulatedLib(functions)

    # ----- public API ----------------------------------------------------------------------

    @property
    def gpus(self) -> list[SimGpu]:
        return list(self._gpus)

    @property
    def symbols(self) -> list[str]:
        return self.lib.symbols

    @property
    def answering(self) -> bool:
        """False while the simulated driver hangs (calls block instead of returning)."""
        return self._answering.is_set()

    @property
    def initialised(self) -> bool:
        return self._init_count > 0 and not self._driver_unloaded

    def install(self) -> Self:
        """Make pynvml talk to this simulation from its next call on."""
        with pynvml.libLoadLock:
            if not self._installed:
                self._previous_lib = pynvml.nvmlLib
                pynvml.nvmlLib = self.lib
                pynvml._nvmlGetFunctionPointer_cache.clear()
                self._installed = True
        return self

    def uninstall(self) -> None:
        """Give pynvml back the library it had, and wake anything waiting on our event sets."""
        with pynvml.libLoadLock:
            if self._installed:
                pynvml.nvmlLib = self._previous_lib
                pynvml._nvmlGetFunctionPointer_cache.clear()
                self._installed = False
        self._answering.set()  # nothing stays blocked in a driver that is gone
        self._invalidate_event_sets()

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def inject(self, index: int, fault: SimFault | Mapping[str, Any]) -> dict[str, Any]:
        """Apply load or a fault to GPU `index`; answer its new simulated state."""
        if not isinstance(fault, SimFault):
            fault = SimFault.model_validate(fault)
        if not 0 <= index < len(self._gpus):
            raise IndexError(f"no simulated GPU {index}; this node has {len(self._gpus)}")
        with self._lock:
            gpu = self._gpus[index]
            if fault.reset:
                self._driver_unloaded = False
                self._answering.set()
            gpu.apply(fault)
            if fault.driver_unloaded is True:
                self._unload_driver()
            elif fault.driver_unloaded is False:
                self._driver_unloaded = False
            if fault.hung is True:
                self._answering.clear()
                log.warning("simulated driver hung: NVML calls block until it is released")
            elif fault.hung is False:
                self._answering.set()
            if fault.ecc_sbe:
                self._deliver(index, pynvml.nvmlEventTypeSingleBitEccError, 0)
            if fault.ecc_dbe:
                self._deliver(index, pynvml.nvmlEventTypeDoubleBitEccError, 0)
            if fault.xid is not None:
                self._deliver(index, pynvml.nvmlEventTypeXidCriticalError, fault.xid)
            return self._state(gpu)

    def state(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self._gpus):
            raise IndexError(f"no simulated GPU {index}; this node has {len(self._gpus)}")
        with self._lock:
            return self._state(self._gpus[index])

    def _state(self, gpu: SimGpu) -> dict[str, Any]:
        return gpu.state() | {"driver_loaded": not self._driver_unloaded,
                              "driver_answering": self.answering,
                              "nvml_initialised": self.initialised}

    # ----- driver-wide state ---------------------------------------------------------------

    def _unload_driver(self) -> None:
        """Every client must nvmlInit again; their event sets are gone."""
        self._driver_unloaded = True
        self._init_count = 0
        self._invalidate_event_sets()

    def _invalidate_event_sets(self) -> None:
        with self._events:
            for event_set in self._event_sets.values():
                event_set.stale = True
            self._event_sets.clear()
            self._events.notify_all()

    def _deliver(self, index: int, event_type: int, data: int) -> None:
        with self._events:
            for event_set in self._event_sets.values():
                if event_set.registrations.get(index, 0) & event_type:
                    event_set.queue.append((index, event_type, data))
            self._events.notify_all()

    def _require_init(self) -> None:
        if not self.initialised:
            raise _Fail(UNINITIALIZED)

    def _gpu(self, handle: int | None) -> SimGpu:
        """The GPU behind a handle, brought up to date; raises for a bad or lost one."""
        self._require_init()
        gpu = self._gpu_by_handle.get(handle or 0)
        if gpu is None:
            raise _Fail(INVALID_ARGUMENT)
        if gpu.lost:
            raise _Fail(GPU_IS_LOST)
        gpu.advance()
        return gpu

    def _handle_of(self, gpu: SimGpu) -> int:
        return ctypes.addressof(self._handle_buffers[gpu.index])

    def _give_handle(self, gpu: SimGpu, out: int | None) -> None:
        if gpu.lost:
            raise _Fail(GPU_IS_LOST)
        _put(c_void_p, out, self._handle_of(gpu))

    # ----- building the symbol table -------------------------------------------------------

    def _build_functions(self) -> dict[str, Any]:
        table: dict[str, Any] = {}

        def export(name: str, argtypes: tuple[type, ...], impl: Callable[..., int], *,
                   locked: bool = True, restype: type = c_int, can_hang: bool = True) -> None:
            prototype = CFUNCTYPE(restype, *argtypes)

            def guarded(*args: Any) -> Any:
                if can_hang and not self._answering.is_set():
                    self._answering.wait()  # a hung driver: block, holding no lock, until released
                try:
                    if locked:
                        with self._lock:
                            return impl(*args)
                    return impl(*args)
                except _Fail as failure:
                    return failure.code
                except Exception:  # a bug here must not read as NVML_SUCCESS
                    log.exception("simulated %s failed", name)
                    return UNKNOWN if restype is c_int else None

            callback = prototype(guarded)
            _KEEP_ALIVE.append(callback)
            table[name] = callback

        H, P, U, ULL = c_void_p, c_void_p, c_uint, c_ulonglong  # handle, pointer, uint, u64

        def scalar(name: str, ctype: type, read: Callable[[SimGpu], Any]) -> None:
            """A `nvmlReturn_t f(nvmlDevice_t, T *out)` getter."""

            def impl(handle: int | None, out: int | None) -> int:
                _put(ctype, out, read(self._gpu(handle)))
                return SUCCESS

            export(name, (H, P), impl)

        def unsupported_unless(ok: bool) -> None:
            if not ok:
                raise _Fail(NOT_SUPPORTED)

        # --- library and system ---
        def init_with_flags(flags: int) -> int:
            if self.fail_init_with is not None:
                return self.fail_init_with
            if self._driver_unloaded:
                self._driver_unloaded = False  # the reloaded driver answers again
            self._init_count += 1
            return SUCCESS

        def shutdown() -> int:
            self._require_init()
            self._init_count -= 1
            return SUCCESS

        def error_string(code: int) -> int:
            if code not in self._error_strings:
                text = pynvml.NVMLError._errcode_to_string.get(code, "Unknown Error")
                self._error_strings[code] = ctypes.create_string_buffer(text.encode())
            return ctypes.addressof(self._error_strings[code])

        def text_getter(value: str) -> Callable[[int | None, int], int]:
            def impl(out: int | None, size: int) -> int:
                self._require_init()
                _put_text(out, size, value)
                return SUCCESS
            return impl

        def cuda_version(out: int | None) -> int:
            self._require_init()
            _put(c_int, out, CUDA_DRIVER_VERSION)
            return SUCCESS

        def process_name(pid: int, out: int | None, size: int) -> int:
            self._require_init()
            if not any(p.pid == pid for g in self._gpus for p in g.processes):
                raise _Fail(NOT_FOUND)
            _put_text(out, size, _PROCESS_NAME)
            return SUCCESS

        export("nvmlInitWithFlags", (U,), init_with_flags)
        export("nvmlInit_v2", (), lambda: init_with_flags(0))
        export("nvmlShutdown", (), shutdown)
        export("nvmlErrorString", (c_int,), error_string, restype=c_void_p, can_hang=False)
        export("nvmlSystemGetDriverVersion", (P, U), text_getter(DRIVER_VERSION))
        export("nvmlSystemGetNVMLVersion", (P, U), text_getter(NVML_VERSION))
        export("nvmlSystemGetCudaDriverVersion", (P,), cuda_version)
        export("nvmlSystemGetCudaDriverVersion_v2", (P,), cuda_version)
        export("nvmlSystemGetProcessName", (U, P, U), process_name)

        # --- finding devices ---
        def device_count(out: int | None) -> int:
            self._require_init()
            _put(c_uint, out, len(self._gpus))
            return SUCCESS

        def handle_by_index(index: int, out: int | None) -> int:
            self._require_init()
            if index >= len(self._gpus):
                raise _Fail(INVALID_ARGUMENT)
            self._give_handle(self._gpus[index], out)
            return SUCCESS

        def handle_by_uuid(uuid: bytes | None, out: int | None) -> int:
            self._require_init()
            for gpu in self._gpus:
                if uuid is not None and gpu.uuid.encode() == uuid:
                    self._give_handle(gpu, out)
                    return SUCCESS
            raise _Fail(NOT_FOUND)

        def handle_by_bus_id(bus_id: bytes | None, out: int | None) -> int:
            self._require_init()
            wanted = (bus_id or b"").decode(errors="replace").lower()
            for gpu in self._gpus:
                full = gpu.pci_bus_id.lower()
                if wanted in (full, full[4:]):  # 8- or 4-digit domain
                    self._give_handle(gpu, out)
                    return SUCCESS
            raise _Fail(NOT_FOUND)

        export("nvmlDeviceGetCount_v2", (P,), device_count)
        export("nvmlDeviceGetHandleByIndex_v2", (U, P), handle_by_index)
        export("nvmlDeviceGetHandleByUUID", (c_char_p, P), handle_by_uuid)
        export("nvmlDeviceGetHandleByPciBusId_v2", (c_char_p, P), handle_by_bus_id)

        # --- identity ---
        def device_text(
            read: Callable[[SimGpu], str],
        ) -> Callable[[int | None, int | None, int], int]:
            def impl(handle: int | None, out: int | None, size: int) -> int:
                _put_text(out, size, read(self._gpu(handle)))
                return SUCCESS
            return impl

        def pci_info(handle: int | None, out: int | None) -> int:
            gpu = self._gpu(handle)
            if not out:
                raise _Fail(INVALID_ARGUMENT)
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
            gpu = self._gpu(handle)
            _put(c_int, major, gpu.profile.compute_capability[0])
            _put(c_int, minor, gpu.profile.compute_capability[1])
            return SUCCESS

        def numa_node(gpu: SimGpu) -> int:
            unsupported_unless(gpu.profile.numa_from_nvml)
            return 0 if gpu.index < max(1, len(self._gpus) // 2) else 1

        export("nvmlDeviceGetName", (H, P, U), device_text(lambda g: g.profile.name))
        export("nvmlDeviceGetUUID", (H, P, U), device_text(lambda g: g.uuid))
        export("nvmlDeviceGetSerial", (H, P, U), device_text(lambda g: g.serial))
        export("nvmlDeviceGetPciInfo_v3", (H, P), pci_info)
        export("nvmlDeviceGetCudaComputeCapability", (H, P, P), compute_capability)
        scalar("nvmlDeviceGetIndex", c_uint, lambda g: g.index)
        scalar("nvmlDeviceGetMinorNumber", c_uint, lambda g: g.index)
        scalar("nvmlDeviceGetArchitecture", c_uint,
               lambda g: _ARCHITECTURE.get(g.profile.compute_capability[0], 0xFFFFFFFF))
        scalar("nvmlDeviceGetNumaNodeId", c_int, numa_node)
        scalar("nvmlDeviceGetPersistenceMode", c_uint, lambda g: pynvml.NVML_FEATURE_ENABLED)
        scalar("nvmlDeviceGetComputeMode", c_uint, lambda g: pynvml.NVML_COMPUTEMODE_DEFAULT)
        scalar("nvmlDeviceGetFanSpeed", c_uint,
               lambda g: unsupported_unless(False))  # passively cooled data-centre boards

        def mig_mode(handle: int | None, current: int | None, pending: int | None) -> int:
            gpu = self._gpu(handle)
            unsupported_unless(gpu.profile.mig)
            _put(c_uint, current, pynvml.NVML_DEVICE_MIG_DISABLE)
            _put(c_uint, pending, pynvml.NVML_DEVICE_MIG_DISABLE)
            return SUCCESS

        export("nvmlDeviceGetMigMode", (H, P, P), mig_mode)

        # --- memory and utilisation ---
        mib = 1024 * 1024

        def memory_info(handle: int | None, out: int | None) -> int:
            gpu = self._gpu(handle)
            if not out:
                raise _Fail(INVALID_ARGUMENT)
            memory = pynvml.c_nvmlMemory_t.from_address(out)
            memory.total = gpu.profile.memory_total_mib * mib
            memory.used = gpu.memory_used_mib * mib
            memory.free = memory.total - memory.used
            return SUCCESS

        def memory_info_v2(handle: int | None, out: int | None) -> int:
            gpu = self._gpu(handle)
            if not out:
                raise _Fail(INVALID_ARGUMENT)
            memory = pynvml.c_nvmlMemory_v2_t.from_address(out)
            if memory.version != pynvml.nvmlMemory_v2:
                raise _Fail(VERSION_MISMATCH)
            memory.total = gpu.profile.memory_total_mib * mib
            memory.reserved = gpu.profile.memory_reserved_mib * mib
            memory.used = (gpu.memory_used_mib - gpu.profile.memory_reserved_mib) * mib
            memory.free = memory.total - memory.reserved - memory.used
            return SUCCESS

        def utilization(handle: int | None, out: int | None) -> int:
            gpu = self._gpu(handle)
            if not out:
                raise _Fail(INVALID_ARGUMENT)
            rates = pynvml.c_nvmlUtilization_t.from_address(out)
            rates.gpu = _uint(gpu.load_pct)
            rates.memory = _uint(gpu.memory_util_pct)
            return SUCCESS

        export("nvmlDeviceGetMemoryInfo", (H, P), memory_info)
        export("nvmlDeviceGetMemoryInfo_v2", (H, P), memory_info_v2)
        export("nvmlDeviceGetUtilizationRates", (H, P), utilization)

        # --- power and energy ---
        def milliwatts(watts: float) -> int:
            return _uint(watts * 1000)

        def limit_constraints(handle: int | None, low: int | None, high: int | None) -> int:
            gpu = self._gpu(handle)
            _put(c_uint, low, milliwatts(gpu.profile.power_min_w))
            _put(c_uint, high, milliwatts(gpu.profile.power_max_w))
            return SUCCESS

        def set_power_limit(handle: int | None, limit_mw: int) -> int:
            gpu = self._gpu(handle)
            if not self.allow_set:
                raise _Fail(NO_PERMISSION)
            p = gpu.profile
            if not milliwatts(p.power_min_w) <= limit_mw <= milliwatts(p.power_max_w):
                raise _Fail(INVALID_ARGUMENT)
            gpu.set_power_limit_w(limit_mw / 1000)
            return SUCCESS

        scalar("nvmlDeviceGetPowerUsage", c_uint, lambda g: milliwatts(g.power_w))
        scalar("nvmlDeviceGetTotalEnergyConsumption", c_ulonglong, lambda g: int(g.energy_mj))
        scalar("nvmlDeviceGetPowerManagementMode", c_uint, lambda g: pynvml.NVML_FEATURE_ENABLED)
        scalar("nvmlDeviceGetPowerManagementLimit", c_uint, lambda g: milliwatts(g.power_limit_w))
        scalar("nvmlDeviceGetPowerManagementDefaultLimit", c_uint,
               lambda g: milliwatts(g.profile.power_default_w))
        scalar("nvmlDeviceGetEnforcedPowerLimit", c_uint,
               lambda g: milliwatts(g.enforced_power_limit_w))
        export("nvmlDeviceGetPowerManagementLimitConstraints", (H, P, P), limit_constraints)
        export("nvmlDeviceSetPowerManagementLimit", (H, U), set_power_limit)

        # --- temperature ---
        def temperature(handle: int | None, sensor: int, out: int | None) -> int:
            gpu = self._gpu(handle)
            if sensor != pynvml.NVML_TEMPERATURE_GPU:
                raise _Fail(INVALID_ARGUMENT)
            _put(c_uint, out, _uint(gpu.temperature_c))
            return SUCCESS

        def temperature_v(handle: int | None, out: int | None) -> int:
            gpu = self._gpu(handle)
            if not out:
                raise _Fail(INVALID_ARGUMENT)
            reading = pynvml.c_nvmlTemperature_v1_t.from_address(out)
            if reading.version != pynvml.nvmlTemperature_v1:
                raise _Fail(VERSION_MISMATCH)
            if reading.sensorType != pynvml.NVML_TEMPERATURE_GPU:
                raise _Fail(INVALID_ARGUMENT)
            reading.temperature = round(gpu.temperature_c)
            return SUCCESS

        def threshold(handle: int | None, kind: int, out: int | None) -> int:
            p = self._gpu(handle).profile
            values = {
                pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: p.shutdown_c,
                pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: p.slowdown_c,
                pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX: p.max_operating_c,
            }
            if p.remapped_rows:  # HBM boards report a memory limit too
                values[pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX] = p.shutdown_c + 3
            if kind not in values:
                raise _Fail(NOT_SUPPORTED if kind < pynvml.NVML_TEMPERATURE_THRESHOLD_COUNT
                            else INVALID_ARGUMENT)
            _put(c_uint, out, _uint(values[kind]))
            return SUCCESS

        export("nvmlDeviceGetTemperature", (H, U, P), temperature)
        export("nvmlDeviceGetTemperatureV", (H, P), temperature_v)
        export("nvmlDeviceGetTemperatureThreshold", (H, U, P), threshold)

        # --- clocks ---
        def clock_of(gpu: SimGpu, kind: int, maximum: bool) -> int:
            p = gpu.profile
            sm = p.max_sm_clock_mhz if maximum else gpu.reported_sm_clock_mhz
            if kind in (pynvml.NVML_CLOCK_GRAPHICS, pynvml.NVML_CLOCK_SM):
                return sm
            if kind == pynvml.NVML_CLOCK_MEM:
                return p.memory_clocks_mhz[0] if maximum else gpu.memory_clock_mhz
            if kind == pynvml.NVML_CLOCK_VIDEO:
                return round(sm * _VIDEO_CLOCK_RATIO)
            raise _Fail(INVALID_ARGUMENT)

        def clock_info(maximum: bool) -> Callable[[int | None, int, int | None], int]:
            def impl(handle: int | None, kind: int, out: int | None) -> int:
                _put(c_uint, out, clock_of(self._gpu(handle), kind, maximum))
                return SUCCESS
            return impl

        def write_list(values: Sequence[int], count: int | None, out: int | None) -> int:
            """The NVML two-call protocol: too small (or no) buffer -> size it, then fill it."""
            if not count:
                raise _Fail(INVALID_ARGUMENT)
            room = c_uint.from_address(count).value
            c_uint.from_address(count).value = len(values)
            if not values:
                return SUCCESS
            if not out or room < len(values):
                return INSUFFICIENT_SIZE
            (c_uint * len(values)).from_address(out)[:] = list(values)
            return SUCCESS

        def memory_clocks(handle: int | None, count: int | None, out: int | None) -> int:
            return write_list(self._gpu(handle).profile.memory_clocks_mhz, count, out)

        def graphics_clocks(handle: int | None, memory_mhz: int, count: int | None,
                            out: int | None) -> int:
            table = self._gpu(handle).profile.graphics_clocks_mhz
            if memory_mhz not in table:
                raise _Fail(NOT_FOUND)
            return write_list(table[memory_mhz], count, out)

        def lock_clocks(handle: int | None, min_mhz: int, max_mhz: int) -> int:
            gpu = self._gpu(handle)
            if not self.allow_set:
                raise _Fail(NO_PERMISSION)
            p = gpu.profile

            def resolve(mhz: int) -> int:
                if mhz >= pynvml.NVML_CLOCK_LIMIT_ID_RANGE_START:  # TDP / unlimited
                    return p.max_sm_clock_mhz
                return min(max(mhz, p.min_sm_clock_mhz), p.max_sm_clock_mhz)

            if min_mhz > max_mhz:
                raise _Fail(INVALID_ARGUMENT)
            gpu.lock_clocks(resolve(min_mhz), resolve(max_mhz))
            return SUCCESS

        def reset_locked_clocks(handle: int | None) -> int:
            gpu = self._gpu(handle)
            if not self.allow_set:
                raise _Fail(NO_PERMISSION)
            gpu.reset_clocks()
            return SUCCESS

        def pstate(gpu: SimGpu) -> int:
            idle = gpu.load_pct <= 0 and len(gpu.profile.memory_clocks_mhz) > 1
            return pynvml.NVML_PSTATE_8 if idle else pynvml.NVML_PSTATE_0

        export("nvmlDeviceGetClockInfo", (H, U, P), clock_info(maximum=False))
        export("nvmlDeviceGetMaxClockInfo", (H, U, P), clock_info(maximum=True))
        export("nvmlDeviceGetSupportedMemoryClocks", (H, P, P), memory_clocks)
        export("nvmlDeviceGetSupportedGraphicsClocks", (H, U, P, P), graphics_clocks)
        export("nvmlDeviceSetGpuLockedClocks", (H, U, U), lock_clocks)
        export("nvmlDeviceResetGpuLockedClocks", (H,), reset_locked_clocks)
        scalar("nvmlDeviceGetPerformanceState", c_uint, pstate)
        scalar("nvmlDeviceGetPowerState", c_uint, pstate)
        for name in ("nvmlDeviceGetCurrentClocksEventReasons",
                     "nvmlDeviceGetCurrentClocksThrottleReasons"):
            scalar(name, c_ulonglong, lambda g: g.throttle_reasons)
        for name in ("nvmlDeviceGetSupportedClocksEventReasons",
                     "nvmlDeviceGetSupportedClocksThrottleReasons"):
            scalar(name, c_ulonglong, lambda g: SUPPORTED_REASONS)

        # --- errors ---
        def ecc_mode(handle: int | None, current: int | None, pending: int | None) -> int:
            self._gpu(handle)
            _put(c_uint, current, pynvml.NVML_FEATURE_ENABLED)
            _put(c_uint, pending, pynvml.NVML_FEATURE_ENABLED)
            return SUCCESS

        def ecc_total(handle: int | None, error_type: int, counter: int, out: int | None) -> int:
            gpu = self._gpu(handle)
            corrected, uncorrected = (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                                      pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
            counts = {
                (corrected, pynvml.NVML_VOLATILE_ECC): gpu.ecc_sbe_volatile,
                (uncorrected, pynvml.NVML_VOLATILE_ECC): gpu.ecc_dbe_volatile,
                (corrected, pynvml.NVML_AGGREGATE_ECC): gpu.ecc_sbe_aggregate,
                (uncorrected, pynvml.NVML_AGGREGATE_ECC): gpu.ecc_dbe_aggregate,
            }
            if (error_type, counter) not in counts:
                raise _Fail(INVALID_ARGUMENT)
            _put(c_ulonglong, out, counts[(error_type, counter)])
            return SUCCESS

        def remapped_rows(handle: int | None, corr: int | None, unc: int | None,
                          pending: int | None, failure: int | None) -> int:
            gpu = self._gpu(handle)
            unsupported_unless(gpu.profile.remapped_rows)
            _put(c_uint, corr, gpu.remapped_correctable)
            _put(c_uint, unc, gpu.remapped_uncorrectable)
            _put(c_uint, pending, int(gpu.remap_pending))
            _put(c_uint, failure, int(gpu.remap_failure))
            return SUCCESS

        export("nvmlDeviceGetEccMode", (H, P, P), ecc_mode)
        export("nvmlDeviceGetTotalEccErrors", (H, U, U, P), ecc_total)
        export("nvmlDeviceGetRemappedRows", (H, P, P, P, P), remapped_rows)

        # --- processes ---
        def running_processes(compute: bool) -> Callable[[int | None, int | None, int | None], int]:
            def impl(handle: int | None, count: int | None, out: int | None) -> int:
                gpu = self._gpu(handle)
                procs = gpu.processes if compute else []
                if not count:
                    raise _Fail(INVALID_ARGUMENT)
                room = c_uint.from_address(count).value
                c_uint.from_address(count).value = len(procs)
                if not procs:
                    return SUCCESS
                if not out or room < len(procs):
                    return INSUFFICIENT_SIZE
                infos = (pynvml.c_nvmlProcessInfo_v3_t * len(procs)).from_address(out)
                for info, proc in zip(infos, procs):
                    info.pid = proc.pid
                    info.usedGpuMemory = proc.used_memory_mib * mib
                    info.gpuInstanceId = _NO_INSTANCE
                    info.computeInstanceId = _NO_INSTANCE
                return SUCCESS
            return impl

        def process_utilization(handle: int | None, out: int | None, count: int | None,
                                last_seen_us: int) -> int:
            gpu = self._gpu(handle)
            if not count:
                raise _Fail(INVALID_ARGUMENT)
            now_us = int((self._epoch_offset + self.clock()) * 1_000_000)
            if not gpu.processes or now_us <= last_seen_us:
                raise _Fail(NOT_FOUND)  # what NVML says when nothing was sampled since then
            procs = gpu.processes
            room = c_uint.from_address(count).value
            c_uint.from_address(count).value = len(procs)
            if not out or room < len(procs):
                return INSUFFICIENT_SIZE
            samples = (pynvml.c_nvmlProcessUtilizationSample_t * len(procs)).from_address(out)
            mem_ratio = gpu.profile.memory_util_per_load
            for sample, proc in zip(samples, procs):
                sample.pid = proc.pid
                sample.timeStamp = now_us
                sample.smUtil = _uint(proc.sm_util)
                sample.memUtil = _uint(proc.sm_util * mem_ratio)
                sample.encUtil = 0
                sample.decUtil = 0
            return SUCCESS

        export("nvmlDeviceGetComputeRunningProcesses_v3", (H, P, P), running_processes(True))
        export("nvmlDeviceGetGraphicsRunningProcesses_v3", (H, P, P), running_processes(False))
        export("nvmlDeviceGetMPSComputeRunningProcesses_v3", (H, P, P), running_processes(False))
        export("nvmlDeviceGetProcessUtilization", (H, P, P, ULL), process_utilization)

        # --- events ---
        def event_set_create(out: int | None) -> int:
            self._require_init()
            event_set = _EventSet(buffer=ctypes.create_string_buffer(16))
            _put(c_void_p, out, event_set.address)
            with self._events:
                self._event_sets[event_set.address] = event_set
            return SUCCESS

        def register_events(handle: int | None, event_types: int, set_address: int | None) -> int:
            gpu = self._gpu(handle)
            if event_types & ~gpu.supported_event_types:
                raise _Fail(NOT_SUPPORTED)
            with self._events:
                event_set = self._event_sets.get(set_address or 0)
                if event_set is None:
                    raise _Fail(INVALID_ARGUMENT)
                event_set.registrations[gpu.index] = (
                    event_set.registrations.get(gpu.index, 0) | event_types
                )
            return SUCCESS

        def event_set_wait(set_address: int | None, out: int | None, timeout_ms: int) -> int:
            """Blocks on the event condition only, never on the model lock."""
            if not out:
                raise _Fail(INVALID_ARGUMENT)
            deadline = time.monotonic() + timeout_ms / 1000
            with self._events:
                event_set = self._event_sets.get(set_address or 0)
                if event_set is None:
                    return UNINITIALIZED if not self.initialised else INVALID_ARGUMENT
                while not event_set.queue:
                    if event_set.stale or not self.initialised:
                        return UNINITIALIZED
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return TIMEOUT
                    self._events.wait(remaining)
                if event_set.stale or not self.initialised:
                    return UNINITIALIZED
                index, event_type, data = event_set.queue.popleft()
            event = pynvml.c_nvmlEventData_t.from_address(out)
            event.device = ctypes.cast(self._handle_of(self._gpus[index]), pynvml.c_nvmlDevice_t)
            event.eventType = event_type
            event.eventData = data
            event.gpuInstanceId = _NO_INSTANCE
            event.computeInstanceId = _NO_INSTANCE
            return SUCCESS

        def event_set_free(set_address: int | None) -> int:
            with self._events:
                event_set = self._event_sets.pop(set_address or 0, None)
                if event_set is None:
                    return INVALID_ARGUMENT
                event_set.stale = True
                self._events.notify_all()
            return SUCCESS

        scalar("nvmlDeviceGetSupportedEventTypes", c_ulonglong, lambda g: g.supported_event_types)
        export("nvmlEventSetCreate", (P,), event_set_create)
        export("nvmlDeviceRegisterEvents", (H, ULL, P), register_events)
        export("nvmlEventSetWait_v2", (P, P, U), event_set_wait, locked=False)
        export("nvmlEventSetFree", (P,), event_set_free, locked=False)
        return table


def install(
    gpus: int,
    model: str | Sequence[str] = "H100",
    *,
    clock: Callable[[], float] = time.monotonic,
    permissions: Permissions = "root",
    seed: str = "",
    missing_symbols: Iterable[str] = (),
) -> SimulatedNvml:
    """Simulate `gpus` boards of `model` (or one model per GPU) and point pynvml at them.

    `permissions="none"` models an unprivileged container (setters: NO_PERMISSION); `seed`
    varies the UUIDs (one per simulated node); `missing_symbols` models an older driver.
    """
    return SimulatedNvml(gpus, model, clock=clock, permissions=permissions, seed=seed,
                         missing_symbols=missing_symbols).install()
