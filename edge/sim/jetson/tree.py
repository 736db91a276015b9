"""A Jetson module's kernel files under a work directory, and the "kernel" that keeps them current.

The layout is a JetPack 6 (L4T R36) Orin's, at the paths jetson-stats reads (see
edge/devices/jetson/sysfs.py for the reader's side and the jtop sources):

    sys/firmware/devicetree/base/{model,compatible,serial-number}   (proc/device-tree links here)
    etc/nv_tegra_release, etc/nvpmodel.conf -> nvpmodel/nvpmodel_<part>.conf, var/lib/nvpmodel/status
    sys/devices/platform/bus@0/17000000.gpu/{load, of_node -> devicetree gpu@17000000,
        devfreq/17000000.gpu/{cur_freq,target_freq,min_freq,max_freq,available_frequencies,governor,
        available_governors, device -> ../../../17000000.gpu}}
    sys/class/devfreq/17000000.gpu -> the devfreq directory (removed while the GPU is lost)
    sys/devices/virtual/thermal/thermal_zoneN/{type,temp} (sys/class/thermal links)
    sys/devices/platform/bus@0/c240000.i2c/i2c-1/1-004x/{name, hwmon/hwmonN/in*_label, in*_input,
        curr*_input, curr*_crit, curr*_max} (sys/bus/i2c/devices and sys/class/hwmon links)
    proc/meminfo, sys/kernel/debug/nvmap/iovmm/{maps,clients}

`JetsonKernel.tick()` (under the simulation's lock) does what the kernel would have done since the
last tick: it validates what was written into the devfreq control files as devfreq does (a value is
clamped to the OPP table's range, min_freq to at most max_freq; an unparsable one is replaced by
the previous value, where the real kernel answers EINVAL), hands the effective range to the
`SimGpu` physics as locked clocks, steps the physics, and rewrites every status file (each
atomically: a reader never sees half a file).

A tree of plain files cannot refuse a write from root, so `permissions="none"` makes the control
files mode 0444, which is how sysfs shows an attribute that has no store method: the backend
checks the mode before writing and refuses (EACCES), and so does the nvpmodel stand-in.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge.sim.jetson.profiles import MHZ, JetsonModule, to_mhz
from edge.sim.physics import SimGpu

L4T_RELEASE = ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
               "DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n"
               "TARGET_USERSPACE_LIB_DIR=nvidia\nTARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n")
L4T_VERSION = "36.4.3"
GPU_DEVICE = Path("sys/devices/platform/bus@0/17000000.gpu")
GPU_DEVFREQ = GPU_DEVICE / "devfreq/17000000.gpu"
CLASS_DEVFREQ = Path("sys/class/devfreq/17000000.gpu")
I2C_BUS = Path("sys/devices/platform/bus@0/c240000.i2c/i2c-1")
NVPMODEL_STATUS = Path("var/lib/nvpmodel/status")
CONTROL_FILES = ("min_freq", "max_freq", "governor")
THERMAL_ZONES = ("cpu-thermal", "gpu-thermal", "cv0-thermal", "soc0-thermal", "tj-thermal")
OS_RESIDENT_KIB = 1_400_000  # what the OS and desktop keep, besides the GPU's nvmap share


def write_atomic(path: Path, text: str, mode: int = 0o444) -> None:
    """Replace `path` with `text` in one rename; nothing is written when the content is unchanged."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_text(text)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def _link(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def nvpmodel_conf(module: JetsonModule) -> str:
    """The module's nvpmodel.conf, in NVIDIA's format, with only the GPU clamps of each mode."""
    devfreq = f"/{GPU_DEVFREQ}"
    lines = [f"# nvpmodel_{module.module_part}.conf: simulated by kgpu (edge/sim/jetson)",
             "< PARAM TYPE=CLOCK NAME=GPU >",
             f"FREQ_TABLE {devfreq}/available_frequencies",
             f"MAX_FREQ {devfreq}/max_freq",
             f"MIN_FREQ {devfreq}/min_freq", ""]
    for mode in module.modes:
        lines += [f"< POWER_MODEL ID={mode.id} NAME={mode.name} >", "GPU MIN_FREQ 0",
                  f"GPU MAX_FREQ {mode.gpu_max_hz}", ""]
    lines.append(f"< PM_CONFIG DEFAULT={module.default_mode} >")
    return "\n".join(lines) + "\n"


