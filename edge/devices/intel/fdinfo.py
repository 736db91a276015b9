"""GPU use per DRM client from /proc/<pid>/fdinfo (Documentation/gpu/drm-usage-stats.rst).

Every open DRM file of an i915 or xe device shows, in its fdinfo, the client (`drm-client-id`,
unique per device, `drm-pdev` the device's PCI address), the engine busy time (i915:
`drm-engine-<class>: <ns> ns`; xe: `drm-cycles-<class>` busy cycles against `drm-total-cycles-<class>`,
a GPU timestamp), `drm-engine-capacity-<class>` when the class has several engines, and memory per
region (`drm-resident-<region>`: i915's `local0`, xe's `vram0` are the card's VRAM).

One client may be seen through several fds or processes (dup, fork, SCM_RIGHTS): the spec asks
readers to count it once, by (drm-pdev, drm-client-id); the lowest pid is credited.

Parsing and the arithmetic between two snapshots are pure; `scan_proc` is the only I/O.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DRIVERS = frozenset({"i915", "xe"})
_UNITS = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024 * 1024, "GiB": 1024 ** 3}
DEVICE_LOCAL_REGIONS = ("local", "vram")  # i915 local0, xe vram0


@dataclass
class DrmClient:
    """What one DRM client's fdinfo said at one moment."""

    pid: int
    driver: str
    pdev: str
    client_id: int
    engine_ns: dict[str, int] = field(default_factory=dict)  # i915: busy ns per engine class
    cycles: dict[str, int] = field(default_factory=dict)  # xe: busy cycles per engine class
    total_cycles: dict[str, int] = field(default_factory=dict)  # xe: the GPU timestamp per class
    capacity: dict[str, int] = field(default_factory=dict)
    resident: dict[str, int] = field(default_factory=dict)  # bytes per memory region

    @property
    def key(self) -> tuple[str, int]:
        return self.pdev, self.client_id

    @property
    def vram_resident_bytes(self) -> int:
        return sum(size for region, size in self.resident.items() if region.startswith(DEVICE_LOCAL_REGIONS))


def _number(value: str) -> int:
    """"1234", "1234 ns", "23992 KiB" -> the integer in base units (bytes for sizes)."""
    parts = value.split()
    unit = parts[1] if len(parts) > 1 else ""
    return int(parts[0]) * _UNITS.get(unit, 1)


