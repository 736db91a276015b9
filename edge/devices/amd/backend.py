"""The AMD backend: AMD Instinct and Radeon GPUs through AMD's amdsmi Python library.

The same three outcomes as the NVML backend (edge/driver/nvml.py), from amdsmi's status codes:

* a figure the board cannot give (AMDSMI_STATUS_NOT_SUPPORTED, NOT_YET_IMPLEMENTED, NO_PERM, or a
  field amdsmi fills with its N/A marker) is None and named in `missing`, logged once per GPU and
  figure;
* a board that vanished (AMDSMI_STATUS_NOT_FOUND) gives a sample with `lost=True`;
* a library whose session went away (NOT_INIT, DRIVER_NOT_LOADED: the amdgpu module reloaded) is
  initialised again once; if that fails, `DriverUnavailable`.

Setters raise `DriverRefused` for what amdsmi refuses (INVAL: a cap outside the board's range;
NO_PERM: not root; NOT_SUPPORTED; BUSY) with a reason that says so, `DriverError` otherwise.

amdsmi is imported in `open()`, not at module import: a node without it never loads it. With
`rocm_path` (the simulation's workdir) $ROCM_PATH points there before the first import, which is
where the bindings look for libamd_smi.so.

Synchronous and not thread-safe: the daemon calls it from one worker thread (`DriverRunner`).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from edge.devices.base import (
    BackendName,
    Capability,
    DriverError,
    DriverRefused,
    DriverUnavailable,
    MissingFigures,
    Vendor,
)
from shared.gpu import GpuInventory, GpuSample, ProcessSample
from shared.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

RESOURCE_NAME = "amd.com/gpu"
MIB = 1024 * 1024  # amdsmi's VRAM "MB"
_NOT_AVAILABLE = {0xFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF}  # amdsmi's N/A markers in numeric fields

# amdsmi_status_t (amdsmi.h)
INVAL, NOT_SUPPORTED, NOT_YET_IMPLEMENTED, NO_PERM = 1, 2, 3, 10
INPUT_OUT_OF_BOUNDS, BUSY, NOT_FOUND, NOT_INIT, DRIVER_NOT_LOADED = 17, 30, 31, 32, 34
NO_DATA, SETTING_UNAVAILABLE = 40, 55
_ABSENT = {NOT_SUPPORTED, NOT_YET_IMPLEMENTED, NO_PERM, NO_DATA}
_LOST = {NOT_FOUND}
_SESSION_GONE = {NOT_INIT, DRIVER_NOT_LOADED}
_REFUSED = {INVAL, NOT_SUPPORTED, NOT_YET_IMPLEMENTED, NO_PERM, INPUT_OUT_OF_BOUNDS, BUSY, SETTING_UNAVAILABLE}
_WHY = {
    INVAL: "outside what the board accepts",
    NO_PERM: "amdsmi needs root (and /dev/kfd, /dev/dri) to change it",
    NOT_SUPPORTED: "the board or its firmware has no such control",
    BUSY: "the GPU is in use",
}
_ALL_CAPABILITIES = frozenset({Capability.POWER_LIMIT, Capability.CLOCK_LIMIT, Capability.RESET,
                               Capability.ENERGY_COUNTER, Capability.ECC})


class _GpuLost(Exception):
    """Internal: the GPU being read is gone."""


def import_amdsmi(rocm_path: Path | str | None = None) -> Any:
    """The amdsmi module; with `rocm_path`, $ROCM_PATH/$ROCM_HOME point there first (unless it is
    imported already). DriverUnavailable when it is not installed or finds no libamd_smi.so."""
    module = sys.modules.get("amdsmi")
    if module is not None and hasattr(module, "amdsmi_init"):
        return module
    if rocm_path is not None:
        os.environ["ROCM_PATH"] = os.environ["ROCM_HOME"] = str(rocm_path)
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # the bindings print why the library did not load
            return importlib.import_module("amdsmi")
    except ImportError as exc:
        raise DriverUnavailable("ImportError", "the amdsmi Python library is not installed "
                                "(pip install 'kgpu[amd]' or 'amdsmi>=7.0.2')") from exc
    except (KeyError, OSError, AttributeError) as exc:
        raise DriverUnavailable("AMDSMI_LIBRARY_MISSING", "amdsmi could not load libamd_smi.so "
                                f"(install amd-smi-lib, or set ROCM_PATH): {said.getvalue().strip()}") from exc


def _number(value: Any) -> int | None:
    """A numeric amdsmi field, or None where amdsmi says N/A."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value in _NOT_AVAILABLE:
        return None
    return int(value)


