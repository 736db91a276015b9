"""Data-centre GPU models the simulated libnvidia-ml can pretend to be.

The figures are what NVML reports on real boards (driver 550), so code tested against the
simulation sees realistic names, limits and clock tables rather than round made-up numbers.
"""

from dataclasses import dataclass, replace

DRIVER_VERSION = "550.54.15"
NVML_VERSION = "12.550.54.15"
CUDA_DRIVER_VERSION = 12040  # nvmlSystemGetCudaDriverVersion: 1000 * major + 10 * minor

AMBIENT_C = 30.0
EQUILIBRIUM_AT_DEFAULT_LIMIT_C = 72.0  # where a board settles at full load and default limit


def _clock_table(highest_mhz: int, lowest_mhz: int, step_mhz: int = 15) -> tuple[int, ...]:
    """A descending graphics clock table, the shape nvmlDeviceGetSupportedGraphicsClocks gives."""
    return tuple(range(highest_mhz, lowest_mhz - 1, -step_mhz))


@dataclass(frozen=True)
class GpuProfile:
    """One board model. Powers in watts, clocks in MHz, temperatures in °C."""

    key: str
    name: str  # as nvmlDeviceGetName reports it
    memory_total_mib: int
    memory_reserved_mib: int  # used by the driver and firmware with nothing running
    pci_device_id: int
    compute_capability: tuple[int, int]
    power_min_w: float
    power_max_w: float
    power_default_w: float
    idle_w: float
    max_board_w: float  # drawn at 100 % load and full clocks with no cap
    memory_clocks_mhz: tuple[int, ...]  # descending; the first is the one used under load
    graphics_clocks_mhz: dict[int, tuple[int, ...]]  # per memory clock, descending
    idle_sm_clock_mhz: int
    max_operating_c: float  # SW thermal slowdown starts here (NVML "GPU max operating temp")
    slowdown_c: float  # HW thermal slowdown
    shutdown_c: float
    remapped_rows: bool  # Ampere/Hopper HBM boards; others answer NotSupported
    mig: bool
    numa_from_nvml: bool  # SXM boards on NUMA-aware platforms; PCIe cards: NotSupported
    memory_util_per_load: float  # memory controller busy fraction per unit of SM load
    # --- what dcgm-exporter's default counters need (edge/sim/nvml/fields.py, gpm.py) ---
    hbm: bool = False  # HBM boards report a memory temperature (NVML_FI_DEV_MEMORY_TEMP)
    nvenc: int = 0  # video encoder engines (NVIDIA's video encode/decode support matrix)
    nvdec: int = 0  # video decoder engines
    nvlink_links: int = 0  # 0: a PCIe card without NVLink
    nvlink_gb_s_per_link: float = 0.0  # per direction
    pcie_gb_s: float = 16.0  # the slot's bandwidth per direction (Gen3 x16 16, Gen4 32, Gen5 64)
    gpm: bool = False  # GPU performance monitoring (nvmlGpm*): Hopper and later
    tensor_per_load: float = 0.6  # tensor pipe busy fraction per unit of SM load
    architecture: str = ""  # nvmlDeviceGetArchitecture's family, lower case: hopper, ampere, turing

    @property
    def max_sm_clock_mhz(self) -> int:
        return self.graphics_clocks_mhz[self.memory_clocks_mhz[0]][0]

    @property
    def min_sm_clock_mhz(self) -> int:
        return self.graphics_clocks_mhz[self.memory_clocks_mhz[0]][-1]

    @property
    def thermal_k_c_per_w(self) -> float:
        """°C above ambient per watt, so full power at the default limit sits near 72 °C."""
        return (EQUILIBRIUM_AT_DEFAULT_LIMIT_C - AMBIENT_C) / self.power_default_w


H100 = GpuProfile(
    key="H100",
    name="NVIDIA H100 80GB HBM3",
    memory_total_mib=81559,
    memory_reserved_mib=530,
    pci_device_id=0x233010DE,
    compute_capability=(9, 0),
    power_min_w=200.0,
    power_max_w=700.0,
    power_default_w=700.0,
    idle_w=70.0,
    max_board_w=700.0,
    memory_clocks_mhz=(2619,),
    graphics_clocks_mhz={2619: _clock_table(1980, 345)},
    idle_sm_clock_mhz=345,
    max_operating_c=87.0,
    slowdown_c=89.0,
    shutdown_c=92.0,
    remapped_rows=True,
    mig=True,
    numa_from_nvml=True,
    memory_util_per_load=0.55,
    hbm=True,
    nvenc=0,  # H100 has no NVENC; 7 NVDEC and 7 NVJPG
    nvdec=7,
    nvlink_links=18,  # NVLink 4: 18 links x 25 GB/s per direction = 900 GB/s both ways
    nvlink_gb_s_per_link=25.0,
    pcie_gb_s=64.0,  # Gen5 x16
    gpm=True,
    tensor_per_load=0.7,
    architecture="hopper",
)

