"""The Intel backend (Data Center GPU Flex / Max, Arc) over the i915 / xe sysfs, hwmon and DRM fdinfo
files (backend.py). Registered with the device layer through `open_intel` and `present`
(edge/devices/select.py); nothing vendor-specific is imported at module import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge.devices.base import DeviceBackend
from edge.devices.intel.backend import IntelBackend
from edge.devices.intel.sysfs import find_cards

__all__ = ["IntelBackend", "open_intel", "present"]


def open_intel(**kwargs: Any) -> DeviceBackend:
    """The backend, not yet opened. kwargs: `sysfs_root` (default "/": the directory holding sys/
    and proc/; the simulation's `backend_kwargs()` points it at its tree)."""
    return IntelBackend(**kwargs)


def present(sysfs_root: Path) -> bool:
    """Whether the node has an Intel GPU bound to i915 or xe (a drm card with that driver)."""
    return bool(find_cards(Path(sysfs_root)))