class AmdSmiBackend:
    """Synchronous access to the node's AMD GPUs through amdsmi."""

    backend: BackendName = "amd"
    vendor: Vendor = "amd"
    resource_name = RESOURCE_NAME

    def __init__(self, *, rocm_path: Path | str | None = None, sysfs_root: Path | str = "/",
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._rocm_path = rocm_path
        self._sysfs_root = Path(sysfs_root)
        self._wall_clock = wall_clock
        self._smi: Any = None
        self._handles: list[Any] = []
        self._inventory: dict[int, GpuInventory] = {}
        self._uuids: dict[int, str] = {}
        self._capabilities: dict[int, frozenset[Capability]] = {}
        self._missing = MissingFigures(log, error_key="amdsmi_error")
        self._open = False
        self.reinits = 0

    # ----- life cycle ----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        self._smi = import_amdsmi(self._rocm_path)
        self._start("amdsmi_init")
        self._open = True

    def _start(self, what: str) -> None:
        smi = self._smi
        try:
            smi.amdsmi_init(smi.AmdSmiInitFlags.INIT_AMD_GPUS)
            self._handles = list(smi.amdsmi_get_processor_handles())
        except smi.AmdSmiLibraryException as error:
            raise DriverUnavailable(self.code_name(error), f"{what} failed: {error.get_error_info()}") from error

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._handles = []
        try:
            self._smi.amdsmi_shut_down()
        except self._smi.AmdSmiLibraryException as error:  # the driver already went away
            log.debug("amdsmi_shut_down: %s", error)

    def code_name(self, error: Exception) -> str:
        """amdsmi's name for a status: 1 -> "AMDSMI_STATUS_INVAL"."""
        code = getattr(error, "err_code", None)
        if code is None:
            return type(error).__name__
        names = self._smi.amdsmi_wrapper.amdsmi_status_t__enumvalues
        return str(names.get(code, f"AMDSMI_STATUS_{code}"))

    def _with_reinit(self, attempt: Callable[[], T]) -> T:
        """Run `attempt`; if the library's session went away, initialise once and run it again."""
        smi = self._smi
        try:
            return attempt()
        except smi.AmdSmiLibraryException as error:
            if error.get_error_code() not in _SESSION_GONE:
                raise
            log.warning("amdsmi answered %s; initialising again", self.code_name(error))
        self._start("initialising amdsmi again")
        self.reinits += 1
        try:
            return attempt()
        except smi.AmdSmiLibraryException as error:
            if error.get_error_code() in _SESSION_GONE:
                raise DriverUnavailable(self.code_name(error), "amdsmi still answers "
                                        f"{self.code_name(error)} after initialising again") from error
            raise

    def _handle(self, index: int) -> Any:
        if not 0 <= index < len(self._handles):
            raise DriverError("AMDSMI_STATUS_NOT_FOUND", f"no AMD GPU {index}; amdsmi lists {len(self._handles)}")
        return self._handles[index]

    def _call(self, index: int, fn: Callable[..., T], *args: Any) -> T:
        return self._with_reinit(lambda: fn(self._handle(index), *args))

    # ----- reading -------------------------------------------------------------------------

    def _note_missing(self, index: int, figures: Sequence[str], reason: str, missing: list[str],
                      level: int = logging.INFO) -> None:
        self._missing.note(index, figures, reason, missing, level)

    def _read(self, index: int, figures: Sequence[str], missing: list[str], fn: Callable[..., T],
              *args: Any) -> T | None:
        """One amdsmi read; None and `missing` when the board cannot give it; _GpuLost when gone."""
        smi = self._smi
        try:
            return self._call(index, fn, *args)
        except smi.AmdSmiLibraryException as error:
            code = error.get_error_code()
            if code in _LOST:
                raise _GpuLost from error
            self._note_missing(index, figures, self.code_name(error), missing,
                               logging.INFO if code in _ABSENT else logging.WARNING)
            return None

    def _figure(self, index: int, name: str, missing: list[str], value: Any) -> int | None:
        """A field of a read: None (and `missing`) where amdsmi filled in N/A."""
        number = _number(value)
        if number is None and value is not None:
            self._note_missing(index, [name], "N/A on this board", missing)
        return number

    def device_count(self) -> int:
        return len(self._handles)

    def known_uuid(self, index: int) -> str | None:
        return self._uuids.get(index)

    def uuid_of(self, index: int) -> str:
        if index in self._uuids:
            return self._uuids[index]
        missing: list[str] = []
        try:
            uuid = self._read(index, ["uuid"], missing, self._smi.amdsmi_get_gpu_device_uuid)
        except _GpuLost:
            uuid = None
        if not uuid:
            return f"AMD-unknown-{index}"
        self._uuids[index] = f"AMD-{uuid}"
        return self._uuids[index]

    def inventory(self) -> list[GpuInventory]:
        """Static facts about every GPU; a lost GPU keeps its last known entry."""
        entries = []
        for index in range(self.device_count()):
            try:
                entry = self._inventory_of(index)
            except _GpuLost:
                log.warning("AMD gpu %d is gone; keeping its last known inventory", index, extra={"gpu": index})
                if index in self._inventory:
                    entries.append(self._inventory[index])
                continue
            self._inventory[index] = entry
            self._uuids[index] = entry.uuid
            entries.append(entry)
        return entries

    def _inventory_of(self, index: int) -> GpuInventory:
        smi = self._smi
        missing: list[str] = []

        def read(figures: Sequence[str], fn: Callable[..., Any], *args: Any) -> Any:
            return self._read(index, figures, missing, fn, *args)

        asic = read(["name", "architecture"], smi.amdsmi_get_gpu_asic_info) or {}
        uuid = read(["uuid"], smi.amdsmi_get_gpu_device_uuid)
        bdf = read(["pci_bus_id"], smi.amdsmi_get_gpu_device_bdf)
        vram = read(["memory_total_bytes"], smi.amdsmi_get_gpu_vram_info)
        driver = read(["driver_version"], smi.amdsmi_get_gpu_driver_info)
        caps = read(["power_limit_min_w", "power_limit_max_w", "power_limit_default_w"],
                    smi.amdsmi_get_power_cap_info)
        gfx = read(["supported_sm_clocks_mhz"], smi.amdsmi_get_clk_freq, smi.AmdSmiClkType.GFX)
        mem = read(["supported_memory_clocks_mhz"], smi.amdsmi_get_clk_freq, smi.AmdSmiClkType.MEM)
        numa = read(["numa_node"], smi.amdsmi_topo_get_numa_node_number)
        energy = read(["energy_mj"], smi.amdsmi_get_energy_count)
        ecc = read(["ecc_sbe_volatile", "ecc_dbe_volatile"], smi.amdsmi_get_gpu_total_ecc_count)
        name = str(asic.get("market_name") or "")
        capabilities = {Capability.CLOCK_LIMIT, Capability.RESET}
        low, high = (_number(caps.get("min_power_cap")), _number(caps.get("max_power_cap"))) if caps else (None, None)
        if low is not None and high is not None and high > low:
            capabilities.add(Capability.POWER_LIMIT)
        if energy is not None:
            capabilities.add(Capability.ENERGY_COUNTER)
        if ecc is not None:
            capabilities.add(Capability.ECC)
        self._capabilities[index] = frozenset(capabilities)
        gfx_version = asic.get("target_graphics_version")
        return GpuInventory(
            index=index,
            uuid=f"AMD-{uuid}" if uuid else (f"AMD-{asic['asic_serial']}" if asic.get("asic_serial", "N/A") != "N/A"
                                             else f"AMD-unknown-{index}"),
            name=name,
            pci_bus_id=bdf or "",
            memory_total_bytes=(_number(vram.get("vram_size")) or 0) * MIB if vram else 0,
            driver_version=str(driver.get("driver_version", "")) if driver else "",
            architecture=gfx_version if isinstance(gfx_version, str) and gfx_version != "gfx0" else None,
            power_limit_min_w=low / 1e6 if low is not None else None,
            power_limit_max_w=high / 1e6 if high is not None else None,
            power_limit_default_w=_watts(caps.get("default_power_cap")) if caps else None,
            supported_sm_clocks_mhz=_mhz_levels(gfx),
            supported_memory_clocks_mhz=_mhz_levels(mem),
            numa_node=numa if isinstance(numa, int) and numa >= 0 else None,
            vendor="amd",
            backend="amd",
            platform="instinct" if "instinct" in name.lower() or name.upper().startswith("MI") else "radeon",
            resource_name=RESOURCE_NAME,
            capabilities=sorted(capabilities),
            missing=missing,
        )

    def sample(self, index: int) -> GpuSample:
        """Everything we watch on GPU `index`, now. A vanished GPU gives `lost=True`, no figures."""
        uuid = self.uuid_of(index)
        ts = self._wall_clock()
        try:
            return self._sample_figures(index, uuid, ts)
        except _GpuLost:
            log.debug("AMD gpu %d is gone", index, extra={"gpu": index})
            return GpuSample(index=index, uuid=uuid, ts=ts, lost=True)

    def _sample_figures(self, index: int, uuid: str, ts: float) -> GpuSample:
        smi = self._smi
        missing: list[str] = []

        def read(figures: Sequence[str], fn: Callable[..., Any], *args: Any) -> Any:
            return self._read(index, figures, missing, fn, *args)

        def figure(name: str, value: Any) -> int | None:
            return self._figure(index, name, missing, value)

        activity = read(["utilization_pct", "memory_util_pct"], smi.amdsmi_get_gpu_activity)
        vram = read(["memory_used_bytes", "memory_free_bytes"], smi.amdsmi_get_gpu_vram_usage)
        temperature = self._temperature(index, missing)
        memory_temperature = read(["memory_temperature_c"], smi.amdsmi_get_temp_metric,
                                  smi.AmdSmiTemperatureType.VRAM, smi.AmdSmiTemperatureMetric.CURRENT)
        power = read(["power_w"], smi.amdsmi_get_power_info)
        cap = read(["power_limit_w"], smi.amdsmi_get_power_cap_info)
        gfx = read(["sm_clock_mhz"], smi.amdsmi_get_clock_info, smi.AmdSmiClkType.GFX)
        mem = read(["memory_clock_mhz"], smi.amdsmi_get_clock_info, smi.AmdSmiClkType.MEM)
        energy = read(["energy_mj"], smi.amdsmi_get_energy_count)
        ecc = read(["ecc_sbe_volatile", "ecc_dbe_volatile"], smi.amdsmi_get_gpu_total_ecc_count)
        replays = read(["pcie_replays"], smi.amdsmi_get_gpu_pci_replay_counter)
        processes = read(["processes"], smi.amdsmi_get_gpu_process_list)
        # NVIDIA-only figures: no amdsmi counterpart
        self._note_missing(index, ["throttle_reasons", "remapped_rows_correctable", "remapped_rows_uncorrectable",
                                   "remap_pending", "remap_failure"], "no amdsmi counterpart", missing)
        used = total = None
        if vram is not None:
            used, total = figure("memory_used_bytes", vram.get("vram_used")), _number(vram.get("vram_total"))
        cap_uw = figure("power_limit_w", cap.get("power_cap")) if cap is not None else None
        return GpuSample(
            index=index,
            uuid=uuid,
            ts=ts,
            utilization_pct=_percent(figure("utilization_pct", activity.get("gfx_activity"))) if activity else None,
            memory_util_pct=_percent(figure("memory_util_pct", activity.get("umc_activity"))) if activity else None,
            memory_used_bytes=used * MIB if used is not None else None,
            memory_free_bytes=(total - used) * MIB if used is not None and total is not None else None,
            temperature_c=temperature,
            memory_temperature_c=float(memory_temperature) if isinstance(memory_temperature, int) else None,
            power_w=self._power_w(index, power, missing) if power is not None else None,
            power_limit_w=cap_uw / 1e6 if cap_uw is not None else None,
            sm_clock_mhz=figure("sm_clock_mhz", gfx.get("clk")) if gfx is not None else None,
            memory_clock_mhz=figure("memory_clock_mhz", mem.get("clk")) if mem is not None else None,
            energy_mj=_energy_mj(energy),
            ecc_sbe_volatile=figure("ecc_sbe_volatile", ecc.get("correctable_count")) if ecc else None,
            ecc_dbe_volatile=figure("ecc_dbe_volatile", ecc.get("uncorrectable_count")) if ecc else None,
            pcie_replays=replays if isinstance(replays, int) else None,
            processes=[ProcessSample(pid=p["pid"], used_memory_bytes=p["memory_usage"]["vram_mem"])
                       for p in processes or []],
            missing=missing,
        )

    def _temperature(self, index: int, missing: list[str]) -> float | None:
        """The junction (hotspot) temperature, what the SMU throttles on; else the edge sensor."""
        smi = self._smi
        for sensor in (smi.AmdSmiTemperatureType.HOTSPOT, smi.AmdSmiTemperatureType.EDGE):
            value = self._read(index, [], missing, smi.amdsmi_get_temp_metric, sensor,
                               smi.AmdSmiTemperatureMetric.CURRENT)
            if isinstance(value, int):
                return float(value)
        self._note_missing(index, ["temperature_c"], "no hotspot or edge sensor", missing)
        return None

    def _power_w(self, index: int, power: dict[str, Any], missing: list[str]) -> float | None:
        """MI300 fills current_socket_power, MI200 and Radeon average_socket_power (W)."""
        for field in ("current_socket_power", "average_socket_power", "socket_power"):
            value = _number(power.get(field))
            if value is not None:
                return float(value)
        self._note_missing(index, ["power_w"], "N/A on this board", missing)
        return None

    def probe(self, index: int) -> bool:
        """Whether a vanished GPU answers again, as the same board."""
        smi = self._smi
        try:
            uuid = f"AMD-{self._call(index, smi.amdsmi_get_gpu_device_uuid)}"
        except (smi.AmdSmiLibraryException, DriverError) as error:
            log.debug("AMD gpu %d: probe failed: %s", index, error, extra={"gpu": index})
            return False
        known = self._uuids.get(index)
        if known is not None and known != uuid:
            log.warning("AMD gpu %d came back as %s (was %s)", index, uuid, known, extra={"gpu": index})
            self._inventory.pop(index, None)
        self._uuids[index] = uuid
        return True

    def capabilities(self, index: int) -> frozenset[Capability]:
        """What the board can do (known once the inventory was read; before, all AMD offers)."""
        return self._capabilities.get(index, _ALL_CAPABILITIES)

    # ----- changing ------------------------------------------------------------------------

    def _change(self, index: int, action: str, fn: Callable[..., Any], *args: Any) -> None:
        smi = self._smi
        try:
            self._call(index, fn, *args)
        except smi.AmdSmiLibraryException as error:
            code = error.get_error_code()
            why = f"gpu {index}: {action}: {self.code_name(error)}" + (f" ({_WHY[code]})" if code in _WHY else "")
            if code in _REFUSED:
                raise DriverRefused(self.code_name(error), why) from error
            raise DriverError(self.code_name(error), why) from error

    def set_power_limit(self, index: int, watts: float) -> None:
        action = f"set power cap to {watts:g} W"
        known = self._inventory.get(index)
        if known and known.power_limit_min_w is not None and known.power_limit_max_w is not None:
            action += f" (allowed {known.power_limit_min_w:g}-{known.power_limit_max_w:g} W)"
        self._change(index, action, self._smi.amdsmi_set_power_cap, 0, round(watts * 1e6))

    def lock_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        self._change(index, f"limit the GFX clock to {min_mhz}-{max_mhz} MHz", self._smi.amdsmi_set_gpu_clk_range,
                     int(min_mhz), int(max_mhz), self._smi.AmdSmiClkType.GFX)

    def reset_clocks(self, index: int) -> None:
        """Back to the driver's automatic DPM (performance level auto): the whole clock range."""
        self._change(index, "reset the GFX clock range (performance level auto)",
                     self._smi.amdsmi_set_gpu_perf_level, self._smi.AmdSmiDevPerfLevel.AUTO)

    def reset_gpu(self, index: int) -> None:
        """A GPU reset (amdsmi_reset_gpu, as `amd-smi reset -G`); refused while a process holds it."""
        self._change(index, "reset the GPU", self._smi.amdsmi_reset_gpu)


def _watts(microwatts: Any) -> float | None:
    value = _number(microwatts)
    return value / 1e6 if value is not None else None


def _percent(value: int | None) -> float | None:
    return float(min(value, 100)) if value is not None else None


def _mhz_levels(freq: dict[str, Any] | None) -> list[int]:
    """amdsmi_get_clk_freq's levels (Hz) as MHz, highest first."""
    if not freq:
        return []
    return sorted({round(hz / 1_000_000) for hz in freq.get("frequency", []) if _number(hz)}, reverse=True)


def _energy_mj(energy: dict[str, Any] | None) -> int | None:
    """The energy accumulator times its resolution (uJ per tick), in mJ."""
    if not energy:
        return None
    ticks, resolution = _number(energy.get("energy_accumulator")), energy.get("counter_resolution")
    if ticks is None or not isinstance(resolution, float | int):
        return None
    return int(ticks * resolution / 1000)
