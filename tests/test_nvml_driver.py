"""NvmlDriver and XidWatcher, through the real pynvml bindings over the simulated library."""

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pynvml
import pytest

from edge.devices.base import DriverError, DriverRefused, DriverUnavailable
from edge.driver.nvml import NvmlDriver, cuda_version_text, milliwatts_to_watts, sysfs_bus_id, watts_to_milliwatts
from edge.driver.xid import XidWatcher
from edge.sim import SimulatedNvml, install
from shared.gpu import XidEvent
from tests.helpers.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sims(clock: FakeClock) -> Iterator[list[SimulatedNvml]]:
    made: list[SimulatedNvml] = []
    yield made
    for sim in reversed(made):
        sim.uninstall()


@pytest.fixture
def node(
    sims: list[SimulatedNvml], clock: FakeClock
) -> Iterator[Callable[..., tuple[SimulatedNvml, NvmlDriver]]]:
    """A simulated node and an opened driver over it; both undone after the test."""
    drivers: list[NvmlDriver] = []

    def make(
        gpus: int = 2, model: str | list[str] = "H100", **options: object
    ) -> tuple[SimulatedNvml, NvmlDriver]:
        sysfs_root = options.pop("sysfs_root", "/nonexistent-sysfs")
        sim = install(gpus, model, clock=clock, **options)  # type: ignore[arg-type]
        sims.append(sim)
        driver = NvmlDriver(sysfs_root=sysfs_root)  # type: ignore[arg-type]
        driver.open()
        drivers.append(driver)
        return sim, driver

    yield make
    for driver in drivers:
        driver.close()


def run_for(clock: FakeClock, driver: NvmlDriver, seconds: float, index: int = 0) -> None:
    """Simulated time passes while the driver samples every 5 s."""
    for _ in range(int(seconds / 5)):
        clock.advance(5)
        driver.sample(index)


def test_unit_conversions() -> None:
    assert milliwatts_to_watts(250_500) == 250.5
    assert watts_to_milliwatts(250.5) == 250_500
    assert cuda_version_text(12040) == "12.4"
    assert cuda_version_text(11080) == "11.8"
    assert sysfs_bus_id("00000000:AB:00.0") == "0000:ab:00.0"


# ----- inventory ---------------------------------------------------------------------------

PROFILE_FACTS = {
    # name, mig, (min, max, default) W, memory clocks, top SM clock, NUMA from NVML
    "H100": ("NVIDIA H100 80GB HBM3", False, (200, 700, 700), [2619], 1980, 0),
    "A100": ("NVIDIA A100-SXM4-80GB", False, (100, 400, 400), [1593], 1410, 0),
    "A10": ("NVIDIA A10", None, (100, 150, 150), [6251, 405], 1695, None),
    "T4": ("Tesla T4", None, (60, 70, 70), [5001, 405], 1590, None),
}


@pytest.mark.parametrize("model", sorted(PROFILE_FACTS))
def test_inventory_of_each_profile(node, model: str) -> None:
    sim, driver = node(2, model)
    name, mig, limits, memory_clocks, top_sm, numa = PROFILE_FACTS[model]
    inventory = driver.inventory()
    assert [g.index for g in inventory] == [0, 1]
    gpu = inventory[1]
    assert gpu.name == name
    assert gpu.uuid == sim.gpus[1].uuid
    assert gpu.pci_bus_id == sim.gpus[1].pci_bus_id
    assert gpu.memory_total_bytes == sim.gpus[1].profile.memory_total_mib * 2**20
    assert gpu.driver_version == "550.54.15"
    assert gpu.cuda_version == "12.4"
    assert gpu.mig_mode is mig
    assert (gpu.power_limit_min_w, gpu.power_limit_max_w, gpu.power_limit_default_w) == limits
    assert gpu.supported_memory_clocks_mhz == memory_clocks
    assert gpu.supported_sm_clocks_mhz[0] == top_sm
    assert gpu.supported_sm_clocks_mhz == sorted(gpu.supported_sm_clocks_mhz, reverse=True)
    assert gpu.numa_node == (None if numa is None else 1)  # GPU 1 of 2 sits on the second node
    assert gpu.missing == ([] if mig is not None else ["mig_mode"])


def test_numa_node_falls_back_to_sysfs(node, tmp_path: Path) -> None:
    sim, driver = node(1, "T4", sysfs_root=tmp_path)
    device = tmp_path / "bus/pci/devices" / sysfs_bus_id(sim.gpus[0].pci_bus_id)
    device.mkdir(parents=True)
    (device / "numa_node").write_text("1\n")
    assert driver.inventory()[0].numa_node == 1
    (device / "numa_node").write_text("-1\n")  # a machine without NUMA
    assert driver.inventory()[0].numa_node is None


