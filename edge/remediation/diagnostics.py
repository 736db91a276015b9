"""The ladder's local checks: NVML checks read from the sample (pure), NVML's recovery action
(read on the driver thread), and the configured commands (CUDA probe, `dcgmi diag`, the reset,
the reboot), each run as an asyncio subprocess bounded in time, so the event loop never waits.

Commands are templates: `{index}`, `{uuid}` and `{pci_bus_id}` are filled in; they run through
the shell with `KGPU_EDGE_API` added to their environment (the simulated driver's tools reach
the in-process simulation through it).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

import pynvml

from shared.gpu import GpuInventory, GpuSample

OUTPUT_KEPT = 400  # characters of a command's output kept in the decision log

# NVML_FI_DEV_GET_GPU_RECOVERY_ACTION's values (nvml.h): what the board needs to recover.
RECOVERY_ACTIONS = {
    pynvml.NVML_GPU_RECOVERY_ACTION_NONE: "none",
    pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET: "gpu reset",
    pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT: "node reboot",
    pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P: "drain peer-to-peer",
    pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET: "drain and reset",
}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class CommandOutcome:
    ok: bool
    detail: str


def nvml_checks(sample: GpuSample | None, critical_temp_c: float, recovery_action: int | None = None,
                interface: str = "NVML") -> list[Check]:
    """What the latest sample (and NVML's recovery action, when read) says of the GPU. The same
    checks serve every backend (`interface` names it): a figure it does not give is not checked."""
    if sample is None or sample.lost:
        return [Check(interface.lower(), False, f"the GPU does not answer {interface} (lost)")]
    checks = [
        Check("row_remap_pending", not sample.remap_pending, "row remap pending (needs a GPU reset)"
              if sample.remap_pending else "no row remap pending"),
        Check("row_remap_failure", not sample.remap_failure, "row remap failure" if sample.remap_failure
              else "no row remap failure"),
    ]
    if sample.temperature_c is not None:
        hot = sample.temperature_c >= critical_temp_c
        checks.append(Check("temperature", not hot, f"{sample.temperature_c:.1f} °C "
                            f"{'>=' if hot else '<'} criticalTempC {critical_temp_c:.1f}"))
    if recovery_action is not None:
        name = RECOVERY_ACTIONS.get(recovery_action, f"action {recovery_action}")
        checks.append(Check("recovery_action", recovery_action == pynvml.NVML_GPU_RECOVERY_ACTION_NONE,
                            f"NVML recovery action: {name}"))
    return checks


def summary(checks: list[Check]) -> tuple[bool, str]:
    failed = [c.detail for c in checks if not c.ok]
    return not failed, "; ".join(failed) if failed else "; ".join(c.detail for c in checks)


def read_recovery_action(index: int) -> int | None:
    """NVML's GPU recovery action field (on the driver thread); None where NVML does not have it."""
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        (value,) = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])
    except pynvml.NVMLError:
        return None
    if value.nvmlReturn != pynvml.NVML_SUCCESS:
        return None
    return int(value.value.uiVal)


def fill(template: str, gpu: GpuInventory) -> str:
    """A command template with the GPU's index, uuid and PCI bus id, each shell-quoted."""
    return template.format(index=gpu.index, uuid=shlex.quote(gpu.uuid), pci_bus_id=shlex.quote(gpu.pci_bus_id))


def available(template: str) -> bool:
    """Whether a command's executable is on PATH (dcgmi runs only where DCGM is installed)."""
    try:
        words = shlex.split(template)
    except ValueError:
        return False
    return bool(words) and shutil.which(words[0]) is not None


async def run_command(command: str, timeout_s: float, env: Mapping[str, str] | None = None) -> CommandOutcome:
    """Run a shell command, bounded by `timeout_s` (then killed); ok when it exits 0."""
    try:
        process = await asyncio.create_subprocess_shell(
            command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True)
    except OSError as exc:
        return CommandOutcome(False, f"{command!r} could not start: {exc}")
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        _kill(process)
        await process.wait()
        return CommandOutcome(False, f"{command!r} did not finish within {timeout_s:.0f} s (killed)")
    except asyncio.CancelledError:  # the daemon stops: leave no command behind
        _kill(process)
        raise
    text = output.decode(errors="replace").strip()[-OUTPUT_KEPT:]
    code = process.returncode
    return CommandOutcome(code == 0, f"{command!r} exited {code}" + (f": {text}" if text else ""))


def _kill(process: asyncio.subprocess.Process) -> None:
    """The command and whatever it started (it runs in its own session)."""
    try:
        os.killpg(process.pid, 9)
    except (ProcessLookupError, PermissionError):
        try:
            process.kill()
        except ProcessLookupError:
            pass
