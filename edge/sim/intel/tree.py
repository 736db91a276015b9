"""The simulated Intel GPU's files, laid out as the kernel lays them out (edge/devices/intel/sysfs.py
reads them; kernel_abi.md there cites each file).

Under the tree's root:

    sys/devices/pci0000:00/<pci>/          the PCI function: vendor, device, class, numa_node,
        driver -> sys/bus/pci/drivers/<i915|xe>
        drm/cardN/ (device -> ../..)        i915: gt_{act,cur,min,max,RP0,RPn}_freq_mhz, lmem_total_bytes
        drm/renderD(128+N)/ (device -> ../..)
        hwmon/hwmonK/                       name, power1_max, power1_rated_max, power1_max_interval,
                                            energy1_input, in0_input, temp*_input (+ xe's labels)
        tile0/gt0/freq0/                    xe: {act,cur,min,max,rp0,rpn}_freq
        tile0/physical_vram_size_bytes      xe
    sys/bus/pci/devices/<pci> -> the function; sys/bus/pci/drivers/<driver>/<pci> -> the function
    sys/class/drm/cardN, renderD*, sys/class/hwmon/hwmonK -> into the function
    proc/<pid>/{comm, fd/<fd> -> /dev/dri/renderD*, fdinfo/<fd>}   DRM clients (drm-usage-stats)
    proc/sys/kernel/osrelease

Files the kernel rewrites are replaced atomically (write a temporary, rename), so a reader sees the
old or the new content, never half of it. Control files are 0644, or 0444 with permissions "none":
kernfs refuses a write to a file without write bits even for root, and the backend applies the same
rule to this tree of plain files (edge/devices/intel/sysfs.py write_control).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

INTEL_VENDOR = 0x8086
GPU_TIMESTAMP_HZ = 19_200_000  # xe's drm-total-cycles: the GPU timestamp (19.2 MHz reference clock)
COMPUTE_ENGINES = 4  # CCS engines of an ATS-M GPU: fdinfo's drm-engine-capacity-compute / -ccs
_OTHER_ENGINES = {"i915": (("render", 1), ("copy", 1), ("video", 2), ("video-enhance", 2)),
                  "xe": (("rcs", 1), ("bcs", 1), ("vcs", 2), ("vecs", 2))}
_COMPUTE = {"i915": "compute", "xe": "ccs"}
_I915_ROLE = {"rp0": "RP0", "rpn": "RPn"}  # i915's capitalised names: gt_RP0_freq_mhz, gt_RPn_freq_mhz
_VRAM_REGION = {"i915": "local0", "xe": "vram0"}
_SYSTEM_REGION = {"i915": "system0", "xe": "system"}


def put(path: Path, text: str, mode: int = 0o444) -> None:
    """Replace `path` atomically with `text` and `mode`."""
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_text(text if text.endswith("\n") else text + "\n", encoding="ascii")
    os.chmod(temporary, mode)
    os.replace(temporary, path)


class Writer:
    """`put` that skips a file whose content it already wrote (most files of an idle card do not
    change between ticks). `forget()` after the tree changed shape."""

    def __init__(self) -> None:
        self._written: dict[Path, str] = {}

    def put(self, path: Path, text: str, mode: int = 0o444) -> None:
        if self._written.get(path) != text:
            put(path, text, mode)
            self._written[path] = text

    def forget(self) -> None:
        self._written.clear()


def link(path: Path, target: str) -> None:
    if path.is_symlink():
        path.unlink()
    path.symlink_to(target)


@dataclass
class CardFiles:
    """Where one simulated card's files are."""

    root: Path
    index: int
    pci: str
    driver: str

    @property
    def card(self) -> str:
        return f"card{self.index}"

    @property
    def render(self) -> str:
        return f"renderD{128 + self.index}"

    @property
    def hwmon_name(self) -> str:
        return f"hwmon{2 + self.index}"  # hwmon0/1: the CPU's sensors on a real host

    @property
    def function(self) -> Path:
        return self.root / "sys/devices/pci0000:00" / self.pci

    @property
    def hwmon(self) -> Path:
        return self.function / "hwmon" / self.hwmon_name

    @property
    def card_dir(self) -> Path:
        return self.function / "drm" / self.card

    @property
    def freq_dir(self) -> Path:
        return self.card_dir if self.driver == "i915" else self.function / "tile0/gt0/freq0"

    def freq(self, role: str) -> Path:
        """act, cur, min, max, rp0, rpn -> the file of this driver's naming."""
        if self.driver == "i915":
            return self.freq_dir / f"gt_{_I915_ROLE.get(role, role)}_freq_mhz"
        return self.freq_dir / f"{role}_freq"

    def class_links(self) -> list[Path]:
        return [self.root / "sys/class/drm" / self.card, self.root / "sys/class/drm" / self.render,
                self.root / "sys/class/hwmon" / self.hwmon_name, self.root / "sys/bus/pci/devices" / self.pci,
                self.root / "sys/bus/pci/drivers" / self.driver / self.pci]


