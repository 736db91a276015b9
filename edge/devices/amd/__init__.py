"""AMD Instinct and Radeon GPUs through AMD's amdsmi Python library (edge/devices/amd/backend.py).

`open_amd(**kwargs)` makes the backend (not opened: the daemon opens it on its driver thread);
`present(sysfs_root)` says whether the node has an AMD GPU. Neither imports amdsmi at module
import: a node without it never loads it, and `present` answers False rather than failing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

from edge.devices.amd.backend import RESOURCE_NAME, AmdSmiBackend, import_amdsmi
from edge.devices.base import DeviceBackend, DriverUnavailable
from shared.logs import get_logger

log = get_logger(__name__)

__all__ = ["RESOURCE_NAME", "AmdSmiBackend", "open_amd", "present"]


def open_amd(**kwargs: Any) -> DeviceBackend:
    """The AMD backend: `rocm_path` (where libamd_smi.so is: the simulation's workdir; else
    $ROCM_PATH or /opt/rocm as the bindings look), `sysfs_root`."""
    return AmdSmiBackend(**kwargs)


def present(sysfs_root: Path | str = "/") -> bool:
    """Whether this node has an AMD GPU: a DRM card bound to amdgpu under `<sysfs_root>/sys`, or
    amdsmi (when installed) finds one. Never raises."""
    drm = Path(sysfs_root) / "sys/class/drm"
    try:
        for driver in drm.glob("card*/device/driver"):
            if os.path.basename(os.readlink(driver)) == "amdgpu":
                return True
    except OSError as exc:
        log.debug("AMD probe: cannot read %s: %s", drm, exc)
    return _amdsmi_finds_gpu()


def _amdsmi_finds_gpu() -> bool:
    if importlib.util.find_spec("amdsmi") is None:
        return False
    try:
        smi = import_amdsmi()
    except DriverUnavailable as exc:
        log.debug("AMD probe: %s", exc)
        return False
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            smi.amdsmi_init(smi.AmdSmiInitFlags.INIT_AMD_GPUS)
            try:
                return len(smi.amdsmi_get_processor_handles()) > 0
            finally:
                smi.amdsmi_shut_down()
    except Exception as exc:  # noqa: BLE001 - a probe that breaks means "no AMD GPU here", said why
        log.debug("AMD probe: amdsmi found no GPU: %s", exc)
        return False
