"""The simulated driver's side of remediation: NVML's recovery-action field, GPU resets (and the
device's refusals), node reboots and diagnostics, read through the real pynvml bindings; and the
stand-in tools (edge/sim/tools) run as processes against a real `kgpu edge run --backend sim`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pydantic
import pynvml
import pytest

from edge.sim import SimFault, SimRefused, SimulatedNvml, install
from kgpu.lab.processes import wait_for
from tests.helpers.clock import FakeClock
from tests.helpers.edge_process import EdgeProcess

RESET, REBOOT, NONE = (pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET, pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT,
                       pynvml.NVML_GPU_RECOVERY_ACTION_NONE)


@pytest.fixture
def make_sim() -> Iterator[Callable[..., SimulatedNvml]]:
    made: list[SimulatedNvml] = []

    def make(gpus: int = 2, model: str = "H100") -> SimulatedNvml:
        sim = install(gpus, model, clock=FakeClock())
        made.append(sim)
        pynvml.nvmlInit()
        return sim

    yield make
    for sim in reversed(made):
        sim.uninstall()


def handle(index: int = 0) -> Any:
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def recovery_action(index: int = 0) -> tuple[int, int]:
    """(the field's own nvmlReturn, its value) as a monitoring agent reads it."""
    value = pynvml.nvmlDeviceGetFieldValues(handle(index), [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])[0]
    return value.nvmlReturn, value.value.uiVal


def failed_tests(result: dict[str, Any]) -> dict[str, str]:
    return {t["name"]: t["info"] for t in result["tests"] if t["result"] == "Fail"}


# ----- NVML's recovery-action field -----------------------------------------------------------


def test_the_recovery_action_field_reports_what_each_fault_needs(make_sim) -> None:
    sim = make_sim(4)
    assert recovery_action(0) == (pynvml.NVML_SUCCESS, NONE)
    sim.inject(0, {"ecc_dbe": 1})  # a retired row waits for a reset
    sim.inject(1, {"xid": 13})  # the application's own error: nothing to do on the board
    sim.inject(2, {"xid": 79, "recovery": "reboot"})
    sim.inject(3, {"xid": 48})
    assert [recovery_action(i)[1] for i in range(4)] == [RESET, NONE, REBOOT, RESET]
    sim.inject(3, {"xid": 119, "recovery": "reboot"})  # a heavier fault raises it; a lighter never lowers it
    sim.inject(2, {"xid": 48})
    assert [recovery_action(i)[1] for i in (2, 3)] == [REBOOT, REBOOT]
    assert sim.state(3)["recovery_action"] == "reboot"

    sim.recovery_action_field = False  # an NVML older than R565: the field alone is refused
    code, _ = recovery_action(0)
    assert code == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert pynvml.nvmlDeviceGetTemperature(handle(0), pynvml.NVML_TEMPERATURE_GPU) > 0


def test_recovery_must_belong_to_a_fault() -> None:
    with pytest.raises(pydantic.ValidationError, match="recovery applies to"):
        SimFault.model_validate({"recovery": "reset"})
    with pytest.raises(pydantic.ValidationError):
        SimFault.model_validate({"xid": 79, "recovery": "power-cycle"})


# ----- GPU reset -------------------------------------------------------------------------------


def test_a_reset_clears_what_a_real_reset_clears(make_sim) -> None:
    sim = make_sim()
    pynvml.nvmlDeviceSetPowerManagementLimit(handle(), 400_000)
    pynvml.nvmlDeviceSetGpuLockedClocks(handle(), 1000, 1200)
    sim.inject(0, {"ecc_dbe": 2, "ecc_sbe": 5, "xid": 79, "lost": True})
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetHandleByIndex(0)

    result = sim.gpu_reset(0)
    assert result["effective"] is True and result["pci_bus_id"] == "00000000:18:00.0"
    h = handle()  # answers again
    assert recovery_action(0)[1] == NONE
    assert pynvml.nvmlDeviceGetPowerManagementLimit(h) == 700_000  # back to default
    volatile = pynvml.nvmlDeviceGetTotalEccErrors(h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
    aggregate = pynvml.nvmlDeviceGetTotalEccErrors(h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                                   pynvml.NVML_AGGREGATE_ECC)
    assert (volatile, aggregate) == (0, 2)
    correctable, uncorrectable, pending, failure = pynvml.nvmlDeviceGetRemappedRows(h)
    assert (uncorrectable, pending, failure) == (2, 0, 0)  # the remap took effect
    assert sim.state(0)["locked_clocks_mhz"] is None
    assert sim.diagnose(0, 1)["passed"] is True


def test_a_reset_is_refused_while_a_process_holds_the_gpu(make_sim) -> None:
    sim = make_sim()
    sim.inject(0, {"xid": 79, "processes": [{"pid": 4242, "used_memory_mib": 1024, "sm_util": 40}]})
    with pytest.raises(SimRefused, match="In use by another client") as refused:
        sim.gpu_reset(0)
    assert refused.value.reason == "in-use"
    assert recovery_action(0)[1] == RESET  # nothing changed
    assert [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle())] == [4242]

    sim.inject(0, {"processes": []})  # the pod drained
    assert sim.gpu_reset(0)["effective"] is True
    assert recovery_action(0)[1] == NONE


def test_a_reset_is_refused_while_mig_instances_exist_and_applies_a_pending_mig_mode(make_sim) -> None:
    sim = make_sim(1)
    sim.inject(0, {"processes": [{"pid": 77, "used_memory_mib": 10, "sm_util": 5}]})
    pynvml.nvmlDeviceSetMigMode(handle(), pynvml.NVML_DEVICE_MIG_ENABLE)  # busy: left pending
    assert pynvml.nvmlDeviceGetMigMode(handle()) == [0, 1]
    sim.inject(0, {"processes": []})
    sim.gpu_reset(0)
    assert pynvml.nvmlDeviceGetMigMode(handle()) == [1, 1]  # the reset made it current

    profile = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle(), pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE)
    instance = pynvml.nvmlDeviceCreateGpuInstance(handle(), profile.id)
    with pytest.raises(SimRefused) as refused:
        sim.gpu_reset(0)
    assert refused.value.reason == "in-use"
    pynvml.nvmlGpuInstanceDestroy(instance)
    assert sim.gpu_reset(0)["effective"] is True


