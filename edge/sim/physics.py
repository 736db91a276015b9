"""The state of one simulated GPU and how it evolves: power, heat, clocks, errors, processes.

The model steps lazily: every read first integrates from the last read to `clock()`, so a
test can drive hours of simulated time with a fake clock and no sleeping. It is deliberately
simple (first-order lags, quadratic clock/power curve) but keeps the couplings a power or
thermal policy relies on: load raises power, a lower power limit or locked clocks lower it,
power heats the board, heat throttles the clocks, and a hot cabinet raises every temperature.

`SimGpu` is not thread-safe by itself; `SimulatedNvml` holds one lock around all of them.
"""

import math
import time
import uuid as uuid_lib
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, model_validator

from edge.sim.profiles import AMBIENT_C, GpuProfile
from shared.wire import WireModel

# nvmlClocksEventReasons bits, as NVML defines them.
REASON_GPU_IDLE = 0x1
REASON_SW_POWER_CAP = 0x4
REASON_HW_SLOWDOWN = 0x8
REASON_SW_THERMAL_SLOWDOWN = 0x20
REASON_HW_THERMAL_SLOWDOWN = 0x40
SUPPORTED_REASONS = (
    REASON_GPU_IDLE
    | 0x2  # applications clocks setting
    | REASON_SW_POWER_CAP
    | REASON_HW_SLOWDOWN
    | 0x10  # sync boost
    | REASON_SW_THERMAL_SLOWDOWN
    | REASON_HW_THERMAL_SLOWDOWN
    | 0x80  # HW power brake
)

# nvmlEventType bits a board offers: single/double-bit ECC, P-state, XID, clock changes.
SUPPORTED_EVENT_TYPES = 0x1 | 0x2 | 0x4 | 0x8 | 0x10

POWER_LAG_S = 0.5  # the power controller settles within a second or two
THERMAL_TIME_CONSTANT_S = 30.0
MAX_STEP_S = 0.5
MAX_STEPS_PER_READ = 4000  # a very long gap is integrated in coarser steps
SW_THERMAL_CLOCK_CUT = 0.3  # clocks fall by up to 30 % between max-operating and slowdown
HW_THERMAL_CLOCK_FACTOR = 0.5

# What moves over the buses per unit of SM load (a data-parallel training step: inputs in over
# PCIe, gradients out over NVLink), as fractions of the link's bandwidth per direction.
PCIE_RX_PER_LOAD = 0.08
PCIE_TX_PER_LOAD = 0.04
PCIE_IDLE_BYTES_S = 2.0e5  # the driver's own housekeeping traffic
NVLINK_PER_LOAD = 0.25
MEMORY_TEMP_OFFSET_C = -3.0  # HBM runs a little cooler than the GPU die when idle
MEMORY_TEMP_PER_LOAD_C = 6.0  # and warms with memory traffic
KIB = 1024

Recovery = Literal["reset", "reboot"]
_RECOVERY_RANK: dict[Recovery | None, int] = {None: 0, "reset": 1, "reboot": 2}

# XIDs after which the board reports NVML_GPU_RECOVERY_ACTION_GPU_RESET by default (double-bit ECC,
# internal micro-controller halt, row-remap failure, NVLink, fallen off the bus, uncontained ECC,
# GSP errors, unrecovered ECC); others (13, 31, 43, 94, ...: the application's own errors, or
# contained ones) ask for no recovery action. An injection's `recovery` overrides this. What the
# remediation ladder does about an XID is its own catalogue (edge/remediation), not this table.
RESET_XIDS = frozenset({48, 62, 64, 74, 79, 95, 119, 120, 140})


def worse(a: Recovery | None, b: Recovery | None) -> Recovery | None:
    """The heavier of two recovery actions (a reboot covers a reset)."""
    return a if _RECOVERY_RANK[a] >= _RECOVERY_RANK[b] else b


# Realistic bus ids of an 8-GPU HGX board; more GPUs get made-up ones.
_HGX_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)


class SimProcess(WireModel):
    """A compute process the simulated GPU should report."""

    pid: int = Field(ge=1, le=4_194_304)
    used_memory_mib: int = Field(ge=0)
    sm_util: float = Field(default=0.0, ge=0, le=100)


