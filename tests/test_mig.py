"""MIG over the simulated driver, through the real pynvml: NVIDIA's profile tables, applying
layouts and reading them back, what the driver refuses, and what a reboot keeps."""

from __future__ import annotations

import csv
import ctypes
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pynvml
import pytest

from edge.devices.base import DriverRefused
from edge.driver.mig import MigDriver, MigState
from edge.driver.nvml import NvmlDriver
from edge.sim import SimulatedNvml
from edge.sim.nvml.mig_state import PERSISTED_MIG_MODE
from shared.mig import ImpossibleLayout, place, profiles_for
from shared.partitioning import MigLayout

REFERENCE = Path(__file__).resolve().parents[1] / "deploy/reference/nvidia-mig/profiles.csv"
SIM_MODEL = {"NVIDIA A100-SXM4-40GB": "A100-40GB", "NVIDIA A100-SXM4-80GB": "A100",
             "NVIDIA H100 80GB HBM3": "H100"}
H100 = "NVIDIA H100 80GB HBM3"
A100_40 = "NVIDIA A100-SXM4-40GB"
GPU_INSTANCE_PROFILES = [getattr(pynvml, n) for n in dir(pynvml) if n.startswith("NVML_GPU_INSTANCE_PROFILE_")
                         and n != "NVML_GPU_INSTANCE_PROFILE_COUNT"]


def reference() -> dict[str, list[dict[str, str]]]:
    rows: dict[str, list[dict[str, str]]] = {}
    with REFERENCE.open() as handle:
        for row in csv.DictReader(line for line in handle if not line.startswith("#")):
            rows.setdefault(row["board"], []).append(row)
    return rows


def layout(spec: object) -> MigLayout:
    return MigLayout.model_validate(spec)


@pytest.fixture
def node() -> Iterator[Callable[..., tuple[SimulatedNvml, NvmlDriver, MigDriver]]]:
    """A simulated node (unique UUIDs per test), its NvmlDriver and MigDriver; forgets the MIG
    mode its boards kept, so no other test's boards start in MIG mode."""
    seed = f"mig-{uuid.uuid4()}"
    opened: list[tuple[SimulatedNvml, NvmlDriver]] = []

    def make(models: list[str]) -> tuple[SimulatedNvml, NvmlDriver, MigDriver]:
        sim = SimulatedNvml(len(models), models, seed=seed).install()
        driver = NvmlDriver()
        driver.open()
        opened.append((sim, driver))
        return sim, driver, MigDriver(driver)

    yield make
    for sim, driver in reversed(opened):
        uuids = [gpu.uuid for gpu in sim.gpus]
        driver.close()
        sim.uninstall()
        for gpu_uuid in uuids:
            PERSISTED_MIG_MODE.pop(gpu_uuid, None)


@pytest.mark.parametrize("board", sorted(SIM_MODEL))
def test_profiles_and_placements_match_nvidias_tables(node, board: str) -> None:
    rows = {row["profile"]: row for row in reference()[board]}
    assert {p.name for p in profiles_for(board) or ()} == set(rows)
    node([SIM_MODEL[board]])
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    seen = set()
    for index in GPU_INSTANCE_PROFILES:
        try:
            info = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)
        except pynvml.NVMLError_NotSupported:
            continue  # a profile this board does not have (6-slice, 8-slice, GFX, ...)
        name = info.name.decode() if isinstance(info.name, bytes) else info.name
        row = rows[name.removeprefix("MIG ")]
        seen.add(row["profile"])
        assert info.id == int(row["id"])
        assert info.instanceCount == int(row["instances"])
        assert info.memorySizeMB == round(float(row["memory_gib"]) * 1024 / 32) * 32
        assert info.multiprocessorCount == int(row["sms"])
        placements = (pynvml.c_nvmlGpuInstancePlacement_t * 8)()
        count = ctypes.c_uint(8)
        pynvml.nvmlDeviceGetGpuInstancePossiblePlacements(handle, info.id, placements, ctypes.byref(count))
        got = [(placements[i].start, placements[i].size) for i in range(count.value)]
        assert got == [(int(s), int(row["size"])) for s in row["starts"].split()]
    assert seen == set(rows)


