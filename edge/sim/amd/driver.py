"""The simulated amdgpu driver behind the simulated libamd_smi: the boards, their handles, the
library's init count, a driver that unloads or hangs, permissions and per-board settings amdsmi
keeps (the performance level). The symbols (edge/sim/amd/symbols.py) read and change it under
`lock`; `SimulatedAmdSmi` (edge/sim/amd/sim.py) injects faults through it.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
import uuid as uuid_lib
from collections.abc import Callable, Sequence
from typing import Any

from edge.sim.amd.profiles import BOARDS, AmdBoard
from edge.sim.physics import SimGpu
from edge.sim.profiles import GpuProfile

# amdsmi_status_t values (amdsmi_wrapper.py; amdsmi.h)
SUCCESS = 0
INVAL = 1
NOT_SUPPORTED = 2
NO_PERM = 10
BUSY = 30
NOT_FOUND = 31
NOT_INIT = 32
DRIVER_NOT_LOADED = 34
INSUFFICIENT_SIZE = 41
OUT_OF_RESOURCES = 15
UNKNOWN_ERROR = 0xFFFFFFFF

PERF_AUTO = 0  # AMDSMI_DEV_PERF_LEVEL_AUTO
PERF_MANUAL = 3
PERF_DETERMINISM = 8

# Bus numbers of an 8-way MI300X platform's OAMs (plausible; more GPUs get made-up ones)
_BUSES = (0x05, 0x26, 0x46, 0x65, 0x85, 0xA6, 0xC6, 0xE5)


class Fail(Exception):
    """Raised inside a symbol to answer an amdsmi status code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class AmdSimDriver:
    """What the simulated amdgpu driver and libamd_smi know. `lock` guards everything."""

    def __init__(self, profiles: Sequence[GpuProfile], *, clock: Callable[[], float], seed: str,
                 allow_set: bool) -> None:
        self.clock = clock
        self.allow_set = allow_set  # False: setters answer AMDSMI_STATUS_NO_PERM
        self.lock = threading.RLock()
        self.answering = threading.Event()  # cleared while the driver hangs: calls block
        self.answering.set()
        self.init_count = 0
        self.unloaded = False
        self.gpus = [SimGpu(i, p, clock=clock, seed=seed) for i, p in enumerate(profiles)]
        self.boards: list[AmdBoard] = [BOARDS[p.key] for p in profiles]
        self.perf_levels = [PERF_AUTO for _ in self.gpus]
        for gpu in self.gpus:  # amdsmi's ids, not NVIDIA's
            gpu.uuid = "AMD-" + str(uuid_lib.uuid5(uuid_lib.NAMESPACE_URL, f"kgpu-sim-amd:{seed}:{gpu.profile.key}:"
                                                                            f"{gpu.index}"))
            bus = _BUSES[gpu.index] if gpu.index < len(_BUSES) else 0xF0 + gpu.index % 16
            gpu.pci_bus_id = f"0000:{bus:02x}:00.0"
            gpu.serial = hashlib.sha256(gpu.uuid.encode()).hexdigest()[:16].upper()
        # handles: addresses of buffers we own, so each is a real non-null pointer
        self._socket_buffers = [ctypes.create_string_buffer(16) for _ in self.gpus]
        self._gpu_buffers = [ctypes.create_string_buffer(16) for _ in self.gpus]
        self._by_socket = {ctypes.addressof(b): g for b, g in zip(self._socket_buffers, self.gpus)}
        self._by_handle = {ctypes.addressof(b): g for b, g in zip(self._gpu_buffers, self.gpus)}

    @property
    def initialised(self) -> bool:
        return self.init_count > 0 and not self.unloaded

    def require_init(self) -> None:
        if not self.initialised:
            raise Fail(NOT_INIT)

    def socket_handles(self) -> list[int]:
        return [ctypes.addressof(b) for b in self._socket_buffers]

    def handle_of(self, gpu: SimGpu) -> int:
        return ctypes.addressof(self._gpu_buffers[gpu.index])

    def gpu_of_socket(self, socket: int | None) -> SimGpu:
        self.require_init()
        gpu = self._by_socket.get(socket or 0)
        if gpu is None:
            raise Fail(INVAL)
        return gpu

    def gpu(self, handle: int | None) -> SimGpu:
        """The GPU behind a processor handle, brought up to date; NOT_FOUND once it is gone."""
        self.require_init()
        gpu = self._by_handle.get(handle or 0)
        if gpu is None:
            raise Fail(INVAL)
        if gpu.lost:
            raise Fail(NOT_FOUND)
        gpu.advance()
        return gpu

    def board(self, gpu: SimGpu) -> AmdBoard:
        return self.boards[gpu.index]

    def require_permission(self) -> None:
        if not self.allow_set:
            raise Fail(NO_PERM)

    def unload(self) -> None:
        """The amdgpu module is gone: every client's session with it too."""
        self.unloaded = True
        self.init_count = 0

    def reload(self) -> None:
        """The driver came back (a reboot): loaded, but every client must amdsmi_init again."""
        self.unloaded = False
        self.init_count = 0
        self.perf_levels = [PERF_AUTO for _ in self.gpus]

    def reset(self, gpu: SimGpu) -> bool:
        """A GPU reset (the caller checked nothing holds the GPU): see SimGpu.gpu_reset."""
        self.perf_levels[gpu.index] = PERF_AUTO
        return gpu.gpu_reset()

    def state(self, gpu: SimGpu) -> dict[str, Any]:
        return gpu.state() | {"driver_loaded": not self.unloaded, "driver_answering": self.answering.is_set(),
                              "amdsmi_initialised": self.initialised,
                              "perf_level": self.perf_levels[gpu.index]}
