"""The Intel backend: Data Center GPU Flex / Max and Arc through the kernel's i915 / xe sysfs files.

Why sysfs and not Level Zero Sysman (`pyzes`): the hwmon and GT frequency files are the kernel's
stable ABI, need no Level Zero loader or compute runtime on the edge node, and are what Sysman
itself reads underneath; per-process use comes from DRM fdinfo, which Sysman does not give.

What it reads and writes (kernel_abi.md in this directory cites each file):

* power: there is no instantaneous power file on these parts; `power_w` is the rate of the
  `energy1_input` counter (µJ) between two samples (the first after open uses a reading taken at
  open or inventory time); `energy_mj` is that counter / 1000;
* the power cap is hwmon `power1_max` (PL1, µW): the kernel takes any value (0 disables the limit)
  and the hardware clamps it to its SKU range, so a cap outside (0, power1_rated_max] is refused
  here with the range, and a cap whose read-back differs is refused with what took;
* clocks: `gt_min/max_freq_mhz` (i915) or `freq0/min_freq`, `max_freq` (xe) within RPn..RP0, in the
  order that keeps min <= max at every step (i915 answers EINVAL otherwise);
* utilisation and per-process use: DRM fdinfo of every process holding the card (fdinfo.py);
* no ECC, row remapping, XID or throttle-reason figures: those are listed missing.

Synchronous and not thread-safe, like every backend (the daemon's DriverRunner thread calls it).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge.devices.base import (
    BackendName,
    Capability,
    DriverError,
    DriverRefused,
    DriverUnavailable,
    MissingFigures,
    Vendor,
)
from edge.devices.intel import fdinfo, ids, sysfs
from edge.devices.intel.sysfs import FREQ_STEP_MHZ, IntelCard
from shared.gpu import GpuInventory, GpuSample, ProcessSample
from shared.logs import get_logger

log = get_logger(__name__)

MICRO = 1_000_000
# The kernel exposes no minimum for power1_max: the hardware clamps silently to its SKU minimum
# ("typical but not guaranteed", i915_hwmon.c). kgpu offers caps down to this share of the rated
# power, a floor the policy can plan with; the read-back tells when the hardware clamped anyway.
MIN_CAP_SHARE = 0.4
CAP_TOLERANCE_W = 0.5  # the PL1 register's unit is 1/8 W: a read-back this close has taken
MIN_RATE_INTERVAL_S = 0.05  # a shorter interval between energy readings gives no usable rate
PROCESS_SCAN_REUSE_S = 0.25  # one /proc scan serves every card sampled in the same cycle
# Figures the i915/xe sysfs has no file for: named in `missing` once per GPU.
NOT_EXPOSED = ("memory_util_pct", "memory_clock_mhz", "throttle_reasons", "ecc_sbe_volatile",
               "ecc_dbe_volatile", "remapped_rows_correctable", "remapped_rows_uncorrectable",
               "remap_pending", "remap_failure")


class _Lost(Exception):
    """Internal: the card's files vanished while being read."""


@dataclass
class _Reading:
    """The previous energy reading of a card, for the power rate."""

    t: float
    energy_uj: int