def test_layouts_apply_and_read_back_through_nvml(node) -> None:
    sim, _, mig = node(["H100", "A100-40GB"])
    assert mig.read(0) == MigState(True, False, False, (), H100)

    state = mig.apply(0, H100, layout("all-1g.10gb"))
    assert (state.enabled, state.pending_enabled, state.layout_label()) == (True, True, "all-1g.10gb")
    assert [d.start for d in state.devices] == list(range(7))
    assert {d.memory_total_bytes for d in state.devices} == {9984 * 2**20}
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetMigMode(handle) == [1, 1]
    uuids = set()
    for position in range(7):
        device = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, position)
        assert pynvml.nvmlDeviceIsMigDeviceHandle(device).value == 1
        assert pynvml.nvmlDeviceGetName(device) == f"{H100} MIG 1g.10gb"
        assert pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(device)) == 0
        uuids.add(pynvml.nvmlDeviceGetUUID(device))
        by_uuid = pynvml.nvmlDeviceGetHandleByUUID(pynvml.nvmlDeviceGetUUID(device))
        assert pynvml.nvmlDeviceGetComputeInstanceId(by_uuid) == 0
        assert pynvml.nvmlDeviceGetGpuInstanceId(by_uuid) == pynvml.nvmlDeviceGetGpuInstanceId(device)
    assert len(uuids) == 7 and all(u.startswith("MIG-") for u in uuids)
    assert uuids == {d.uuid for d in state.devices}
    assert pynvml.nvmlDeviceIsMigDeviceHandle(handle).value == 0
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetGpuInstanceId(handle)  # a GPU, not a MIG device
    assert set(mig.memory_used(0)) == uuids

    mixed = layout({"mixed": {"3g.40gb": 1, "2g.20gb": 1, "1g.10gb": 2}})
    state = mig.apply(0, H100, mixed)
    assert state.layout_label() == mixed.label() == "mixed 1g.10gb=2,2g.20gb=1,3g.40gb=1"
    assert sorted((d.profile, d.start) for d in state.devices) == \
        sorted((p.profile.name, p.start) for p in place(H100, mixed))
    assert all(d.ci_id == 0 for d in state.devices) and len({d.gi_id for d in state.devices}) == 4

    small = mig.apply(1, A100_40, layout({"mixed": {"1g.5gb": 3, "4g.20gb": 1}}))
    assert Counter(d.profile for d in small.devices) == {"1g.5gb": 3, "4g.20gb": 1}
    assert {d.profile: d.memory_total_bytes for d in small.devices}["1g.5gb"] == 4864 * 2**20

    state = mig.apply(0, H100, layout("disabled"))
    assert state == MigState(True, False, False, (), H100)
    assert state.layout_label() == "disabled"
    assert pynvml.nvmlDeviceGetMigMode(handle) == [0, 0]
    assert sim.gpus[0].uuid not in {d.uuid for d in state.devices}


def test_applying_the_layout_a_gpu_has_changes_nothing(node) -> None:
    sim, _, mig = node(["H100"])
    first = mig.apply(0, H100, layout({"mixed": {"2g.20gb": 2, "1g.10gb": 3}}))
    # Any NVML change would now be refused (no permission, work running): none is attempted.
    sim.allow_set = False
    sim.inject(0, {"processes": [{"pid": 4242, "used_memory_mib": 1024, "sm_util": 50}]})
    again = mig.apply(0, H100, layout({"mixed": {"1g.10gb": 3, "2g.20gb": 2}}))
    assert again == first
    with pytest.raises(DriverRefused):  # while a different layout would have to change it
        mig.apply(0, H100, layout("disabled"))
    assert mig.read(0) == first


