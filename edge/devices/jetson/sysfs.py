"""Where a Jetson keeps what jetson-stats (jtop) reads, and how to parse it. Pure file reading.

Every path is relative to a root directory (the host's `/`, or a simulated tree), and follows
jetson-stats 7.2.2 (rbonghi/jetson_stats, jtop/core/):

* gpu.py `find_igpu` / `igpu_read_status` / `igpu_read_freq`: the GPU is the devfreq device in
  `sys/class/devfreq/` whose `device/of_node/name` is a known GPU (ga10b, gv11b, gb10b, gpu); its
  load is `<device>/load` in per-mille (jtop divides by 10), its frequencies `cur_freq`,
  `min_freq`, `max_freq` in Hz in the devfreq directory. Thor's GPC domain is
  `sys/class/devfreq/gpu-gpc-0` (gpu.py `THOR_GPC`), without a load file.
* temperature.py `get_virtual_thermal_temperature`: `sys/devices/virtual/thermal/thermal_zone*/
  {type,temp}`, temp in millidegrees; the GPU zone's type is "gpu-thermal" (Orin) or "GPU-therm"
  (Xavier): jtop names a zone by its type up to the first '-'.
* power.py `find_all_i2c_power_monitor` / `list_all_i2c_ports` / `list_all_ina238_ports`:
  `sys/bus/i2c/devices/*/name` containing "ina3221" or "ina238", then the first directory of
  `<device>/hwmon/`; INA3221 channels by `in<N>_label` (labels containing "NC" and channel 7, the
  sum of shunt voltages, skipped), `in<N>_input` mV and `curr<N>_input` mA; INA238 (Thor's carrier
  board) `in1_input` mV, `curr1_input` mA, `power1_input` µW, named VIN.
* memory.py `meminfo`: `proc/meminfo` ("Key:  value kB"); the GPU's share of the shared RAM is
  `NvMapMemUsed`.
* processes.py `read_process_table`: the nvmap debugfs table `sys/kernel/debug/nvmap/iovmm/maps`
  (lines "user process pid sizeK", then "total sizeK"); `clients` in the same directory has the
  same summary lines.
* nvpmodel.py `nvpmodel_query`: `nvpmodel -q` prints "NV Power Mode: <NAME>" and the mode ID on
  the next line; the modes themselves are in `etc/nvpmodel.conf` ("< POWER_MODEL ID=n NAME=x >"
  blocks with "GPU MAX_FREQ <Hz>" lines, "< PM_CONFIG DEFAULT=n >").
* jetson_variables.py: `etc/nv_tegra_release` ("# R36 (release), REVISION: 4.3, ..."),
  `sys/firmware/devicetree/base/{model,compatible,serial-number}`.

The devfreq files follow the kernel ABI (Documentation/ABI/testing/sysfs-class-devfreq):
`available_frequencies` lists the OPPs in Hz; writing `min_freq`/`max_freq` sets a user request
the kernel clamps to the OPP table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEVFREQ = Path("sys/class/devfreq")
THOR_GPC = "gpu-gpc-0"
KNOWN_GPU_NAMES = frozenset({"gv11b", "gp10b", "ga10b", "gb10b", "gpu"})
THERMAL = Path("sys/devices/virtual/thermal")
GPU_THERMAL_TYPES = ("gpu-thermal", "GPU-therm")
I2C_DEVICES = Path("sys/bus/i2c/devices")
MEMINFO = Path("proc/meminfo")
NVMAP_TABLES = (Path("sys/kernel/debug/nvmap/iovmm/maps"), Path("sys/kernel/debug/nvmap/iovmm/clients"))
NVPMODEL_CONF = Path("etc/nvpmodel.conf")
TEGRA_RELEASE = Path("etc/nv_tegra_release")
DEVICETREE = Path("sys/firmware/devicetree/base")
# The rail whose power is the GPU's figure, best first: AGX Orin's GPU+SOC rail, the GPU rail of
# AGX Xavier and of older modules, then Orin NX/Nano's (and Xavier NX's) CPU+GPU+CV rail.
GPU_RAILS = ("VDD_GPU_SOC", "VDD_GPU", "GPU", "VDD_CPU_GPU_CV")
# devicetree SoC -> our platform name
PLATFORMS = {"nvidia,tegra234": "jetson-orin", "nvidia,tegra194": "jetson-xavier",
             "nvidia,tegra264": "jetson-thor"}
ARCHITECTURES = {"jetson-orin": "ampere", "jetson-xavier": "volta", "jetson-thor": "blackwell"}

_MEMINFO_LINE = re.compile(r"^(?P<key>[^:]+):\s+(?P<value>\d+)(?:\s+(?P<unit>\w)B)?")
_NVMAP_LINE = re.compile(r"^(?P<user>\w+)\s+(?P<process>\S+)\s+(?P<pid>\d+)\s+(?P<size>\d+)(?P<unit>[KMG])\s*$")
_POWER_MODEL = re.compile(r"<\s*POWER_MODEL\s+ID=(?P<id>\d+)\s+NAME=(?P<name>\S+?)\s*>")
_PM_CONFIG = re.compile(r"<\s*PM_CONFIG\s+DEFAULT=(?P<id>\d+)\s*>")
_POWER_MODE = re.compile(r"NV Power Mode:\s*(?P<name>\S+)")
_BUDGET = re.compile(r"(?P<watts>\d+(?:\.\d+)?)W", re.IGNORECASE)
_RELEASE = re.compile(r"R(?P<major>\d+)\s*\(release\),\s*REVISION:\s*(?P<revision>[\d.]+)")
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3}


def read_text(path: Path) -> str:
    """A sysfs/procfs file's content without the trailing newline or devicetree NULs."""
    return path.read_text(errors="replace").strip().strip("\x00")


