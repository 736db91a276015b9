"""A simulated AMD node: Instinct boards behind a simulated libamd_smi.so that the real, unpatched
amdsmi Python bindings load and call.

`install()` builds the library (edge/sim/amd/build.py) into `<workdir>/lib`, points $ROCM_PATH (and
$ROCM_HOME, which the bindings read first) at `workdir` if amdsmi is not imported yet, imports
amdsmi, and registers one ctypes callback per forwarded C function (edge/sim/amd/symbols.py). The
C table is process-wide: one simulation is installed at a time, and installing another replaces
it. The public face is `SimulatedNvml`'s (edge/sim/lib.py): inject, state, gpu_reset, reboot,
diagnose, boots, plus `backend_kwargs()` for the AMD backend.

AMD has no XIDs: an injected `xid` is refused; double-bit (uncorrectable) and single-bit
(correctable) ECC faults raise amdsmi's RAS counts. A lost board answers AMDSMI_STATUS_NOT_FOUND.
A GPU reset (`amdsmi_reset_gpu`, `amd-smi reset -G`) is refused while a process holds the GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self

from edge.sim.amd.build import LIBRARY_NAME, BuildError, build_library
from edge.sim.amd.driver import AmdSimDriver
from edge.sim.amd.profiles import AMDGPU_DRIVER_VERSION, get_profile
from edge.sim.amd.symbols import Symbols
from edge.sim.diagnostics import diagnose
from edge.sim.lib import SimRefused
from edge.sim.physics import SimFault, SimGpu
from shared.logs import get_logger

log = get_logger(__name__)

Permissions = Literal["root", "none"]

_install_lock = threading.Lock()
_active: SimulatedAmdSmi | None = None  # the simulation the C table points at


def load_bindings(workdir: Path) -> Any:
    """amdsmi's wrapper module, bound to the simulated library built under `workdir` (or to the one
    an earlier simulation in this process built: the bindings load their library once)."""
    library = build_library(workdir)
    wrapper = sys.modules.get("amdsmi.amdsmi_wrapper")
    if wrapper is None:
        os.environ["ROCM_PATH"] = os.environ["ROCM_HOME"] = str(workdir)
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said):  # the bindings print why they could not load it
                importlib.import_module("amdsmi")
        except (KeyError, OSError, AttributeError) as exc:
            raise BuildError(f"amdsmi could not load the simulated {library}: {said.getvalue().strip()} "
                             f"({type(exc).__name__}: {exc})") from exc
        wrapper = sys.modules["amdsmi.amdsmi_wrapper"]
    loaded = wrapper._libraries.get(LIBRARY_NAME)
    if loaded is None or not hasattr(loaded, "kgpu_sim_register"):
        raise BuildError(f"amdsmi was imported before the simulation and bound another {LIBRARY_NAME} "
                         f"({getattr(loaded, '_name', None)}); install the AMD simulation before amdsmi is "
                         "first imported")
    loaded.kgpu_sim_register.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    loaded.kgpu_sim_register.restype = ctypes.c_int
    return wrapper


class SimulatedAmdSmi:
    """A node's worth of simulated AMD Instinct GPUs behind a simulated libamd_smi."""

    def __init__(
        self,
        gpus: int,
        model: str | Sequence[str] = "MI300X",
        *,
        clock: Callable[[], float] = time.monotonic,
        permissions: Permissions = "root",
        seed: str = "",
        workdir: Path | str,
    ) -> None:
        if permissions not in ("root", "none"):
            raise ValueError(f"permissions must be 'root' or 'none', not {permissions!r}")
        models = [model] * gpus if isinstance(model, str) else list(model)
        if gpus < 0 or len(models) != gpus:
            raise ValueError(f"need {gpus} model names (or one for all), got {len(models)}")
        self.clock = clock
        self.workdir = Path(workdir)
        self.driver = AmdSimDriver([get_profile(m) for m in models], clock=clock, seed=seed,
                                   allow_set=permissions == "root")
        self.boots = 1
        self._library: Any = None
        self._callbacks: dict[str, Any] = {}

    # ----- life cycle --------------------------------------------------------------------------

    @property
    def gpus(self) -> list[SimGpu]:
        return list(self.driver.gpus)

    @property
    def allow_set(self) -> bool:
        """False: setters answer AMDSMI_STATUS_NO_PERM (an unprivileged container)."""
        return self.driver.allow_set

    @allow_set.setter
    def allow_set(self, allowed: bool) -> None:
        self.driver.allow_set = allowed

    @property
    def installed(self) -> bool:
        return _active is self

    def backend_kwargs(self) -> dict[str, Any]:
        """What `open_amd()` needs to reach this simulation."""
        return {"rocm_path": str(self.workdir)}

    def install(self) -> Self:
        """Build and load the library if needed and point its functions at this simulation."""
        global _active
        wrapper = load_bindings(self.workdir)
        with _install_lock:
            self._library = wrapper._libraries[LIBRARY_NAME]
            if not self._callbacks:
                self._callbacks = Symbols(self.driver, wrapper).callbacks()
            for name, callback in self._callbacks.items():
                if self._library.kgpu_sim_register(name.encode(), ctypes.cast(callback, ctypes.c_void_p)) != 0:
                    raise BuildError(f"the simulated {LIBRARY_NAME} does not forward {name}: rebuild it")
            _active = self
        return self

    def uninstall(self) -> None:
        """Unset the library's functions (they answer as a node without a driver) and release
        anything blocked in a hung call."""
        global _active
        with _install_lock:
            if _active is self:
                for name in self._callbacks:
                    self._library.kgpu_sim_register(name.encode(), None)
                _active = None
        self.driver.answering.set()

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    # ----- faults and remediation ----------------------------------------------------------------

    def inject(self, index: int, fault: SimFault | Mapping[str, Any]) -> dict[str, Any]:
        """Apply load or a fault to GPU `index`; answer its new simulated state."""
        if not isinstance(fault, SimFault):
            fault = SimFault.model_validate(fault)
        if fault.xid is not None:
            raise ValueError("AMD has no XIDs; inject ecc_dbe (an uncorrectable RAS error) or lost instead")
        if fault.remap_failure is not None:
            raise ValueError("AMD retires bad pages rather than remapping rows; inject ecc_dbe instead")
        if fault.encoder_utilization is not None or fault.decoder_utilization is not None:
            raise ValueError("the simulated AMD boards do not model their video engines (VCN)")
        self._check_index(index)
        driver = self.driver
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
                log.warning("simulated amdgpu driver hung: amdsmi calls block until it is released")
            elif fault.hung is False:
                driver.answering.set()
            return driver.state(gpu)

    def state(self, index: int) -> dict[str, Any]:
        self._check_index(index)
        with self.driver.lock:
            return self.driver.state(self.driver.gpus[index])

    def gpu_reset(self, index: int) -> dict[str, Any]:
        """Reset GPU `index` as `amd-smi reset -G -g <index>` does; SimRefused when the device
        refuses. `effective` False: the reset ran, but the fault needs a reboot."""
        self._check_index(index)
        driver = self.driver
        with driver.lock:
            gpu = driver.gpus[index]
            if driver.unloaded:
                raise SimRefused("driver-not-loaded", "amdgpu driver is not loaded")
            if not driver.answering.is_set():
                raise SimRefused("driver-not-answering", "the amdgpu driver is not answering")
            if gpu.processes:
                raise SimRefused("in-use", f"GPU {index} is in use by {len(gpu.processes)} process(es): "
                                           "AMDSMI_STATUS_BUSY")
            effective = driver.reset(gpu)
            log.warning("simulated AMD GPU %s reset%s", index,
                        "" if effective else "; its fault needs a reboot, the GPU stays faulty")
            return {"index": index, "uuid": gpu.uuid, "pci_bus_id": gpu.pci_bus_id,
                    "effective": effective, "state": driver.state(gpu)}

    def reboot(self) -> dict[str, Any]:
        """Reboot the node: every GPU freshly booted, the driver reloaded (clients amdsmi_init again)."""
        driver = self.driver
        with driver.lock:
            for gpu in driver.gpus:
                gpu.reboot()
            driver.answering.set()
            driver.reload()
            self.boots += 1
            log.warning("simulated AMD node rebooted (boot %s): the driver was reloaded", self.boots)
            return {"boots": self.boots, "gpus": [driver.state(gpu) for gpu in driver.gpus]}

    def diagnose(self, index: int, level: int = 1) -> dict[str, Any]:
        """What a diagnostic run finds on the board (edge/sim/diagnostics.py's checks)."""
        self._check_index(index)
        with self.driver.lock:
            gpu = self.driver.gpus[index]
            gpu.advance()
            return diagnose(gpu, level, AMDGPU_DRIVER_VERSION)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.driver.gpus):
            raise IndexError(f"no simulated GPU {index}; this node has {len(self.driver.gpus)}")


def install(
    gpus: int,
    model: str | Sequence[str] = "MI300X",
    *,
    clock: Callable[[], float] = time.monotonic,
    permissions: Permissions = "root",
    seed: str = "",
    workdir: Path | str,
) -> SimulatedAmdSmi:
    """Simulate `gpus` AMD boards of `model` (MI210, MI300X; or one model per GPU) under the real
    amdsmi bindings; the library is built under `workdir`. `permissions="none"` models an
    unprivileged container (setters: AMDSMI_STATUS_NO_PERM); `seed` varies the UUIDs."""
    return SimulatedAmdSmi(gpus, model, clock=clock, permissions=permissions, seed=seed,
                           workdir=workdir).install()
