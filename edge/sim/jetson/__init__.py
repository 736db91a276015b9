"""A simulated Jetson module at its real interface, the kernel's files (issue 16): profiles
(edge/sim/jetson/profiles.py), the tree and its kernel (tree.py), the simulation's public face
(sim.py) and an `nvpmodel` stand-in (nvpmodel.py)."""

from edge.sim.jetson.profiles import MODULES, PROFILES, JetsonModule, get_module
from edge.sim.jetson.sim import SimulatedJetson, install

__all__ = ["MODULES", "PROFILES", "JetsonModule", "SimulatedJetson", "get_module", "install"]