def parse_fdinfo(text: str, pid: int) -> DrmClient | None:
    """One fdinfo file; None when it is not an i915/xe DRM client (or lacks its identity)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.startswith("drm-"):
            fields[key.strip()] = value.strip()
    driver = fields.get("drm-driver")
    if driver not in DRIVERS or "drm-pdev" not in fields or "drm-client-id" not in fields:
        return None
    try:
        client = DrmClient(pid=pid, driver=driver, pdev=fields["drm-pdev"], client_id=int(fields["drm-client-id"]))
        for key, value in fields.items():
            name = key.removeprefix("drm-")
            if name.startswith("engine-capacity-"):
                client.capacity[name.removeprefix("engine-capacity-")] = int(value)
            elif name.startswith("engine-"):
                client.engine_ns[name.removeprefix("engine-")] = _number(value)
            elif name.startswith("total-cycles-"):
                client.total_cycles[name.removeprefix("total-cycles-")] = int(value)
            elif name.startswith("cycles-"):
                client.cycles[name.removeprefix("cycles-")] = int(value)
            elif name.startswith("resident-"):
                client.resident[name.removeprefix("resident-")] = _number(value)
    except ValueError:
        return None
    return client


def _is_drm_fd(fd_link: Path) -> bool:
    try:
        return os.readlink(fd_link).startswith("/dev/dri/")
    except OSError:
        return False


def _drm_fds(proc: Path, pid: int) -> list[str] | None:
    """The fds of `pid` worth reading: those linking to /dev/dri/*. /proc/<pid>/fd is 0500, owned by
    the process's user: without CAP_DAC_READ_SEARCH another user's cannot be listed, but its fdinfo
    directory (0555, checked by ptrace read access: CAP_SYS_PTRACE) can, and every fd in it is read
    (non-DRM ones have no drm-driver line). None: nothing of the process can be read."""
    try:
        return [fd for fd in os.listdir(proc / str(pid) / "fd") if _is_drm_fd(proc / str(pid) / "fd" / fd)]
    except PermissionError:
        pass
    except OSError:
        return None
    try:
        return os.listdir(proc / str(pid) / "fdinfo")
    except OSError:
        return None


def scan_proc(proc: Path) -> list[DrmClient]:
    """Every i915/xe client under `proc`, once each. A process we may not look into (no ptrace read
    access: CAP_SYS_PTRACE for other users' processes) or that exits meanwhile is skipped."""
    clients: dict[tuple[str, int], DrmClient] = {}
    try:
        pids = sorted(int(name) for name in os.listdir(proc) if name.isdigit())
    except OSError:
        return []
    for pid in pids:
        for fd in _drm_fds(proc, pid) or []:
            try:
                text = (proc / str(pid) / "fdinfo" / fd).read_text(encoding="ascii", errors="replace")
            except OSError:
                continue
            client = parse_fdinfo(text, pid)
            if client is not None and client.key not in clients:
                clients[client.key] = client
    return list(clients.values())


def busy_fractions(before: DrmClient, now: DrmClient, interval_s: float) -> dict[str, float]:
    """Per engine class, the fraction (0-1) of the class's engines this client kept busy between
    two readings. Counters may lag and catch up (the spec allows it): a decrease counts as zero."""
    fractions: dict[str, float] = {}
    for engine, busy_ns in now.engine_ns.items():
        if engine in before.engine_ns and interval_s > 0:
            delta = max(0, busy_ns - before.engine_ns[engine])
            fractions[engine] = delta / (interval_s * 1e9) / now.capacity.get(engine, 1)
    for engine, cycles in now.cycles.items():
        if engine in before.cycles and engine in now.total_cycles and engine in before.total_cycles:
            elapsed = now.total_cycles[engine] - before.total_cycles[engine]
            if elapsed > 0:
                delta = max(0, cycles - before.cycles[engine])
                fractions[engine] = delta / elapsed / now.capacity.get(engine, 1)
    return fractions


@dataclass(frozen=True)
class DeviceUse:
    """One device's use between two snapshots."""

    utilization_pct: float | None  # the busiest engine class; None without two readings
    vram_used_bytes: int  # resident in device memory, all clients
    per_pid_util_pct: dict[int, float]  # busiest class per process; absent: no two readings yet
    per_pid_vram_bytes: dict[int, int]


def device_use(before: Mapping[tuple[str, int], DrmClient] | None, now: Iterable[DrmClient],
               interval_s: float) -> DeviceUse:
    """Utilisation and memory of one device from its clients now and at the previous snapshot.
    Clients that appeared since have no interval yet and add nothing to utilisation."""
    per_class: dict[str, float] = {}
    pid_class: dict[int, dict[str, float]] = {}
    vram: dict[int, int] = {}
    measured = before is not None and interval_s > 0
    for client in now:
        vram[client.pid] = vram.get(client.pid, 0) + client.vram_resident_bytes
        previous = before.get(client.key) if before is not None else None
        if previous is None or not measured:
            continue
        shares = pid_class.setdefault(client.pid, {})
        for engine, fraction in busy_fractions(previous, client, interval_s).items():
            per_class[engine] = per_class.get(engine, 0.0) + fraction
            shares[engine] = shares.get(engine, 0.0) + fraction

    def pct(fraction: float) -> float:
        return round(min(100.0, max(0.0, fraction * 100.0)), 1)

    return DeviceUse(
        utilization_pct=pct(max(per_class.values(), default=0.0)) if measured else None,
        vram_used_bytes=sum(vram.values()),
        per_pid_util_pct={pid: pct(max(shares.values(), default=0.0)) for pid, shares in pid_class.items()},
        per_pid_vram_bytes=vram,
    )