class SimFault(WireModel):
    """Load or fault to inject into one simulated GPU; every field is optional.

    `utilization` sets the load directly and drops simulated processes; `processes` replaces
    them and the load becomes the sum of their `sm_util`. `driver_unloaded` and `hung` act on
    the whole simulated driver, the rest on the one GPU. `reset` is applied first, then the rest.

    `hung: true` models a driver that stops answering (a GPU stuck in a reset, a wedged kernel
    module): every NVML call blocks, without returning an error, until `hung: false`.

    `recovery` says what clears the injected `xid`, `lost` and `ecc_dbe` faults (and what the
    board reports in NVML's recovery-action field): "reset" (a GPU reset clears them) or "reboot"
    (they survive a reset; only a node reboot clears them). Left out, each fault takes its own
    default: "reset" for `lost`, for `ecc_dbe` and for the XIDs in RESET_XIDS (79 among them),
    none for other XIDs. `diag_fails: true` is a latent fault only diagnostics find: it survives
    both unless `recovery` says which clears it (`diag_fails: false` removes it).
    """

    utilization: float | None = Field(default=None, ge=0, le=100)
    temperature_c: float | None = Field(default=None, ge=-40, le=150)
    ambient_c: float | None = Field(default=None, ge=-40, le=80)
    xid: int | None = Field(default=None, ge=1, le=999)
    ecc_dbe: int | None = Field(default=None, ge=0, le=1_000_000)
    ecc_sbe: int | None = Field(default=None, ge=0, le=1_000_000)
    remap_failure: bool | None = None
    pcie_replays: int | None = Field(default=None, ge=0, le=1_000_000)  # added to the counter
    encoder_utilization: float | None = Field(default=None, ge=0, le=100)  # video load
    decoder_utilization: float | None = Field(default=None, ge=0, le=100)
    lost: bool | None = None
    processes: list[SimProcess] | None = None
    driver_unloaded: bool | None = None
    hung: bool | None = None
    reset: bool | None = None
    recovery: Recovery | None = None
    diag_fails: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "SimFault":
        if self.recovery is not None and not (self.xid is not None or self.lost or self.ecc_dbe
                                              or self.diag_fails):
            raise ValueError("recovery applies to an xid, lost, ecc_dbe or diag_fails fault: give one")
        if self.utilization is not None and self.processes is not None:
            raise ValueError("give either utilization or processes (their sm_util sum is the load)")
        if self.processes is not None:
            pids = [p.pid for p in self.processes]
            if len(pids) != len(set(pids)):
                raise ValueError("process pids must be unique")
            if sum(p.sm_util for p in self.processes) > 100:
                raise ValueError("the processes' sm_util must add up to at most 100")
        return self


def _bus_id(index: int) -> str:
    bus = _HGX_BUSES[index] if index < len(_HGX_BUSES) else 0xC0 + index
    return f"00000000:{bus:02X}:00.0"