A100 = GpuProfile(
    key="A100",
    name="NVIDIA A100-SXM4-80GB",
    memory_total_mib=81920,
    memory_reserved_mib=420,
    pci_device_id=0x20B210DE,
    compute_capability=(8, 0),
    power_min_w=100.0,
    power_max_w=400.0,
    power_default_w=400.0,
    idle_w=60.0,
    max_board_w=400.0,
    memory_clocks_mhz=(1593,),
    graphics_clocks_mhz={1593: _clock_table(1410, 210)},
    idle_sm_clock_mhz=210,
    max_operating_c=85.0,
    slowdown_c=89.0,
    shutdown_c=92.0,
    remapped_rows=True,
    mig=True,
    numa_from_nvml=True,
    memory_util_per_load=0.5,
    hbm=True,
    nvenc=0,  # A100 has no NVENC; 5 NVDEC
    nvdec=5,
    nvlink_links=12,  # NVLink 3 on the SXM4 board: 12 links x 25 GB/s per direction
    nvlink_gb_s_per_link=25.0,
    pcie_gb_s=32.0,  # Gen4 x16
    gpm=False,  # GPM is Hopper and later
    architecture="ampere",
)

# The 40 GB A100 (SXM4): the same board with half the HBM2 (not HBM2e) and its own MIG table.
A100_40GB = replace(
    A100,
    key="A100-40GB",
    name="NVIDIA A100-SXM4-40GB",
    memory_total_mib=40960,
    memory_reserved_mib=400,
    pci_device_id=0x20B010DE,
    memory_clocks_mhz=(1215,),
    graphics_clocks_mhz={1215: _clock_table(1410, 210)},
)

A10 = GpuProfile(
    key="A10",
    name="NVIDIA A10",
    memory_total_mib=23028,
    memory_reserved_mib=260,
    pci_device_id=0x223610DE,
    compute_capability=(8, 6),
    power_min_w=100.0,
    power_max_w=150.0,
    power_default_w=150.0,
    idle_w=22.0,
    max_board_w=150.0,
    memory_clocks_mhz=(6251, 405),
    graphics_clocks_mhz={6251: _clock_table(1695, 210), 405: _clock_table(405, 210)},
    idle_sm_clock_mhz=210,
    max_operating_c=88.0,
    slowdown_c=95.0,
    shutdown_c=98.0,
    remapped_rows=False,
    mig=False,
    numa_from_nvml=False,
    memory_util_per_load=0.4,
    hbm=False,  # GDDR6: no memory temperature sensor in NVML
    nvenc=1,
    nvdec=2,
    pcie_gb_s=32.0,  # Gen4 x16, no NVLink
    tensor_per_load=0.5,
    architecture="ampere",
)

T4 = GpuProfile(
    key="T4",
    name="Tesla T4",
    memory_total_mib=15360,
    memory_reserved_mib=105,
    pci_device_id=0x1EB810DE,
    compute_capability=(7, 5),
    power_min_w=60.0,
    power_max_w=70.0,
    power_default_w=70.0,
    idle_w=10.0,
    max_board_w=70.0,
    memory_clocks_mhz=(5001, 405),
    graphics_clocks_mhz={5001: _clock_table(1590, 300), 405: _clock_table(405, 300)},
    idle_sm_clock_mhz=300,
    max_operating_c=85.0,
    slowdown_c=93.0,
    shutdown_c=96.0,
    remapped_rows=False,
    mig=False,
    numa_from_nvml=False,
    memory_util_per_load=0.45,
    hbm=False,  # GDDR6: no memory temperature sensor in NVML
    nvenc=1,
    nvdec=2,
    pcie_gb_s=16.0,  # Gen3 x16, no NVLink
    tensor_per_load=0.5,
    architecture="turing",
)

PROFILES: dict[str, GpuProfile] = {p.key: p for p in (H100, A100, A10, T4, A100_40GB)}


def get_profile(model: str) -> GpuProfile:
    """Look a model up by key ("H100", case-insensitive); a typo names the valid ones."""
    for key, profile in PROFILES.items():
        if key.lower() == model.strip().lower():
            return profile
    raise ValueError(f"unknown GPU model {model!r}; valid models: {', '.join(PROFILES)}")
