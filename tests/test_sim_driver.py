"""The simulated libnvidia-ml, exercised through the real pynvml bindings only."""

import threading
import time
from collections.abc import Callable, Iterator

import pydantic
import pynvml
import pytest

from edge.sim import PROFILES, SimFault, SimulatedNvml, install
from tests.helpers.clock import FakeClock

W = 1000  # NVML speaks milliwatts



@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_sim(clock: FakeClock) -> Iterator[Callable[..., SimulatedNvml]]:
    """Install a simulation and nvmlInit it; undone after the test."""
    made: list[SimulatedNvml] = []

    def make(gpus: int = 1, model: str | list[str] = "H100", **options: object) -> SimulatedNvml:
        sim = install(gpus, model, clock=clock, **options)  # type: ignore[arg-type]
        made.append(sim)
        pynvml.nvmlInit()
        return sim

    yield make
    for sim in reversed(made):
        sim.uninstall()


def settle(clock: FakeClock, seconds: float, step: float = 5.0) -> None:
    """Let simulated time pass, reading now and then like a sampler would."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    elapsed = 0.0
    while elapsed < seconds:
        clock.advance(step)
        elapsed += step
        pynvml.nvmlDeviceGetPowerUsage(handle)


# ----- identity and the library contract ---------------------------------------------------

EXPECTED = {
    "H100": ("NVIDIA H100 80GB HBM3", 200, 700, 700, 2619, 1980),
    "A100": ("NVIDIA A100-SXM4-80GB", 100, 400, 400, 1593, 1410),
    "A10": ("NVIDIA A10", 100, 150, 150, 6251, 1695),
    "T4": ("Tesla T4", 60, 70, 70, 5001, 1590),
}


@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_each_profile_reports_its_identity_through_pynvml(make_sim, model: str) -> None:
    make_sim(2, model)
    name, low_w, high_w, default_w, memory_mhz, top_sm_mhz = EXPECTED[model]
    handle = pynvml.nvmlDeviceGetHandleByIndex(1)
    assert pynvml.nvmlDeviceGetName(handle) == name
    assert pynvml.nvmlDeviceGetUUID(handle).startswith("GPU-")
    assert pynvml.nvmlDeviceGetUUID(handle) != pynvml.nvmlDeviceGetUUID(
        pynvml.nvmlDeviceGetHandleByIndex(0)
    )
    assert pynvml.nvmlDeviceGetIndex(handle) == 1
    assert str(pynvml.nvmlDeviceGetPciInfo(handle).busId).startswith("00000000:")
    assert pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle) == [low_w * W, high_w * W]
    assert pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) == default_w * W
    assert pynvml.nvmlDeviceGetMemoryInfo(handle).total == PROFILES[model].memory_total_mib * 2**20
    memory_clocks = pynvml.nvmlDeviceGetSupportedMemoryClocks(handle)
    assert memory_clocks[0] == memory_mhz
    sm_clocks = pynvml.nvmlDeviceGetSupportedGraphicsClocks(handle, memory_mhz)
    assert sm_clocks[0] == top_sm_mhz
    assert sm_clocks == sorted(sm_clocks, reverse=True)
    assert pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM) == top_sm_mhz
    assert pynvml.nvmlSystemGetDriverVersion() == "550.54.15"
    assert pynvml.nvmlSystemGetCudaDriverVersion() == 12040
    assert pynvml.nvmlDeviceGetCount() == 2
    if model in ("H100", "A100"):
        assert pynvml.nvmlDeviceGetMigMode(handle) == [0, 0]
        assert pynvml.nvmlDeviceGetRemappedRows(handle) == (0, 0, 0, 0)
    else:
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetMigMode(handle)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetRemappedRows(handle)


def test_handles_can_be_found_by_uuid_and_bus_id(make_sim) -> None:
    sim = make_sim(3)
    gpu = sim.gpus[2]
    by_uuid = pynvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
    by_bus = pynvml.nvmlDeviceGetHandleByPciBusId(gpu.pci_bus_id)
    assert pynvml.nvmlDeviceGetIndex(by_uuid) == 2
    assert pynvml.nvmlDeviceGetIndex(by_bus) == 2
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetHandleByUUID("GPU-00000000-0000-0000-0000-000000000000")
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetHandleByIndex(3)


def test_an_unimplemented_symbol_is_function_not_found(make_sim) -> None:
    make_sim(1, missing_symbols=["nvmlDeviceGetTotalEnergyConsumption"])
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        pynvml.nvmlDeviceGetBAR1MemoryInfo(handle)  # never implemented
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # removed for this test


def test_bad_model_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="H100, A100, A10, T4"):
        SimulatedNvml(1, "V100")


def test_calls_need_nvml_init_and_shutdown_is_counted(clock: FakeClock) -> None:
    sim = install(1, clock=clock)
    try:
        with pytest.raises(pynvml.NVMLError_Uninitialized):
            pynvml.nvmlDeviceGetCount()
        pynvml.nvmlInit()
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        assert pynvml.nvmlDeviceGetCount() == 1  # one init still holds it open
        pynvml.nvmlShutdown()
        with pytest.raises(pynvml.NVMLError_Uninitialized):
            pynvml.nvmlDeviceGetCount()
    finally:
        sim.uninstall()


def test_uninstall_restores_the_previous_library(clock: FakeClock) -> None:
    before = pynvml.nvmlLib
    outer = install(1, clock=clock)
    inner = install(2, clock=clock)
    assert pynvml.nvmlLib is inner.lib
    inner.uninstall()
    assert pynvml.nvmlLib is outer.lib
    outer.uninstall()
    assert pynvml.nvmlLib is before
    assert pynvml._nvmlGetFunctionPointer_cache == {}


# ----- physics -----------------------------------------------------------------------------


def test_power_follows_load(make_sim, clock: FakeClock) -> None:
    sim = make_sim(1)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    settle(clock, 10)
    idle = pynvml.nvmlDeviceGetPowerUsage(handle) / W
    assert idle == pytest.approx(70, abs=1)
    reasons = pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
    assert reasons & pynvml.nvmlClocksEventReasonGpuIdle
    sim.inject(0, {"utilization": 50})
    settle(clock, 10)
    assert pynvml.nvmlDeviceGetPowerUsage(handle) / W == pytest.approx(70 + 630 * 0.5, abs=2)
    assert pynvml.nvmlDeviceGetUtilizationRates(handle).gpu == 50
    sim.inject(0, {"utilization": 100})
    settle(clock, 10)
    assert pynvml.nvmlDeviceGetPowerUsage(handle) / W == pytest.approx(700, abs=2)
    assert pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM) == 1980


def test_power_limit_caps_power_and_clocks(make_sim, clock: FakeClock) -> None:
    sim = make_sim(1)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    sim.inject(0, {"utilization": 100})
    pynvml.nvmlDeviceSetPowerManagementLimit(handle, 300 * W)
    settle(clock, 10)
    assert pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) == 300 * W
    assert pynvml.nvmlDeviceGetPowerUsage(handle) / W == pytest.approx(300, abs=2)
    reasons = pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
    assert reasons & pynvml.nvmlClocksEventReasonSwPowerCap
    assert not reasons & pynvml.nvmlClocksEventReasonGpuIdle
    capped_clock = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
    assert 345 <= capped_clock < 1980
    assert capped_clock in pynvml.nvmlDeviceGetSupportedGraphicsClocks(handle, 2619)


def test_locked_clocks_lower_power_until_reset(make_sim, clock: FakeClock) -> None:
    sim = make_sim(1)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    sim.inject(0, {"utilization": 100})
    pynvml.nvmlDeviceSetGpuLockedClocks(handle, 345, 990)
    settle(clock, 10)
    assert pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM) == 990
    assert pynvml.nvmlDeviceGetPowerUsage(handle) / W == pytest.approx(70 + 630 * 0.25, abs=2)
    pynvml.nvmlDeviceResetGpuLockedClocks(handle)
    settle(clock, 10)
    assert pynvml.nvmlDeviceGetPowerUsage(handle) / W == pytest.approx(700, abs=2)


def test_temperature_rises_with_power_and_falls_towards_ambient(make_sim, clock: FakeClock) -> None:
    sim = make_sim(1)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    start = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    assert 30 <= start <= 36  # idle in a 30 °C room
    sim.inject(0, {"utilization": 100})
    settle(clock, 30)
    after_one_time_constant = pynvml.nvmlDeviceGetTemperature(handle, 0)
    assert start + 15 < after_one_time_constant < 72
    settle(clock, 300)
    hot = pynvml.nvmlDeviceGetTemperature(handle, 0)
    assert 70 <= hot <= 75
    sim.inject(0, {"utilization": 0})
    settle(clock, 300)
    assert pynvml.nvmlDeviceGetTemperature(handle, 0) <= start + 1


def test_hot_cabinet_throttles_and_a_lower_limit_really_cools(make_sim, clock: FakeClock) -> None:
    sim = make_sim(1)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    sim.inject(0, {"utilization": 100, "ambient_c": 60})
    thermal = (pynvml.nvmlClocksEventReasonSwThermalSlowdown
               | pynvml.nvmlClocksEventReasonHwThermalSlowdown)
    seen_thermal = 0
    for _ in range(120):
        clock.advance(5)
        seen_thermal |= pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle) & thermal
    assert seen_thermal, "a 60 °C cabinet at full load must throttle an H100"
    assert pynvml.nvmlDeviceGetTemperature(handle, 0) >= 85
    assert pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM) < 1980
    pynvml.nvmlDeviceSetPowerManagementLimit(handle, 200 * W)
    settle(clock, 300)
    assert pynvml.nvmlDeviceGetTemperature(handle, 0) < 76  # 60 + 0.06 * 200 = 72
    reasons = pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
    assert not reasons & thermal
    assert reasons & pynvml.nvmlClocksEventReasonSwPowerCap


def test_injected_temperature_is_read_then_relaxes(make_sim, clock: FakeClock) -> None:
    sim = make_sim(1)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    state = sim.inject(0, {"temperature_c": 95})
    assert state["temperature_c"] == 95
    assert pynvml.nvmlDeviceGetTemperature(handle, 0) == 95
    assert pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle) & (
        pynvml.nvmlClocksEventReasonHwThermalSlowdown | pynvml.nvmlClocksEventReasonHwSlowdown
    )
    assert pynvml.nvmlDeviceGetTemperatureThreshold(
        handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN) == 89
    settle(clock, 300)
    assert pynvml.nvmlDeviceGetTemperature(handle, 0) < 40


def test_energy_counter_integrates_power(make_sim, clock: FakeClock) -> None:
    sim = make_sim(1, "A100")
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    sim.inject(0, {"utilization": 100})
    settle(clock, 10)
    power_w = pynvml.nvmlDeviceGetPowerUsage(handle) / W
    before = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    settle(clock, 60, step=1)
    after = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    assert after - before == pytest.approx(power_w * 60 * 1000, rel=0.01)


def test_processes_drive_load_memory_and_per_process_utilisation(
    make_sim, clock: FakeClock
) -> None:
    sim = make_sim(1)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetComputeRunningProcesses(handle) == []
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetProcessUtilization(handle, 0)
    base_used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    sim.inject(0, {"processes": [{"pid": 4242, "used_memory_mib": 10240, "sm_util": 30},
                                 {"pid": 4343, "used_memory_mib": 2048, "sm_util": 45}]})
    clock.advance(1)
    running = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    assert {(p.pid, p.usedGpuMemory) for p in running} == {
        (4242, 10240 * 2**20),
        (4343, 2048 * 2**20),
    }
    assert pynvml.nvmlDeviceGetUtilizationRates(handle).gpu == 75
    assert pynvml.nvmlDeviceGetMemoryInfo(handle).used == base_used + 12288 * 2**20
    samples = pynvml.nvmlDeviceGetProcessUtilization(handle, 0)
    assert {s.pid: s.smUtil for s in samples} == {4242: 30, 4343: 45}
    newest = max(s.timeStamp for s in samples)
    assert newest > 1_600_000_000 * 1_000_000  # epoch microseconds, like the real driver
    with pytest.raises(pynvml.NVMLError_NotFound):  # nothing newer than what we saw
        pynvml.nvmlDeviceGetProcessUtilization(handle, newest)
    clock.advance(1)
    assert len(pynvml.nvmlDeviceGetProcessUtilization(handle, newest)) == 2
    assert pynvml.nvmlSystemGetProcessName(4242) == "/usr/bin/python3"


# ----- faults ------------------------------------------------------------------------------


def test_ecc_and_row_remapping_faults_and_reset(make_sim, clock: FakeClock) -> None:
    sim = make_sim(1)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    sim.inject(0, {"ecc_sbe": 5, "ecc_dbe": 2, "remap_failure": True, "utilization": 80})
    corrected = pynvml.nvmlDeviceGetTotalEccErrors(
        handle, pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC)
    uncorrected = pynvml.nvmlDeviceGetTotalEccErrors(
        handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
    assert (corrected, uncorrected) == (5, 2)
    assert pynvml.nvmlDeviceGetRemappedRows(handle) == (0, 2, 1, 1)
    pynvml.nvmlDeviceSetPowerManagementLimit(handle, 400 * W)
    state = sim.inject(0, {"reset": True})
    assert state["ecc_dbe_volatile"] == 0 and state["power_limit_w"] == 700
    assert state["utilization_pct"] == 0
    assert pynvml.nvmlDeviceGetRemappedRows(handle) == (0, 0, 0, 0)
    assert pynvml.nvmlDeviceGetTotalEccErrors(handle, 1, pynvml.NVML_AGGREGATE_ECC) == 0


def test_fault_validation() -> None:
    with pytest.raises(pydantic.ValidationError):
        SimFault(utilization=101)
    with pytest.raises(pydantic.ValidationError):
        SimFault(temperature_c=151)
    with pytest.raises(pydantic.ValidationError):
        SimFault.model_validate({"utilisation": 50})  # a typo is an error, not ignored
    with pytest.raises(pydantic.ValidationError, match="either utilization or processes"):
        SimFault.model_validate({"utilization": 5, "processes": []})
    with pytest.raises(pydantic.ValidationError, match="at most 100"):
        SimFault.model_validate({"processes": [{"pid": 1, "used_memory_mib": 1, "sm_util": 60},
                                               {"pid": 2, "used_memory_mib": 1, "sm_util": 60}]})
    assert SimFault().model_dump(exclude_none=True) == {}


def test_inject_rejects_a_bad_index_and_impossible_memory(make_sim) -> None:
    sim = make_sim(2, "T4")
    with pytest.raises(IndexError):
        sim.inject(2, {"utilization": 10})
    with pytest.raises(ValueError, match="MiB"):
        sim.inject(0, {"processes": [{"pid": 1, "used_memory_mib": 16000, "sm_util": 1}]})


def test_driver_refuses_what_the_real_one_refuses(make_sim) -> None:
    sim = make_sim(1)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceSetPowerManagementLimit(handle, 150 * W)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceSetPowerManagementLimit(handle, 701 * W)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceSetGpuLockedClocks(handle, 1500, 1000)
    sim.allow_set = False
    with pytest.raises(pynvml.NVMLError_NoPermission):
        pynvml.nvmlDeviceSetPowerManagementLimit(handle, 300 * W)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        pynvml.nvmlDeviceSetGpuLockedClocks(handle, 345, 1000)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        pynvml.nvmlDeviceResetGpuLockedClocks(handle)
    assert pynvml.nvmlDeviceGetPowerManagementLimit(handle) == 700 * W
    sim.allow_set = True
    pynvml.nvmlDeviceSetPowerManagementLimit(handle, 300 * W)
    assert pynvml.nvmlDeviceGetPowerManagementLimit(handle) == 300 * W


def test_unprivileged_container_permissions(make_sim) -> None:
    sim = make_sim(1, "A10", permissions="none")
    assert sim.allow_set is False
    with pytest.raises(pynvml.NVMLError_NoPermission):
        pynvml.nvmlDeviceSetPowerManagementLimit(pynvml.nvmlDeviceGetHandleByIndex(0), 120 * W)
    with pytest.raises(ValueError):
        SimulatedNvml(1, permissions="admin")  # type: ignore[arg-type]


def test_lost_gpu_answers_gpu_is_lost_until_it_comes_back(make_sim) -> None:
    sim = make_sim(2)
    handle = pynvml.nvmlDeviceGetHandleByIndex(1)
    sim.inject(1, {"lost": True})
    for call in (pynvml.nvmlDeviceGetTemperature, pynvml.nvmlDeviceGetClockInfo):
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            call(handle, 0)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetHandleByIndex(1)
    assert pynvml.nvmlDeviceGetTemperature(pynvml.nvmlDeviceGetHandleByIndex(0), 0) > 0
    sim.inject(1, {"lost": False})
    assert pynvml.nvmlDeviceGetTemperature(pynvml.nvmlDeviceGetHandleByIndex(1), 0) > 0


def test_driver_unloaded_until_nvml_init(make_sim) -> None:
    sim = make_sim(1)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    state = sim.inject(0, {"driver_unloaded": True})
    assert state["driver_loaded"] is False
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetTemperature(handle, 0)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()
    pynvml.nvmlInit()
    assert pynvml.nvmlDeviceGetTemperature(pynvml.nvmlDeviceGetHandleByIndex(0), 0) > 0
    assert sim.state(0)["driver_loaded"] is True


# ----- events ------------------------------------------------------------------------------


def test_xid_is_delivered_through_the_event_set(make_sim) -> None:
    sim = make_sim(2)
    handle = pynvml.nvmlDeviceGetHandleByIndex(1)
    event_set = pynvml.nvmlEventSetCreate()
    try:
        pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
        started = time.monotonic()
        with pytest.raises(pynvml.NVMLError_Timeout):
            pynvml.nvmlEventSetWait(event_set, 50)
        assert time.monotonic() - started >= 0.045
        sim.inject(0, {"xid": 31})  # GPU 0 is not registered: not delivered
        timer = threading.Timer(0.05, sim.inject, args=(1, {"xid": 79}))
        timer.start()
        data = pynvml.nvmlEventSetWait(event_set, 2000)  # wakes when the XID arrives
        timer.join()
        assert data.eventType == pynvml.nvmlEventTypeXidCriticalError
        assert data.eventData == 79
        assert pynvml.nvmlDeviceGetUUID(data.device) == sim.gpus[1].uuid
        with pytest.raises(pynvml.NVMLError_Timeout):
            pynvml.nvmlEventSetWait(event_set, 10)
    finally:
        pynvml.nvmlEventSetFree(event_set)


def test_registering_an_unsupported_event_type_is_refused(make_sim) -> None:
    sim = make_sim(1)
    sim.gpus[0].supported_event_types = 0
    event_set = pynvml.nvmlEventSetCreate()
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceRegisterEvents(pynvml.nvmlDeviceGetHandleByIndex(0),
                                        pynvml.nvmlEventTypeXidCriticalError, event_set)
    pynvml.nvmlEventSetFree(event_set)


def test_waiting_for_events_does_not_block_other_calls(make_sim) -> None:
    sim = make_sim(1)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    event_set = pynvml.nvmlEventSetCreate()
    pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
    outcome: list[str] = []

    def wait() -> None:
        try:
            outcome.append(f"xid {pynvml.nvmlEventSetWait(event_set, 5000).eventData}")
        except pynvml.NVMLError as error:
            outcome.append(type(error).__name__)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    started = time.monotonic()
    for _ in range(20):
        pynvml.nvmlDeviceGetTemperature(handle, 0)
    assert time.monotonic() - started < 1.0
    assert waiter.is_alive()  # still waiting, while we were served
    sim.inject(0, {"xid": 43})
    waiter.join(timeout=5)
    assert outcome == ["xid 43"]
    pynvml.nvmlEventSetFree(event_set)


def test_a_driver_unload_wakes_event_waiters(make_sim) -> None:
    sim = make_sim(1)
    event_set = pynvml.nvmlEventSetCreate()
    pynvml.nvmlDeviceRegisterEvents(pynvml.nvmlDeviceGetHandleByIndex(0),
                                    pynvml.nvmlEventTypeXidCriticalError, event_set)
    threading.Timer(0.05, sim.inject, args=(0, {"driver_unloaded": True})).start()
    started = time.monotonic()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlEventSetWait(event_set, 5000)
    assert time.monotonic() - started < 2


def test_concurrent_readers_and_injections(make_sim) -> None:
    sim = make_sim(2)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(200):
                handle = pynvml.nvmlDeviceGetHandleByIndex(1)
                assert pynvml.nvmlDeviceGetPowerUsage(handle) > 0
                assert pynvml.nvmlDeviceGetUtilizationRates(handle).gpu <= 100
        except BaseException as error:  # collected for the assertion below
            errors.append(error)

    readers = [threading.Thread(target=read) for _ in range(4)]
    for reader in readers:
        reader.start()
    for load in range(0, 100, 5):
        sim.inject(1, {"utilization": load})
    for reader in readers:
        reader.join()
    assert errors == []
    assert sim.state(1)["utilization_pct"] == 95


def test_field_values_answer_one_by_one(make_sim) -> None:
    """The call succeeds; each field carries its own return code, as libnvidia-ml does."""
    make_sim(2, ["H100", "T4"])
    wanted = [pynvml.NVML_FI_DEV_MEMORY_TEMP, pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER,
              pynvml.NVML_FI_DEV_ECC_CURRENT]  # the last one is not simulated
    h100, t4 = (pynvml.nvmlDeviceGetFieldValues(pynvml.nvmlDeviceGetHandleByIndex(i), wanted) for i in (0, 1))
    assert [v.nvmlReturn for v in h100] == [pynvml.NVML_SUCCESS, pynvml.NVML_SUCCESS,
                                            pynvml.NVML_ERROR_NOT_SUPPORTED]
    assert [v.nvmlReturn for v in t4] == [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_SUCCESS,
                                          pynvml.NVML_ERROR_NOT_SUPPORTED]
    assert 20 < h100[0].value.uiVal < 60 and h100[0].valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    bad_link = pynvml.nvmlDeviceGetFieldValues(pynvml.nvmlDeviceGetHandleByIndex(0),
                                               [(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_RAW_TX, 18)])
    assert bad_link[0].nvmlReturn == pynvml.NVML_ERROR_INVALID_ARGUMENT  # links 0-17 only


def test_nvlink_traffic_follows_load(make_sim, clock: FakeClock) -> None:
    sim = make_sim(1, "H100")
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    fields = [(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, link) for link in range(18)]

    def kib() -> int:
        return sum(v.value.ullVal for v in pynvml.nvmlDeviceGetFieldValues(handle, fields))

    start = kib()
    clock.advance(10)
    assert kib() == start  # no load, no NVLink traffic
    sim.inject(0, {"utilization": 100})
    start = kib()
    clock.advance(10)
    # a quarter of 18 links x 25 GB/s per direction, over 10 s
    assert (kib() - start) * 1024 == pytest.approx(0.25 * 18 * 25e9 * 10, rel=0.01)


def test_gpm_refuses_what_the_real_library_refuses(make_sim, clock: FakeClock) -> None:
    make_sim(2, ["H100", "H100"])
    first, second = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
    request = pynvml.c_nvmlGpmMetricsGet_t()
    request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = 1
    request.metrics[0].metricId = pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL
    request.sample1, request.sample2 = first, second
    with pytest.raises(pynvml.NVMLError_InvalidArgument):  # samples never filled
        pynvml.nvmlGpmMetricsGet(request)
    pynvml.nvmlGpmSampleGet(pynvml.nvmlDeviceGetHandleByIndex(0), first)
    clock.advance(1)
    pynvml.nvmlGpmSampleGet(pynvml.nvmlDeviceGetHandleByIndex(1), second)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):  # two different GPUs
        pynvml.nvmlGpmMetricsGet(request)
    request.version = 99
    with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
        pynvml.nvmlGpmMetricsGet(request)
    pynvml.nvmlGpmSampleFree(first)
    pynvml.nvmlGpmSampleFree(second)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):  # freed twice
        pynvml.nvmlGpmSampleFree(first)
