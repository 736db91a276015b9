"""A simulated libnvidia-ml: ctypes callbacks put in place of `pynvml.nvmlLib`.

`install(gpus, model)` makes every pynvml call (and so our whole driver) run against simulated
boards whose power, temperature and clocks follow a small physical model, and into which
load and faults can be injected (`SimulatedNvml.inject`). Tests and the `--sim` daemon use it.

The other vendors' simulations have the same public face (`gpus`, `inject`, `state`, `gpu_reset`,
`reboot`, `diagnose`, `uninstall`, plus `backend_kwargs()` for their backend) at their own real
interface: edge/sim/jetson (a sysfs tree), edge/sim/amd (a libamd_smi under amdsmi), edge/sim/intel
(an xe sysfs/hwmon tree); edge/devices/select.py installs the one `--sim-model` names.
"""

from edge.sim.lib import SimRefused, SimulatedLib, SimulatedNvml, install
from edge.sim.physics import SimFault, SimGpu, SimProcess
from edge.sim.profiles import PROFILES, GpuProfile, get_profile

__all__ = [
    "PROFILES",
    "GpuProfile",
    "SimFault",
    "SimGpu",
    "SimProcess",
    "SimRefused",
    "SimulatedLib",
    "SimulatedNvml",
    "get_profile",
    "install",
]
