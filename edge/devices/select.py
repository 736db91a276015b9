"""Which device backend the daemon runs on: by name (`--backend`), found by probing (`auto`), or the
simulation of `--sim-model`'s vendor (`sim`).

The vendor backends (edge/devices/jetson, amd, intel) and their simulations (edge/sim/jetson, amd,
intel) are imported here, inside the functions, and only when asked for: a node without amdsmi
never imports it, and a missing package is a clear one-line error, not an ImportError at start-up.

Each vendor package gives `open_<vendor>(**kwargs) -> DeviceBackend` (constructs; the daemon calls
`open()` on its driver thread and retries while the device is not there) and
`present(sysfs_root: Path) -> bool` (a cheap check that the node has such a device).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.config import SIM_MODEL_BACKENDS, EdgeSettings
from edge.devices.base import DeviceBackend
from shared.logs import get_logger

log = get_logger(__name__)

VENDOR_BACKENDS = ("jetson", "amd", "intel")
# `auto` tries these in order. Jetson first: a Jetson module may answer NVML too (JetPack 6 ships a
# libnvidia-ml), but NVML answers NotSupported for power, temperature and utilisation there.
AUTO_ORDER = ("jetson", "nvml", "amd", "intel")


class BackendNotFound(Exception):
    """No backend can run: `--backend auto` found no device, or a vendor backend is not installed.
    The message is one line that says what was tried and why each did not fit."""


def sim_backend(model: str) -> str:
    """The backend a simulated model runs on: nvml, jetson, amd or intel."""
    return SIM_MODEL_BACKENDS[model]


def _vendor_module(backend: str, part: str = "devices") -> Any:
    """edge.devices.<backend> (or edge.sim.<backend>); BackendNotFound naming what is missing."""
    name = f"edge.{part}.{backend}"
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise BackendNotFound(f"the {backend} backend is not available: cannot import {name} ({exc})") from exc


def _opener(backend: str) -> Callable[..., DeviceBackend]:
    module = _vendor_module(backend)
    opener = getattr(module, f"open_{backend}", None)
    if opener is None:
        raise BackendNotFound(f"the {backend} backend is not available: edge.devices.{backend} has no "
                              f"open_{backend}()")
    return opener


def sim_workdir(settings: EdgeSettings) -> Path:
    """Where a vendor simulation puts its file tree or library: beside the daemon's database."""
    return settings.db.parent / f"kgpu-sim-{sim_backend(settings.sim_model)}-{settings.node or 'node'}"


def install_sim(settings: EdgeSettings) -> Any:
    """With `--backend sim`, the simulation of `--sim-model`, installed: the simulated
    libnvidia-ml for an NVIDIA model (pynvml talks to it from now on), else the vendor's simulated
    interface (a sysfs tree, a libamd_smi), whose `backend_kwargs()` the backend is opened with."""
    backend = sim_backend(settings.sim_model)
    # the node name seeds the UUIDs: simulated nodes sharing a fleet never share a GPU UUID
    if backend == "nvml":
        from edge import sim

        return sim.install(settings.sim_gpus, settings.sim_model, permissions=settings.sim_permissions,
                           seed=settings.node or "")
    module = _vendor_module(backend, "sim")
    workdir = sim_workdir(settings)
    workdir.mkdir(parents=True, exist_ok=True)
    return module.install(settings.sim_gpus, settings.sim_model, permissions=settings.sim_permissions,
                          seed=settings.node or "", workdir=workdir)


def _nvml_present() -> tuple[bool, str]:
    """Whether libnvidia-ml loads and sees at least one GPU (and why not)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return False, f"NVML: {exc}"
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        return False, f"NVML: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return (count > 0), f"NVML: {count} GPU(s)"


def _vendor_present(backend: str, sysfs_root: Path) -> tuple[bool, str]:
    try:
        module = _vendor_module(backend)
    except BackendNotFound:
        return False, f"{backend}: not installed"  # said in full only when asked for by name
    present = getattr(module, "present", None)
    if present is None:
        return False, f"{backend}: edge.devices.{backend} has no present()"
    try:
        found = bool(present(sysfs_root))
    except Exception as exc:  # noqa: BLE001 - a probe that breaks means "not this one", said why
        return False, f"{backend}: probe failed ({type(exc).__name__}: {exc})"
    return found, f"{backend}: {'found' if found else 'no device'}"


def detect(sysfs_root: Path, *, nvml_present: Callable[[], tuple[bool, str]] = _nvml_present) -> tuple[str, str]:
    """`--backend auto`: the first backend in AUTO_ORDER whose device the node has, and a line of
    what each probe said; BackendNotFound (with that line) when none fits."""
    said: list[str] = []
    for backend in AUTO_ORDER:
        found, note = nvml_present() if backend == "nvml" else _vendor_present(backend, sysfs_root)
        said.append(note)
        if found:
            return backend, "; ".join(said)
    raise BackendNotFound(f"--backend auto found no accelerator under {sysfs_root} ({'; '.join(said)}); "
                          "name one with --backend nvml|jetson|amd|intel, or run --backend sim")


def resolve(settings: EdgeSettings) -> str:
    """The backend `settings` asks for: nvml, jetson, amd or intel (auto probed, sim by its model)."""
    if settings.backend == "sim":
        return sim_backend(settings.sim_model)
    if settings.backend == "auto":
        backend, said = detect(settings.sysfs_root)
        log.info("--backend auto chose %s (%s)", backend, said, extra={"backend": backend})
        return backend
    return settings.backend


def make_backend(settings: EdgeSettings, sim: Any = None, *, backend: str | None = None) -> DeviceBackend:
    """The backend the daemon samples and acts through, not yet opened (the daemon opens it on its
    driver thread and retries while the device is not there). `sim`: the installed simulation
    (`install_sim`), whose `backend_kwargs()` a vendor backend is opened with."""
    name = backend or resolve(settings)
    if name == "nvml":
        from edge.driver.nvml import NvmlDriver

        return NvmlDriver()
    opener = _opener(name)
    kwargs: dict[str, Any] = sim.backend_kwargs() if sim is not None and hasattr(sim, "backend_kwargs") \
        else {"sysfs_root": settings.sysfs_root}
    return opener(**kwargs)
