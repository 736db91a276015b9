"""The device layer: what every accelerator backend gives the daemon (issue 16).

The daemon, the policy, health, energy, the store, sync, the metrics and the cloud only ever see
`GpuInventory` and `GpuSample` (shared/gpu.py) and the few actions below; a backend turns its
vendor's interface into them. NVML (edge/driver/nvml.py, real or simulated libnvidia-ml) is one
backend; Jetson (sysfs: devfreq, thermal zones, INA3221 rails, nvpmodel), AMD (amdsmi) and Intel
(the xe/i915 hwmon and sysfs files) are the others (edge/devices/<vendor>/).

Rules every backend keeps, as NVML does:

* a figure the device cannot give is None and named in `missing` (logged once per GPU and figure);
* a device that vanished gives a sample with `lost=True`; an interface that went away raises
  `DriverUnavailable`;
* an action the device cannot take raises `DriverRefused` with the reason, and the daemon records
  the policy's decision as advisory with that reason;
* synchronous and not thread-safe: the daemon calls a backend from one worker thread
  (edge/driver/runner.py `DriverRunner`), with a timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import StrEnum
from typing import Literal, Protocol, runtime_checkable

from shared.gpu import GpuInventory, GpuSample

BackendName = Literal["nvml", "jetson", "amd", "intel"]
Vendor = Literal["nvidia", "amd", "intel"]


class Capability(StrEnum):
    """What a device can do or report beyond the figures every sample may carry."""

    POWER_LIMIT = "power_limit"  # set_power_limit takes effect
    CLOCK_LIMIT = "clock_limit"  # lock_clocks / reset_clocks (Jetson: devfreq max_freq; Intel: RPS max)
    POWER_MODE = "power_mode"  # a whole-module power mode (Jetson's nvpmodel)
    RESET = "reset"  # the device has a reset the remediation ladder may use
    XID_EVENTS = "xid_events"  # NVML's XID event set
    MIG = "mig"  # NVIDIA Multi-Instance GPU
    ENERGY_COUNTER = "energy_counter"  # a hardware energy counter (else energy is integrated from power)
    ECC = "ecc"  # memory error counters


class DriverError(Exception):
    """A device call failed. `code_name` is the interface's name for it, e.g. NVML's "GpuIsLost",
    amdsmi's "AMDSMI_STATUS_INVAL", or an errno name for a sysfs file ("EACCES")."""

    def __init__(self, code_name: str, message: str) -> None:
        super().__init__(f"{code_name}: {message}")
        self.code_name = code_name
        self.message = message


class DriverRefused(DriverError):
    """The device refused a change, or has no such knob: the decision is advisory, with this reason."""


class DriverUnavailable(DriverError):
    """The device interface is not usable (library missing, driver unloaded, files gone)."""


class DriverTimeout(DriverError):
    """A device call did not return in time (see DriverRunner)."""


class MissingFigures:
    """The figures a backend's devices cannot give: each named in the sample's (or inventory's)
    `missing`, and logged once per (GPU, figure), so that a board without a sensor does not fill
    the log every cycle. `error_key` names the log field that carries the reason ("nvml_error")."""

    def __init__(self, logger: logging.Logger, *, error_key: str | None = None, where: str = "") -> None:
        self._log = logger
        self._error_key = error_key
        self._where = where  # " on this Jetson": said after "not available"
        self._reported: set[tuple[int, str]] = set()

    def note(self, index: int, figures: Sequence[str], reason: str, missing: list[str],
             level: int = logging.INFO) -> None:
        for figure in figures:
            if figure not in missing:
                missing.append(figure)
        first_time = [f for f in figures if (index, f) not in self._reported]
        if not first_time:
            return
        self._reported.update((index, f) for f in first_time)
        extra: dict[str, object] = {"gpu": index, "figures": first_time}
        if self._error_key is not None:
            extra[self._error_key] = reason
        self._log.log(level, "gpu %d: %s not available%s (%s); reported as missing", index, ", ".join(first_time),
                      self._where, reason, extra=extra)


@runtime_checkable
class DeviceBackend(Protocol):
    """One node's accelerators of one kind. Indexes are 0..device_count()-1, stable while open."""

    backend: BackendName
    vendor: Vendor
    resource_name: str  # the extended resource its device plugin advertises (nvidia.com/gpu, amd.com/gpu, ...)

    @property
    def is_open(self) -> bool: ...

    def open(self) -> None:
        """Initialise the interface; DriverUnavailable when it is not there."""

    def close(self) -> None: ...

    def device_count(self) -> int: ...

    def known_uuid(self, index: int) -> str | None:
        """The device's id if already read (no device call): for log lines about a lost device."""

    def uuid_of(self, index: int) -> str: ...

    def inventory(self) -> list[GpuInventory]: ...

    def sample(self, index: int) -> GpuSample: ...

    def probe(self, index: int) -> bool:
        """Whether a device that was lost answers again."""

    def set_power_limit(self, index: int, watts: float) -> None: ...

    def lock_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None: ...

    def reset_clocks(self, index: int) -> None: ...

    def capabilities(self, index: int) -> frozenset[Capability]: ...