def read_int(path: Path) -> int:
    return int(read_text(path).split()[0])


@dataclass(frozen=True)
class GpuNode:
    """The GPU's devfreq node: `devfreq` as listed under sys/class/devfreq (its disappearance means
    the GPU is gone), `device` the platform device directory that holds `load`."""

    name: str  # of_node name: ga10b (Orin), gv11b (Xavier), gpu (JetPack 6), gpu-gpc-0 (Thor)
    devfreq: Path
    device: Path

    @property
    def present(self) -> bool:
        return self.devfreq.is_dir()


def find_gpu(root: Path) -> GpuNode | None:
    """The integrated GPU's devfreq node, as jtop's find_igpu finds it; None when there is none."""
    base = root / DEVFREQ
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return None
    for entry in entries:
        if entry.name == THOR_GPC:  # Thor's GPC domain (jtop gpu.py _thor_gpc_freq): no load file
            return GpuNode(THOR_GPC, entry, entry.resolve())
        try:
            name = read_text(entry / "device" / "of_node" / "name")
        except OSError:
            continue
        if name.lower() in KNOWN_GPU_NAMES or "gpu" in name.lower():
            return GpuNode(name, entry, (entry / "device").resolve())
    return None


def available_frequencies_hz(node: GpuNode) -> list[int]:
    """The OPP table, ascending (the kernel lists it ascending on Tegra)."""
    return sorted(int(value) for value in read_text(node.devfreq / "available_frequencies").split())


def find_gpu_thermal_zone(root: Path) -> Path | None:
    """The `temp` file of the GPU's thermal zone."""
    base = root / THERMAL
    try:
        zones = sorted(p for p in base.iterdir() if p.name.startswith("thermal_zone"))
    except OSError:
        return None
    for zone in zones:
        try:
            kind = read_text(zone / "type")
        except OSError:
            continue
        if kind in GPU_THERMAL_TYPES or kind.split("-")[0].lower() == "gpu":
            return zone / "temp"
    return None


@dataclass(frozen=True)
class RailFiles:
    """One power rail's hwmon files: bus voltage (mV) and current (mA), or power (µW, INA238)."""

    label: str
    volt: Path | None
    curr: Path | None
    power_uw: Path | None = None

    def watts(self) -> float:
        if self.power_uw is not None:
            return read_int(self.power_uw) / 1e6
        if self.volt is None or self.curr is None:
            raise OSError(f"rail {self.label} has neither power nor voltage and current")
        return read_int(self.volt) * read_int(self.curr) / 1e6


def _hwmon_dir(device: Path) -> Path | None:
    try:
        entries = sorted(p for p in (device / "hwmon").iterdir() if p.is_dir())
    except OSError:
        return None
    return entries[0] if entries else None


def _ina3221_rails(hwmon: Path) -> dict[str, RailFiles]:
    rails: dict[str, RailFiles] = {}
    for label_file in sorted(hwmon.glob("in*_label")):
        try:
            channel = int(label_file.name.split("_")[0].removeprefix("in"))
            label = read_text(label_file)
        except (OSError, ValueError):
            continue
        if "NC" in label or channel == 7:  # unconnected; the sum of shunt voltages
            continue
        volt, curr = hwmon / f"in{channel}_input", hwmon / f"curr{channel}_input"
        rails[label] = RailFiles(label, volt if volt.is_file() else None,
                                 curr if curr.is_file() else None)
    return rails


