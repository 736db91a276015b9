"""Jetson Orin modules the simulated sysfs tree can pretend to be: ORIN-NANO, ORIN-NX, AGX-ORIN.

Each module is a `GpuProfile` (edge/sim/profiles.py: the physics of edge/sim/physics.py `SimGpu`
runs on it unchanged) plus what only a Jetson has (`JetsonModule`): the devicetree identity, the
GPU's devfreq OPP table in Hz, the INA3221 rails and the nvpmodel power modes.

Sources (read 2026-12): NVIDIA Jetson Orin NX Series, Jetson Orin Nano Series and Jetson AGX Orin
Series data sheets (GPU cores and maximum frequency, memory, module power range: Orin Nano 8GB
625 MHz 7-15 W, Orin NX 16GB 918 MHz 10-25 W, AGX Orin 64GB 1.3 GHz 15-60 W); the Jetson Linux
Developer Guide r35/r36 "Jetson Orin Nano Series, Jetson Orin NX Series and Jetson AGX Orin Series"
power and performance chapter (nvpmodel mode names and IDs, the INA3221 rail names VDD_IN /
VDD_CPU_GPU_CV / VDD_SOC on Orin NX and Nano, VDD_GPU_SOC / VDD_CPU_CV / VIN_SYS_5V0 on AGX Orin);
jetson-stats 7.2.2 (jtop/core/*.py) for the file layout.

Not confirmed against a real module (plausible values, marked so the reader knows): the OPP tables
below 918 MHz (the 102 MHz step of ga10b's table is from observed `available_frequencies` listings,
Orin Nano's top step 624.75 MHz likewise); each mode's GPU frequency cap (the developer guide's
tables give them per mode; the figures here are rounded to an OPP step and may differ by one step);
which mode is the default on AGX Orin 64GB (taken as MAXN) and Orin NX 16GB (taken as 15W); the
rail powers at idle and at full GPU load (from forum measurements: AGX Orin MAXN GPU stress ~40 W
on VDD_GPU_SOC) and the thermal trip points (the module's Tj max is 105 °C; software throttling is
taken to start at 95 °C). The Orin Nano is the original (JetPack 6.0/6.1) 8GB module, not the
"Super" 25 W MAXN_SUPER mode of JetPack 6.2.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.sim.profiles import GpuProfile

MHZ = 1_000_000

# ga10b's OPP table (Hz) up to AGX Orin's 1300.5 MHz; smaller modules stop lower.
_GA10B_OPPS_HZ = (306_000_000, 408_000_000, 510_000_000, 612_000_000, 714_000_000, 816_000_000,
                  918_000_000, 1_020_000_000, 1_122_000_000, 1_224_000_000, 1_300_500_000)


def to_mhz(hz: int) -> int:
    """devfreq speaks Hz; everything above it speaks whole MHz (1300500000 -> 1300)."""
    return hz // MHZ


@dataclass(frozen=True)
class PowerMode:
    """One nvpmodel mode: its ID and NAME in /etc/nvpmodel.conf, its power budget (None: MAXN,
    unbudgeted) and the GPU devfreq cap it writes (GPU MAX_FREQ; -1: the table's top)."""

    id: int
    name: str
    budget_w: float | None
    gpu_max_hz: int


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel: its label and the bus voltage it measures at (mV)."""

    label: str
    millivolts: int


@dataclass(frozen=True)
class JetsonModule:
    """What a Jetson module shows beyond a GpuProfile."""

    profile: GpuProfile
    model: str  # /sys/firmware/devicetree/base/model
    compatible: tuple[str, ...]  # /sys/firmware/devicetree/base/compatible (NUL-separated)
    module_part: str  # the p37xx number the nvpmodel file is named after
    opps_hz: tuple[int, ...]  # ascending, as available_frequencies lists them
    gpu_rail: str  # the rail whose power is the GPU's figure (it also carries CPU/SOC, see backend)
    rails: tuple[tuple[str, tuple[Rail, ...]], ...]  # (i2c device "1-0040", its channels)
    modes: tuple[PowerMode, ...]
    default_mode: int
    other_rails_w: float  # what the rails besides the GPU rail draw at idle (CPU, SOC, DDR)


def _orin_profile(key: str, name: str, memory_mib: int, opps_hz: tuple[int, ...], idle_w: float,
                  max_w: float, *, nvenc: int) -> GpuProfile:
    table = tuple(to_mhz(hz) for hz in reversed(opps_hz))
    return GpuProfile(
        key=key,
        name=name,
        memory_total_mib=memory_mib,
        memory_reserved_mib=900,  # the GPU's nvmap share with nothing running (CUDA/display carve-outs)
        pci_device_id=0,  # integrated: no PCI function
        compute_capability=(8, 7),
        # No GPU power cap exists: min = max = default = the rail's peak, so SimGpu's cap never binds.
        power_min_w=max_w,
        power_max_w=max_w,
        power_default_w=max_w,
        idle_w=idle_w,
        max_board_w=max_w,
        memory_clocks_mhz=(3199,),  # EMC, LPDDR5
        graphics_clocks_mhz={3199: table},
        idle_sm_clock_mhz=table[-1],
        max_operating_c=95.0,
        slowdown_c=99.0,
        shutdown_c=105.0,
        remapped_rows=False,
        mig=False,
        numa_from_nvml=False,
        memory_util_per_load=0.5,
        hbm=False,
        nvenc=nvenc,
        nvdec=1,
        pcie_gb_s=0.0,
        gpm=False,
        architecture="ampere",
    )


_NANO_OPPS = (*_GA10B_OPPS_HZ[:4], 624_750_000)
_NX_OPPS = _GA10B_OPPS_HZ[:7]

ORIN_NANO = JetsonModule(
    profile=_orin_profile("ORIN-NANO", "NVIDIA Jetson Orin Nano (8GB)", 7620, _NANO_OPPS, 1.0, 8.0,
                          nvenc=0),  # Orin Nano has no NVENC
    model="NVIDIA Jetson Orin Nano Developer Kit",
    compatible=("nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005", "nvidia,tegra234"),
    module_part="p3767_0005",
    opps_hz=_NANO_OPPS,
    gpu_rail="VDD_CPU_GPU_CV",
    rails=(("1-0040", (Rail("VDD_IN", 5000), Rail("VDD_CPU_GPU_CV", 5000), Rail("VDD_SOC", 5000))),),
    modes=(PowerMode(0, "15W", 15.0, -1), PowerMode(1, "7W", 7.0, 408_000_000)),
    default_mode=0,
    other_rails_w=2.5,
)

ORIN_NX = JetsonModule(
    profile=_orin_profile("ORIN-NX", "NVIDIA Jetson Orin NX (16GB ram)", 15656, _NX_OPPS, 1.5, 16.0,
                          nvenc=1),
    model="NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
    compatible=("nvidia,p3768-0000+p3767-0000", "nvidia,p3767-0000", "nvidia,tegra234"),
    module_part="p3767_0000",
    opps_hz=_NX_OPPS,
    gpu_rail="VDD_CPU_GPU_CV",
    rails=(("1-0040", (Rail("VDD_IN", 5000), Rail("VDD_CPU_GPU_CV", 5000), Rail("VDD_SOC", 5000))),),
    modes=(PowerMode(0, "MAXN", None, -1), PowerMode(1, "10W", 10.0, 612_000_000),
           PowerMode(2, "15W", 15.0, 714_000_000), PowerMode(3, "25W", 25.0, 918_000_000)),
    default_mode=2,
    other_rails_w=3.0,
)

AGX_ORIN = JetsonModule(
    profile=_orin_profile("AGX-ORIN", "NVIDIA Jetson AGX Orin (64GB ram)", 62800, _GA10B_OPPS_HZ,
                          3.0, 40.0, nvenc=2),
    model="Jetson AGX Orin Developer Kit",
    compatible=("nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005", "nvidia,tegra234"),
    module_part="p3701_0005",
    opps_hz=_GA10B_OPPS_HZ,
    gpu_rail="VDD_GPU_SOC",
    rails=(("1-0040", (Rail("VDD_GPU_SOC", 5000), Rail("VDD_CPU_CV", 5000), Rail("VIN_SYS_5V0", 5000))),
           ("1-0041", (Rail("NC", 5000), Rail("VDDQ_VDD2_1V8AO", 5000), Rail("NC", 5000)))),
    modes=(PowerMode(0, "MAXN", None, -1), PowerMode(1, "MODE_15W", 15.0, 408_000_000),
           PowerMode(2, "MODE_30W", 30.0, 612_000_000), PowerMode(3, "MODE_50W", 50.0, 816_000_000)),
    default_mode=0,
    other_rails_w=4.0,
)

MODULES: dict[str, JetsonModule] = {m.profile.key: m for m in (ORIN_NANO, ORIN_NX, AGX_ORIN)}
PROFILES: dict[str, GpuProfile] = {key: m.profile for key, m in MODULES.items()}


def get_module(model: str) -> JetsonModule:
    """A module by key ("ORIN-NX", case-insensitive); a typo names the valid ones."""
    for key, module in MODULES.items():
        if key.lower() == model.strip().lower():
            return module
    raise ValueError(f"unknown Jetson model {model!r}; valid models: {', '.join(MODULES)}")
