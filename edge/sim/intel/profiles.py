"""Intel boards the simulated i915/xe sysfs tree can pretend to be (edge/sim/intel/).

FLEX170 — Intel Data Center GPU Flex 170 (ATS-M, Xe-HPG), from Intel's Flex Series product brief and
ARK (ark.intel.com, "Intel Data Center GPU Flex 170"): 150 W total board power, 16 GB GDDR6 (256-bit,
576 GB/s, i.e. 18 Gbps: a 2250 MHz memory clock), 32 Xe cores, a maximum dynamic frequency of
2050 MHz, PCIe 4.0 x16, passively cooled; PCI device id 0x56C0 (the kernel's INTEL_ATS_M_IDS).

What we could not confirm from Intel's documents, and chose (marked "sim" below): the idle power,
the lowest GT frequency (RPn: 300 MHz, what DG2-family parts report), the memory the driver keeps,
the thermal thresholds (Intel publishes none for Flex in ARK), and the lowest power cap: the
kernel exposes no minimum for power1_max, and the hardware clamps to an unpublished SKU minimum;
the simulation clamps to 40 % of TDP, the floor kgpu's backend offers (edge/devices/intel/backend.py).
The Flex 140 (0x56C1, two 8-Xe-core GPUs and 2 x 6 GB on one 75 W card) is left out: how its
75 W splits between the two GPUs' hwmon files is not documented.

The NVML-only fields of GpuProfile are set to what fits a board without them (no MIG, no row
remapping, no NVLink, no GPM; `compute_capability` (0, 0)).
"""

from edge.sim.profiles import GpuProfile

RPN_MHZ = 300  # sim: RPn of DG2-family parts
FREQ_STEP_MHZ = 50

FLEX170 = GpuProfile(
    key="FLEX170",
    name="Intel Data Center GPU Flex 170",
    memory_total_mib=16384,
    memory_reserved_mib=0,  # fdinfo counts only what clients hold
    pci_device_id=(0x56C0 << 16) | 0x8086,  # device << 16 | vendor, as the NVML profiles pack it
    compute_capability=(0, 0),
    power_min_w=60.0,  # sim: 40 % of TDP (see above)
    power_max_w=150.0,
    power_default_w=150.0,
    idle_w=35.0,  # sim
    max_board_w=150.0,
    memory_clocks_mhz=(2250,),
    graphics_clocks_mhz={2250: tuple(range(2050, RPN_MHZ - 1, -FREQ_STEP_MHZ))},
    idle_sm_clock_mhz=RPN_MHZ,
    max_operating_c=95.0,  # sim
    slowdown_c=100.0,  # sim
    shutdown_c=105.0,  # sim
    remapped_rows=False,
    mig=False,
    numa_from_nvml=False,
    memory_util_per_load=0.5,
    hbm=False,
    nvenc=0,  # NVIDIA's encoder fields; the Flex media engines are not simulated
    nvdec=0,
    pcie_gb_s=32.0,  # PCIe 4.0 x16
    gpm=False,
    tensor_per_load=0.6,
    architecture="xe-hpg",
)

PROFILES: dict[str, GpuProfile] = {p.key: p for p in (FLEX170,)}


def get_profile(model: str) -> GpuProfile:
    for key, profile in PROFILES.items():
        if key.lower() == model.strip().lower():
            return profile
    raise ValueError(f"unknown Intel GPU model {model!r}; valid models: {', '.join(PROFILES)}")