class JetsonKernel:
    """The files of one simulated module and the kernel that keeps them. Not thread-safe: the
    simulation calls it under its lock."""

    def __init__(self, root: Path, module: JetsonModule, gpu: SimGpu, *, readonly_controls: bool) -> None:
        self.root = root
        self.module = module
        self.gpu = gpu
        self.readonly_controls = readonly_controls
        self.opps = module.opps_hz
        self.hz_of_mhz = {to_mhz(hz): hz for hz in self.opps}
        self.min_hz, self.max_hz = self.opps[0], self.opps[-1]  # the effective devfreq range
        self._physics_range: tuple[int, int] | None = None  # the range last given to the physics

    # ----- building -------------------------------------------------------------------------

    def build(self, serial: str) -> None:
        """Lay the whole tree out, fresh (a module that just booted into its nvpmodel mode)."""
        r = self.root
        m = self.module
        base = r / "sys/firmware/devicetree/base"
        write_atomic(base / "model", m.model + "\x00")
        write_atomic(base / "compatible", "".join(f"{entry}\x00" for entry in m.compatible))
        write_atomic(base / "serial-number", serial + "\x00")
        write_atomic(base / "bus@0/gpu@17000000/name", "gpu\x00")
        _link(r / "proc/device-tree", "../sys/firmware/devicetree/base")
        write_atomic(r / "etc/nv_tegra_release", L4T_RELEASE)
        write_atomic(r / f"etc/nvpmodel/nvpmodel_{m.module_part}.conf", nvpmodel_conf(m))
        _link(r / "etc/nvpmodel.conf", f"nvpmodel/nvpmodel_{m.module_part}.conf")
        if not (r / NVPMODEL_STATUS).is_file():
            write_atomic(r / NVPMODEL_STATUS, f"pmode:{m.default_mode:04d} fmode:quiet\n", 0o644)
        _link(r / GPU_DEVICE / "of_node", "../../../../firmware/devicetree/base/bus@0/gpu@17000000")
        devfreq = r / GPU_DEVFREQ
        _link(devfreq / "device", "../../../17000000.gpu")
        write_atomic(devfreq / "available_frequencies", " ".join(map(str, self.opps)) + "\n")
        write_atomic(devfreq / "available_governors", "nvhost_podgov userspace performance simple_ondemand\n")
        write_atomic(r / GPU_DEVICE / "railgate_enable", "1\n")
        self._boot_controls()
        for number, kind in enumerate(THERMAL_ZONES):
            zone = r / f"sys/devices/virtual/thermal/thermal_zone{number}"
            write_atomic(zone / "type", kind + "\n")
            _link(r / f"sys/class/thermal/thermal_zone{number}", f"../../devices/virtual/thermal/thermal_zone{number}")
        for number, (address, rails) in enumerate(m.rails, start=1):
            device = r / I2C_BUS / address
            write_atomic(device / "name", "ina3221\n")
            hwmon = device / "hwmon" / f"hwmon{number}"
            write_atomic(hwmon / "name", "ina3221\n")
            for channel, rail in enumerate(rails, start=1):
                write_atomic(hwmon / f"in{channel}_label", rail.label + "\n")
                write_atomic(hwmon / f"curr{channel}_crit", "32760\n", 0o644)
                write_atomic(hwmon / f"curr{channel}_max", "32760\n", 0o644)
            _link(r / "sys/bus/i2c/devices" / address, f"../../../devices/platform/bus@0/c240000.i2c/i2c-1/{address}")
            _link(r / f"sys/class/hwmon/hwmon{number}",
                  f"../../devices/platform/bus@0/c240000.i2c/i2c-1/{address}/hwmon/hwmon{number}")
        self.tick()

    def _boot_controls(self) -> None:
        """The devfreq range the nvpmodel mode in force sets at boot, and the control files' mode."""
        cap = self.mode_cap_hz(self.mode_id())
        self.min_hz, self.max_hz = self.opps[0], cap
        self._physics_range = None  # a rebooted board has no locked clocks: give it the range again
        devfreq = self.root / GPU_DEVFREQ
        mode = 0o444 if self.readonly_controls else 0o644
        for name, value in (("min_freq", self.min_hz), ("max_freq", self.max_hz), ("governor", "nvhost_podgov")):
            path = devfreq / name
            if path.exists():
                os.chmod(path, 0o644)
            path.write_text(f"{value}\n")
            os.chmod(path, mode)

    def mode_id(self) -> int:
        try:
            text = (self.root / NVPMODEL_STATUS).read_text()
            return int(text.split("pmode:", 1)[1].split()[0])
        except (OSError, IndexError, ValueError):
            return self.module.default_mode

    def mode_cap_hz(self, mode_id: int) -> int:
        for mode in self.module.modes:
            if mode.id == mode_id and mode.gpu_max_hz > 0:
                return min(mode.gpu_max_hz, self.opps[-1])
        return self.opps[-1]

    def reboot(self) -> None:
        """A fresh boot: the devfreq range of the persisted nvpmodel mode, the GPU node back."""
        self._boot_controls()
        self.tick()

    # ----- the kernel's tick -------------------------------------------------------------------

    def tick(self) -> None:
        self._take_controls()
        self.gpu.advance()
        self._render()

    def _take_controls(self) -> None:
        """Validate the devfreq control files as devfreq does and give the physics the range."""
        devfreq = self.root / GPU_DEVFREQ
        requested_max, seen_max = self._requested(devfreq / "max_freq", self.max_hz)
        requested_min, seen_min = self._requested(devfreq / "min_freq", self.min_hz)
        high = self.opps[-1] if requested_max == 0 else min(max(requested_max, self.opps[0]), self.opps[-1])
        low = min(max(requested_min, self.opps[0]), self.opps[-1])
        low = min(low, high)
        for name, value, seen in (("max_freq", high, seen_max), ("min_freq", low, seen_min)):
            self._put_back(devfreq / name, value, seen)
        self.min_hz, self.max_hz = low, high
        if (low, high) != self._physics_range:
            self._physics_range = (low, high)
            # the OPPs the governor may pick: the highest at or below the cap, the lowest at or above the floor
            cap = max(hz for hz in self.opps if hz <= high)
            floor = min((hz for hz in self.opps if hz >= low), default=cap)
            if (floor, cap) == (self.opps[0], self.opps[-1]):
                self.gpu.reset_clocks()
            else:
                self.gpu.lock_clocks(to_mhz(min(floor, cap)), to_mhz(cap))

    @staticmethod
    def _requested(path: Path, previous: int) -> tuple[int, str]:
        """What was last written (and the text seen); an unparsable value keeps `previous`: the
        real kernel refuses such a write with EINVAL, and nothing changes."""
        try:
            text = path.read_text()
        except OSError:
            return previous, ""
        try:
            return int(text.split()[0]), text
        except (ValueError, IndexError):
            return previous, text

    @staticmethod
    def _put_back(path: Path, value: int, seen: str) -> None:
        """Show the effective value (keeping the file's mode), unless it already shows it or
        something new was written since we read it (the next tick takes that). In one rename, as a
        sysfs read is atomic: a reader never sees the file emptied half-way through."""
        text = f"{value}\n"
        try:
            current = path.read_text()
            if current == text or current != seen:
                return
            write_atomic(path, text, path.stat().st_mode & 0o777)
        except OSError:
            pass

    def _render(self) -> None:
        r = self.root
        gpu = self.gpu
        if gpu.lost:
            if CLASS_DEVFREQ.name in os.listdir(r / CLASS_DEVFREQ.parent):
                (r / CLASS_DEVFREQ).unlink()
        elif not (r / CLASS_DEVFREQ).is_symlink():
            _link(r / CLASS_DEVFREQ, "../../devices/platform/bus@0/17000000.gpu/devfreq/17000000.gpu")
        devfreq = r / GPU_DEVFREQ
        clock_hz = self.hz_of_mhz.get(gpu.reported_sm_clock_mhz, gpu.reported_sm_clock_mhz * MHZ)
        write_atomic(r / GPU_DEVICE / "load", f"{round(gpu.load_pct * 10)}\n")
        write_atomic(devfreq / "cur_freq", f"{clock_hz}\n")
        write_atomic(devfreq / "target_freq", f"{clock_hz}\n")
        gpu_mc = round(gpu.temperature_c * 1000)
        soc_mc = round((gpu.ambient_c + gpu.temperature_c) / 2 * 1000)
        temps = {"cpu-thermal": soc_mc + 500, "gpu-thermal": gpu_mc, "cv0-thermal": soc_mc,
                 "soc0-thermal": soc_mc, "tj-thermal": max(gpu_mc, soc_mc + 500)}
        for number, kind in enumerate(THERMAL_ZONES):
            write_atomic(r / f"sys/devices/virtual/thermal/thermal_zone{number}/temp", f"{temps[kind]}\n")
        self._render_rails()
        self._render_memory()

    def rail_watts(self) -> dict[str, float]:
        """Each rail's power now: the GPU rail is the physics' board power; the rest a baseline."""
        m = self.module
        gpu_w = self.gpu.power_w
        load = self.gpu.load_pct / 100
        other = m.other_rails_w * (1 + 0.3 * load)
        watts = {m.gpu_rail: gpu_w, "VDD_SOC": other * 0.4, "VDD_CPU_CV": other * 0.4,
                 "VIN_SYS_5V0": other * 0.3, "VDDQ_VDD2_1V8AO": other * 0.2}
        watts["VDD_IN"] = gpu_w + other
        return watts

    def _render_rails(self) -> None:
        watts = self.rail_watts()
        for number, (address, rails) in enumerate(self.module.rails, start=1):
            hwmon = self.root / I2C_BUS / address / "hwmon" / f"hwmon{number}"
            for channel, rail in enumerate(rails, start=1):
                milliamps = 0 if rail.label == "NC" else round(watts.get(rail.label, 0.0) * 1e6 / rail.millivolts)
                write_atomic(hwmon / f"in{channel}_input", f"{rail.millivolts}\n")
                write_atomic(hwmon / f"curr{channel}_input", f"{milliamps}\n")

    def _render_memory(self) -> None:
        gpu = self.gpu
        total_kib = gpu.profile.memory_total_mib * 1024
        nvmap_kib = gpu.memory_used_mib * 1024
        free_kib = max(0, total_kib - OS_RESIDENT_KIB - nvmap_kib)
        cached_kib = min(free_kib // 4, 2_000_000)
        lines = {"MemTotal": total_kib, "MemFree": free_kib - cached_kib, "MemAvailable": free_kib,
                 "Buffers": 40_000, "Cached": cached_kib, "SwapCached": 0, "SwapTotal": total_kib // 2,
                 "SwapFree": total_kib // 2, "NvMapMemFree": 0, "NvMapMemUsed": nvmap_kib}
        write_atomic(self.root / "proc/meminfo", "".join(f"{key + ':':<16}{value:>8} kB\n"
                                                          for key, value in lines.items()))
        table = ["CLIENT                        PROCESS      PID        SIZE"]
        for process in gpu.processes:
            table.append(f"{'user':<30}{'python3':<13}{process.pid:<11}{process.used_memory_mib * 1024}K")
        total = sum(p.used_memory_mib for p in gpu.processes) * 1024
        table.append(f"{'total':<54}{total}K")
        for name in ("maps", "clients"):
            write_atomic(self.root / "sys/kernel/debug/nvmap/iovmm" / name, "\n".join(table) + "\n")