@dataclass
class StaticFacts:
    device_id: int
    vram_bytes: int
    rated_uw: int
    rpn_mhz: int
    rp0_mhz: int
    numa_node: int = -1


def create_card(files: CardFiles, facts: StaticFacts, control_mode: int) -> None:
    """The card's directories, links and files that do not change while it is there."""
    function = files.function
    for directory in (files.card_dir, function / "drm" / files.render, files.hwmon, files.freq_dir):
        directory.mkdir(parents=True, exist_ok=True)
    driver_dir = files.root / "sys/bus/pci/drivers" / files.driver
    driver_dir.mkdir(parents=True, exist_ok=True)
    put(function / "vendor", f"0x{INTEL_VENDOR:04x}")
    put(function / "device", f"0x{facts.device_id:04x}")
    put(function / "class", "0x038000")  # display controller (a Flex has no display outputs)
    put(function / "numa_node", str(facts.numa_node))
    link(function / "driver", f"../../../bus/pci/drivers/{files.driver}")
    for node in (files.card, files.render):
        link(function / "drm" / node / "device", "../..")
    put(files.card_dir / "dev", f"226:{files.index}")
    link(files.hwmon / "device", "../..")
    put(files.hwmon / "name", files.driver)
    put(files.hwmon / "power1_rated_max", str(facts.rated_uw))
    put(files.hwmon / "power1_max_interval", "1000", control_mode)
    if files.driver == "xe":
        put(files.hwmon / "temp2_label", "pkg")
        put(files.hwmon / "temp3_label", "vram")
        put(function / "tile0/physical_vram_size_bytes", str(facts.vram_bytes))
    else:
        put(files.hwmon / "curr1_crit", "0", control_mode)  # server parts: I1 in mA
        put(files.card_dir / "lmem_total_bytes", str(facts.vram_bytes))  # Intel's backport i915
    put(files.freq("rp0"), str(facts.rp0_mhz))
    put(files.freq("rpn"), str(facts.rpn_mhz))
    relative = {"sys/class/drm": f"../../devices/pci0000:00/{files.pci}/drm/",
                "sys/class/hwmon": f"../../devices/pci0000:00/{files.pci}/hwmon/"}
    link(files.root / "sys/class/drm" / files.card, relative["sys/class/drm"] + files.card)
    link(files.root / "sys/class/drm" / files.render, relative["sys/class/drm"] + files.render)
    link(files.root / "sys/class/hwmon" / files.hwmon_name, relative["sys/class/hwmon"] + files.hwmon_name)
    link(files.root / "sys/bus/pci/devices" / files.pci, f"../../../devices/pci0000:00/{files.pci}")
    link(driver_dir / files.pci, f"../../../../devices/pci0000:00/{files.pci}")


