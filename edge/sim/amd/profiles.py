"""AMD Instinct boards the simulated libamd_smi can pretend to be: MI210 and MI300X.

`PROFILES` holds their `GpuProfile`s (the physics of edge/sim/physics.py runs on them; the
NVIDIA-only fields are set to what fits: no MIG, no row remapping, no NVLink, no NVENC/NVDEC
modelled), `BOARDS` what amdsmi reports beyond them (ASIC ids, compute units, XGMI, which power
field the board fills).

Sources (AMD's product pages and data sheets):

* MI210: "AMD Instinct MI210 Accelerator" data sheet / amd.com product page: 104 CUs, peak engine
  clock 1700 MHz, 64 GB HBM2e at 1.6 GHz on a 4096-bit bus (1.6 TB/s), 300 W TBP, PCIe Gen4 x16,
  up to 3 Infinity Fabric links (100 GB/s peak each, with the bridge), PCIe device id 0x740F.
* MI300X: "AMD Instinct MI300X Accelerator" data sheet / amd.com product page: 304 CUs, peak
  engine clock 2100 MHz, 192 GB HBM3 at 5.2 Gbps on an 8192-bit bus (5.3 TB/s), 750 W TBP (OAM),
  PCIe Gen5 x16, 7 Infinity Fabric links at 128 GB/s peak each (896 GB/s), device id 0x74A1.

Not confirmed from a data sheet, chosen to be plausible (say so if you have a board to check):
the minimum power caps (what `amd-smi static --limit` reports varies with firmware), the idle
powers, the memory reserved with nothing running, the exact VRAM totals amdsmi reports in MB,
the thermal throttle/shutdown thresholds, the memory clock amdsmi reports for HBM3 (1300 MHz is
what amd-smi commonly shows on MI300X), and the DPM clock levels (100 MHz steps here).
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.sim.profiles import GpuProfile

AMDGPU_DRIVER_VERSION = "6.12.12"  # amdsmi_get_gpu_driver_info: an amdgpu DKMS module (plausible, not pinned)


def _steps(highest_mhz: int, lowest_mhz: int, step_mhz: int = 100) -> tuple[int, ...]:
    """Descending DPM clock levels, as amdsmi_get_clk_freq lists them (at most 33)."""
    return tuple(range(highest_mhz, lowest_mhz - 1, -step_mhz))


@dataclass(frozen=True)
class AmdBoard:
    """What amdsmi reports of a board beyond its physics."""

    market_name: str  # amdsmi_get_gpu_asic_info().market_name
    device_id: int  # PCI device id
    gfx_version: int  # target_graphics_version: 0x942 -> "gfx942"
    compute_units: int
    vram_type: int  # AMDSMI_VRAM_TYPE_*: 3 HBM2E, 4 HBM3
    vram_bit_width: int
    vram_max_bandwidth_gb_s: int
    xgmi_links: int
    xgmi_gb_s_per_link: int
    edge_sensor: bool  # MI300X has no edge temperature sensor (amd-smi shows N/A)
    current_power: bool  # MI300 fills current_socket_power; MI200 and earlier average_socket_power
    platform: str = "instinct"


MI210 = GpuProfile(
    key="MI210",
    name="AMD Instinct MI210",
    memory_total_mib=65520,
    memory_reserved_mib=12,
    pci_device_id=0x740F1002,
    compute_capability=(0, 0),  # a CUDA notion; AMD has gfx targets (BOARDS)
    power_min_w=100.0,
    power_max_w=300.0,
    power_default_w=300.0,
    idle_w=42.0,
    max_board_w=300.0,
    memory_clocks_mhz=(1600,),
    graphics_clocks_mhz={1600: _steps(1700, 500)},
    idle_sm_clock_mhz=800,
    max_operating_c=95.0,
    slowdown_c=100.0,
    shutdown_c=105.0,
    remapped_rows=False,  # AMD retires bad pages; no NVIDIA-style row remapping
    mig=False,
    numa_from_nvml=False,
    memory_util_per_load=0.5,
    hbm=True,
    nvlink_links=0,  # XGMI is in BOARDS, not modelled as NVLink traffic
    pcie_gb_s=32.0,  # Gen4 x16
    architecture="cdna2",
)

MI300X = GpuProfile(
    key="MI300X",
    name="AMD Instinct MI300X",
    memory_total_mib=196592,
    memory_reserved_mib=290,
    pci_device_id=0x74A11002,
    compute_capability=(0, 0),
    power_min_w=200.0,
    power_max_w=750.0,
    power_default_w=750.0,
    idle_w=140.0,
    max_board_w=750.0,
    memory_clocks_mhz=(1300,),
    graphics_clocks_mhz={1300: _steps(2100, 500)},
    idle_sm_clock_mhz=500,
    max_operating_c=100.0,
    slowdown_c=105.0,
    shutdown_c=110.0,
    remapped_rows=False,
    mig=False,  # MI300X partitions (CPX/NPS) are not MIG
    numa_from_nvml=False,
    memory_util_per_load=0.55,
    hbm=True,
    nvlink_links=0,
    pcie_gb_s=64.0,  # Gen5 x16
    tensor_per_load=0.7,
    architecture="cdna3",
)

PROFILES: dict[str, GpuProfile] = {p.key: p for p in (MI210, MI300X)}

BOARDS: dict[str, AmdBoard] = {
    "MI210": AmdBoard(market_name="AMD Instinct MI210", device_id=0x740F, gfx_version=0x90A,
                      compute_units=104, vram_type=3, vram_bit_width=4096, vram_max_bandwidth_gb_s=1638,
                      xgmi_links=3, xgmi_gb_s_per_link=100, edge_sensor=True, current_power=False),
    "MI300X": AmdBoard(market_name="AMD Instinct MI300X", device_id=0x74A1, gfx_version=0x942,
                       compute_units=304, vram_type=4, vram_bit_width=8192, vram_max_bandwidth_gb_s=5300,
                       xgmi_links=7, xgmi_gb_s_per_link=128, edge_sensor=False, current_power=True),
}


def get_profile(model: str) -> GpuProfile:
    """An AMD model by key ("MI300X", case-insensitive); a typo names the valid ones."""
    for key, profile in PROFILES.items():
        if key.lower() == model.strip().lower():
            return profile
    raise ValueError(f"unknown AMD GPU model {model!r}; valid models: {', '.join(PROFILES)}")
