"""A simulated Intel node: Flex boards behind a simulated i915 (or xe) sysfs + proc tree, read by
the real Intel backend (edge/devices/intel) exactly as it reads a host's /sys and /proc."""

from edge.sim.intel.profiles import PROFILES, get_profile
from edge.sim.intel.sim import SimulatedIntel, install

__all__ = ["PROFILES", "SimulatedIntel", "get_profile", "install"]