class IntelBackend:
    """The node's Intel GPUs (i915 or xe), found under `sysfs_root` (which holds sys/ and proc/)."""

    backend: BackendName = "intel"
    vendor: Vendor = "intel"

    def __init__(self, *, sysfs_root: Path | str = "/", wall_clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.root = Path(sysfs_root)
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        self.resource_name = ids.RESOURCE_BY_DRIVER["i915"]
        self._cards: list[IntelCard] = []
        self._present: list[bool] = []
        self._inventory: dict[int, GpuInventory] = {}
        self._energy: dict[int, _Reading] = {}
        self._power: dict[int, float] = {}
        self._clients_before: dict[int, tuple[float, dict[tuple[str, int], fdinfo.DrmClient]]] = {}
        self._scan: tuple[float, list[fdinfo.DrmClient]] | None = None
        self._missing = MissingFigures(log)
        self._open = False

    # ----- life cycle ----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        cards = sysfs.find_cards(self.root)
        if not cards:
            raise DriverUnavailable("ENODEV", f"no Intel GPU bound to i915 or xe under {self.root / 'sys/class/drm'}")
        self._cards = cards
        self._present = [True] * len(cards)
        self.resource_name = ids.RESOURCE_BY_DRIVER[cards[0].driver]
        for index in range(len(cards)):
            self._baseline(index)
        self._open = True

    def close(self) -> None:
        self._open = False
        self._energy.clear()
        self._clients_before.clear()
        self._scan = None

    def device_count(self) -> int:
        self._require_open()
        return len(self._cards)

    def _require_open(self) -> None:
        if not self._open:
            raise DriverUnavailable("ENODEV", "the Intel backend is not open")

    def _card(self, index: int) -> IntelCard:
        self._require_open()
        if not 0 <= index < len(self._cards):
            raise DriverError("EINVAL", f"no Intel GPU {index}; this node has {len(self._cards)}")
        return self._cards[index]

    def _reachable_card(self, index: int, action: str) -> IntelCard:
        """The card to change; DriverError ENODEV when it is lost (its PCI function is gone)."""
        card = self._card(index)
        if not card.device_dir.exists():
            raise DriverError("ENODEV", f"gpu {index}: {action}: the GPU is lost ({card.pci} is gone from sysfs)")
        return card

    # ----- identity ------------------------------------------------------------------------

    def known_uuid(self, index: int) -> str | None:
        card = self._cards[index] if 0 <= index < len(self._cards) else None
        return _uuid(card) if card is not None else None

    def uuid_of(self, index: int) -> str:
        return _uuid(self._card(index))

    def capabilities(self, index: int) -> frozenset[Capability]:
        card = self._card(index)
        found: set[Capability] = set()
        if (card.hwmon_dir / "power1_max").exists():
            found.add(Capability.POWER_LIMIT)
        if (card.hwmon_dir / "energy1_input").exists():
            found.add(Capability.ENERGY_COUNTER)
        if card.freq:
            found.add(Capability.CLOCK_LIMIT)
        return frozenset(found)

    # ----- reading -------------------------------------------------------------------------

    def _note_missing(self, index: int, figures: Sequence[str], why: str, missing: list[str]) -> None:
        self._missing.note(index, figures, why, missing)

    def _read_int(self, index: int, path: Path | None, figure: str, missing: list[str]) -> int | None:
        """An integer file; None and `missing` when the part has no such file; _Lost when the
        whole card went away meanwhile."""
        if path is None:
            self._note_missing(index, [figure], "no such file for this card", missing)
            return None
        try:
            return sysfs.read_int(path)
        except FileNotFoundError:
            if not self._cards[index].device_dir.exists():
                raise _Lost from None
            self._note_missing(index, [figure], f"{path.name} is absent", missing)
        except (OSError, ValueError) as exc:
            self._note_missing(index, [figure], f"{path.name}: {exc}", missing)
        return None

    def _hwmon(self, card: IntelCard, name: str) -> Path:
        return card.hwmon_dir / name

    def _freq_range(self, card: IntelCard) -> tuple[int, int] | None:
        """RPn..RP0 of the primary GT."""
        if not card.freq:
            return None
        try:
            return sysfs.read_int(card.freq[0].path("rpn")), sysfs.read_int(card.freq[0].path("rp0"))
        except (OSError, ValueError):
            return None

    def _baseline(self, index: int) -> None:
        """An energy reading to rate the first sample's power against."""
        energy = self._hwmon(self._cards[index], "energy1_input")
        try:
            self._energy[index] = _Reading(self._monotonic(), sysfs.read_int(energy))
        except (OSError, ValueError):
            self._energy.pop(index, None)

    def inventory(self) -> list[GpuInventory]:
        self._require_open()
        entries = []
        for index, card in enumerate(self._cards):
            try:
                entry = self._inventory_of(index, card)
            except _Lost:
                log.warning("gpu %d is lost; keeping its last known inventory", index, extra={"gpu": index})
                if index in self._inventory:
                    entries.append(self._inventory[index])
                continue
            self._inventory[index] = entry
            entries.append(entry)
            if index not in self._energy:
                self._baseline(index)
        return entries

    def _inventory_of(self, index: int, card: IntelCard) -> GpuInventory:
        missing: list[str] = []
        if not card.device_dir.exists():
            raise _Lost
        rated = self._read_int(index, self._hwmon(card, "power1_rated_max"), "power_limit_max_w", missing)
        rated_w = rated / MICRO if rated else None
        if rated_w is None:
            missing += [f for f in ("power_limit_min_w", "power_limit_default_w") if f not in missing]
        try:
            vram = sysfs.vram_total_bytes(card)
        except (OSError, ValueError):
            vram = None
        if vram is None:
            self._note_missing(index, ["memory_total_bytes"], "the driver publishes no VRAM size", missing)
        numa = None
        try:
            numa = sysfs.read_int(card.device_dir / "numa_node")
        except (OSError, ValueError):
            pass
        span = self._freq_range(card)
        clocks = sorted(range(span[1], span[0] - 1, -FREQ_STEP_MHZ), reverse=True) if span else []
        if not clocks:
            self._note_missing(index, ["supported_sm_clocks_mhz"], "no GT frequency files", missing)
        return GpuInventory(
            index=index, uuid=_uuid(card), name=ids.name_of(card.device_id), pci_bus_id=card.pci,
            memory_total_bytes=vram or 0, driver_version=sysfs.driver_version(self.root, card.driver),
            architecture=ids.architecture_of(card.device_id),
            power_limit_min_w=round(rated_w * MIN_CAP_SHARE, 1) if rated_w else None,
            power_limit_max_w=rated_w, power_limit_default_w=rated_w,
            supported_sm_clocks_mhz=clocks, numa_node=numa if numa is not None and numa >= 0 else None,
            vendor="intel", backend="intel", platform=ids.platform_of(card.device_id),
            resource_name=ids.RESOURCE_BY_DRIVER[card.driver],
            capabilities=sorted(c.value for c in self.capabilities(index)), missing=missing)

    def sample(self, index: int) -> GpuSample:
        card = self._card(index)
        ts = self._wall_clock()
        uuid = _uuid(card)
        if not card.device_dir.exists():
            return self._lost_sample(index, uuid, ts)
        try:
            return self._sample_figures(index, card, uuid, ts)
        except _Lost:
            return self._lost_sample(index, uuid, ts)

    def _lost_sample(self, index: int, uuid: str, ts: float) -> GpuSample:
        card = self._cards[index]
        if not sysfs.driver_loaded(self.root, card.driver):
            raise DriverUnavailable("ENODEV", f"the {card.driver} driver is not loaded "
                                    f"({self.root / 'sys/bus/pci/drivers' / card.driver} is gone)")
        if self._present[index]:
            log.warning("gpu %d (%s) is lost: its PCI function %s is gone from sysfs", index, uuid, card.pci,
                        extra={"gpu": index})
        self._present[index] = False
        self._energy.pop(index, None)
        self._clients_before.pop(index, None)
        return GpuSample(index=index, uuid=uuid, ts=ts, lost=True)

    def _sample_figures(self, index: int, card: IntelCard, uuid: str, ts: float) -> GpuSample:
        missing: list[str] = []
        self._note_missing(index, NOT_EXPOSED, "the i915/xe sysfs has no such file", missing)
        energy_uj = self._read_int(index, self._hwmon(card, "energy1_input"), "energy_mj", missing)
        power_w = self._power_rate(index, energy_uj)
        if energy_uj is None:
            self._note_missing(index, ["power_w"], "no energy counter to rate", missing)
        limit = self._read_int(index, self._hwmon(card, "power1_max"), "power_limit_w", missing)
        temperature = self._read_int(index, card.package_temp, "temperature_c", missing)
        vram_temperature = self._read_int(index, card.vram_temp, "memory_temperature_c", missing)
        clock = self._read_int(index, card.freq[0].path("act") if card.freq else None, "sm_clock_mhz", missing)
        use = self._use(index, card)
        total = self._inventory[index].memory_total_bytes if index in self._inventory else 0
        return GpuSample(
            index=index, uuid=uuid, ts=ts,
            utilization_pct=use.utilization_pct,
            memory_used_bytes=use.vram_used_bytes,
            memory_free_bytes=max(0, total - use.vram_used_bytes) if total else None,
            temperature_c=temperature / 1000.0 if temperature is not None else None,
            memory_temperature_c=vram_temperature / 1000.0 if vram_temperature is not None else None,
            power_w=power_w,
            power_limit_w=limit / MICRO if limit else None,  # 0: PL1 disabled, no limit in force
            sm_clock_mhz=clock,
            energy_mj=energy_uj // 1000 if energy_uj is not None else None,
            processes=[
                ProcessSample(pid=pid, used_memory_bytes=use.per_pid_vram_bytes.get(pid, 0),
                              sm_util_pct=use.per_pid_util_pct.get(pid))
                for pid in sorted(use.per_pid_vram_bytes)
            ],
            missing=missing,
        )

    def _power_rate(self, index: int, energy_uj: int | None) -> float | None:
        """Watts from the energy counter since the previous reading; the last rate when readings
        come too close together; None on the first reading or after the counter restarted."""
        if energy_uj is None:
            return None
        now = self._monotonic()
        previous = self._energy.get(index)
        if previous is not None and now - previous.t < MIN_RATE_INTERVAL_S and energy_uj >= previous.energy_uj:
            return self._power.get(index)
        self._energy[index] = _Reading(now, energy_uj)
        if previous is None or energy_uj < previous.energy_uj:  # a restarted counter: driver reload
            self._power.pop(index, None)
            return None
        watts = round((energy_uj - previous.energy_uj) / (now - previous.t) / MICRO, 2)
        self._power[index] = watts
        return watts

    def _use(self, index: int, card: IntelCard) -> fdinfo.DeviceUse:
        """This card's clients now, measured against the ones seen at its previous sample."""
        now = self._monotonic()
        if self._scan is None or now - self._scan[0] > PROCESS_SCAN_REUSE_S:
            self._scan = (now, fdinfo.scan_proc(self.root / "proc"))
        scanned_at, clients = self._scan
        mine = {c.key: c for c in clients if c.pdev == card.pci and c.driver == card.driver}
        previous = self._clients_before.get(index)
        self._clients_before[index] = (scanned_at, mine)
        if previous is None:
            return fdinfo.device_use(None, mine.values(), 0.0)
        return fdinfo.device_use(previous[1], mine.values(), scanned_at - previous[0])

    def probe(self, index: int) -> bool:
        """Whether a lost card is back: its PCI function has a DRM card again, bound to i915/xe."""
        card = self._card(index)
        found = sysfs.find_card(self.root, card.pci)
        if found is None:
            return False
        if found.device_id != card.device_id:
            log.warning("gpu %d at %s came back as device 0x%04x (was 0x%04x)", index, card.pci,
                        found.device_id, card.device_id, extra={"gpu": index})
            self._inventory.pop(index, None)
        self._cards[index] = found
        self._present[index] = True
        self._baseline(index)
        return True

    # ----- changing ------------------------------------------------------------------------

    def _write(self, index: int, path: Path, value: int, action: str) -> None:
        try:
            sysfs.write_control(path, value)
        except PermissionError as exc:
            raise DriverRefused("EACCES", f"gpu {index}: {action}: writing {path.name} was refused ({exc.strerror}): "
                                "kgpu needs root and a writable /sys (privileged, or the host's /sys "
                                "mounted read-write)") from exc
        except FileNotFoundError as exc:
            raise DriverError("ENODEV", f"gpu {index}: {action}: {path} is gone: the GPU is lost") from exc
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "EIO")
            if exc.errno == errno.EROFS:
                raise DriverRefused(name, f"gpu {index}: {action}: /sys is mounted read-only; kgpu needs it "
                                    "read-write (privileged, or the host's /sys mounted read-write)") from exc
            if exc.errno == errno.EINVAL:
                raise DriverRefused(name, f"gpu {index}: {action}: the driver refused {value} for "
                                    f"{path.name} (EINVAL)") from exc
            raise DriverError(name, f"gpu {index}: {action}: writing {path.name}: {exc.strerror}") from exc

    def set_power_limit(self, index: int, watts: float) -> None:
        action = f"set power limit to {watts:g} W"
        card = self._reachable_card(index, action)
        path = self._hwmon(card, "power1_max")
        if not path.exists():
            raise DriverRefused("ENOTSUP", f"gpu {index}: {action}: Intel: this card has no power1_max (PL1) in "
                                "hwmon; the policy acts through the GT frequency cap")
        rated = self._rated_w(index, card)
        low = round(rated * MIN_CAP_SHARE, 1) if rated else 0.0
        if rated is None or not low <= watts <= rated:
            allowed = f"{low:g}-{rated:g} W" if rated else "unknown: no power1_rated_max"
            raise DriverRefused("EINVAL", f"gpu {index}: {action}: Intel: outside the card's range "
                                f"(allowed {allowed}; power1_max beyond the rated TDP is clamped by the driver)")
        self._write(index, path, round(watts * MICRO), action)
        try:
            took = sysfs.read_int(path) / MICRO
        except (OSError, ValueError) as exc:
            raise DriverError("EIO", f"gpu {index}: {action}: reading power1_max back: {exc}") from exc
        if abs(took - watts) > CAP_TOLERANCE_W:
            raise DriverRefused("EINVAL", f"gpu {index}: {action}: Intel: the card holds {took:g} W instead "
                                "(the hardware clamps PL1 to its SKU range)")

    def _rated_w(self, index: int, card: IntelCard) -> float | None:
        try:
            rated = sysfs.read_int(self._hwmon(card, "power1_rated_max"))
        except (OSError, ValueError):
            rated = 0
        return rated / MICRO if rated else None

    def lock_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        action = f"lock GT frequency to {min_mhz}-{max_mhz} MHz"
        card = self._reachable_card(index, action)
        span = self._freq_range(card)
        if span is None:
            raise DriverRefused("ENOTSUP", f"gpu {index}: {action}: Intel: no GT frequency files for this card")
        if not span[0] <= min_mhz <= max_mhz <= span[1]:
            raise DriverRefused("EINVAL", f"gpu {index}: {action}: Intel: outside RPn..RP0 "
                                f"({span[0]}-{span[1]} MHz) or min above max")
        self._set_freq(index, card, [(min_mhz, max_mhz)] * len(card.freq), action)

    def reset_clocks(self, index: int) -> None:
        """No lock: every GT's min and max back to its RPn and RP0 (whatever a previous run set)."""
        action = "reset GT frequency to RPn..RP0"
        card = self._reachable_card(index, action)
        if not card.freq:
            raise DriverRefused("ENOTSUP", f"gpu {index}: {action}: Intel: no GT frequency files for this card")
        wanted = []
        for gt in card.freq:
            try:
                wanted.append((sysfs.read_int(gt.path("rpn")), sysfs.read_int(gt.path("rp0"))))
            except (OSError, ValueError) as exc:
                raise DriverError("EIO", f"gpu {index}: {action}: reading {gt.names['rp0']}: {exc}") from exc
        self._set_freq(index, card, wanted, action)

    def _set_freq(self, index: int, card: IntelCard, wanted: list[tuple[int, int]], action: str) -> None:
        """Write each GT's min and max so that min <= max holds after every write."""
        for gt, (low, high) in zip(card.freq, wanted, strict=False):
            try:
                current_min = sysfs.read_int(gt.path("min"))
            except (OSError, ValueError) as exc:
                raise DriverError("EIO", f"gpu {index}: {action}: reading {gt.names['min']}: {exc}") from exc
            order = [("max", high), ("min", low)] if high >= current_min else [("min", low), ("max", high)]
            for role, value in order:
                self._write(index, gt.path(role), value, action)
            try:
                took = (sysfs.read_int(gt.path("min")), sysfs.read_int(gt.path("max")))
            except (OSError, ValueError) as exc:
                raise DriverError("EIO", f"gpu {index}: {action}: reading the limits back: {exc}") from exc
            if abs(took[0] - low) >= FREQ_STEP_MHZ or abs(took[1] - high) >= FREQ_STEP_MHZ:
                raise DriverRefused("EINVAL", f"gpu {index}: {action}: Intel: the GT holds {took[0]}-{took[1]} MHz "
                                    "instead")


def _uuid(card: IntelCard) -> str:
    """Stable across restarts and re-enumeration: the device id and the PCI address."""
    return f"INTEL-{card.device_id:04x}-{card.pci.replace(':', '-')}"