def test_impossible_layouts_are_refused_with_the_reason(node) -> None:
    cases = {
        "at most 1 x 4g.40gb": {"mixed": {"4g.40gb": 2}},
        "needs 8 compute slices; NVIDIA H100 80GB HBM3 has 7": {"mixed": {"4g.40gb": 1, "3g.40gb": 1, "1g.10gb": 1}},
        "needs 9 memory slices": {"mixed": {"3g.40gb": 1, "1g.20gb": 2, "1g.10gb": 1}},
        "2g.10gb is not a MIG profile of NVIDIA H100 80GB HBM3; its profiles are 1g.10gb": "all-2g.10gb",
    }
    for reason, spec in cases.items():
        with pytest.raises(ImpossibleLayout, match=reason.replace("+", r"\+")):
            place(H100, layout(spec))
    with pytest.raises(ImpossibleLayout, match="NVIDIA A10 has no MIG"):
        place("NVIDIA A10", layout("all-1g.10gb"))
    assert place("NVIDIA A10", layout("disabled")) == []

    sim, _, mig = node(["T4", "H100"])
    with pytest.raises(ImpossibleLayout, match="Tesla T4 has no MIG"):
        mig.apply(0, "Tesla T4", layout("all-1g.10gb"))
    assert mig.read(0).supported is False
    assert mig.apply(0, "Tesla T4", layout("disabled")).supported is False  # nothing to disable
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceSetMigMode(pynvml.nvmlDeviceGetHandleByIndex(0), 1)
    with pytest.raises(ImpossibleLayout):
        mig.apply(1, H100, layout({"mixed": {"7g.80gb": 1, "1g.10gb": 1}}))
    assert mig.read(1).enabled is False  # refused before touching the GPU

    # The driver itself refuses a bad start slot and an overlap.
    mig.apply(1, H100, layout({"mixed": {"3g.40gb": 1}}))
    handle = pynvml.nvmlDeviceGetHandleByIndex(1)
    where = pynvml.c_nvmlGpuInstancePlacement_t(start=1, size=4)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(handle, 9, ctypes.byref(where))
    where = pynvml.c_nvmlGpuInstancePlacement_t(start=0, size=4)
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(handle, 9, ctypes.byref(where))
    assert pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(handle, 9) == 1


def test_the_driver_refuses_changes_under_work_and_without_permission(node) -> None:
    sim, _, mig = node(["H100"])
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    sim.allow_set = False
    with pytest.raises(DriverRefused, match="NoPermission") as refused:
        mig.apply(0, H100, layout("all-3g.40gb"))
    assert refused.value.code_name == "NoPermission"
    sim.allow_set = True

    # Enabling MIG under running work: the mode is left pending (a reset or an idle GPU needed).
    sim.inject(0, {"processes": [{"pid": 777, "used_memory_mib": 2048, "sm_util": 30}]})
    with pytest.raises(DriverRefused, match="pending a GPU reset") as pending:
        mig.apply(0, H100, layout("all-3g.40gb"))
    assert pending.value.code_name == "InUse"
    assert mig.read(0) == MigState(True, False, True, (), H100)
    assert pynvml.nvmlDeviceGetMigMode(handle) == [0, 1]

    sim.inject(0, {"processes": []})  # drained
    state = mig.apply(0, H100, layout("all-3g.40gb"))
    assert state.layout_label() == "all-3g.40gb"

    # Instances cannot be destroyed, nor MIG disabled, under work.
    sim.inject(0, {"processes": [{"pid": 778, "used_memory_mib": 2048, "sm_util": 30}]})
    with pytest.raises(DriverRefused, match="InUse"):
        mig.apply(0, H100, layout("all-1g.10gb"))
    assert mig.read(0) == state
    with pytest.raises(pynvml.NVMLError_InUse):
        pynvml.nvmlDeviceSetMigMode(handle, 0)  # GPU instances still exist


def test_a_reboot_keeps_mig_mode_but_not_the_instances(node) -> None:
    sim, driver, mig = node(["A100", "A100"])
    mig.apply(0, "NVIDIA A100-SXM4-80GB", layout("all-1g.10gb"))
    assert [g.architecture for g in driver.inventory()] == ["ampere", "ampere"]
    assert driver.inventory()[0].mig_mode is True
    driver.close()
    sim.uninstall()

    _, rebooted_driver, rebooted = node(["A100", "A100"])  # the same boards, powered up again
    assert rebooted.read(0) == MigState(True, True, True, (), "NVIDIA A100-SXM4-80GB")
    assert rebooted.read(1).enabled is False
    assert rebooted.read(0).layout_label() == "enabled (no MIG devices)"
    state = rebooted.apply(0, "NVIDIA A100-SXM4-80GB", layout("all-1g.10gb"))
    assert len(state.devices) == 7
    assert rebooted_driver.inventory()[0].mig_mode is True


def test_architecture_is_read_into_the_inventory(node) -> None:
    _, driver, _ = node(["H100", "A100-40GB", "A10", "T4"])
    assert [(g.name, g.architecture) for g in driver.inventory()] == [
        (H100, "hopper"), (A100_40, "ampere"), ("NVIDIA A10", "ampere"), ("Tesla T4", "turing")]
