"""The Jetson backend: a Jetson module's one integrated GPU, read from the files jetson-stats reads.

NVML on a Jetson answers NotSupported for power, temperature and utilisation, so this backend reads
the kernel's own interfaces directly (edge/devices/jetson/sysfs.py names each file and the
jetson-stats source it follows): the GPU's devfreq node (load, frequencies), its thermal zone, the
INA3221/INA238 rails, /proc/meminfo, the nvmap debugfs table and nvpmodel. jetson-stats itself is
not used: its `jtop` client needs the jtop.service root daemon on the host and a socket into the
container, and it reads these same files; we read them with no extra dependency.

What a sample means here:

* `utilization_pct`: the devfreq device's `load` (per-mille) / 10;
* `sm_clock_mhz`: `cur_freq` (Hz) in MHz;
* `temperature_c`: the gpu-thermal (GPU-therm) zone;
* `power_w`: the GPU's rail. On AGX Orin that is VDD_GPU_SOC (GPU and SoC); on Orin NX and Orin
  Nano there is no GPU-only rail, and VDD_CPU_GPU_CV (CPU, GPU and the CV engines) is used: the
  figure then includes the CPU. Without such a rail power_w is missing;
* `energy_mj`: integrated here from successive rail powers (trapezoids; no hardware energy counter,
  so Capability.ENERGY_COUNTER is absent), since the backend was opened, not across a lost spell;
* `memory_used_bytes`: `NvMapMemUsed` (the GPU's share of the RAM it shares with the CPU),
  `memory_free_bytes`: `MemAvailable`; `processes`: the nvmap clients, with their GPU memory;
* `power_limit_w` is None: there is no GPU power cap. ECC, row remapping, throttle reasons, memory
  clock and memory utilisation are not exposed either and are listed in `missing`.

Actions: `lock_clocks` writes the devfreq `max_freq`/`min_freq` (Hz), choosing from
`available_frequencies` and never above the nvpmodel mode's GPU cap, and reads them back;
`reset_clocks` restores the mode's range (the whole table under MAXN); `set_power_limit` raises
DriverRefused (see its docstring); `set_power_mode` runs `nvpmodel -m`. There is no GPU reset
short of a reboot (no Capability.RESET).

A write the kernel would refuse is a DriverRefused with the errno's name: EACCES when the file is
not writable for us, which we check before writing with os.access and the file's mode (sysfs gives
an attribute without a store method mode 0444, which refuses root too; a read-only /sys mount
fails os.access), then the errno of the write itself.

`kernel_sync` (None on a real module) is called before every read of the tree and after every
write: a simulated tree (edge/sim/jetson) passes its kernel's tick, so its files are as fresh and
its writes as synchronously validated as a real kernel's.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge.devices.base import Capability, DriverError, DriverRefused, DriverUnavailable, MissingFigures
from edge.devices.jetson import sysfs
from edge.devices.jetson.sysfs import GpuNode, NvpMode
from shared.gpu import GpuInventory, GpuSample, ProcessSample
from shared.logs import get_logger

log = get_logger(__name__)

MHZ = 1_000_000
NO_POWER_CAP = ("Jetson has no GPU power cap; the policy acts through the GPU's devfreq max "
                "frequency and the nvpmodel mode")
# What a Jetson never gives (logged once, listed in every sample's `missing`).
ALWAYS_MISSING = ("memory_util_pct", "power_limit_w", "memory_clock_mhz", "throttle_reasons",
                  "ecc_sbe_volatile", "ecc_dbe_volatile", "remapped_rows_correctable",
                  "remapped_rows_uncorrectable", "remap_pending", "remap_failure")
INVENTORY_MISSING = ("pci_bus_id", "power_limit_min_w", "power_limit_max_w", "power_limit_default_w",
                     "supported_memory_clocks_mhz")


class JetsonBackend:
    """Synchronous access to a Jetson's integrated GPU (index 0) through sysfs; not thread-safe."""

    backend = "jetson"
    vendor = "nvidia"
    resource_name = "nvidia.com/gpu"

    def __init__(
        self,
        *,
        sysfs_root: Path | str = "/",
        nvpmodel_cmd: Sequence[str] | None = None,
        kernel_sync: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        command_timeout_s: float = 10.0,
    ) -> None:
        self.root = Path(sysfs_root)
        found = shutil.which("nvpmodel") if nvpmodel_cmd is None else None
        self._nvpmodel_cmd = list(nvpmodel_cmd) if nvpmodel_cmd is not None else (
            [found] if found else None)
        self._kernel_sync = kernel_sync
        self._clock = clock
        self._wall_clock = wall_clock
        self._command_timeout_s = command_timeout_s
        self._node: GpuNode | None = None
        self._uuid: str | None = None
        self._inventory: GpuInventory | None = None
        self._missing = MissingFigures(log, where=" on this Jetson")
        self._energy_mj = 0.0
        self._last_power: tuple[float, float] | None = None  # (clock, watts) of the previous sample
        self._open = False

    # ----- life cycle ----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        self._sync()
        node = sysfs.find_gpu(self.root)
        if node is None:
            raise DriverUnavailable("ENODEV", f"no Jetson GPU devfreq node under {self.root / sysfs.DEVFREQ}")
        self._node = node
        self._uuid = self._read_uuid()
        self._open = True
        log.info("Jetson GPU %s at %s", node.name, node.devfreq, extra={"gpu": 0})

    def close(self) -> None:
        self._open = False
        self._last_power = None

    def _sync(self) -> None:
        if self._kernel_sync is not None:
            self._kernel_sync()

    def _gpu(self, index: int) -> GpuNode:
        if index != 0:
            raise DriverError("EINVAL", f"gpu {index}: a Jetson has one GPU (index 0)")
        if self._node is None:
            raise DriverUnavailable("ENODEV", "the Jetson backend is not open")
        return self._node

    def _read_uuid(self) -> str:
        """JETSON-<module serial number> (stable across reboots), else from the machine id."""
        for path in (self.root / sysfs.DEVICETREE / "serial-number", self.root / "etc/machine-id"):
            try:
                value = sysfs.read_text(path)
            except OSError:
                continue
            if value:
                return f"JETSON-{value}"
        return "JETSON-unknown"

    # ----- reading -------------------------------------------------------------------------

    def device_count(self) -> int:
        return 1 if self._node is not None else 0

    def known_uuid(self, index: int) -> str | None:
        return self._uuid if index == 0 else None

    def uuid_of(self, index: int) -> str:
        self._gpu(index)
        return self._uuid or "JETSON-unknown"

    def _note_missing(self, figures: Sequence[str], missing: list[str], why: str) -> None:
        self._missing.note(0, figures, why, missing)  # a Jetson's one GPU

    def inventory(self) -> list[GpuInventory]:
        """The module's GPU; while it is lost, its last known entry (none if never seen)."""
        self._sync()
        node = self._gpu(0)
        if not node.present:
            log.warning("gpu 0 is lost; keeping its last known inventory", extra={"gpu": 0})
            return [self._inventory] if self._inventory is not None else []
        missing: list[str] = []
        self._note_missing(INVENTORY_MISSING, missing, "integrated GPU without a power cap")
        try:
            frequencies = sysfs.available_frequencies_hz(node)
        except (OSError, ValueError) as error:
            frequencies = []
            self._note_missing(["supported_sm_clocks_mhz"], missing, str(error))
        meminfo = self._meminfo(missing)
        platform = sysfs.platform_of(self.root, node.name)
        release = sysfs.l4t_release(self.root)
        if release is None:
            self._note_missing(["driver_version"], missing, f"no {sysfs.TEGRA_RELEASE}")
        try:
            model = sysfs.read_text(self.root / sysfs.DEVICETREE / "model")
        except OSError:
            model = f"NVIDIA Jetson ({node.name})"
        self._inventory = GpuInventory(
            index=0,
            uuid=self.uuid_of(0),
            name=model,
            pci_bus_id="",
            memory_total_bytes=meminfo.get("MemTotal", 0),
            driver_version=release or "",
            cuda_version=None,
            mig_mode=None,
            architecture=sysfs.ARCHITECTURES.get(platform),
            supported_sm_clocks_mhz=sorted({hz // MHZ for hz in frequencies}, reverse=True),
            numa_node=None,
            vendor="nvidia",
            backend="jetson",
            platform=platform,
            resource_name=self.resource_name,
            capabilities=sorted(self.capabilities(0)),
            missing=missing,
        )
        return [self._inventory]

    def _meminfo(self, missing: list[str]) -> dict[str, int]:
        try:
            return sysfs.parse_meminfo((self.root / sysfs.MEMINFO).read_text())
        except OSError as error:
            self._note_missing(["memory_total_bytes", "memory_used_bytes", "memory_free_bytes"],
                               missing, str(error))
            return {}

    def sample(self, index: int) -> GpuSample:
        """Everything we watch on the GPU, now; `lost=True` when its devfreq node has vanished."""
        self._sync()
        node = self._gpu(index)
        uuid = self.uuid_of(index)
        ts = self._wall_clock()
        try:
            return self._sample(node, uuid, ts)
        except FileNotFoundError:
            if node.present:
                raise
        self._last_power = None  # do not integrate across the time the GPU was gone
        return GpuSample(index=0, uuid=uuid, ts=ts, lost=True)

    def _sample(self, node: GpuNode, uuid: str, ts: float) -> GpuSample:
        if not node.present:
            raise FileNotFoundError(node.devfreq)
        missing: list[str] = []
        self._note_missing(ALWAYS_MISSING, missing, "not exposed by the kernel")
        utilization = self._figure(["utilization_pct"], missing,
                                   lambda: sysfs.read_int(node.device / "load") / 10.0)
        clock = self._figure(["sm_clock_mhz"], missing,
                             lambda: sysfs.read_int(node.devfreq / "cur_freq") // MHZ)
        zone = sysfs.find_gpu_thermal_zone(self.root)
        temperature = self._figure(["temperature_c"], missing,
                                   lambda: sysfs.read_int(zone) / 1000.0 if zone else None)
        rail = sysfs.gpu_rail(sysfs.find_rails(self.root))
        power = self._figure(["power_w", "energy_mj"], missing, rail.watts if rail else _none)
        energy = self._integrate(power) if power is not None else None
        meminfo = self._meminfo(missing)
        used = meminfo.get("NvMapMemUsed")
        if used is None:
            self._note_missing(["memory_used_bytes"], missing, "no NvMapMemUsed in /proc/meminfo")
        free = meminfo.get("MemAvailable")
        return GpuSample(
            index=0,
            uuid=uuid,
            ts=ts,
            utilization_pct=utilization,
            memory_used_bytes=used,
            memory_free_bytes=free,
            temperature_c=temperature,
            power_w=power,
            sm_clock_mhz=clock,
            energy_mj=energy,
            processes=self._processes(missing),
            missing=missing,
        )

    def _figure(self, figures: Sequence[str], missing: list[str], read: Callable[[], Any]) -> Any:
        """read() or None, naming `figures` missing when the file is absent or unreadable; a vanished
        devfreq node (FileNotFoundError with the node gone) propagates as a lost GPU."""
        try:
            value = read()
        except FileNotFoundError as error:
            if self._node is not None and not self._node.present:
                raise
            self._note_missing(figures, missing, f"no {error.filename}")
            return None
        except (OSError, ValueError) as error:
            self._note_missing(figures, missing, str(error))
            return None
        if value is None:
            self._note_missing(figures, missing, "no such file on this module")
        return value

    def _integrate(self, watts: float) -> int:
        now = self._clock()
        if self._last_power is not None:
            then, before = self._last_power
            if now > then:
                self._energy_mj += (before + watts) / 2 * (now - then) * 1000.0
        self._last_power = (now, watts)
        return int(self._energy_mj)

    def _processes(self, missing: list[str]) -> list[ProcessSample]:
        for table in sysfs.NVMAP_TABLES:
            try:
                text = (self.root / table).read_text()
            except OSError:
                continue
            return [ProcessSample(pid=c.pid, used_memory_bytes=c.size_bytes)
                    for c in sysfs.parse_nvmap(text)]
        self._note_missing(["processes"], missing, "no nvmap debugfs table (debugfs not mounted?)")
        return []

    def probe(self, index: int) -> bool:
        """Whether the GPU's devfreq node is back (and answers)."""
        self._sync()
        if index != 0 or self._node is None:
            return False
        node = sysfs.find_gpu(self.root)
        if node is None:
            return False
        try:
            sysfs.read_int(node.devfreq / "cur_freq")
        except (OSError, ValueError):
            return False
        self._node = node
        return True

    # ----- nvpmodel --------------------------------------------------------------------------

    def power_modes(self) -> tuple[list[NvpMode], int | None]:
        """The nvpmodel modes from nvpmodel.conf and the default ID; ([], None) without one."""
        try:
            return sysfs.parse_nvpmodel_conf((self.root / sysfs.NVPMODEL_CONF).read_text())
        except OSError:
            return [], None

    def _nvpmodel(self, *args: str) -> subprocess.CompletedProcess[str]:
        if self._nvpmodel_cmd is None:
            raise DriverRefused("ENOENT", "nvpmodel is not installed (mount the host's /usr/sbin/nvpmodel)")
        try:
            return subprocess.run([*self._nvpmodel_cmd, *args], capture_output=True, text=True,
                                  timeout=self._command_timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise DriverRefused("nvpmodel", f"nvpmodel {' '.join(args)}: {error}") from error

    def power_mode(self) -> tuple[str, int] | None:
        """(name, ID) of the nvpmodel mode in force, from `nvpmodel -q`; None when unknown."""
        try:
            done = self._nvpmodel("-q")
        except DriverRefused:
            return None
        return sysfs.parse_nvpmodel_query(done.stdout) if done.returncode == 0 else None

    def set_power_mode(self, index: int, mode_id: int) -> None:
        """`nvpmodel -m <mode_id>`: the whole module's power mode (CPU cores, clocks, GPU cap)."""
        self._gpu(index)
        done = self._nvpmodel("-m", str(mode_id))
        if done.returncode != 0:
            reason = (done.stderr or done.stdout).strip().splitlines()
            raise DriverRefused("nvpmodel", f"gpu {index}: nvpmodel -m {mode_id}: "
                                f"{reason[-1] if reason else f'exit status {done.returncode}'}")
        self._sync()

    def _mode_cap_hz(self) -> int | None:
        """The GPU MAX_FREQ of the nvpmodel mode in force (None: no cap, or unknown)."""
        mode = self.power_mode()
        if mode is None:
            return None
        modes, _ = self.power_modes()
        for entry in modes:
            if entry.id == mode[1] and entry.gpu_max_hz is not None and entry.gpu_max_hz > 0:
                return entry.gpu_max_hz
        return None

    # ----- changing ------------------------------------------------------------------------

    def capabilities(self, index: int) -> frozenset[Capability]:
        node = self._gpu(index)
        found = set()
        if (node.devfreq / "max_freq").is_file():
            found.add(Capability.CLOCK_LIMIT)
        if self._nvpmodel_cmd is not None and self.power_modes()[0]:
            found.add(Capability.POWER_MODE)
        return frozenset(found)

    def set_power_limit(self, index: int, watts: float) -> None:
        """Refused: a Jetson has no GPU power cap. The module's nvpmodel modes have budgets, but a
        mode also sets the CPU cores and clocks of the whole module (and some changes need a
        reboot), which is not the policy's to decide; it caps the GPU through lock_clocks."""
        self._gpu(index)
        mode = self.power_mode()
        now = f" (nvpmodel mode now {mode[0]})" if mode else ""
        raise DriverRefused("ENOTSUP", f"gpu {index}: set power limit to {watts:g} W: {NO_POWER_CAP}{now}")

    def lock_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        """Cap the GPU at the highest OPP <= max_mhz (and the mode's cap), floor at the lowest OPP
        >= min_mhz (at most the cap)."""
        node = self._gpu(index)
        self._sync()
        action = f"lock GPU clocks to {min_mhz}-{max_mhz} MHz"
        table = self._table(node, action)
        cap = self._mode_cap_hz()
        allowed = [hz for hz in table if hz // MHZ <= max_mhz and (cap is None or hz <= cap)]
        if not allowed:
            raise DriverRefused("EINVAL", f"gpu {index}: {action}: below the GPU's lowest frequency "
                                f"{table[0] // MHZ} MHz (available: {_mhz_list(table)})")
        top = allowed[-1]
        bottom = next((hz for hz in table if hz // MHZ >= min_mhz), top)
        self._set_range(node, min(bottom, top), top, action)

    def reset_clocks(self, index: int) -> None:
        """Back to the whole range the nvpmodel mode allows (the whole table under MAXN)."""
        node = self._gpu(index)
        self._sync()
        action = "reset GPU clocks"
        table = self._table(node, action)
        cap = self._mode_cap_hz()
        top = max((hz for hz in table if cap is None or hz <= cap), default=table[-1])
        self._set_range(node, table[0], top, action)

    def _table(self, node: GpuNode, action: str) -> list[int]:
        try:
            table = sysfs.available_frequencies_hz(node)
        except (OSError, ValueError) as error:
            raise DriverError(_errno_name(error), f"gpu 0: {action}: available_frequencies: {error}") from error
        if not table:
            raise DriverRefused("EINVAL", f"gpu 0: {action}: the GPU lists no available frequencies")
        return table

    def _set_range(self, node: GpuNode, low_hz: int, high_hz: int, action: str) -> None:
        """Write min_freq/max_freq in an order every kernel accepts, then read both back."""
        try:
            current_min = sysfs.read_int(node.devfreq / "min_freq")
        except (OSError, ValueError):
            current_min = 0
        writes = [("max_freq", high_hz), ("min_freq", low_hz)]
        if high_hz < current_min:  # lowering below the present floor: the floor goes first
            writes.reverse()
        for name, hz in writes:
            self._write(node.devfreq / name, hz, action)
        self._sync()
        for name, hz in writes:
            try:
                kept = sysfs.read_int(node.devfreq / name)
            except (OSError, ValueError) as error:
                raise DriverError(_errno_name(error), f"gpu 0: {action}: reading back {name}: {error}") from error
            if kept != hz:
                raise DriverRefused("EINVAL", f"gpu 0: {action}: wrote {name} {hz} Hz, the kernel kept "
                                    f"{kept} Hz")
        log.info("gpu 0: %s: devfreq range now %d-%d MHz", action, low_hz // MHZ, high_hz // MHZ,
                 extra={"gpu": 0})

    def _write(self, path: Path, hz: int, action: str) -> None:
        if not _writable(path):
            raise DriverRefused("EACCES", f"gpu 0: {action}: {path} is not writable here (the daemon "
                                "needs root and a writable /sys for the GPU's devfreq node)")
        try:
            with open(path, "w") as handle:
                handle.write(f"{hz}\n")
        except OSError as error:
            raise DriverRefused(_errno_name(error), f"gpu 0: {action}: writing {hz} to {path}: "
                                f"{error.strerror or error}") from error


def _none() -> None:
    return None


def _writable(path: Path) -> bool:
    """os.access, and a write bit: sysfs attributes without a store method are 0444 even for root."""
    try:
        return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)
    except OSError:
        return False


def _errno_name(error: Exception) -> str:
    number = getattr(error, "errno", None)
    return errno.errorcode.get(number, "EIO") if isinstance(number, int) else type(error).__name__


def _mhz_list(table: list[int]) -> str:
    return ", ".join(str(hz // MHZ) for hz in table)