def find_rails(root: Path) -> dict[str, RailFiles]:
    """Every INA3221/INA238 rail on the module, by label."""
    rails: dict[str, RailFiles] = {}
    try:
        devices = sorted((root / I2C_DEVICES).iterdir())
    except OSError:
        return rails
    for device in devices:
        try:
            driver = read_text(device / "name").lower()
        except OSError:
            continue
        if "ina3221" not in driver and "ina238" not in driver:
            continue
        hwmon = _hwmon_dir(device)
        if hwmon is None:
            continue
        if "ina238" in driver:
            power = hwmon / "power1_input"
            rails["VIN"] = RailFiles("VIN", hwmon / "in1_input", hwmon / "curr1_input",
                                     power if power.is_file() else None)
        else:
            rails.update(_ina3221_rails(hwmon))
    return rails


def gpu_rail(rails: dict[str, RailFiles]) -> RailFiles | None:
    for label in GPU_RAILS:
        if label in rails:
            return rails[label]
    return None


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> {key: bytes}."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        match = _MEMINFO_LINE.match(line.strip())
        if match:
            unit = match["unit"]
            values[match["key"]] = int(match["value"]) * (_UNITS.get(unit.upper(), 1) if unit else 1)
    return values


@dataclass(frozen=True)
class NvmapClient:
    pid: int
    process: str
    size_bytes: int


def parse_nvmap(text: str) -> list[NvmapClient]:
    """The nvmap debugfs table: one client per process line ("total" and headers skipped)."""
    clients = []
    for line in text.splitlines():
        match = _NVMAP_LINE.match(line.strip())
        if match:
            clients.append(NvmapClient(int(match["pid"]), match["process"],
                                       int(match["size"]) * _UNITS[match["unit"]]))
    return clients


@dataclass(frozen=True)
class NvpMode:
    """One nvpmodel mode from nvpmodel.conf. `budget_w` from its name ("MODE_15W" -> 15; MAXN has
    none); `gpu_max_hz` its GPU MAX_FREQ (None: not set; -1: no cap)."""

    id: int
    name: str
    budget_w: float | None
    gpu_max_hz: int | None


def parse_nvpmodel_conf(text: str) -> tuple[list[NvpMode], int | None]:
    """(modes in ID order, the default mode ID) from /etc/nvpmodel.conf."""
    modes: list[NvpMode] = []
    default: int | None = None
    current: dict[str, object] | None = None

    def close() -> None:
        if current is not None:
            modes.append(NvpMode(**current))  # type: ignore[arg-type]

    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("<"):
            close()
            current = None
            if match := _POWER_MODEL.match(line):
                name = match["name"]
                budget = _BUDGET.search(name)
                current = {"id": int(match["id"]), "name": name,
                           "budget_w": float(budget["watts"]) if budget else None, "gpu_max_hz": None}
            elif match := _PM_CONFIG.match(line):
                default = int(match["id"])
            continue
        parts = line.split()
        if current is not None and len(parts) == 3 and parts[0] == "GPU" and parts[1] == "MAX_FREQ":
            current["gpu_max_hz"] = int(parts[2])
    close()
    return sorted(modes, key=lambda m: m.id), default


def parse_nvpmodel_query(output: str) -> tuple[str, int] | None:
    """`nvpmodel -q` -> (mode name, mode ID), as jtop's nvpmodel_query reads it."""
    lines = [line.strip() for line in output.splitlines()]
    for position, line in enumerate(lines):
        match = _POWER_MODE.search(line)
        if match and position + 1 < len(lines) and lines[position + 1].isdigit():
            return match["name"], int(lines[position + 1])
    return None


def l4t_release(root: Path) -> str | None:
    """"36.4.3" from etc/nv_tegra_release; None when absent or unreadable."""
    try:
        match = _RELEASE.search(read_text(root / TEGRA_RELEASE))
    except OSError:
        return None
    return f"{match['major']}.{match['revision']}" if match else None


def compatible(root: Path) -> list[str]:
    try:
        raw = (root / DEVICETREE / "compatible").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\x00") if part]


def platform_of(root: Path, gpu_name: str) -> str:
    """jetson-orin / jetson-xavier / jetson-thor, from the SoC in the devicetree or the GPU's name."""
    for entry in compatible(root):
        if entry in PLATFORMS:
            return PLATFORMS[entry]
    return {"ga10b": "jetson-orin", "gv11b": "jetson-xavier", THOR_GPC: "jetson-thor"}.get(gpu_name, "jetson")