def remove_card(files: CardFiles) -> None:
    """The PCI function is gone: its directory and every link to it."""
    for path in files.class_links():
        if path.is_symlink():
            path.unlink()
    shutil.rmtree(files.function, ignore_errors=True)


def prepare_root(root: Path, osrelease: str) -> None:
    for directory in ("sys/class/drm", "sys/class/hwmon", "sys/bus/pci/devices", "sys/bus/pci/drivers",
                      "sys/devices/pci0000:00", "proc/sys/kernel"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    put(root / "proc/sys/kernel/osrelease", osrelease)


@dataclass
class SimClient:
    """One DRM client (an open render node) of one process on one card."""

    pid: int
    client_id: int
    fd: int
    comm: str
    util_pct: float
    vram_bytes: int
    busy_ns: float = 0.0  # over all compute engines
    busy_cycles: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)


def fdinfo_text(client: SimClient, files: CardFiles, timestamp_cycles: int) -> str:
    """The fdinfo of `client` as i915 or xe prints it (drm-usage-stats.rst; xe_drm_client.c)."""
    driver = files.driver
    kib = client.vram_bytes // 1024
    lines = ["pos:\t0", "flags:\t02100002", "mnt_id:\t26", f"ino:\t{1000 + client.fd}",
             f"drm-driver:\t{driver}", f"drm-client-id:\t{client.client_id}", f"drm-pdev:\t{files.pci}"]
    for region, size in ((_SYSTEM_REGION[driver], 64 * 1024), (_VRAM_REGION[driver], kib)):
        lines += [f"drm-total-{region}:\t{size} KiB", f"drm-shared-{region}:\t0",
                  f"drm-active-{region}:\t0", f"drm-resident-{region}:\t{size} KiB"]
    compute = _COMPUTE[driver]
    if driver == "i915":
        for engine, capacity in _OTHER_ENGINES[driver]:
            lines.append(f"drm-engine-{engine}:\t0 ns")
            if capacity > 1:
                lines.append(f"drm-engine-capacity-{engine}:\t{capacity}")
        lines += [f"drm-engine-{compute}:\t{int(client.busy_ns)} ns",
                  f"drm-engine-capacity-{compute}:\t{COMPUTE_ENGINES}"]
    else:
        for engine, capacity in _OTHER_ENGINES[driver]:
            lines += [f"drm-cycles-{engine}:\t0", f"drm-total-cycles-{engine}:\t{timestamp_cycles}"]
            if capacity > 1:
                lines.append(f"drm-engine-capacity-{engine}:\t{capacity}")
        lines += [f"drm-cycles-{compute}:\t{int(client.busy_cycles)}",
                  f"drm-total-cycles-{compute}:\t{timestamp_cycles}",
                  f"drm-engine-capacity-{compute}:\t{COMPUTE_ENGINES}"]
    return "\n".join(lines)


def write_client(root: Path, client: SimClient, files: CardFiles, timestamp_cycles: int, writer: Writer) -> None:
    process = root / "proc" / str(client.pid)
    fd_link = process / "fd" / str(client.fd)
    if not fd_link.is_symlink():
        (process / "fd").mkdir(parents=True, exist_ok=True)
        (process / "fdinfo").mkdir(parents=True, exist_ok=True)
        put(process / "comm", client.comm)
        link(fd_link, f"/dev/dri/{files.render}")
    writer.put(process / "fdinfo" / str(client.fd), fdinfo_text(client, files, timestamp_cycles))


def remove_client(root: Path, client: SimClient) -> None:
    process = root / "proc" / str(client.pid)
    for path in (process / "fd" / str(client.fd), process / "fdinfo" / str(client.fd)):
        if path.is_symlink() or path.exists():
            path.unlink()
    try:
        if not os.listdir(process / "fd"):
            shutil.rmtree(process, ignore_errors=True)
    except OSError:
        pass
