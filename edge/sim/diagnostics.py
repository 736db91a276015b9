"""What DCGM's diagnostic (`dcgmi diag -r <level>`) and a CUDA context probe find on a simulated GPU.

Pure: from a board's state to a result the sim HTTP API returns and the stand-in tools print.
The tests and their names follow what `dcgmi diag` lists per level (DCGM 3.x): level 1 the
deployment checks, level 2 adds PCIe and GPU memory, level 3 the stress tests, level 4 memtest.

A check fails, with a reason, when the board is lost (nothing after the NVML check runs), when a
recovery action is pending (the CUDA library check: no context can be made on a GPU that needs a
reset or a reboot), when a row remap is pending or failed, or when a latent fault was injected
(`diag_fails`: the Inforom check at level 1, GPU memory from level 2). The CUDA probe fails when
the board is lost or a recovery action is pending.
"""

from __future__ import annotations

from typing import Any

from edge.sim.physics import SimGpu

LEVELS = (1, 2, 3, 4)
_DEPLOYMENT = ("Denylist", "NVML Library", "CUDA Main Library", "Permissions and OS Blocks",
               "Persistence Mode", "Environment Variables", "Page Retirement/Row Remap",
               "Graphics Processes", "Inforom")
_BY_LEVEL: tuple[tuple[int, str, str], ...] = (
    (2, "Integration", "PCIe"),
    (2, "Hardware", "GPU Memory"),
    (3, "Hardware", "Diagnostic"),
    (3, "Stress", "Targeted Stress"),
    (3, "Stress", "Targeted Power"),
    (3, "Stress", "Memory Bandwidth"),
    (4, "Hardware", "Memtest"),
)
_RECOVERY_NAMES = {"reset": "GPU_RESET", "reboot": "NODE_REBOOT"}


def cuda_context_error(gpu: SimGpu) -> str | None:
    """Why a CUDA context cannot be made on the GPU now; None: it can."""
    if gpu.lost:
        return f"cudaErrorNoDevice: GPU {gpu.index} ({gpu.pci_bus_id}) has fallen off the bus"
    if gpu.recovery is not None:
        return (f"cudaErrorDevicesUnavailable: GPU {gpu.index} needs a {gpu.recovery} "
                f"(NVML recovery action {_RECOVERY_NAMES[gpu.recovery]})")
    return None


def _failures(gpu: SimGpu, level: int) -> dict[str, str]:
    """Test name -> why it fails."""
    failed: dict[str, str] = {}
    cuda = cuda_context_error(gpu)
    if cuda is not None:
        failed["CUDA Main Library"] = cuda
    if gpu.remap_failure:
        failed["Page Retirement/Row Remap"] = (f"GPU {gpu.index} had a row remapping failure; "
                                               "the GPU should be replaced")
    elif gpu.remap_pending:
        failed["Page Retirement/Row Remap"] = (f"GPU {gpu.index} has pending row remappings; "
                                               "reset the GPU to apply them")
    if gpu.diag_fault:
        failed["GPU Memory" if level >= 2 else "Inforom"] = (
            f"GPU {gpu.index}: the simulated board fails this test (diag_fails)")
    return failed


def diagnose(gpu: SimGpu, level: int, driver_version: str) -> dict[str, Any]:
    """The diagnostic of `level` on one GPU: every test with Pass/Fail/Skip and its reason."""
    if level not in LEVELS:
        raise ValueError(f"diagnostic level must be one of {LEVELS}, not {level}")
    names = [("Deployment", name) for name in _DEPLOYMENT]
    names += [(category, name) for lowest, category, name in _BY_LEVEL if level >= lowest]
    tests: list[dict[str, Any]] = []
    if gpu.lost:
        for category, name in names:
            if name == "Denylist":
                result, info = "Pass", None
            elif name == "NVML Library":
                result, info = "Fail", f"GPU {gpu.index} is lost: NVML answers GPU_IS_LOST"
            else:
                result, info = "Skip", None
            tests.append({"category": category, "name": name, "result": result, "info": info})
    else:
        failed = _failures(gpu, level)
        for category, name in names:
            tests.append({"category": category, "name": name,
                          "result": "Fail" if name in failed else "Pass", "info": failed.get(name)})
    cuda = cuda_context_error(gpu)
    return {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "pci_bus_id": gpu.pci_bus_id,
        "pci_device_id": f"{gpu.profile.pci_device_id >> 16:04x}",
        "driver_version": driver_version,
        "level": level,
        "passed": all(t["result"] != "Fail" for t in tests),
        "tests": tests,
        "cuda_context": {"ok": cuda is None, "error": cuda},
    }
