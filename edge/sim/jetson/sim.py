"""A simulated Jetson module at its real interface: the kernel's files under a work directory.

`SimulatedJetson` has the public face of edge/sim/lib.py `SimulatedNvml` (inject, state, gpu_reset,
reboot, diagnose, boots) plus `backend_kwargs()`, the arguments edge/devices/jetson's backend is
opened with to read this tree. One `SimGpu` (edge/sim/physics.py) is the module's GPU; the tree's
"kernel" (edge/sim/jetson/tree.py) turns its state into files and what is written into the devfreq
files into its clock range.

Freshness: a thread ticks the kernel every `tick_s` (0.2 s), so anything reading the tree (the
backend, jtop, `cat`) sees values at most one tick old; the backend is also given the tick as its
`kernel_sync`, so every read it makes sees the physics at that instant, and every write it makes is
validated before it reads it back, as with a real kernel's synchronous sysfs store.

A Jetson has one integrated GPU: `gpus` must be 1. It has no GPU reset (gpu_reset is refused:
reboot the module), no XIDs, no ECC counters and no PCIe link, so those faults are refused with a
ValueError that says what to inject instead. A lost GPU (its devfreq node gone) needs a reboot.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Self

from edge.sim.diagnostics import diagnose
from edge.sim.jetson.profiles import JetsonModule, get_module, to_mhz
from edge.sim.jetson.tree import L4T_VERSION, JetsonKernel
from edge.sim.lib import SimRefused
from edge.sim.physics import SimFault, SimGpu
from shared.logs import get_logger

log = get_logger(__name__)

Permissions = Literal["root", "none"]
TICK_S = 0.2
NVPMODEL_SCRIPT = Path(__file__).with_name("nvpmodel.py")

# SimFault fields a Jetson cannot have, and what to inject instead.
_NOT_ON_JETSON = {
    "xid": "a Jetson has no XIDs (no NVML event set on nvgpu); inject lost or temperature_c instead",
    "ecc_sbe": "a Jetson exposes no GPU ECC counters; inject lost or temperature_c instead",
    "ecc_dbe": "a Jetson exposes no GPU ECC counters; inject lost or temperature_c instead",
    "remap_failure": "a Jetson's shared LPDDR5 has no row remapping",
    "pcie_replays": "a Jetson's GPU is integrated: there is no PCIe link",
    "driver_unloaded": "nvgpu is part of the Jetson kernel and is not unloaded; inject lost instead",
    "hung": "the Jetson backend reads files, which do not hang; inject lost instead",
    "encoder_utilization": "the Jetson backend reads no video engine load",
    "decoder_utilization": "the Jetson backend reads no video engine load",
}


class SimulatedJetson:
    """One simulated Jetson module: its GPU's physics and its kernel's files under `workdir`."""

    def __init__(
        self,
        gpus: int,
        model: str,
        *,
        workdir: Path,
        clock: Callable[[], float] = time.monotonic,
        permissions: Permissions = "root",
        seed: str = "",
        tick_s: float = TICK_S,
    ) -> None:
        if gpus != 1:
            raise ValueError(f"a Jetson module has exactly one integrated GPU; cannot simulate {gpus} "
                             "(use --sim-gpus 1 with a Jetson model)")
        if permissions not in ("root", "none"):
            raise ValueError(f"permissions must be 'root' or 'none', not {permissions!r}")
        self.module: JetsonModule = get_module(model)
        self.clock = clock
        self.root = Path(workdir)
        self.tick_s = tick_s
        self.lock = threading.RLock()
        gpu = SimGpu(0, self.module.profile, clock=clock, seed=seed)
        gpu.uuid = f"JETSON-{gpu.serial}"  # what the backend reads from the devicetree serial number
        gpu.pci_bus_id = ""  # integrated: no PCI function (the backend reports "" too)
        self._gpus = [gpu]
        self.kernel = JetsonKernel(self.root, self.module, gpu, readonly_controls=permissions == "none")
        self.boots = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def gpus(self) -> list[SimGpu]:
        return list(self._gpus)

    @property
    def gpu(self) -> SimGpu:
        return self._gpus[0]

    # ----- life cycle ----------------------------------------------------------------------

    def install(self) -> Self:
        """Lay the tree out and start the kernel's tick."""
        with self.lock:
            self.root.mkdir(parents=True, exist_ok=True)
            self.kernel.build(self.gpu.serial)
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kgpu-sim-jetson-kernel", daemon=True)
            self._thread.start()
        return self

    def uninstall(self) -> None:
        """Stop the kernel's tick (the files stay, frozen)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:  # the kernel thread keeps ticking; say what broke
                log.exception("simulated Jetson kernel tick failed")

    def tick(self) -> None:
        """What the kernel did since its last tick: validate controls, step physics, rewrite files."""
        with self.lock:
            self.kernel.tick()

    def backend_kwargs(self) -> dict[str, Any]:
        """How edge.devices.jetson.open_jetson reaches this tree."""
        return {
            "sysfs_root": self.root,
            # the script by its path: it needs only the standard library, and starts fast
            "nvpmodel_cmd": [sys.executable, str(NVPMODEL_SCRIPT), "--root", str(self.root)],
            "kernel_sync": self.tick,
            "clock": self.clock,
        }

    # ----- the simulation's public face --------------------------------------------------------

    def inject(self, index: int, fault: SimFault | Mapping[str, Any]) -> dict[str, Any]:
        """Apply load or a fault to the GPU; answer its new state. Faults a Jetson cannot have are
        refused (ValueError, naming what to inject instead)."""
        if not isinstance(fault, SimFault):
            fault = SimFault.model_validate(fault)
        self._check_index(index)
        for name, why in _NOT_ON_JETSON.items():
            if getattr(fault, name) not in (None, False, 0):
                raise ValueError(f"{name}: {why}")
        if fault.lost and fault.recovery is None:
            fault = fault.model_copy(update={"recovery": "reboot"})  # no GPU reset on a Jetson
        with self.lock:
            self.gpu.apply(fault)
            self.kernel.tick()
            return self._state()

    def state(self, index: int) -> dict[str, Any]:
        self._check_index(index)
        with self.lock:
            return self._state()

    def gpu_reset(self, index: int) -> dict[str, Any]:
        """Refused: a Jetson's integrated GPU has no reset short of rebooting the module."""
        self._check_index(index)
        raise SimRefused("no-reset", "a Jetson's integrated GPU has no reset; reboot the module")

    def reboot(self) -> dict[str, Any]:
        """Reboot the module: a fresh GPU (a lost one back), the persisted nvpmodel mode's range."""
        with self.lock:
            self.gpu.reboot()
            self.kernel.reboot()
            self.boots += 1
            log.warning("simulated Jetson rebooted (boot %s)", self.boots)
            return {"boots": self.boots, "gpus": [self._state()]}

    def diagnose(self, index: int, level: int = 1) -> dict[str, Any]:
        self._check_index(index)
        with self.lock:
            self.gpu.advance()
            return diagnose(self.gpu, level, L4T_VERSION)

    def _check_index(self, index: int) -> None:
        if index != 0:
            raise IndexError(f"no simulated GPU {index}; a Jetson module has one (index 0)")

    def _state(self) -> dict[str, Any]:
        kernel = self.kernel
        return self.gpu.state() | {
            "platform": "jetson-orin",
            "power_limit_w": None,
            "devfreq_min_mhz": to_mhz(kernel.min_hz),
            "devfreq_max_mhz": to_mhz(kernel.max_hz),
            "nvpmodel_mode": kernel.mode_id(),
            "rails_w": {label: round(w, 3) for label, w in kernel.rail_watts().items()},
            "tree": str(self.root),
        }


def install(
    gpus: int,
    model: str,
    *,
    clock: Callable[[], float] = time.monotonic,
    permissions: Permissions = "root",
    seed: str = "",
    workdir: Path,
) -> SimulatedJetson:
    """Simulate a Jetson module of `model` (ORIN-NANO, ORIN-NX, AGX-ORIN) under `workdir`, its
    kernel ticking. `gpus` must be 1; `permissions="none"` makes the control files read-only."""
    return SimulatedJetson(gpus, model, workdir=workdir, clock=clock, permissions=permissions,
                           seed=seed).install()
