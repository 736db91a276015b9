"""Where an Intel GPU's files are under the kernel's sysfs, and reading and writing them.

The layout (kernel_abi.md in this directory has the ABI excerpts and where they come from):

* `sys/class/drm/cardN` -> the DRM minor; `cardN/device` -> the PCI function
  (`sys/bus/pci/devices/<domain:bus:dev.fn>`), whose `driver` link names `i915` or `xe`. Render nodes
  (`renderD128`) and connectors (`card0-DP-1`) are skipped.
* hwmon: `<pci>/hwmon/hwmonK/` with `name` "i915" or "xe" (i915 may add per-GT "i915_gtN" ones):
  power1_max (µW, RW), power1_rated_max (µW, the default TDP), energy1_input (µJ), temp*_input (m°C).
* GT frequency: i915 `cardN/gt_{act,cur,min,max,RP0,RPn}_freq_mhz` (min/max writable; on a
  multi-GT card the card-level files act on every GT); xe `<pci>/tileT/gtG/freq0/{act,cur,min,max,
  rp0,rpn}_freq` per GT.
* VRAM size: xe `<pci>/tileT/physical_vram_size_bytes` (per tile; not on every kernel); i915 from
  Intel's backport driver (the one Intel ships for Flex and Max), `cardN/lmem_total_bytes`;
  mainline i915 publishes no size (then the figure is missing).

A card whose PCI function vanished (fell off the bus, was removed) is addressed by its PCI address
and found again when it comes back, whatever `cardN` number it gets then.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from edge.devices.intel.ids import DRIVERS, INTEL_PCI_VENDOR

_CARD = re.compile(r"^card\d+$")
_TEMP_INPUT = re.compile(r"^temp(\d+)_input$")
FREQ_STEP_MHZ = 50  # GT frequency granularity on Xe-HPG/HPC (the RPS ratio unit is 50 MHz)

# xe hwmon temperature channels (sysfs-driver-intel-xe-hwmon, 6.15): temp2 package, temp3 VRAM;
# i915 (6.12+ on DG2/ATS-M) exposes the package temperature as temp1.
PACKAGE_TEMP_LABELS = ("pkg", "package")
VRAM_TEMP_LABELS = ("vram",)
_DEFAULT_PACKAGE_TEMP = {"i915": 1, "xe": 2}
_DEFAULT_VRAM_TEMP = {"xe": 3}


@dataclass
class FreqFiles:
    """One GT's frequency files, by role (act, cur, min, max, rp0, rpn)."""

    directory: Path
    names: dict[str, str]

    def path(self, role: str) -> Path:
        return self.directory / self.names[role]


I915_FREQ_NAMES = {"act": "gt_act_freq_mhz", "cur": "gt_cur_freq_mhz", "min": "gt_min_freq_mhz",
                   "max": "gt_max_freq_mhz", "rp0": "gt_RP0_freq_mhz", "rpn": "gt_RPn_freq_mhz"}
XE_FREQ_NAMES = {"act": "act_freq", "cur": "cur_freq", "min": "min_freq", "max": "max_freq",
                 "rp0": "rp0_freq", "rpn": "rpn_freq"}


@dataclass
class IntelCard:
    """One Intel GPU's files, found under `root`."""

    pci: str  # "0000:03:00.0"
    device_id: int
    driver: str  # "i915" or "xe"
    device_dir: Path  # <root>/sys/bus/pci/devices/<pci>
    card_dir: Path  # <root>/sys/class/drm/cardN
    hwmon_dir: Path
    freq: list[FreqFiles] = field(default_factory=list)  # the first is the primary GT
    package_temp: Path | None = None
    vram_temp: Path | None = None


def read_text(path: Path) -> str:
    with open(path, encoding="ascii", errors="replace") as handle:
        return handle.read().strip()


def read_int(path: Path) -> int:
    """An integer file ("150000000", "0x56c0"); ValueError when it holds something else."""
    return int(read_text(path), 0)


def write_control(path: Path, value: int) -> None:
    """Write a sysfs control file as `echo value > path` does.

    kernfs refuses a write to an attribute whose mode has no write bit with EACCES even for root
    (fs/kernfs/file.c kernfs_fop_open); a plain file does not, so the same rule is applied here
    before writing: the simulated tree marks refused control files 0444 (edge/sim/intel).
    """
    mode = path.stat().st_mode  # FileNotFoundError: the device went away
    if not mode & 0o222:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    with open(path, "w", encoding="ascii") as handle:
        handle.write(f"{value}\n")


def _driver_of(device_dir: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(device_dir / "driver"))
    except OSError:
        return None


def _hwmon_of(device_dir: Path, driver: str) -> Path | None:
    """The device-level hwmon directory: the one whose `name` is the driver's."""
    try:
        candidates = sorted((device_dir / "hwmon").iterdir())
    except OSError:
        return None
    for candidate in candidates:
        try:
            if read_text(candidate / "name") == driver:
                return candidate
        except OSError:
            continue
    return None


