"""A node's simulated Intel GPUs: a sysfs + proc tree (tree.py) kept current by a "kernel" thread.

The boards' physics is edge/sim/physics.py `SimGpu` (power, heat, clocks, faults), the same as the
NVML simulation's, with Intel profiles (profiles.py). Every tick (0.1 s) the kernel thread, under
the simulation's lock:

* takes what was written to the control files as the driver does: `power1_max` is accepted and
  clamped to the SKU range [40 % of TDP, TDP] (i915 "allows arbitrary PL1 limits to be set but
  displays clamped values when read", i915_hwmon.c; xe clamps above the maximum, xe_hwmon.c), 0
  disables the limit, anything unparsable is EINVAL (the old value stays); a GT min/max frequency
  outside RPn..RP0, or a min above the max, is EINVAL (the old values stay), as i915's
  intel_rps_set_{min,max}_frequency and xe's xe_guc_pc_set_{min,max}_freq answer. A write to a
  plain file cannot fail, so the correction lands at the next tick, where the real kernel refuses
  the write itself; the backend checks the same ranges before it writes and reads back after;
* integrates the physics and rewrites energy1_input, the temperatures, the frequencies and the
  fdinfo of every simulated client (busy time growing with the load);
* makes a lost card's PCI function vanish from sysfs (and come back once recovered), and the
  driver's directories vanish while the driver is "unloaded".

`permissions="none"` marks the control files 0444: the backend's write gets EACCES, as kernfs
answers a write to a file without write bits, even for root (a plain file would let root write,
so the backend applies kernfs's rule itself: edge/devices/intel/sysfs.py write_control).

Between ticks a reader sees the last tick's values: rates over a 1 s sampling interval (power from
the energy counter, i915's busy nanoseconds) jitter by up to a tick's share, about 10 %; xe's busy
cycles are measured against the GPU timestamp written in the same tick, so they do not.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self

from edge.sim.intel import tree
from edge.sim.intel.profiles import FREQ_STEP_MHZ, get_profile
from edge.sim.lib import Permissions, SimRefused
from edge.sim.physics import SimFault, SimGpu
from shared.logs import get_logger

log = get_logger(__name__)

Driver = Literal["i915", "xe"]
TICK_S = 0.1
OSRELEASE = "6.8.0-kgpu-sim"
LOAD_PID_BASE = 900_000  # the client behind an injected `utilization` (no named processes)
# SimFault fields an Intel board cannot have, and what to inject instead.
_REFUSED = {
    "xid": "Intel has no XIDs; inject lost or temperature_c instead",
    "ecc_sbe": "the i915/xe sysfs has no ECC counters; inject lost or temperature_c instead",
    "ecc_dbe": "the i915/xe sysfs has no ECC counters; inject lost or temperature_c instead",
    "remap_failure": "Intel GPUs have no NVIDIA row remapping",
    "pcie_replays": "the i915/xe sysfs has no PCIe replay counter",
    "encoder_utilization": "the Intel simulation does not model the media engines",
    "decoder_utilization": "the Intel simulation does not model the media engines",
    "hung": "a sysfs tree cannot block its readers; inject driver_unloaded or lost instead",
}


class _InProgress:
    """A control file being written as it was read."""


IN_PROGRESS = _InProgress()


def _bus(seed: str, index: int) -> str:
    """A PCI address per GPU, varied by `seed` so simulated nodes do not share GPU ids."""
    offset = int(hashlib.sha256(seed.encode()).hexdigest(), 16) % 0x40
    return f"0000:{(0x03 + offset + 0x11 * index) % 0x100:02x}:00.0"


class SimulatedIntel:
    """Simulated Intel GPUs behind a simulated i915 (or xe) sysfs tree under `workdir`."""

    def __init__(self, gpus: int, model: str | Sequence[str] = "FLEX170", *, workdir: Path,
                 clock: Callable[[], float] = time.monotonic, permissions: Permissions = "root",
                 seed: str = "", driver: Driver = "i915", tick_s: float = TICK_S) -> None:
        if permissions not in ("root", "none"):
            raise ValueError(f"permissions must be 'root' or 'none', not {permissions!r}")
        if driver not in ("i915", "xe"):
            raise ValueError(f"driver must be 'i915' or 'xe', not {driver!r}")
        models = [model] * gpus if isinstance(model, str) else list(model)
        if gpus < 0 or len(models) != gpus:
            raise ValueError(f"need {gpus} model names (or one for all), got {len(models)}")
        self.root = Path(workdir)
        self.clock = clock
        self.driver: Driver = driver
        self.tick_s = tick_s
        self.control_mode = 0o644 if permissions == "root" else 0o444
        self.lock = threading.RLock()
        self.boots = 1
        self.driver_loaded = True
        self._gpus: list[SimGpu] = []
        self._files: list[tree.CardFiles] = []
        for index, name in enumerate(models):
            gpu = SimGpu(index, get_profile(name), clock=clock, seed=seed)
            gpu.pci_bus_id = _bus(seed, index)
            gpu.uuid = f"INTEL-{gpu.profile.pci_device_id >> 16:04x}-{gpu.pci_bus_id.replace(':', '-')}"
            self._gpus.append(gpu)
            self._files.append(tree.CardFiles(self.root, index, gpu.pci_bus_id, driver))
        self._present = [False] * gpus
        self._shown: list[dict[str, int]] = [{} for _ in range(gpus)]  # control files as last written
        self._partial: dict[Path, str] = {}
        self._writer = tree.Writer()
        self._clients: list[dict[int, tree.SimClient]] = [{} for _ in range(gpus)]
        self._next_client_id = [1] * gpus
        self._last_tick = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- public face (as edge/sim/lib.py SimulatedNvml) --------------------------------------

    @property
    def gpus(self) -> list[SimGpu]:
        return list(self._gpus)

    def backend_kwargs(self) -> dict[str, Any]:
        """What edge.devices.intel.open_intel needs to read this tree."""
        return {"sysfs_root": str(self.root)}

    def install(self) -> Self:
        """Build the tree and start the kernel thread."""
        with self.lock:
            if self._thread is not None:
                return self
            for part in ("sys", "proc"):
                shutil.rmtree(self.root / part, ignore_errors=True)
            self._present = [False] * len(self._gpus)
            self._clients = [{} for _ in self._gpus]
            self._writer.forget()
            tree.prepare_root(self.root, OSRELEASE)
            self._last_tick = self.clock()
            self._sync()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kgpu-sim-intel-kernel", daemon=True)
            self._thread.start()
        return self

    def uninstall(self) -> None:
        """Stop the kernel thread and take the tree away."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
        with self.lock:
            for part in ("sys", "proc"):
                shutil.rmtree(self.root / part, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def tick(self) -> None:
        """One kernel tick now rather than at the thread's next: a test moving a fake clock sees
        the tree follow at once."""
        with self.lock:
            self._sync()

    def inject(self, index: int, fault: SimFault | Mapping[str, Any]) -> dict[str, Any]:
        """Apply load or a fault to GPU `index`; answer its new simulated state."""
        if not isinstance(fault, SimFault):
            fault = SimFault.model_validate(fault)
        self._check_index(index)
        for name, why in _REFUSED.items():
            value = getattr(fault, name)
            if value is not None and value is not False and value != 0:
                raise ValueError(f"{name}: {why}")
        with self.lock:
            gpu = self._gpus[index]
            if fault.reset:
                self.driver_loaded = True
            gpu.apply(fault)
            if fault.reset:
                self._refresh_controls(index)
            if fault.driver_unloaded is not None:
                self.driver_loaded = not fault.driver_unloaded
            self._sync()
            return self._state(index)

    def state(self, index: int) -> dict[str, Any]:
        self._check_index(index)
        with self.lock:
            return self._state(index)

    def gpu_reset(self, index: int) -> dict[str, Any]:
        """A PCI function reset (`echo 1 > /sys/bus/pci/devices/<pci>/reset`): refused while the
        driver is unloaded or a process holds the card, as the device is then in use."""
        self._check_index(index)
        with self.lock:
            gpu = self._gpus[index]
            if not self.driver_loaded:
                raise SimRefused("driver-not-loaded", f"the {self.driver} driver is not loaded")
            holders = sorted(self._clients[index])
            if holders:
                raise SimRefused("in-use", f"{gpu.pci_bus_id} is in use by process(es) "
                                 f"{', '.join(map(str, holders))}")
            effective = gpu.gpu_reset()
            self._refresh_controls(index)  # the reset puts the driver's defaults back in the files
            self._sync()
            log.warning("simulated Intel GPU %s reset%s", index,
                        "" if effective else "; its fault needs a reboot, the GPU stays faulty")
            return {"index": index, "uuid": gpu.uuid, "pci_bus_id": gpu.pci_bus_id, "effective": effective,
                    "state": self._state(index)}

    def reboot(self) -> dict[str, Any]:
        """Every board fresh, no processes, the driver loaded again with its defaults."""
        with self.lock:
            for index, gpu in enumerate(self._gpus):
                gpu.reboot()
                self._refresh_controls(index)
            self.driver_loaded = True
            self.boots += 1
            self._sync()
            log.warning("simulated Intel node rebooted (boot %s)", self.boots)
            return {"boots": self.boots, "gpus": [self._state(i) for i in range(len(self._gpus))]}

    def diagnose(self, index: int, level: int = 1) -> dict[str, Any]:
        """What `xpu-smi diag -d <index> -l <level>` would find, in the shape of the NVML sim's answer."""
        if level not in (1, 2, 3, 4):
            raise ValueError(f"diagnostic level must be one of (1, 2, 3, 4), not {level}")
        self._check_index(index)
        with self.lock:
            gpu = self._gpus[index]
            gpu.advance()
            names = ["Software Exploration", "Hardware Sysman Accessibility", "Computation Check"]
            if level >= 2:
                names += ["Memory Error", "Media Codec"]
            if level >= 3:
                names += ["Memory Bandwidth", "Power", "Computation Functionality"]
            failed: dict[str, str] = {}
            if gpu.lost or not self._present[index]:
                failed["Software Exploration"] = f"GPU {index} ({gpu.pci_bus_id}) is not on the PCI bus"
            elif gpu.recovery is not None:
                failed["Computation Check"] = f"GPU {index} needs a {gpu.recovery}"
            if gpu.diag_fault:
                failed["Memory Error" if level >= 2 else "Hardware Sysman Accessibility"] = (
                    f"GPU {index}: the simulated board fails this test (diag_fails)")
            tests = [{"category": "Intel", "name": name, "result": "Fail" if name in failed else "Pass",
                      "info": failed.get(name)} for name in names]
            return {"index": index, "uuid": gpu.uuid, "pci_bus_id": gpu.pci_bus_id,
                    "pci_device_id": f"{gpu.profile.pci_device_id >> 16:04x}",
                    "driver_version": f"{self.driver} (kernel {OSRELEASE})", "level": level,
                    "passed": not failed, "tests": tests}

    # ----- the kernel ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:  # one bad tick must not stop the simulated kernel
                log.exception("simulated Intel kernel tick failed")

    def _sync(self) -> None:
        """One kernel tick: controls taken, physics advanced, the tree rewritten."""
        now = self.clock()
        interval = max(0.0, now - self._last_tick)
        self._last_tick = now
        driver_dir = self.root / "sys/bus/pci/drivers" / self.driver
        if not self.driver_loaded and driver_dir.exists():
            for files in self._files:
                tree.remove_card(files)
            shutil.rmtree(driver_dir, ignore_errors=True)
            self._writer.forget()
            self._present = [False] * len(self._files)
        for index, gpu in enumerate(self._gpus):
            files = self._files[index]
            wanted = self.driver_loaded and not gpu.lost
            if wanted and not self._present[index]:
                self._create(index)
            elif not wanted and self._present[index]:
                tree.remove_card(files)
                self._writer.forget()
                self._present[index] = False
            if self._present[index]:
                self._take_controls(index)
            gpu.advance()
            self._update_clients(index, interval, now)
            if self._present[index]:
                self._write_dynamic(index)

    def _facts(self, gpu: SimGpu) -> tree.StaticFacts:
        p = gpu.profile
        return tree.StaticFacts(device_id=p.pci_device_id >> 16, vram_bytes=p.memory_total_mib * 1024 * 1024,
                                rated_uw=round(p.power_default_w * 1e6), rpn_mhz=p.min_sm_clock_mhz,
                                rp0_mhz=p.max_sm_clock_mhz)

    def _create(self, index: int) -> None:
        gpu, files = self._gpus[index], self._files[index]
        tree.create_card(files, self._facts(gpu), self.control_mode)
        self._writer.forget()
        self._present[index] = True
        self._refresh_controls(index)

    def _refresh_controls(self, index: int) -> None:
        """The control files as the driver shows the board's present settings (after it was
        created, reset or rebooted)."""
        if not self._present[index]:
            return
        gpu, files = self._gpus[index], self._files[index]
        p = gpu.profile
        low, high = gpu.locked_clocks or (p.min_sm_clock_mhz, p.max_sm_clock_mhz)
        self._show(index, files.hwmon / "power1_max", round(gpu.power_limit_w * 1e6))
        self._show(index, files.freq("min"), low)
        self._show(index, files.freq("max"), high)

    def _show(self, index: int, path: Path, value: int) -> None:
        tree.put(path, str(value), self.control_mode)
        self._shown[index][path.name] = value

    def _written(self, path: Path) -> int | None | _InProgress:
        """A control file's content as an integer; None when it is not one (EINVAL); IN_PROGRESS
        while a writer has truncated the file and not yet written (a plain file's `echo` is two
        steps; sysfs gets the whole buffer at once), or wrote part of a line this tick."""
        try:
            text = path.read_text()
        except OSError:
            return None
        if not text or (not text.endswith("\n") and self._partial.get(path) != text):
            self._partial[path] = text
            return IN_PROGRESS
        self._partial.pop(path, None)
        try:
            return int(text.strip(), 0)
        except ValueError:
            return None

    def _take_controls(self, index: int) -> None:
        gpu, files = self._gpus[index], self._files[index]
        p = gpu.profile
        shown = self._shown[index]
        power_path = files.hwmon / "power1_max"
        written = self._written(power_path)
        if written is not IN_PROGRESS and written != shown.get(power_path.name):
            if not isinstance(written, int) or written < 0:
                self._show(index, power_path, shown[power_path.name])  # EINVAL: unchanged
            elif written == 0:  # PL1 disabled
                gpu.set_power_limit_w(p.max_board_w)
                self._show(index, power_path, 0)
            else:
                effective = min(max(written, round(p.power_min_w * 1e6)), round(p.power_max_w * 1e6))
                gpu.set_power_limit_w(effective / 1e6)
                self._show(index, power_path, effective)
        low_path, high_path = files.freq("min"), files.freq("max")
        low, high = self._written(low_path), self._written(high_path)
        if low is IN_PROGRESS or high is IN_PROGRESS:
            return
        if low != shown.get(low_path.name) or high != shown.get(high_path.name):
            rpn, rp0 = p.min_sm_clock_mhz, p.max_sm_clock_mhz
            if not isinstance(low, int) or not isinstance(high, int) or not rpn <= low <= high <= rp0:
                # EINVAL: unchanged
                self._show(index, low_path, shown[low_path.name])
                self._show(index, high_path, shown[high_path.name])
            else:
                if (low, high) == (rpn, rp0):
                    gpu.reset_clocks()
                else:
                    gpu.lock_clocks(low, high)
                shown[low_path.name], shown[high_path.name] = low, high

    def _write_dynamic(self, index: int) -> None:
        gpu, files = self._gpus[index], self._files[index]
        p = gpu.profile
        clock = gpu.reported_sm_clock_mhz
        put = self._writer.put
        put(files.hwmon / "energy1_input", str(int(gpu.energy_mj * 1000)))
        span = max(1, p.max_sm_clock_mhz - p.min_sm_clock_mhz)
        put(files.hwmon / "in0_input", str(round(700 + 400 * (clock - p.min_sm_clock_mhz) / span)))
        package = "temp2_input" if self.driver == "xe" else "temp1_input"
        put(files.hwmon / package, str(round(gpu.temperature_c * 1000)))
        if self.driver == "xe":
            put(files.hwmon / "temp3_input", str(round(gpu.memory_temperature_c * 1000)))
        put(files.freq("act"), str(clock))
        put(files.freq("cur"), str(clock - clock % FREQ_STEP_MHZ))

    def _update_clients(self, index: int, interval: float, now: float) -> None:
        """The DRM clients of the card follow its processes (or its injected load); their busy
        time grows with their share of the load."""
        gpu, files = self._gpus[index], self._files[index]
        wanted: dict[int, tuple[str, float, int]] = {
            p.pid: (f"sim-worker-{p.pid}", p.sm_util, p.used_memory_mib * 1024 * 1024) for p in gpu.processes}
        if not wanted and gpu.load_pct > 0:
            wanted[LOAD_PID_BASE + index] = ("kgpu-sim-load", gpu.load_pct, 0)
        clients = self._clients[index]
        for pid in [pid for pid in clients if pid not in wanted]:
            tree.remove_client(self.root, clients.pop(pid))
            self._writer.forget()
        timestamp = int(now * tree.GPU_TIMESTAMP_HZ)
        for pid, (comm, util, vram) in wanted.items():
            client = clients.get(pid)
            if client is None:
                client = tree.SimClient(pid=pid, client_id=self._next_client_id[index], fd=10 + index, comm=comm,
                                        util_pct=util, vram_bytes=vram)
                self._next_client_id[index] += 1
                clients[pid] = client
            else:
                busy = interval * client.util_pct / 100.0 * tree.COMPUTE_ENGINES
                client.busy_ns += busy * 1e9
                client.busy_cycles += busy * tree.GPU_TIMESTAMP_HZ
            client.util_pct, client.vram_bytes = util, vram
            tree.write_client(self.root, client, files, timestamp, self._writer)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self._gpus):
            raise IndexError(f"no simulated GPU {index}; this node has {len(self._gpus)}")

    def _state(self, index: int) -> dict[str, Any]:
        return self._gpus[index].state() | {"driver": self.driver, "driver_loaded": self.driver_loaded,
                                            "in_sysfs": self._present[index],
                                            "clients": sorted(self._clients[index])}


def install(gpus: int, model: str | Sequence[str] = "FLEX170", *, clock: Callable[[], float] = time.monotonic,
            permissions: Permissions = "root", seed: str = "", workdir: Path, driver: Driver = "i915",
            tick_s: float = TICK_S) -> SimulatedIntel:
    """Simulate `gpus` Intel boards of `model` under `workdir` (which then holds sys/ and proc/) and
    start the kernel thread. `permissions="none"`: control files refuse writes (an unprivileged
    container); `seed` varies the PCI addresses (one per simulated node); `driver` "i915" (what
    Intel supports the Flex on) or "xe"."""
    return SimulatedIntel(gpus, model, workdir=workdir, clock=clock, permissions=permissions, seed=seed,
                          driver=driver, tick_s=tick_s).install()