def test_a_fault_that_needs_a_reboot_survives_a_reset_and_a_reboot_clears_it(make_sim) -> None:
    sim = make_sim()
    sim.inject(0, {"ecc_dbe": 1})
    sim.inject(0, {"xid": 79, "lost": True, "recovery": "reboot"})
    sim.inject(1, {"diag_fails": True})  # no recovery given: a bad board, nothing clears it

    result = sim.gpu_reset(0)
    assert result["effective"] is False and result["state"]["lost"] is True
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetHandleByIndex(0)
    assert sim.diagnose(0, 1)["passed"] is False
    assert sim.gpu_reset(1)["effective"] is True
    assert sim.diagnose(1, 1)["passed"] is False  # the reset did not clear the latent fault

    assert sim.reboot()["boots"] == 2
    with pytest.raises(pynvml.NVMLError_Uninitialized):  # the driver was reloaded
        pynvml.nvmlDeviceGetCount()
    pynvml.nvmlInit()
    h = handle(0)
    assert recovery_action(0)[1] == NONE
    assert pynvml.nvmlDeviceGetRemappedRows(h)[1:3] == (1, 0)  # the hardware kept its retired row
    assert pynvml.nvmlDeviceGetTotalEccErrors(h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                              pynvml.NVML_AGGREGATE_ECC) == 1
    assert sim.diagnose(0, 1)["passed"] is True
    assert failed_tests(sim.diagnose(1, 1)) == {"Inforom": "GPU 1: the simulated board fails this test (diag_fails)"}


# ----- diagnostics -----------------------------------------------------------------------------


