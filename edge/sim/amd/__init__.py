"""A simulated AMD node under the real amdsmi Python bindings: a libamd_smi.so built from
libamd_smi_sim.c whose functions call back into Python (see sim.py), Instinct MI210 and MI300X
boards (profiles.py) following edge/sim/physics.py's model.
"""

from edge.sim.amd.build import BuildError
from edge.sim.amd.profiles import BOARDS, PROFILES
from edge.sim.amd.sim import SimulatedAmdSmi, install

__all__ = ["BOARDS", "PROFILES", "BuildError", "SimulatedAmdSmi", "install"]
