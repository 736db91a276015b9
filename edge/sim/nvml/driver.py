"""The simulated libnvidia-ml's driver-wide state: the boards and their handles, nvmlInit's
count, a driver that unloads or hangs, permissions, and the event sets faults are delivered to.
Every symbol area (device, power, events, processes) reads and changes it; `SimulatedNvml`
(edge/sim/lib.py) owns one and injects faults through it.
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from collections.abc import Callable, Sequence
from ctypes import c_void_p
from dataclasses import dataclass, field
from typing import Protocol

from edge.sim.nvml.abi import GPU_IS_LOST, INVALID_ARGUMENT, UNINITIALIZED, Fail, put
from edge.sim.physics import SimGpu
from edge.sim.profiles import GpuProfile


class MigSide(Protocol):
    """What a GPU reset and a reboot need of the MIG state (edge/sim/nvml/mig.py MigHandles)."""

    def has_instances(self, index: int) -> bool: ...
    def after_reset(self, index: int) -> None: ...
    def after_reboot(self) -> None: ...


@dataclass
class EventSet:
    buffer: ctypes.Array
    registrations: dict[int, int] = field(default_factory=dict)  # gpu index -> event type mask
    queue: deque[tuple[int, int, int]] = field(default_factory=deque)  # (gpu, type, data)
    stale: bool = False  # freed, or invalidated by a driver unload

    @property
    def address(self) -> int:
        return ctypes.addressof(self.buffer)


class SimDriver:
    """What the simulated driver knows. `lock` guards the model state and is never held while
    waiting for events; `events` guards the event sets."""

    def __init__(self, profiles: Sequence[GpuProfile], *, clock: Callable[[], float], seed: str,
                 allow_set: bool, epoch_offset: float) -> None:
        self.clock = clock
        self.allow_set = allow_set  # False: setters answer NO_PERMISSION
        # An NVML code nvmlInit answers instead of succeeding (e.g. DRIVER_NOT_LOADED): a node
        # whose driver stays away. None: nvmlInit works.
        self.fail_init_with: int | None = None
        self.lock = threading.RLock()  # the model state; never held while waiting for events
        self.events = threading.Condition(threading.Lock())
        self.gpus = [SimGpu(i, p, clock=clock, seed=seed) for i, p in enumerate(profiles)]
        self._handle_buffers = [ctypes.create_string_buffer(16) for _ in self.gpus]
        self._gpu_by_handle = {
            ctypes.addressof(buffer): gpu for buffer, gpu in zip(self._handle_buffers, self.gpus)
        }
        self.event_sets: dict[int, EventSet] = {}
        self.init_count = 0
        self.unloaded = False
        # Cleared while the simulated driver hangs (SimFault.hung): every call blocks until set.
        self.answering = threading.Event()
        self.answering.set()
        self.epoch_offset = epoch_offset  # process samples carry epoch microseconds
        self.error_strings: dict[int, ctypes.Array] = {}
        # False: an NVML older than R565, without NVML_FI_DEV_GET_GPU_RECOVERY_ACTION
        self.recovery_action_field = True
        self.mig: MigSide | None = None  # set by the MIG symbols (edge/sim/nvml/mig.py)

    @property
    def initialised(self) -> bool:
        return self.init_count > 0 and not self.unloaded

    def unload(self) -> None:
        """Every client must nvmlInit again; their event sets are gone."""
        self.unloaded = True
        self.init_count = 0
        self.invalidate_event_sets()

    def reload(self) -> None:
        """The driver came back (a reboot): loaded, but every client must nvmlInit again and
        its event sets are gone."""
        self.unloaded = False
        self.init_count = 0
        self.invalidate_event_sets()

    def invalidate_event_sets(self) -> None:
        with self.events:
            for event_set in self.event_sets.values():
                event_set.stale = True
            self.event_sets.clear()
            self.events.notify_all()

    def deliver(self, index: int, event_type: int, data: int) -> None:
        with self.events:
            for event_set in self.event_sets.values():
                if event_set.registrations.get(index, 0) & event_type:
                    event_set.queue.append((index, event_type, data))
            self.events.notify_all()

    def require_init(self) -> None:
        if not self.initialised:
            raise Fail(UNINITIALIZED)

    def gpu(self, handle: int | None) -> SimGpu:
        """The GPU behind a handle, brought up to date; raises for a bad or lost one."""
        self.require_init()
        gpu = self._gpu_by_handle.get(handle or 0)
        if gpu is None:
            raise Fail(INVALID_ARGUMENT)
        if gpu.lost:
            raise Fail(GPU_IS_LOST)
        gpu.advance()
        return gpu

    def handle_of(self, gpu: SimGpu) -> int:
        return ctypes.addressof(self._handle_buffers[gpu.index])

    def give_handle(self, gpu: SimGpu, out: int | None) -> None:
        if gpu.lost:
            raise Fail(GPU_IS_LOST)
        put(c_void_p, out, self.handle_of(gpu))