# ----- sampling ----------------------------------------------------------------------------


def test_every_figure_is_present_and_plausible(node, clock: FakeClock) -> None:
    sim, driver = node(1, "H100")
    driver.inventory()
    sim.inject(0, {"processes": [{"pid": 101, "used_memory_mib": 20000, "sm_util": 55},
                                 {"pid": 202, "used_memory_mib": 4000, "sm_util": 25}]})
    run_for(clock, driver, 60)
    clock.advance(1)
    sample = driver.sample(0)
    assert sample.missing == []
    assert not sample.lost
    assert sample.uuid == sim.gpus[0].uuid
    assert sample.utilization_pct == 80
    assert 0 < sample.memory_util_pct < sample.utilization_pct
    total = 81559 * 2**20
    assert sample.memory_used_bytes + sample.memory_free_bytes == total
    assert sample.memory_used_bytes > 24000 * 2**20
    assert 40 < sample.temperature_c < 75
    assert sample.power_w == pytest.approx(70 + 630 * 0.8, abs=3)
    assert sample.power_limit_w == 700
    assert sample.sm_clock_mhz == 1980
    assert sample.memory_clock_mhz == 2619
    assert sample.throttle_reasons == 0
    assert sample.energy_mj > 0
    assert (sample.ecc_sbe_volatile, sample.ecc_dbe_volatile) == (0, 0)
    assert (sample.remapped_rows_correctable, sample.remapped_rows_uncorrectable) == (0, 0)
    assert (sample.remap_pending, sample.remap_failure) == (False, False)
    assert {(p.pid, p.used_memory_bytes, p.sm_util_pct) for p in sample.processes} == {
        (101, 20000 * 2**20, 55.0),
        (202, 4000 * 2**20, 25.0),
    }


def test_energy_grows_by_power_times_time(node, clock: FakeClock) -> None:
    sim, driver = node(1, "T4")
    sim.inject(0, {"utilization": 100})
    run_for(clock, driver, 30)
    first = driver.sample(0)
    run_for(clock, driver, 100)
    second = driver.sample(0)
    assert first.power_w == pytest.approx(70, abs=1)
    assert second.energy_mj - first.energy_mj == pytest.approx(first.power_w * 100 * 1000, rel=0.01)


def test_ecc_faults_show_in_samples(node) -> None:
    sim, driver = node(1, "A100")
    sim.inject(0, {"ecc_sbe": 3, "ecc_dbe": 1, "remap_failure": True})
    sample = driver.sample(0)
    assert (sample.ecc_sbe_volatile, sample.ecc_dbe_volatile) == (3, 1)
    assert sample.remapped_rows_uncorrectable == 1
    assert sample.remap_pending is True and sample.remap_failure is True


def test_not_supported_figures_are_missing_and_logged_once(node, caplog) -> None:
    sim, driver = node(1, "T4")
    caplog.set_level(logging.INFO, logger="edge.driver.nvml")
    samples = [driver.sample(0) for _ in range(3)]
    remap_fields = ["remapped_rows_correctable", "remapped_rows_uncorrectable",
                    "remap_pending", "remap_failure"]
    # a T4 (GDDR6, PCIe, Turing) has no memory temperature sensor, no NVLink and no GPM either
    t4_lacks = [*remap_fields, "memory_temperature_c", "nvlink_kib", "gr_engine_active",
                "tensor_active", "dram_active", "pcie_tx_bytes_per_s", "pcie_rx_bytes_per_s"]
    for sample in samples:
        assert sample.missing == t4_lacks
        assert sample.remapped_rows_correctable is None and sample.remap_failure is None
        assert sample.temperature_c is not None  # the rest is still read
    notes = [r for r in caplog.records if "remapped_rows_correctable" in r.getMessage()]
    assert len(notes) == 1
    assert notes[0].levelno == logging.INFO
    assert "NotSupported" in notes[0].getMessage()


def test_a_function_missing_from_an_old_driver_is_missing_and_others_fall_back(node) -> None:
    _, driver = node(1, "H100", missing_symbols=["nvmlDeviceGetTotalEnergyConsumption",
                                                 "nvmlDeviceGetCurrentClocksEventReasons"])
    sample = driver.sample(0)
    assert sample.energy_mj is None
    assert sample.missing == ["energy_mj"]
    # ClocksEventReasons is absent, so the pre-535 ClocksThrottleReasons answered instead.
    assert sample.throttle_reasons == pynvml.nvmlClocksEventReasonGpuIdle