def _temperature_files(hwmon: Path, driver: str) -> tuple[Path | None, Path | None]:
    """The package and VRAM temperature inputs: by label where the driver labels them, else the
    channels the ABI documents for the driver."""
    channels: dict[int, Path] = {}
    try:
        names = os.listdir(hwmon)
    except OSError:
        return None, None
    for name in names:
        match = _TEMP_INPUT.match(name)
        if match:
            channels[int(match.group(1))] = hwmon / name
    package: Path | None = None
    vram: Path | None = None
    for channel, path in sorted(channels.items()):
        try:
            label = read_text(hwmon / f"temp{channel}_label").lower()
        except OSError:
            continue
        if package is None and label in PACKAGE_TEMP_LABELS:
            package = path
        elif vram is None and label in VRAM_TEMP_LABELS:
            vram = path
    if package is None:
        package = channels.get(_DEFAULT_PACKAGE_TEMP.get(driver, 1))
    if vram is None and driver in _DEFAULT_VRAM_TEMP:
        vram = channels.get(_DEFAULT_VRAM_TEMP[driver])
    return package, vram


def _freq_files(driver: str, device_dir: Path, card_dir: Path) -> list[FreqFiles]:
    if driver == "i915":
        files = FreqFiles(card_dir, I915_FREQ_NAMES)
        return [files] if files.path("max").exists() else []
    found = []
    for directory in sorted(device_dir.glob("tile[0-9]*/gt[0-9]*/freq0")):
        files = FreqFiles(directory, XE_FREQ_NAMES)
        if files.path("max").exists():
            found.append(files)
    return found


def _card_for(root: Path, card_dir: Path) -> IntelCard | None:
    """The IntelCard behind a `cardN` directory; None for another vendor's or driver's card."""
    device_dir_real = card_dir / "device"
    driver = _driver_of(device_dir_real)
    if driver not in DRIVERS:
        return None
    try:
        if read_int(device_dir_real / "vendor") != INTEL_PCI_VENDOR:
            return None
        device_id = read_int(device_dir_real / "device")
    except (OSError, ValueError):
        return None
    pci = os.path.basename(os.path.realpath(device_dir_real))
    device_dir = root / "sys/bus/pci/devices" / pci
    hwmon = _hwmon_of(device_dir, driver)
    if hwmon is None:
        return None  # an integrated GPU (no hwmon): not managed
    package, vram = _temperature_files(hwmon, driver)
    return IntelCard(pci=pci, device_id=device_id, driver=driver, device_dir=device_dir, card_dir=card_dir,
                     hwmon_dir=hwmon, freq=_freq_files(driver, device_dir, card_dir),
                     package_temp=package, vram_temp=vram)


def find_cards(root: Path) -> list[IntelCard]:
    """Every discrete Intel GPU bound to i915 or xe under `root` (one with a driver hwmon: an
    integrated GPU has none and is left alone), in PCI address order (stable indexes)."""
    drm = root / "sys/class/drm"
    try:
        names = sorted(name for name in os.listdir(drm) if _CARD.match(name))
    except OSError:
        return []
    cards: dict[str, IntelCard] = {}
    for name in names:
        card = _card_for(root, drm / name)
        if card is not None and card.pci not in cards:
            cards[card.pci] = card
    return [cards[pci] for pci in sorted(cards)]


def find_card(root: Path, pci: str) -> IntelCard | None:
    """The card at PCI address `pci`, if it is there (again): through the PCI function's drm/ dir."""
    device_dir = root / "sys/bus/pci/devices" / pci
    try:
        names = sorted(name for name in os.listdir(device_dir / "drm") if _CARD.match(name))
    except OSError:
        return None
    for name in names:
        card = _card_for(root, root / "sys/class/drm" / name)
        if card is not None and card.pci == pci:
            return card
    return None


def driver_loaded(root: Path, driver: str) -> bool:
    """Whether the kernel module still has its PCI driver registered (its sysfs dir exists)."""
    return (root / "sys/bus/pci/drivers" / driver).is_dir()


def vram_total_bytes(card: IntelCard) -> int | None:
    """VRAM size: xe's per-tile physical size summed, else the backport i915's lmem_total_bytes."""
    if card.driver == "xe":
        tiles = sorted(card.device_dir.glob("tile[0-9]*/physical_vram_size_bytes"))
        if tiles:
            return sum(read_int(tile) for tile in tiles)
        return None
    path = card.card_dir / "lmem_total_bytes"
    return read_int(path) if path.exists() else None


def driver_version(root: Path, driver: str) -> str:
    """The module's version where it has one (Intel's backport DKMS driver), else the kernel's."""
    try:
        return f"{driver} {read_text(root / 'sys/module' / driver / 'version')}"
    except OSError:
        pass
    try:
        return f"{driver} (kernel {read_text(root / 'proc/sys/kernel/osrelease')})"
    except OSError:
        return driver
