"""The one driver path: pynvml calls, whether over the real libnvidia-ml or the simulated one.

`NvmlDriver` turns NVML's answers into our wire models and its failures into three outcomes
the daemon can act on:

* a figure the GPU cannot give (NotSupported, NoPermission, FunctionNotFound) is left None and
  named in `missing`, logged once per (GPU, figure) so a T4 does not fill the log every second;
* a GPU that fell off the bus (GpuIsLost, Unknown) yields a sample with `lost=True`;
* a driver that went away (Uninitialized, DriverNotLoaded, LibRmVersionMismatch) is
  re-initialised once, transparently; if that does not help, `DriverUnavailable` is raised.

Setters raise `DriverRefused` for what the driver legitimately refuses (the caller records its
decision as advisory, with the reason) and `DriverError` for anything else.

The figures behind dcgm-exporter's other default counters are read by edge/driver/fields.py
(field values, reserved memory, PCIe replays, encoder/decoder, vGPU licence) and edge/driver/gpm.py
(the profiling metrics, between this cycle's GPM sample and the previous one).

It is the NVML backend of the device layer (edge/devices/base.py `DeviceBackend`): NVIDIA's
data-centre and workstation GPUs, `nvidia.com/gpu`, every capability the board reports.

Synchronous and not thread-safe: the daemon calls it from one worker thread (`DriverRunner`).
"""

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pynvml

from edge.devices.base import (
    BackendName,
    Capability,
    DriverError,
    DriverRefused,
    DriverUnavailable,
    MissingFigures,
    Vendor,
)
from edge.driver.fields import read_extras
from edge.driver.gpm import FIGURES as GPM_FIGURES
from edge.driver.gpm import GpmReader
from shared.gpu import GpuInventory, GpuSample, ProcessSample
from shared.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

NVMLError = pynvml.NVMLError
_ABSENT: tuple[type[Exception], ...] = (
    pynvml.NVMLError_NotSupported,
    pynvml.NVMLError_NoPermission,
    pynvml.NVMLError_FunctionNotFound,
)
_LOST: tuple[type[Exception], ...] = (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_Unknown)
_DRIVER_GONE: tuple[type[Exception], ...] = (
    pynvml.NVMLError_Uninitialized,
    pynvml.NVMLError_DriverNotLoaded,
    pynvml.NVMLError_LibRmVersionMismatch,
)
_REFUSED: tuple[type[Exception], ...] = (
    pynvml.NVMLError_NoPermission,
    pynvml.NVMLError_NotSupported,
    pynvml.NVMLError_InvalidArgument,
)

# Newest name first: "clocks event reasons" replaced "throttle reasons" in driver 535; either the
# pynvml wrapper or the C symbol may be missing, and then the older one is used.
_THROTTLE_READERS: list[Callable[..., int]] = [
    getattr(pynvml, name)
    for name in (
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
    )
    if hasattr(pynvml, name)
]


# nvmlDeviceGetArchitecture -> the family name GPU Feature Discovery writes (nvidia.com/gpu.family)
_ARCHITECTURES = {2: "kepler", 3: "maxwell", 4: "pascal", 5: "volta", 6: "turing", 7: "ampere",
                  8: "ada-lovelace", 9: "hopper", 10: "blackwell"}


class _GpuLost(Exception):
    """Internal: the GPU being read fell off the bus."""


def code_name(error: Exception) -> str:
    """NVML's name for an error: NVMLError_InvalidArgument -> "InvalidArgument"."""
    name = type(error).__name__
    if name.startswith("NVMLError_"):
        return name.removeprefix("NVMLError_")
    value = getattr(error, "value", None)
    return f"NVML_{value}" if value is not None else name


def milliwatts_to_watts(milliwatts: int) -> float:
    """NVML speaks milliwatts; everything above the driver speaks watts."""
    return milliwatts / 1000.0


def watts_to_milliwatts(watts: float) -> int:
    return round(watts * 1000)