# ----- setters -----------------------------------------------------------------------------


def test_power_limit_caps_power(node, clock: FakeClock) -> None:
    sim, driver = node(1, "H100")
    sim.inject(0, {"utilization": 100})
    run_for(clock, driver, 20)
    assert driver.sample(0).power_w == pytest.approx(700, abs=2)
    driver.set_power_limit(0, 350)
    run_for(clock, driver, 20)
    sample = driver.sample(0)
    assert sample.power_limit_w == 350
    assert sample.power_w == pytest.approx(350, abs=2)
    assert sample.throttle_reasons & pynvml.nvmlClocksEventReasonSwPowerCap
    assert sample.sm_clock_mhz < 1980


def test_power_limit_outside_constraints_is_refused(node) -> None:
    _, driver = node(1, "H100")
    driver.inventory()
    with pytest.raises(DriverRefused) as refused:
        driver.set_power_limit(0, 150)
    assert refused.value.code_name == "InvalidArgument"
    assert "allowed 200-700 W" in refused.value.message
    with pytest.raises(DriverRefused, match="InvalidArgument"):
        driver.lock_clocks(0, 1500, 900)
    assert driver.sample(0).power_limit_w == 700


def test_unprivileged_container_is_refused_with_no_permission(node) -> None:
    _, driver = node(1, "A10", permissions="none")
    for change in (lambda: driver.set_power_limit(0, 120), lambda: driver.lock_clocks(0, 210, 900),
                   lambda: driver.reset_clocks(0)):
        with pytest.raises(DriverRefused) as refused:
            change()
        assert refused.value.code_name == "NoPermission"
    assert driver.sample(0).power_limit_w == 150


def test_locked_clocks_lower_power_and_reset_restores(node, clock: FakeClock) -> None:
    sim, driver = node(1, "A100")
    sim.inject(0, {"utilization": 100})
    run_for(clock, driver, 10)
    full = driver.sample(0).power_w
    driver.lock_clocks(0, 210, 1005)
    run_for(clock, driver, 10)
    locked = driver.sample(0)
    assert locked.sm_clock_mhz == 1005
    assert locked.power_w < full * 0.7
    driver.reset_clocks(0)
    run_for(clock, driver, 10)
    assert driver.sample(0).power_w == pytest.approx(full, abs=2)


def test_setting_a_lost_gpu_is_a_driver_error_not_a_refusal(node) -> None:
    sim, driver = node(1)
    sim.inject(0, {"lost": True})
    with pytest.raises(DriverError) as failed:
        driver.set_power_limit(0, 300)
    assert not isinstance(failed.value, DriverRefused)
    assert failed.value.code_name == "GpuIsLost"


# ----- lost GPU and driver reloads ---------------------------------------------------------


def test_lost_gpu_samples_lost_then_probe_brings_it_back(node) -> None:
    sim, driver = node(2)
    driver.inventory()
    assert not driver.sample(1).lost
    sim.inject(1, {"lost": True})
    lost = driver.sample(1)
    assert lost.lost is True
    assert lost.uuid == sim.gpus[1].uuid  # from the cached inventory
    assert lost.temperature_c is None and lost.power_w is None
    assert not driver.sample(0).lost  # the other GPU is fine
    assert driver.probe(1) is False
    assert [g.uuid for g in driver.inventory()] == [g.uuid for g in sim.gpus]  # kept, last known
    sim.inject(1, {"lost": False})
    assert driver.probe(1) is True
    back = driver.sample(1)
    assert not back.lost and back.temperature_c is not None


def test_driver_reload_is_survived_transparently(node) -> None:
    sim, driver = node(1)
    driver.sample(0)
    sim.inject(0, {"driver_unloaded": True, "utilization": 40})
    sample = driver.sample(0)
    assert not sample.lost
    assert sample.utilization_pct == 40
    assert driver.reinits == 1
    assert sim.initialised


def test_driver_that_stays_away_is_unavailable(node) -> None:
    sim, driver = node(1)
    sim.inject(0, {"driver_unloaded": True})
    sim.fail_init_with = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    with pytest.raises(DriverUnavailable) as unavailable:
        driver.sample(0)
    assert unavailable.value.code_name == "DriverNotLoaded"
    with pytest.raises(DriverUnavailable):
        driver.set_power_limit(0, 300)
    sim.fail_init_with = None
    assert driver.sample(0).temperature_c is not None


