"""The AMD backend through the real amdsmi Python bindings, over the simulated libamd_smi.so.

Nothing between the backend and the C library is replaced: amdsmi (PyPI, unpatched) loads the
library built from edge/sim/amd/libamd_smi_sim.c with ctypes, and its C functions call back into
the simulated boards. The physics runs on a hand-moved clock, so no test waits on time.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.devices.amd import AmdSmiBackend, open_amd, present
from edge.devices.base import Capability, DeviceBackend, DriverRefused, DriverUnavailable
from edge.sim.amd import PROFILES, SimulatedAmdSmi, install
from edge.sim.amd.build import bound_symbols, wrapper_path
from edge.sim.lib import SimRefused
from tests.helpers.clock import FakeClock

pytestmark = pytest.mark.skipif(
    not any(shutil.which(cc) for cc in (os.environ.get("CC") or "gcc", "cc", "gcc")),
    reason="no C compiler (gcc/cc): the simulated libamd_smi.so cannot be built",
)

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("amd-sim")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def node(workdir: Path, clock: FakeClock) -> Iterator[tuple[SimulatedAmdSmi, AmdSmiBackend]]:
    """An MI300X and an MI210 behind the simulated library, and the backend opened on them."""
    sim = install(2, ["MI300X", "MI210"], clock=clock, seed="node-a", workdir=workdir)
    backend = open_amd(**sim.backend_kwargs())
    assert isinstance(backend, AmdSmiBackend)
    backend.open()
    yield sim, backend
    backend.close()
    sim.uninstall()


def settle(clock: FakeClock, backend: AmdSmiBackend, seconds: float = 120.0) -> None:
    """Move simulated time on (the boards integrate it at their next read)."""
    clock.advance(seconds)
    backend.sample(0)


def test_inventory_through_the_real_bindings(node: tuple[SimulatedAmdSmi, AmdSmiBackend]) -> None:
    sim, backend = node
    assert isinstance(backend, DeviceBackend)
    assert (backend.backend, backend.vendor, backend.resource_name) == ("amd", "amd", "amd.com/gpu")
    assert backend.device_count() == 2
    mi300x, mi210 = backend.inventory()
    assert mi300x.name == "AMD Instinct MI300X" and mi210.name == "AMD Instinct MI210"
    assert [mi300x.uuid, mi210.uuid] == [g.uuid for g in sim.gpus]
    assert mi300x.uuid.startswith("AMD-") and mi300x.uuid != mi210.uuid
    assert mi300x.architecture == "gfx942" and mi210.architecture == "gfx90a"
    assert mi300x.memory_total_bytes == PROFILES["MI300X"].memory_total_mib * MIB
    assert (mi300x.power_limit_min_w, mi300x.power_limit_max_w, mi300x.power_limit_default_w) == (200, 750, 750)
    assert (mi210.power_limit_min_w, mi210.power_limit_max_w) == (100, 300)
    assert mi300x.supported_sm_clocks_mhz[0] == 2100 and mi300x.supported_sm_clocks_mhz[-1] == 500
    assert mi300x.pci_bus_id == "0000:05:00.0" and mi300x.driver_version
    for entry in (mi300x, mi210):
        assert (entry.vendor, entry.backend, entry.platform, entry.resource_name) == \
            ("amd", "amd", "instinct", "amd.com/gpu")
        assert set(entry.capabilities) == {"power_limit", "clock_limit", "reset", "energy_counter", "ecc"}
        assert entry.missing == []
    assert backend.capabilities(0) == {Capability.POWER_LIMIT, Capability.CLOCK_LIMIT, Capability.RESET,
                                       Capability.ENERGY_COUNTER, Capability.ECC}
    # the same board under a new backend (a daemon restart) keeps its UUID; another node's differs
    again = open_amd(**sim.backend_kwargs())
    again.open()
    assert again.uuid_of(0) == mi300x.uuid
    again.close()


def test_every_symbol_the_bindings_bind_exists_and_the_rest_are_not_supported(
        node: tuple[SimulatedAmdSmi, AmdSmiBackend]) -> None:
    amdsmi: Any = importlib.import_module("amdsmi")
    library = amdsmi.amdsmi_wrapper._libraries["libamd_smi.so"]
    names = bound_symbols(wrapper_path().read_text())
    assert len(names) > 150 and all(hasattr(library, name) for name in names)
    handle = amdsmi.amdsmi_get_processor_handles()[0]
    with pytest.raises(amdsmi.AmdSmiLibraryException) as caught:
        amdsmi.amdsmi_get_gpu_bad_page_info(handle)  # a stub
    assert caught.value.get_error_code() == amdsmi.amdsmi_wrapper.AMDSMI_STATUS_NOT_SUPPORTED


def test_samples_track_load_temperature_and_processes(node: tuple[SimulatedAmdSmi, AmdSmiBackend],
                                                      clock: FakeClock) -> None:
    sim, backend = node
    idle = backend.sample(0)
    assert idle.utilization_pct == 0 and idle.power_w == pytest.approx(140, abs=1)
    assert idle.sm_clock_mhz == 500 and idle.memory_clock_mhz == 1300
    assert idle.memory_used_bytes == PROFILES["MI300X"].memory_reserved_mib * MIB
    assert idle.power_limit_w == 750 and idle.ecc_dbe_volatile == 0 and idle.ecc_sbe_volatile == 0
    assert "throttle_reasons" in idle.missing and "power_w" not in idle.missing

    sim.inject(0, {"processes": [{"pid": 4242, "used_memory_mib": 40_000, "sm_util": 60},
                                 {"pid": 4343, "used_memory_mib": 20_000, "sm_util": 30}]})
    settle(clock, backend)
    busy = backend.sample(0)
    state = sim.state(0)
    assert busy.utilization_pct == 90 and busy.memory_util_pct == round(90 * PROFILES["MI300X"].memory_util_per_load)
    assert busy.power_w == pytest.approx(state["power_w"], abs=1) and busy.power_w > 500
    assert busy.temperature_c == pytest.approx(state["temperature_c"], abs=1) and busy.temperature_c > idle.temperature_c
    assert busy.memory_temperature_c is not None and busy.memory_temperature_c > idle.memory_temperature_c
    assert busy.sm_clock_mhz == 2100
    assert busy.memory_used_bytes == (PROFILES["MI300X"].memory_reserved_mib + 60_000) * MIB
    assert busy.memory_used_bytes + busy.memory_free_bytes == PROFILES["MI300X"].memory_total_mib * MIB
    assert {(p.pid, p.used_memory_bytes) for p in busy.processes} == {(4242, 40_000 * MIB), (4343, 20_000 * MIB)}

    sim.inject(0, {"temperature_c": 97.0})
    assert backend.sample(0).temperature_c == 97.0

    # MI210 reports its power in average_socket_power (MI300 in current_socket_power): same figure
    sim.inject(1, {"utilization": 100})
    clock.advance(120)
    mi210 = backend.sample(1)
    assert mi210.power_w == pytest.approx(300, abs=1) and mi210.utilization_pct == 100


def test_energy_is_monotonic_and_agrees_with_power(node: tuple[SimulatedAmdSmi, AmdSmiBackend],
                                                   clock: FakeClock) -> None:
    sim, backend = node
    readings = []
    for load in (0, 50, 100, 20, 0):
        sim.inject(0, {"utilization": load})
        for _ in range(3):
            clock.advance(10)
            readings.append(backend.sample(0).energy_mj)
    assert all(isinstance(r, int) for r in readings)
    assert readings == sorted(readings) and readings[-1] > readings[0]
    # at a steady draw, the counter's increase is power x time
    sim.inject(0, {"utilization": 70})
    settle(clock, backend, 60)
    before = backend.sample(0)
    clock.advance(100)
    after = backend.sample(0)
    assert before.power_w == after.power_w
    assert after.energy_mj - before.energy_mj == pytest.approx(after.power_w * 100 * 1000, rel=0.01)


def test_power_cap_is_applied_and_one_outside_the_range_refused(node: tuple[SimulatedAmdSmi, AmdSmiBackend],
                                                                 clock: FakeClock) -> None:
    sim, backend = node
    backend.inventory()
    sim.inject(0, {"utilization": 100})
    backend.set_power_limit(0, 450)
    settle(clock, backend)
    capped = backend.sample(0)
    assert capped.power_limit_w == 450 and sim.state(0)["power_limit_w"] == 450
    assert capped.power_w == pytest.approx(450, abs=1) and capped.sm_clock_mhz < 2100
    for watts in (800, 150):
        with pytest.raises(DriverRefused) as refused:
            backend.set_power_limit(0, watts)
        assert refused.value.code_name == "AMDSMI_STATUS_INVAL"
        assert "allowed 200-750 W" in str(refused.value)
    assert backend.sample(0).power_limit_w == 450  # a refused cap changes nothing


def test_setters_without_permission_are_refused(workdir: Path, clock: FakeClock) -> None:
    sim = install(1, "MI300X", clock=clock, permissions="none", workdir=workdir)
    backend = open_amd(**sim.backend_kwargs())
    backend.open()
    try:
        assert backend.sample(0).power_w is not None  # reading needs no privilege
        for change in (lambda: backend.set_power_limit(0, 500), lambda: backend.lock_clocks(0, 500, 1500)):
            with pytest.raises(DriverRefused) as refused:
                change()
            assert refused.value.code_name == "AMDSMI_STATUS_NO_PERM"
            assert "root" in str(refused.value)
        assert sim.state(0)["power_limit_w"] == 750
    finally:
        backend.close()
        sim.uninstall()


def test_clock_limit_and_reset(node: tuple[SimulatedAmdSmi, AmdSmiBackend], clock: FakeClock) -> None:
    sim, backend = node
    sim.inject(0, {"utilization": 100})
    backend.lock_clocks(0, 500, 1200)
    settle(clock, backend)
    limited = backend.sample(0)
    assert limited.sm_clock_mhz == 1200 and limited.power_w < 740
    with pytest.raises(DriverRefused) as refused:
        backend.lock_clocks(0, 500, 2500)
    assert refused.value.code_name == "AMDSMI_STATUS_INVAL"
    backend.reset_clocks(0)
    settle(clock, backend)
    assert backend.sample(0).sm_clock_mhz == 2100 and sim.state(0)["locked_clocks_mhz"] is None


def test_ecc_faults_raise_the_ras_counters(node: tuple[SimulatedAmdSmi, AmdSmiBackend]) -> None:
    sim, backend = node
    sim.inject(1, {"ecc_sbe": 5})
    sim.inject(1, {"ecc_dbe": 2})
    sample = backend.sample(1)
    assert (sample.ecc_sbe_volatile, sample.ecc_dbe_volatile) == (5, 2)
    assert backend.sample(0).ecc_dbe_volatile == 0
    with pytest.raises(ValueError, match="AMD has no XIDs"):
        sim.inject(1, {"xid": 79})


def test_a_lost_device_and_its_return(node: tuple[SimulatedAmdSmi, AmdSmiBackend]) -> None:
    sim, backend = node
    known = backend.inventory()
    sim.inject(0, {"lost": True})
    lost = backend.sample(0)
    assert lost.lost and lost.uuid == known[0].uuid and lost.power_w is None
    assert not backend.probe(0)
    assert backend.inventory()[0] == known[0]  # its last known entry
    assert not backend.sample(1).lost  # the other board is unaffected
    sim.gpu_reset(0)
    assert backend.probe(0)
    back = backend.sample(0)
    assert not back.lost and back.uuid == known[0].uuid and back.power_w is not None


def test_reset_is_refused_while_a_process_runs(node: tuple[SimulatedAmdSmi, AmdSmiBackend]) -> None:
    sim, backend = node
    sim.inject(0, {"processes": [{"pid": 77, "used_memory_mib": 1000, "sm_util": 50}], "ecc_dbe": 1})
    backend.set_power_limit(0, 500)
    with pytest.raises(SimRefused) as refused:
        sim.gpu_reset(0)
    assert refused.value.reason == "in-use"
    with pytest.raises(DriverRefused) as busy:
        backend.reset_gpu(0)
    assert busy.value.code_name == "AMDSMI_STATUS_BUSY" and "in use" in str(busy.value)
    sim.inject(0, {"processes": []})
    backend.reset_gpu(0)  # amdsmi_reset_gpu
    after = backend.sample(0)
    assert after.ecc_dbe_volatile == 0 and after.power_limit_w == 750 and after.processes == []
    assert sim.gpu_reset(0)["effective"]


def test_reboot_and_driver_unload(node: tuple[SimulatedAmdSmi, AmdSmiBackend], clock: FakeClock) -> None:
    sim, backend = node
    settle(clock, backend, 600)
    before = backend.sample(0).energy_mj
    sim.reboot()  # the driver reloads: the library's session is gone, the backend initialises again
    after = backend.sample(0)
    assert backend.reinits == 1 and not after.lost
    assert before is not None and after.energy_mj is not None and after.energy_mj < before
    sim.inject(0, {"driver_unloaded": True})
    with pytest.raises(DriverUnavailable) as gone:
        backend.sample(0)
    assert gone.value.code_name == "AMDSMI_STATUS_DRIVER_NOT_LOADED"


def test_present_by_sysfs_or_amdsmi(tmp_path: Path, workdir: Path) -> None:
    card = tmp_path / "sys/class/drm/card0/device"
    card.mkdir(parents=True)
    (tmp_path / "drivers/i915").mkdir(parents=True)
    (card / "driver").symlink_to(tmp_path / "drivers/i915")
    sim = install(1, "MI210", workdir=workdir)
    assert present(tmp_path)  # no amdgpu card in the tree, but amdsmi finds the board
    sim.uninstall()
    assert not present(tmp_path)  # an Intel card, and amdsmi finds no driver
    (tmp_path / "drivers/amdgpu").mkdir()
    (card / "driver").unlink()
    (card / "driver").symlink_to(tmp_path / "drivers/amdgpu")
    assert present(tmp_path)
    with pytest.raises(DriverUnavailable):
        open_amd(**sim.backend_kwargs()).open()  # no simulation installed: amdsmi_init fails