def cuda_version_text(version: int) -> str:
    """nvmlSystemGetCudaDriverVersion's 12040 -> "12.4"."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def sysfs_bus_id(nvml_bus_id: str) -> str:
    """NVML's "00000000:18:00.0" -> sysfs's "0000:18:00.0"."""
    domain, rest = nvml_bus_id.split(":", 1)
    return f"{int(domain, 16):04x}:{rest}".lower()


# What every NVIDIA GPU behind NVML has; the rest depends on what the board reports (inventory).
_ALWAYS = frozenset({Capability.RESET, Capability.XID_EVENTS, Capability.ENERGY_COUNTER, Capability.ECC})


def nvml_capabilities(entry: GpuInventory) -> frozenset[Capability]:
    """What a GPU can do, from its inventory: a power cap where NVML gave its range, clock locks
    where it listed the supported clocks, MIG where it reported a MIG mode."""
    found = set(_ALWAYS)
    if entry.power_limit_min_w is not None and entry.power_limit_max_w is not None:
        found.add(Capability.POWER_LIMIT)
    if entry.supported_sm_clocks_mhz:
        found.add(Capability.CLOCK_LIMIT)
    if entry.mig_mode is not None:
        found.add(Capability.MIG)
    return frozenset(found)


class NvmlDriver:
    """Synchronous access to the node's GPUs through pynvml: the device layer's NVML backend."""

    backend: BackendName = "nvml"
    vendor: Vendor = "nvidia"
    resource_name: str = "nvidia.com/gpu"

    def __init__(
        self,
        *,
        sysfs_root: Path | str = "/sys",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._sysfs_root = Path(sysfs_root)
        self._wall_clock = wall_clock
        self._handles: dict[int, Any] = {}
        self._inventory: dict[int, GpuInventory] = {}
        self._uuids: dict[int, str] = {}
        self._missing = MissingFigures(log, error_key="nvml_error")
        self._process_seen_us: dict[int, int] = {}  # newest process-utilisation sample per GPU
        self._gpm = GpmReader()  # the previous GPM sample per GPU
        self._open = False
        self.reinits = 0

    # ----- life cycle ----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        try:
            pynvml.nvmlInit()
        except NVMLError as error:
            raise DriverUnavailable(code_name(error), f"nvmlInit failed: {error}") from error
        self._open = True

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._gpm.forget()
        self._handles.clear()
        try:
            pynvml.nvmlShutdown()
        except NVMLError as error:  # e.g. the driver already went away: nothing left to close
            log.debug("nvmlShutdown: %s", error)

    def _reinit(self, cause: Exception) -> None:
        log.warning("NVML answered %s; re-initialising", code_name(cause))
        self._handles.clear()
        self._gpm.discard()
        try:
            pynvml.nvmlInit()
        except NVMLError as error:
            raise DriverUnavailable(
                code_name(error), f"re-initialising NVML failed: {error}"
            ) from error
        self._open = True
        self.reinits += 1

    def _with_reinit(self, attempt: Callable[[], T]) -> T:
        """Run `attempt`; if the driver went away, re-initialise once and run it again."""
        try:
            return attempt()
        except _DRIVER_GONE as error:
            self._reinit(error)
        try:
            return attempt()
        except _DRIVER_GONE as error:
            raise DriverUnavailable(
                code_name(error), f"NVML still answers {error} after re-initialising"
            ) from error

    def _handle(self, index: int) -> Any:
        if index not in self._handles:
            self._handles[index] = pynvml.nvmlDeviceGetHandleByIndex(index)
        return self._handles[index]

    def _device_call(self, index: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(handle of GPU `index`, *args), surviving a driver re-initialisation."""
        return self._with_reinit(lambda: fn(self._handle(index), *args))

    def _check_reachable(self, index: int) -> None:
        """Raise _GpuLost or DriverError when GPU `index` cannot even be addressed."""
        try:
            self._with_reinit(lambda: self._handle(index))
        except _LOST as error:
            self._handles.pop(index, None)
            raise _GpuLost from error
        except NVMLError as error:
            raise DriverError(code_name(error), f"gpu {index}: no handle: {error}") from error

    # ----- reading -------------------------------------------------------------------------

    def _note_missing(self, index: int, figures: Sequence[str], error: Exception,
                      missing: list[str]) -> None:
        """Name the figures in `missing`; log each (GPU, figure) the first time only."""
        level = logging.INFO if isinstance(error, _ABSENT) else logging.WARNING  # "cannot" is normal
        self._missing.note(index, figures, code_name(error), missing, level)

    def _read(self, index: int, figures: Sequence[str], missing: list[str],
              fns: Callable[..., T] | Sequence[Callable[..., T]], *args: Any) -> T | None:
        """One figure (or a group read by one call); None and `missing` when unavailable.

        Given several functions, the next is tried when one is not in this libnvidia-ml
        (e.g. ClocksEventReasons on a driver older than 535 has only ClocksThrottleReasons).
        """
        candidates = list(fns) if isinstance(fns, Sequence) else [fns]
        for position, fn in enumerate(candidates):
            try:
                return self._device_call(index, fn, *args)
            except _LOST as error:
                self._handles.pop(index, None)
                raise _GpuLost from error
            except pynvml.NVMLError_FunctionNotFound as error:
                if position == len(candidates) - 1:
                    self._note_missing(index, figures, error, missing)
            except NVMLError as error:
                self._note_missing(index, figures, error, missing)
                return None
        return None

    def device_count(self) -> int:
        try:
            return self._with_reinit(pynvml.nvmlDeviceGetCount)
        except NVMLError as error:
            raise DriverError(code_name(error), f"nvmlDeviceGetCount: {error}") from error

    def known_uuid(self, index: int) -> str | None:
        """The UUID from the inventory cache, without calling NVML (safe from any thread)."""
        return self._uuids.get(index)

    def uuid_of(self, index: int) -> str:
        """The GPU's UUID, from the inventory when known (a lost GPU cannot tell us)."""
        if index in self._uuids:
            return self._uuids[index]
        try:
            uuid = _text(self._device_call(index, pynvml.nvmlDeviceGetUUID))
        except NVMLError:
            return f"GPU-unknown-{index}"
        self._uuids[index] = uuid
        return uuid

    def inventory(self) -> list[GpuInventory]:
        """Static facts about every GPU; a lost GPU keeps its last known entry."""
        count = self.device_count()
        try:
            driver_version = _text(self._with_reinit(pynvml.nvmlSystemGetDriverVersion))
        except NVMLError as error:
            raise DriverError(code_name(error), f"nvmlSystemGetDriverVersion: {error}") from error
        try:
            cuda_version: str | None = cuda_version_text(
                self._with_reinit(pynvml.nvmlSystemGetCudaDriverVersion)
            )
        except NVMLError as error:
            log.info("CUDA driver version not available (%s)", code_name(error))
            cuda_version = None
        entries = []
        for index in range(count):
            try:
                self._check_reachable(index)
                entry = self._inventory_of(index, driver_version, cuda_version)
            except _GpuLost:
                log.warning("gpu %d is lost; keeping its last known inventory", index,
                            extra={"gpu": index})
                if index in self._inventory:
                    entries.append(self._inventory[index])
                continue
            self._inventory[index] = entry
            self._uuids[index] = entry.uuid
            entries.append(entry)
        return entries

    def _inventory_of(
        self, index: int, driver_version: str, cuda_version: str | None
    ) -> GpuInventory:
        missing: list[str] = []

        def read(figures: Sequence[str], fn: Callable[..., Any], *args: Any) -> Any:
            return self._read(index, figures, missing, fn, *args)

        name = read(["name"], pynvml.nvmlDeviceGetName)
        uuid = read(["uuid"], pynvml.nvmlDeviceGetUUID)
        pci = read(["pci_bus_id"], pynvml.nvmlDeviceGetPciInfo)
        memory = read(["memory_total_bytes"], pynvml.nvmlDeviceGetMemoryInfo)
        mig = read(["mig_mode"], pynvml.nvmlDeviceGetMigMode)
        architecture = read(["architecture"], pynvml.nvmlDeviceGetArchitecture)
        constraints = read(["power_limit_min_w", "power_limit_max_w"],
                           pynvml.nvmlDeviceGetPowerManagementLimitConstraints)
        default_limit = read(
            ["power_limit_default_w"], pynvml.nvmlDeviceGetPowerManagementDefaultLimit
        )
        memory_clocks = read(
            ["supported_memory_clocks_mhz"], pynvml.nvmlDeviceGetSupportedMemoryClocks
        )
        sm_clocks = None
        if memory_clocks:
            sm_clocks = read(
                ["supported_sm_clocks_mhz"],
                pynvml.nvmlDeviceGetSupportedGraphicsClocks,
                max(memory_clocks),
            )
        pci_bus_id = _text(pci.busId) if pci is not None else ""
        entry = GpuInventory(
            index=index,
            uuid=_text(uuid) if uuid is not None else f"GPU-unknown-{index}",
            name=_text(name) if name is not None else "",
            pci_bus_id=pci_bus_id,
            memory_total_bytes=memory.total if memory is not None else 0,
            driver_version=driver_version,
            cuda_version=cuda_version,
            mig_mode=(mig[0] == pynvml.NVML_DEVICE_MIG_ENABLE) if mig is not None else None,
            architecture=_ARCHITECTURES.get(architecture) if architecture is not None else None,
            power_limit_min_w=milliwatts_to_watts(constraints[0]) if constraints else None,
            power_limit_max_w=milliwatts_to_watts(constraints[1]) if constraints else None,
            power_limit_default_w=(
                milliwatts_to_watts(default_limit) if default_limit is not None else None
            ),
            supported_memory_clocks_mhz=sorted(memory_clocks or [], reverse=True),
            supported_sm_clocks_mhz=sorted(sm_clocks or [], reverse=True),
            numa_node=self._numa_node(index, pci_bus_id),
            missing=missing,
        )
        return entry.model_copy(update={"resource_name": self.resource_name,
                                        "capabilities": sorted(c.value for c in nvml_capabilities(entry))})

    def _numa_node(self, index: int, pci_bus_id: str) -> int | None:
        """From NVML where this pynvml and the platform have it, else from sysfs, else None."""
        if hasattr(pynvml, "nvmlDeviceGetNumaNodeId"):
            try:
                node = self._device_call(index, pynvml.nvmlDeviceGetNumaNodeId)
                if node >= 0:
                    return node
            except _LOST as error:
                raise _GpuLost from error
            except NVMLError as error:
                log.debug("gpu %d: nvmlDeviceGetNumaNodeId: %s; trying sysfs", index,
                          code_name(error))
        if not pci_bus_id:
            return None
        path = self._sysfs_root / "bus/pci/devices" / sysfs_bus_id(pci_bus_id) / "numa_node"
        try:
            node = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        return node if node >= 0 else None  # -1: not a NUMA machine

    def sample(self, index: int) -> GpuSample:
        """Everything we watch on GPU `index`, now. A lost GPU gives `lost=True` and no figures."""
        uuid = self.uuid_of(index)
        ts = self._wall_clock()
        try:
            self._check_reachable(index)
            return self._sample_figures(index, uuid, ts)
        except _GpuLost:
            log.debug("gpu %d is lost", index, extra={"gpu": index})
            return GpuSample(index=index, uuid=uuid, ts=ts, lost=True)

    def _sample_figures(self, index: int, uuid: str, ts: float) -> GpuSample:
        missing: list[str] = []

        def read(figures: Sequence[str], fns: Any, *args: Any) -> Any:
            return self._read(index, figures, missing, fns, *args)

        utilization = read(
            ["utilization_pct", "memory_util_pct"], pynvml.nvmlDeviceGetUtilizationRates
        )
        memory = read(["memory_used_bytes", "memory_free_bytes"], pynvml.nvmlDeviceGetMemoryInfo)
        temperature = read(["temperature_c"], pynvml.nvmlDeviceGetTemperature,
                           pynvml.NVML_TEMPERATURE_GPU)
        power = read(["power_w"], pynvml.nvmlDeviceGetPowerUsage)
        limit = read(["power_limit_w"], pynvml.nvmlDeviceGetEnforcedPowerLimit)
        sm_clock = read(["sm_clock_mhz"], pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)
        memory_clock = read(
            ["memory_clock_mhz"], pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM
        )
        reasons = read(["throttle_reasons"], _THROTTLE_READERS)
        energy = read(["energy_mj"], pynvml.nvmlDeviceGetTotalEnergyConsumption)
        sbe = read(["ecc_sbe_volatile"], pynvml.nvmlDeviceGetTotalEccErrors,
                   pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC)
        dbe = read(["ecc_dbe_volatile"], pynvml.nvmlDeviceGetTotalEccErrors,
                   pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
        remapped = read(["remapped_rows_correctable", "remapped_rows_uncorrectable",
                         "remap_pending", "remap_failure"], pynvml.nvmlDeviceGetRemappedRows)
        processes = self._processes(index, missing)
        extras = read_extras(read, lambda figures, error: self._note_missing(index, figures, error,
                                                                              missing))
        extras.update(self._gpm_figures(index, missing))
        return GpuSample(
            index=index,
            uuid=uuid,
            ts=ts,
            utilization_pct=float(utilization.gpu) if utilization is not None else None,
            memory_util_pct=float(utilization.memory) if utilization is not None else None,
            memory_used_bytes=memory.used if memory is not None else None,
            memory_free_bytes=memory.free if memory is not None else None,
            temperature_c=float(temperature) if temperature is not None else None,
            power_w=milliwatts_to_watts(power) if power is not None else None,
            power_limit_w=milliwatts_to_watts(limit) if limit is not None else None,
            sm_clock_mhz=sm_clock,
            memory_clock_mhz=memory_clock,
            throttle_reasons=reasons,
            energy_mj=energy,
            ecc_sbe_volatile=sbe,
            ecc_dbe_volatile=dbe,
            remapped_rows_correctable=remapped[0] if remapped is not None else None,
            remapped_rows_uncorrectable=remapped[1] if remapped is not None else None,
            remap_pending=bool(remapped[2]) if remapped is not None else None,
            remap_failure=bool(remapped[3]) if remapped is not None else None,
            processes=processes,
            missing=missing,
            **extras,
        )

    def _gpm_figures(self, index: int, missing: list[str]) -> dict[str, float | None]:
        """GPM's profiling figures over the interval since this GPU's previous sample."""
        try:
            return self._gpm.read(index, lambda fn, *args: self._device_call(index, fn, *args))
        except _LOST as error:
            self._gpm.forget(index)
            self._handles.pop(index, None)
            raise _GpuLost from error
        except NVMLError as error:
            self._note_missing(index, GPM_FIGURES, error, missing)
            return {}

    def _processes(self, index: int, missing: list[str]) -> list[ProcessSample]:
        running = self._read(index, ["processes"], missing,
                             pynvml.nvmlDeviceGetComputeRunningProcesses)
        if not running:
            return []
        sm_util = self._process_sm_util(index, missing)
        return [
            ProcessSample(
                pid=p.pid, used_memory_bytes=p.usedGpuMemory, sm_util_pct=sm_util.get(p.pid)
            )
            for p in running
        ]

    def _process_sm_util(self, index: int, missing: list[str]) -> dict[int, float]:
        """Mean SM utilisation per pid over the samples NVML took since our last look."""
        seen_us = self._process_seen_us.get(index, 0)
        try:
            samples = self._device_call(index, pynvml.nvmlDeviceGetProcessUtilization, seen_us)
        except pynvml.NVMLError_NotFound:
            return {}  # nothing sampled since last time: unknown, not unsupported
        except _LOST as error:
            raise _GpuLost from error
        except NVMLError as error:
            self._note_missing(index, ["processes.sm_util_pct"], error, missing)
            return {}
        per_pid: dict[int, list[int]] = {}
        for sample in samples:
            per_pid.setdefault(sample.pid, []).append(sample.smUtil)
            seen_us = max(seen_us, sample.timeStamp)
        self._process_seen_us[index] = seen_us
        return {pid: sum(values) / len(values) for pid, values in per_pid.items()}

    def capabilities(self, index: int) -> frozenset[Capability]:
        """What GPU `index` can do, from its inventory (read by `inventory()`; none before)."""
        known = self._inventory.get(index)
        return nvml_capabilities(known) if known is not None else frozenset()

    def probe(self, index: int) -> bool:
        """Try to reach a lost GPU again: a fresh handle and its UUID."""
        self._handles.pop(index, None)
        try:
            uuid = _text(self._device_call(index, pynvml.nvmlDeviceGetUUID))
        except (NVMLError, DriverUnavailable) as error:
            log.debug("gpu %d: probe failed: %s", index, error, extra={"gpu": index})
            self._handles.pop(index, None)
            return False
        known = self._uuids.get(index)
        if known is not None and known != uuid:
            log.warning("gpu %d came back as %s (was %s)", index, uuid, known, extra={"gpu": index})
            self._inventory.pop(index, None)
        self._uuids[index] = uuid
        return True

    # ----- changing ------------------------------------------------------------------------

    def _change(self, index: int, action: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._device_call(index, fn, *args)
        except _REFUSED as error:
            raise DriverRefused(code_name(error), f"gpu {index}: {action}: {error}") from error
        except NVMLError as error:
            if isinstance(error, _LOST):
                self._handles.pop(index, None)
            raise DriverError(code_name(error), f"gpu {index}: {action}: {error}") from error

    def set_power_limit(self, index: int, watts: float) -> None:
        action = f"set power limit to {watts:g} W"
        known = self._inventory.get(index)
        if known and known.power_limit_min_w is not None and known.power_limit_max_w is not None:
            action += f" (allowed {known.power_limit_min_w:g}-{known.power_limit_max_w:g} W)"
        self._change(
            index, action, pynvml.nvmlDeviceSetPowerManagementLimit, watts_to_milliwatts(watts)
        )

    def lock_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        self._change(index, f"lock SM clocks to {min_mhz}-{max_mhz} MHz",
                     pynvml.nvmlDeviceSetGpuLockedClocks, min_mhz, max_mhz)

    def reset_clocks(self, index: int) -> None:
        self._change(index, "reset locked clocks", pynvml.nvmlDeviceResetGpuLockedClocks)