class SimGpu:
    """One simulated board: its controls, its injected faults and its physical state."""

    def __init__(
        self,
        index: int,
        profile: GpuProfile,
        *,
        clock: Callable[[], float] = time.monotonic,
        seed: str = "",
    ) -> None:
        self.index = index
        self.profile = profile
        self.clock = clock
        # Stable across runs (tests can name them); `seed` tells simulated nodes apart.
        name = f"kgpu-sim:{seed}:{profile.key}:{index}"
        self.uuid = "GPU-" + str(uuid_lib.uuid5(uuid_lib.NAMESPACE_URL, name))
        self.pci_bus_id = _bus_id(index)
        self.serial = f"1654{int(self.uuid[4:12], 16) % 10**9:09d}"
        self.energy_mj = 0.0  # survives a reset: the counter runs since driver load
        # Counters since driver load, read by NVML field values and GPM samples.
        self.pcie_replays = 0
        self.pcie_tx_bytes = 0.0
        self.pcie_rx_bytes = 0.0
        self.nvlink_tx_kib = 0.0
        self.nvlink_rx_kib = 0.0
        self.gr_active_s = 0.0  # time the graphics/compute engine was busy
        self.tensor_active_s = 0.0
        self.dram_active_s = 0.0
        self._fresh()

    def _fresh(self) -> None:
        """Back to a board that just booted in an idle server."""
        p = self.profile
        self.power_limit_w = p.power_default_w
        self.locked_clocks: tuple[int, int] | None = None
        self.load_pct = 0.0
        self.processes: list[SimProcess] = []
        self.ambient_c = AMBIENT_C
        self.power_w = p.idle_w
        self.temperature_c = self.ambient_c + p.thermal_k_c_per_w * p.idle_w
        self.sm_clock_mhz = float(p.idle_sm_clock_mhz)
        self.throttle_reasons = REASON_GPU_IDLE
        self.ecc_sbe_volatile = 0
        self.ecc_dbe_volatile = 0
        self.ecc_sbe_aggregate = 0
        self.ecc_dbe_aggregate = 0
        self.remapped_correctable = 0
        self.remapped_uncorrectable = 0
        self.remap_pending = False
        self.remap_failure = False
        self.encoder_pct = 0.0
        self.decoder_pct = 0.0
        self.lost = False
        # The recovery action the board reports (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION): None, or
        # what clears its present fault.
        self.recovery: Recovery | None = None
        self.diag_fault = False  # a latent fault that fails diagnostics
        self.diag_fault_cleared_by: Recovery | None = None  # None: neither reset nor reboot
        # A test may clear bits here to model a board that refuses event registration.
        self.supported_event_types = SUPPORTED_EVENT_TYPES
        self.last_t = self.clock()

    # ----- physics -------------------------------------------------------------------------

    def advance(self) -> None:
        """Integrate from the last read up to now."""
        now = self.clock()
        dt = now - self.last_t
        if dt <= 0:
            return
        self.last_t = now
        steps = min(MAX_STEPS_PER_READ, max(1, math.ceil(dt / MAX_STEP_S)))
        h = dt / steps
        for _ in range(steps):
            self._step(h)

    def _clock_ceiling(self) -> tuple[float, int]:
        """The SM clock allowed by locks and temperature, with the thermal reason bits."""
        p = self.profile
        ceiling = float(p.max_sm_clock_mhz)
        if self.locked_clocks is not None:
            ceiling = min(ceiling, self.locked_clocks[1])
        reasons = 0
        if self.temperature_c >= p.slowdown_c:
            reasons |= REASON_HW_THERMAL_SLOWDOWN | REASON_HW_SLOWDOWN
            ceiling = min(ceiling, p.max_sm_clock_mhz * HW_THERMAL_CLOCK_FACTOR)
        elif self.temperature_c >= p.max_operating_c:
            reasons |= REASON_SW_THERMAL_SLOWDOWN
            depth = (self.temperature_c - p.max_operating_c) / (p.slowdown_c - p.max_operating_c)
            ceiling = min(ceiling, p.max_sm_clock_mhz * (1 - SW_THERMAL_CLOCK_CUT * depth))
        return ceiling, reasons

    def _operating_point(self) -> tuple[float, float, int]:
        """Target power (W), SM clock (MHz) and reason bits for the present load and state."""
        p = self.profile
        ceiling, reasons = self._clock_ceiling()
        floor = float(self.locked_clocks[0]) if self.locked_clocks else float(p.min_sm_clock_mhz)
        load = self.load_pct / 100.0
        if load <= 0:
            idle_clock = max(float(p.idle_sm_clock_mhz), floor)
            return p.idle_w, min(idle_clock, ceiling), reasons | REASON_GPU_IDLE
        dynamic_w = (p.max_board_w - p.idle_w) * load
        clock = ceiling
        target_w = p.idle_w + dynamic_w * (clock / p.max_sm_clock_mhz) ** 2
        if target_w > self.power_limit_w:
            reasons |= REASON_SW_POWER_CAP
            headroom = max(0.0, self.power_limit_w - p.idle_w) / dynamic_w
            clock = p.max_sm_clock_mhz * math.sqrt(headroom)
            target_w = self.power_limit_w
        # Power and thermal protection win over a locked minimum; the table's floor does not move.
        return target_w, max(clock, float(p.min_sm_clock_mhz)), reasons

    def _step(self, h: float) -> None:
        p = self.profile
        target_w, clock, reasons = self._operating_point()
        before_w = self.power_w
        self.power_w += (target_w - self.power_w) * (1 - math.exp(-h / POWER_LAG_S))
        self.energy_mj += (before_w + self.power_w) / 2 * h * 1000.0
        equilibrium_c = self.ambient_c + p.thermal_k_c_per_w * self.power_w
        self.temperature_c += (equilibrium_c - self.temperature_c) * (
            1 - math.exp(-h / THERMAL_TIME_CONSTANT_S)
        )
        self.sm_clock_mhz = clock
        self.throttle_reasons = reasons
        self._count_activity(h)

    def _count_activity(self, h: float) -> None:
        """Engine busy time and bus traffic over `h` seconds at the present load."""
        p = self.profile
        load = self.load_pct / 100.0
        self.gr_active_s += h * load
        self.tensor_active_s += h * load * p.tensor_per_load
        self.dram_active_s += h * min(1.0, load * p.memory_util_per_load)
        pcie = p.pcie_gb_s * 1e9
        self.pcie_rx_bytes += h * (PCIE_IDLE_BYTES_S + pcie * PCIE_RX_PER_LOAD * load)
        self.pcie_tx_bytes += h * (PCIE_IDLE_BYTES_S + pcie * PCIE_TX_PER_LOAD * load)
        nvlink_kib_s = p.nvlink_links * p.nvlink_gb_s_per_link * 1e9 * NVLINK_PER_LOAD * load / KIB
        self.nvlink_tx_kib += h * nvlink_kib_s
        self.nvlink_rx_kib += h * nvlink_kib_s

    # ----- what NVML reports ---------------------------------------------------------------

    @property
    def reported_sm_clock_mhz(self) -> int:
        """The clock snapped down to a step of the board's clock table."""
        table = self.profile.graphics_clocks_mhz[self.profile.memory_clocks_mhz[0]]
        for step in table:
            if step <= self.sm_clock_mhz + 0.5:
                return step
        return table[-1]

    @property
    def memory_clock_mhz(self) -> int:
        """GDDR boards drop their memory clock when idle; HBM boards keep it."""
        clocks = self.profile.memory_clocks_mhz
        return clocks[-1] if self.load_pct <= 0 and len(clocks) > 1 else clocks[0]

    @property
    def memory_used_mib(self) -> int:
        used = self.profile.memory_reserved_mib + sum(p.used_memory_mib for p in self.processes)
        return min(used, self.profile.memory_total_mib)

    @property
    def memory_util_pct(self) -> int:
        return round(self.load_pct * self.profile.memory_util_per_load)

    @property
    def memory_temperature_c(self) -> float:
        return self.temperature_c + MEMORY_TEMP_OFFSET_C + MEMORY_TEMP_PER_LOAD_C * self.load_pct / 100

    @property
    def enforced_power_limit_w(self) -> float:
        return self.power_limit_w

    # ----- controls ------------------------------------------------------------------------

    def set_power_limit_w(self, watts: float) -> None:
        self.advance()
        self.power_limit_w = watts

    def lock_clocks(self, min_mhz: int, max_mhz: int) -> None:
        self.advance()
        self.locked_clocks = (min_mhz, max_mhz)

    def reset_clocks(self) -> None:
        self.advance()
        self.locked_clocks = None

    def apply(self, fault: SimFault) -> None:
        """Apply the per-GPU part of a fault (not `xid` or `driver_unloaded`)."""
        if fault.encoder_utilization and not self.profile.nvenc:
            raise ValueError(f"a {self.profile.key} has no video encoder (NVENC)")
        if fault.decoder_utilization and not self.profile.nvdec:
            raise ValueError(f"a {self.profile.key} has no video decoder (NVDEC)")
        self.advance()
        if fault.reset:
            self._fresh()
        if fault.ambient_c is not None:
            self.ambient_c = fault.ambient_c
        if fault.utilization is not None:
            self.processes = []
            self.load_pct = fault.utilization
        if fault.processes is not None:
            wanted = self.profile.memory_reserved_mib + sum(
                p.used_memory_mib for p in fault.processes
            )
            if wanted > self.profile.memory_total_mib:
                raise ValueError(
                    f"processes need {wanted} MiB, more than the {self.profile.memory_total_mib} "
                    f"MiB of a {self.profile.key}"
                )
            self.processes = list(fault.processes)
            self.load_pct = min(100.0, sum(p.sm_util for p in fault.processes))
        if fault.temperature_c is not None:
            self.temperature_c = fault.temperature_c
        if fault.ecc_sbe:
            self.ecc_sbe_volatile += fault.ecc_sbe
            self.ecc_sbe_aggregate += fault.ecc_sbe
        if fault.ecc_dbe:
            self.ecc_dbe_volatile += fault.ecc_dbe
            self.ecc_dbe_aggregate += fault.ecc_dbe
            if self.profile.remapped_rows:
                # An uncorrectable error retires its row; the remap takes effect at the next reset.
                self.remapped_uncorrectable += fault.ecc_dbe
                self.remap_pending = True
        if fault.remap_failure is not None:
            self.remap_failure = fault.remap_failure
        if fault.pcie_replays:
            self.pcie_replays += fault.pcie_replays
        if fault.encoder_utilization is not None:
            self.encoder_pct = fault.encoder_utilization
        if fault.decoder_utilization is not None:
            self.decoder_pct = fault.decoder_utilization
        if fault.lost is not None:
            self.lost = fault.lost
        self._note_recovery(fault)
        # Recompute clocks and reason bits now, so a read right after an injection sees them.
        _, clock, reasons = self._operating_point()
        self.sm_clock_mhz, self.throttle_reasons = clock, reasons

    def _note_recovery(self, fault: SimFault) -> None:
        """Raise the pending recovery action for the faults of `fault` (see SimFault)."""
        needs: Recovery | None = None
        if fault.xid is not None:
            needs = worse(needs, fault.recovery or ("reset" if fault.xid in RESET_XIDS else None))
        if fault.lost or fault.ecc_dbe:
            needs = worse(needs, fault.recovery or "reset")
        self.recovery = worse(self.recovery, needs)
        if fault.diag_fails is not None:
            self.diag_fault = fault.diag_fails
            self.diag_fault_cleared_by = fault.recovery if fault.diag_fails else None

    # ----- recovery --------------------------------------------------------------------------

    def gpu_reset(self) -> bool:
        """What a GPU reset does (the caller checked that nothing holds the GPU). Always: volatile
        ECC counters to 0, clocks and power limit back to default, no load. When the fault needs
        no more than a reset: no longer lost, pending row remaps applied, the recovery action
        cleared. Answers False when the fault needs a reboot: the reset ran, the GPU stays faulty."""
        self.advance()
        p = self.profile
        self.ecc_sbe_volatile = self.ecc_dbe_volatile = 0
        self.locked_clocks = None
        self.power_limit_w = p.power_default_w
        self.processes = []
        self.load_pct = self.encoder_pct = self.decoder_pct = 0.0
        effective = self.recovery != "reboot"
        if effective:
            self.lost = False
            self.remap_pending = False  # the retired rows take effect
            self.recovery = None
            if self.diag_fault and self.diag_fault_cleared_by == "reset":
                self.diag_fault = False
        _, clock, reasons = self._operating_point()
        self.sm_clock_mhz, self.throttle_reasons = clock, reasons
        return effective

    def reboot(self) -> None:
        """The node rebooted: a freshly booted board. What the hardware keeps survives: its
        remapped rows (pending ones applied), aggregate ECC counters, a remap failure, a latent
        fault that no reboot clears, and the cabinet's temperature."""
        kept = (self.ecc_sbe_aggregate, self.ecc_dbe_aggregate, self.remapped_correctable,
                self.remapped_uncorrectable, self.remap_failure, self.ambient_c,
                self.diag_fault and self.diag_fault_cleared_by is None, self.supported_event_types)
        self.advance()
        self._fresh()
        (self.ecc_sbe_aggregate, self.ecc_dbe_aggregate, self.remapped_correctable,
         self.remapped_uncorrectable, self.remap_failure, self.ambient_c, self.diag_fault,
         self.supported_event_types) = kept
        self.temperature_c = self.ambient_c + self.profile.thermal_k_c_per_w * self.power_w
        # counters since driver load start again
        self.energy_mj = 0.0
        self.pcie_replays = 0
        self.pcie_tx_bytes = self.pcie_rx_bytes = 0.0
        self.nvlink_tx_kib = self.nvlink_rx_kib = 0.0
        self.gr_active_s = self.tensor_active_s = self.dram_active_s = 0.0

    def state(self) -> dict[str, Any]:
        """A JSON-able picture of the GPU, for an HTTP answer or a test failure message."""
        self.advance()
        return {
            "index": self.index,
            "uuid": self.uuid,
            "model": self.profile.key,
            "name": self.profile.name,
            "lost": self.lost,
            "utilization_pct": self.load_pct,
            "temperature_c": round(self.temperature_c, 2),
            "ambient_c": self.ambient_c,
            "power_w": round(self.power_w, 2),
            "power_limit_w": self.power_limit_w,
            "sm_clock_mhz": self.reported_sm_clock_mhz,
            "memory_clock_mhz": self.memory_clock_mhz,
            "locked_clocks_mhz": list(self.locked_clocks) if self.locked_clocks else None,
            "throttle_reasons": self.throttle_reasons,
            "energy_mj": int(self.energy_mj),
            "memory_used_mib": self.memory_used_mib,
            "memory_total_mib": self.profile.memory_total_mib,
            "memory_temperature_c": (round(self.memory_temperature_c, 2) if self.profile.hbm
                                     else None),
            "encoder_utilization_pct": self.encoder_pct,
            "decoder_utilization_pct": self.decoder_pct,
            "pcie_replays": self.pcie_replays,
            "ecc_sbe_volatile": self.ecc_sbe_volatile,
            "ecc_dbe_volatile": self.ecc_dbe_volatile,
            "remapped_rows": (
                {
                    "correctable": self.remapped_correctable,
                    "uncorrectable": self.remapped_uncorrectable,
                    "pending": self.remap_pending,
                    "failure": self.remap_failure,
                }
                if self.profile.remapped_rows
                else None
            ),
            "processes": [p.model_dump() for p in self.processes],
            "recovery_action": self.recovery or "none",
            "diag_fails": self.diag_fault,
        }
