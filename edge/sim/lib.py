"""A simulated libnvidia-ml that pynvml calls exactly as it calls the real one.

`SimulatedNvml.install()` puts a `SimulatedLib` in place of `pynvml.nvmlLib`. Its attributes
are ctypes `CFUNCTYPE` callbacks named like the C symbols pynvml looks up; each writes into the
pointers pynvml passes and returns an NVML return code, so every pynvml wrapper (and every
line of our driver above it) runs unchanged. A symbol we do not implement raises
AttributeError, which pynvml turns into NVMLError_FunctionNotFound, as with an old driver.

Handles are the addresses of small buffers we own, one per GPU and one per event set, so a
pynvml handle is a genuine non-null pointer that maps back to its simulated object.

This module is the simulation's public face (install, inject faults, read state, and what a
remediation does: reset a GPU, reboot the node, run diagnostics); the driver's state and the
symbols, one module per area of the NVML API, are in edge/sim/nvml/.

A GPU reset is atomic under the simulation's lock: an NVML call made meanwhile waits for it (as
calls wait on a real driver busy resetting) and then sees the reset board. It is refused, as
nvidia-smi refuses it, while a process holds the GPU or MIG instances exist ("In use by another
client"), and while the driver is unloaded or hung.
"""

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Self

import pynvml

from edge.sim.diagnostics import diagnose
from edge.sim.nvml import build_symbols
from edge.sim.nvml.abi import SimulatedLib
from edge.sim.nvml.driver import SimDriver
from edge.sim.physics import SimFault, SimGpu
from edge.sim.profiles import DRIVER_VERSION, get_profile
from shared.logs import get_logger

log = get_logger(__name__)

Permissions = Literal["root", "none"]

__all__ = ["Permissions", "SimRefused", "SimulatedLib", "SimulatedNvml", "install"]