def test_diagnostics_pass_or_fail_with_the_reason(make_sim) -> None:
    sim = make_sim(3)
    healthy = sim.diagnose(0, 1)
    assert healthy["passed"] is True and healthy["cuda_context"] == {"ok": True, "error": None}
    assert [t["name"] for t in healthy["tests"]][:2] == ["Denylist", "NVML Library"]
    assert {t["name"] for t in sim.diagnose(0, 3)["tests"]} >= {"PCIe", "GPU Memory", "Targeted Stress"}

    sim.inject(0, {"ecc_dbe": 1})
    pending = sim.diagnose(0, 1)
    assert pending["passed"] is False and pending["cuda_context"]["ok"] is False
    assert set(failed_tests(pending)) == {"CUDA Main Library", "Page Retirement/Row Remap"}
    assert "pending row remappings" in failed_tests(pending)["Page Retirement/Row Remap"]

    sim.inject(1, {"remap_failure": True})
    assert "replaced" in failed_tests(sim.diagnose(1, 1))["Page Retirement/Row Remap"]
    assert sim.gpu_reset(1)["effective"] is True
    assert sim.diagnose(1, 1)["passed"] is False  # a remap failure is hardware: no reset clears it

    sim.inject(2, {"diag_fails": True, "recovery": "reset"})
    assert set(failed_tests(sim.diagnose(2, 2))) == {"GPU Memory"}
    assert sim.diagnose(2, 1)["cuda_context"]["ok"] is True  # latent: only the diagnostic finds it
    sim.gpu_reset(2)
    assert sim.diagnose(2, 2)["passed"] is True

    sim.inject(0, {"lost": True})
    lost = sim.diagnose(0, 1)
    assert failed_tests(lost) == {"NVML Library": "GPU 0 is lost: NVML answers GPU_IS_LOST"}
    with pytest.raises(ValueError, match="level"):
        sim.diagnose(0, 5)


# ----- the stand-in tools against a real edge daemon -------------------------------------------


def tool(edge: EdgeProcess | None, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KGPU_EDGE_API"}
    if edge is not None:
        env["KGPU_EDGE_API"] = edge.base
    return subprocess.run([sys.executable, "-m", f"edge.sim.tools.{module}", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_tools_reset_a_gpu_lost_with_xid_79_on_a_running_edge(edge_factory) -> None:
    edge = edge_factory(gpus=2, config={"lost_probe_interval": 1})  # a lost GPU is tried again each second
    edge.inject(1, xid=79, lost=True)
    wait_for(lambda: (edge.gpu(1)["sample"] or {}).get("lost") is True, timeout=30, what="GPU 1 seen lost")

    diag = tool(edge, "dcgmi", "diag", "-r", "1", "-i", "1")
    assert diag.returncode == 226, diag
    assert "| NVML Library              | Fail" in diag.stdout and "GPU 1 is lost" in diag.stdout
    probe = tool(edge, "cuda_probe", "-i", "1")
    assert probe.returncode == 1 and "fallen off the bus" in probe.stderr

    edge.inject(0, processes=[{"pid": 4242, "used_memory_mib": 512, "sm_util": 30}])
    busy = tool(edge, "nvidia_smi", "--gpu-reset", "-i", "0")
    assert busy.returncode == 255, busy
    assert "GPU 00000000:18:00.0: In use by another client" in busy.stdout

    reset = tool(edge, "nvidia_smi", "--gpu-reset", "-i", "1")
    assert (reset.returncode, reset.stdout) == (0, "GPU 00000000:2A:00.0 was successfully reset.\n"), reset
    before = edge.gpu(1)["sample"]["ts"]

    def answers_again() -> bool:
        sample = edge.gpu(1)["sample"]
        return sample["ts"] > before and sample["lost"] is False and sample["temperature_c"] is not None

    wait_for(answers_again, timeout=30, what="GPU 1 sampled again after its reset")
    assert tool(edge, "dcgmi", "diag", "-r", "1", "-i", "1").returncode == 0
    assert tool(edge, "cuda_probe", "-i", "1").returncode == 0
    assert tool(edge, "nvidia_smi", "--gpu-reset", "-i", "7").returncode == 6  # "No devices were found"

    before = edge.gpu(0)["sample"]["ts"]
    rebooted = tool(edge, "reboot")
    assert (rebooted.returncode, rebooted.stderr) == (0, "simulated node rebooted (boot 2)\n"), rebooted
    wait_for(lambda: edge.gpu(0)["sample"]["ts"] > before + 1 and not edge.gpu(0)["sample"]["lost"], timeout=30,
             what="the daemon reading GPUs again after the simulated reboot")
    status, body = edge.request("POST", "/api/v1/sim/gpus/0/reset")  # a reboot ended the process
    assert status == 200 and body["state"]["processes"] == [], body

    unset = tool(None, "reboot")
    assert unset.returncode == 2 and "KGPU_EDGE_API is not set" in unset.stderr
