"""The symbols of the simulated libnvidia-ml, by area.

Each C function pynvml calls is a ctypes `CFUNCTYPE` callback over the simulated driver's state
(`driver.SimDriver`). They are written in one module per area of the NVML API, so that a reader
looking for how power limits or XID events are simulated finds them together, and a new symbol
goes next to its neighbours: `device` (library, finding devices, identity, memory and
utilisation), `power` (power, energy, temperature, clocks), `events` (ECC and event sets, through
which XID and ECC faults arrive), `processes`, `fields` (NVML field values, PCIe replays,
encoder/decoder, vGPU), `gpm` (the profiling metrics) and `mig` (MIG mode, GPU and compute
instances, MIG device handles; its state and rules in `mig_state`). `abi` holds what they share
(return codes, writing into C pointers, the callback wrapper).
"""

from __future__ import annotations

from typing import Any

from edge.sim.nvml.abi import Exports
from edge.sim.nvml.device import export_device
from edge.sim.nvml.driver import SimDriver
from edge.sim.nvml.events import export_events
from edge.sim.nvml.fields import export_fields
from edge.sim.nvml.gpm import export_gpm
from edge.sim.nvml.mig import export_mig
from edge.sim.nvml.power import export_power
from edge.sim.nvml.processes import export_processes


def build_symbols(driver: SimDriver) -> dict[str, Any]:
    """C symbol name -> callback, for every NVML function the simulation implements."""
    exports = Exports(driver.lock, driver.answering, driver.gpu)
    for area in (export_device, export_power, export_events, export_processes, export_fields,
                 export_gpm, export_mig):  # export_mig after export_device: it extends its symbols
        area(driver, exports)
    return exports.table