class SimRefused(Exception):
    """The simulated device refused a reset: `reason` is a short code ("in-use",
    "driver-not-loaded", "driver-not-answering"), the message what nvidia-smi says."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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
        self.driver = SimDriver(profiles, clock=clock, seed=seed, allow_set=permissions == "root",
                                epoch_offset=time.time() - clock())
        self._previous_lib: Any = None
        self._installed = False
        functions = build_symbols(self.driver)
        for name in missing_symbols:  # models an older libnvidia-ml without them
            if functions.pop(name, None) is None:
                raise ValueError(f"{name} is not a symbol the simulation implements")
        self.lib = SimulatedLib(functions)
        self.boots = 1  # the node's boot count: a reboot adds one

    # ----- public API ----------------------------------------------------------------------

    @property
    def gpus(self) -> list[SimGpu]:
        return list(self.driver.gpus)

    @property
    def symbols(self) -> list[str]:
        return self.lib.symbols

    @property
    def answering(self) -> bool:
        """False while the simulated driver hangs (calls block instead of returning)."""
        return self.driver.answering.is_set()

    @property
    def initialised(self) -> bool:
        return self.driver.initialised

    @property
    def allow_set(self) -> bool:
        """False: setters answer NO_PERMISSION (an unprivileged container)."""
        return self.driver.allow_set

    @allow_set.setter
    def allow_set(self, allowed: bool) -> None:
        self.driver.allow_set = allowed

    @property
    def fail_init_with(self) -> int | None:
        """An NVML code nvmlInit answers instead of succeeding (e.g. DRIVER_NOT_LOADED): a node
        whose driver stays away. None: nvmlInit works."""
        return self.driver.fail_init_with

    @fail_init_with.setter
    def fail_init_with(self, code: int | None) -> None:
        self.driver.fail_init_with = code

    @property
    def recovery_action_field(self) -> bool:
        """False: an NVML older than R565, which does not know NVML_FI_DEV_GET_GPU_RECOVERY_ACTION."""
        return self.driver.recovery_action_field

    @recovery_action_field.setter
    def recovery_action_field(self, supported: bool) -> None:
        self.driver.recovery_action_field = supported

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
        self.driver.answering.set()  # nothing stays blocked in a driver that is gone
        self.driver.invalidate_event_sets()

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def inject(self, index: int, fault: SimFault | Mapping[str, Any]) -> dict[str, Any]:
        """Apply load or a fault to GPU `index`; answer its new simulated state."""
        if not isinstance(fault, SimFault):
            fault = SimFault.model_validate(fault)
        driver = self.driver
        self._check_index(index)
        with driver.lock:
            gpu = driver.gpus[index]
            if fault.reset:
                driver.unloaded = False
                driver.answering.set()
            gpu.apply(fault)
            if fault.driver_unloaded is True:
                driver.unload()
            elif fault.driver_unloaded is False:
                driver.unloaded = False
            if fault.hung is True:
                driver.answering.clear()
                log.warning("simulated driver hung: NVML calls block until it is released")
            elif fault.hung is False:
                driver.answering.set()
            if fault.ecc_sbe:
                driver.deliver(index, pynvml.nvmlEventTypeSingleBitEccError, 0)
            if fault.ecc_dbe:
                driver.deliver(index, pynvml.nvmlEventTypeDoubleBitEccError, 0)
            if fault.xid is not None:
                driver.deliver(index, pynvml.nvmlEventTypeXidCriticalError, fault.xid)
            return self._state(gpu)

    def state(self, index: int) -> dict[str, Any]:
        self._check_index(index)
        with self.driver.lock:
            return self._state(self.driver.gpus[index])

    def gpu_reset(self, index: int) -> dict[str, Any]:
        """Reset GPU `index` as `nvidia-smi --gpu-reset -i <index>` does; raises SimRefused when
        the device refuses. `effective` False: the reset ran, but the fault needs a reboot."""
        self._check_index(index)
        driver = self.driver
        with driver.lock:
            gpu = driver.gpus[index]
            if driver.unloaded:
                raise SimRefused("driver-not-loaded", "NVIDIA driver is not loaded")
            if not self.answering:
                raise SimRefused("driver-not-answering", "the NVIDIA driver is not answering")
            if gpu.processes or (driver.mig is not None and driver.mig.has_instances(index)):
                raise SimRefused("in-use", "In use by another client")
            effective = gpu.gpu_reset()
            if effective and driver.mig is not None:
                driver.mig.after_reset(index)
            log.warning("simulated GPU %s reset%s", index,
                        "" if effective else "; its fault needs a reboot, the GPU stays faulty")
            return {"index": index, "uuid": gpu.uuid, "pci_bus_id": gpu.pci_bus_id,
                    "effective": effective, "state": self._state(gpu)}

    def reboot(self) -> dict[str, Any]:
        """Reboot the node: every GPU freshly booted (a fault that needs a reboot is gone, what the
        hardware keeps stays: edge/sim/physics.py SimGpu.reboot), processes gone, the driver
        reloaded: every client must nvmlInit again."""
        driver = self.driver
        with driver.lock:
            for gpu in driver.gpus:
                gpu.reboot()
            if driver.mig is not None:
                driver.mig.after_reboot()
            driver.answering.set()
            driver.reload()
            self.boots += 1
            log.warning("simulated node rebooted (boot %s): the driver was reloaded", self.boots)
            return {"boots": self.boots, "gpus": [self._state(gpu) for gpu in driver.gpus]}

    def diagnose(self, index: int, level: int = 1) -> dict[str, Any]:
        """What `dcgmi diag -r <level> -i <index>` finds (edge/sim/diagnostics.py): `passed`, each
        test with its result and reason, and whether a CUDA context can be made."""
        self._check_index(index)
        with self.driver.lock:
            gpu = self.driver.gpus[index]
            gpu.advance()
            return diagnose(gpu, level, DRIVER_VERSION)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.driver.gpus):
            raise IndexError(f"no simulated GPU {index}; this node has {len(self.driver.gpus)}")

    def _state(self, gpu: SimGpu) -> dict[str, Any]:
        return gpu.state() | {"driver_loaded": not self.driver.unloaded,
                              "driver_answering": self.answering,
                              "nvml_initialised": self.initialised}


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