# ----- XID watcher -------------------------------------------------------------------------


def eventually(condition: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    """Poll a condition another thread will make true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


class Collector:
    """A thread-safe on_xid that lets the test wait for the n-th event."""

    def __init__(self) -> None:
        self.events: list[XidEvent] = []
        self._condition = threading.Condition()

    def __call__(self, event: XidEvent) -> None:
        with self._condition:
            self.events.append(event)
            self._condition.notify_all()

    def wait_for(self, count: int, timeout_s: float = 3.0) -> list[XidEvent]:
        with self._condition:
            self._condition.wait_for(lambda: len(self.events) >= count, timeout_s)
            return list(self.events)


@pytest.fixture
def watcher_for() -> Iterator[Callable[..., XidWatcher]]:
    watchers: list[XidWatcher] = []

    def make(
        collector: Collector, driver: NvmlDriver | None = None, **options: float
    ) -> XidWatcher:
        watcher = XidWatcher(driver, collector, wait_ms=50, initial_backoff_s=0.05,
                             max_backoff_s=0.2, **options)
        watchers.append(watcher)
        watcher.start()
        assert watcher.wait_ready(3.0)
        return watcher

    yield make
    for watcher in watchers:
        watcher.stop()


def test_xid_reaches_the_callback_with_the_right_uuid(node, watcher_for) -> None:
    sim, _ = node(3)
    collector = Collector()
    watcher = watcher_for(collector)
    assert watcher.registered == {i: g.uuid for i, g in enumerate(sim.gpus)}
    sim.inject(2, {"xid": 79})
    sim.inject(0, {"xid": 48})
    events = collector.wait_for(2)
    assert [(e.index, e.uuid, e.xid) for e in events] == [
        (2, sim.gpus[2].uuid, 79),
        (0, sim.gpus[0].uuid, 48),
    ]
    assert watcher.events == 2
    watcher.stop()
    assert not watcher.running


def test_xid_watcher_skips_gpus_without_event_support(node, watcher_for) -> None:
    sim, _ = node(2)
    sim.gpus[0].supported_event_types = 0
    collector = Collector()
    watcher = watcher_for(collector)
    assert watcher.registered == {1: sim.gpus[1].uuid}
    sim.inject(1, {"xid": 94})
    assert [(e.index, e.xid) for e in collector.wait_for(1)] == [(1, 94)]


def test_xid_watcher_survives_a_driver_reload(node, watcher_for) -> None:
    sim, _ = node(1)
    collector = Collector()
    watcher = watcher_for(collector)
    sim.inject(0, {"driver_unloaded": True})
    # The watcher sees Uninitialized, backs off, re-initialises and registers again.
    assert eventually(lambda: watcher.errors >= 1 and sim.initialised)
    assert watcher.errors >= 1
    assert "Uninitialized" in (watcher.last_error or "")
    assert watcher.wait_ready(3.0)
    sim.inject(0, {"xid": 13})
    assert [e.xid for e in collector.wait_for(1)] == [13]


def test_xid_watcher_refresh_picks_up_a_returned_gpu(node, watcher_for) -> None:
    sim, _ = node(2)
    sim.inject(1, {"lost": True})
    collector = Collector()
    watcher = watcher_for(collector)  # retries lost GPUs only every 30 s by default
    assert set(watcher.registered) == {0}
    sim.inject(1, {"lost": False})
    watcher.refresh()
    assert eventually(lambda: set(watcher.registered) == {0, 1})
    sim.inject(1, {"xid": 79})
    assert [(e.index, e.xid) for e in collector.wait_for(1)] == [(1, 79)]


def test_xid_watcher_registers_a_returned_gpu_by_itself(node, watcher_for) -> None:
    sim, driver = node(2)
    driver.inventory()
    sim.inject(0, {"lost": True})
    collector = Collector()
    watcher = watcher_for(collector, driver, retry_lost_s=0.1)
    assert set(watcher.registered) == {1}
    sim.inject(1, {"xid": 31})  # GPU 1 is watched all along, without a gap
    assert [(e.index, e.xid) for e in collector.wait_for(1)] == [(1, 31)]
    sim.inject(0, {"lost": False})
    assert eventually(lambda: set(watcher.registered) == {0, 1})
    sim.inject(0, {"xid": 119})
    events = collector.wait_for(2)
    assert [(e.index, e.uuid, e.xid) for e in events][1] == (0, sim.gpus[0].uuid, 119)
    assert watcher.errors == 0
