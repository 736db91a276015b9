"""The Jetson backend (issue 16): a Jetson module's integrated GPU through the kernel files that
jetson-stats reads (edge/devices/jetson/sysfs.py), acted on through devfreq and nvpmodel
(edge/devices/jetson/backend.py). edge/devices/select.py imports `open_jetson` and `present`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge.devices.jetson.backend import NO_POWER_CAP, JetsonBackend
from edge.devices.jetson.sysfs import DEVICETREE, TEGRA_RELEASE

__all__ = ["NO_POWER_CAP", "JetsonBackend", "open_jetson", "present"]


def open_jetson(**kwargs: Any) -> JetsonBackend:
    """The backend, not yet opened. kwargs: `sysfs_root` (the host's / , default "/"), and from a
    simulation's `backend_kwargs()` also `nvpmodel_cmd`, `kernel_sync` and `clock`."""
    return JetsonBackend(**kwargs)


def present(sysfs_root: Path) -> bool:
    """A Jetson: the devicetree's compatible names an "nvidia,tegra" SoC, or etc/nv_tegra_release
    (the L4T release file) exists."""
    root = Path(sysfs_root)
    try:
        compatible = (root / DEVICETREE / "compatible").read_bytes()
    except OSError:
        compatible = b""
    return b"nvidia,tegra" in compatible or (root / TEGRA_RELEASE).is_file()
