"""The Intel backend (edge/devices/intel) over the simulated i915 / xe sysfs + proc tree (edge/sim/intel).

The simulation's physics runs on a FakeClock shared with the backend's rate clock, and each test
moves it and runs one kernel tick (`sim.tick()`), so rates and figures are exact, not timed; one
test lets the real kernel thread run and waits on the tree with a generous timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge.devices.base import Capability, DeviceBackend, DriverError, DriverRefused, DriverUnavailable
from edge.devices.intel import IntelBackend, open_intel, present
from edge.devices.intel.fdinfo import device_use, parse_fdinfo, scan_proc
from edge.sim.intel import SimulatedIntel, install
from edge.sim.lib import SimRefused
from tests.helpers.clock import FakeClock

Node = Callable[..., tuple[SimulatedIntel, IntelBackend]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def node(tmp_path: Path, clock: FakeClock) -> Iterator[Node]:
    """A simulated Intel node and an opened backend over it; both undone after the test."""
    made: list[tuple[SimulatedIntel, IntelBackend]] = []

    def make(gpus: int = 2, **options: object) -> tuple[SimulatedIntel, IntelBackend]:
        sim = install(gpus, "FLEX170", clock=clock, workdir=tmp_path / f"node{len(made)}", seed="n1",
                      **options)  # type: ignore[arg-type]
        backend = open_intel(**sim.backend_kwargs(), monotonic=clock)
        assert isinstance(backend, IntelBackend)
        backend.open()
        made.append((sim, backend))
        return sim, backend

    yield make
    for sim, backend in made:
        backend.close()
        sim.uninstall()


def run(sim: SimulatedIntel, clock: FakeClock, seconds: float) -> None:
    """Simulated time passes: the kernel takes what was written now (as the real one does at the
    write), then catches up."""
    sim.tick()
    clock.advance(seconds)
    sim.tick()


def test_inventory_of_an_i915_flex_node(node: Node) -> None:
    sim, backend = node(2)
    assert isinstance(backend, DeviceBackend)
    assert present(sim.root) and not present(sim.root / "elsewhere")
    assert backend.device_count() == 2 and backend.resource_name == "gpu.intel.com/i915"
    first, second = backend.inventory()
    assert first.name == "Intel Data Center GPU Flex 170"
    assert first.uuid == sim.gpus[0].uuid == backend.known_uuid(0) and first.uuid != second.uuid
    assert first.pci_bus_id == sim.gpus[0].pci_bus_id and first.pci_bus_id.startswith("0000:")
    assert first.memory_total_bytes == 16 * 1024**3
    assert (first.power_limit_min_w, first.power_limit_max_w, first.power_limit_default_w) == (60.0, 150.0, 150.0)
    assert first.supported_sm_clocks_mhz[0] == 2050 and first.supported_sm_clocks_mhz[-1] == 300
    assert (first.vendor, first.backend, first.platform, first.resource_name) == \
        ("intel", "intel", "flex", "gpu.intel.com/i915")
    assert set(first.capabilities) == {"power_limit", "clock_limit", "energy_counter"}
    assert backend.capabilities(0) == {Capability.POWER_LIMIT, Capability.CLOCK_LIMIT, Capability.ENERGY_COUNTER}
    assert first.driver_version.startswith("i915") and first.missing == []


def test_figures_follow_the_load_and_the_temperature(node: Node, clock: FakeClock) -> None:
    sim, backend = node(1)
    backend.inventory()
    backend.sample(0)  # the first sample has no interval for utilisation yet
    sim.inject(0, {"utilization": 80})
    run(sim, clock, 20)
    before = backend.sample(0)
    run(sim, clock, 10)
    sample = backend.sample(0)
    state = sim.state(0)
    assert sample.utilization_pct == pytest.approx(80, abs=0.5)
    assert sample.sm_clock_mhz == state["sm_clock_mhz"]
    assert sample.temperature_c == pytest.approx(state["temperature_c"], abs=0.01)
    assert sample.power_limit_w == 150.0
    # power is the energy counter's rate: consistent with the energy figures, and with the physics
    assert before.energy_mj is not None and sample.energy_mj is not None and sample.energy_mj > before.energy_mj
    assert sample.power_w == pytest.approx((sample.energy_mj - before.energy_mj) / 1000 / 10, rel=0.01)
    assert sample.power_w == pytest.approx(state["power_w"], rel=0.05)
    assert sample.energy_mj == pytest.approx(state["energy_mj"], abs=2)
    assert {"ecc_dbe_volatile", "throttle_reasons"} <= set(sample.missing) and "power_w" not in sample.missing
    sim.inject(0, {"temperature_c": 97.0})
    run(sim, clock, 0.2)
    hot = backend.sample(0)
    assert hot.temperature_c is not None and hot.temperature_c > 95
    assert hot.sm_clock_mhz is not None and sample.sm_clock_mhz is not None
    assert hot.sm_clock_mhz < sample.sm_clock_mhz  # thermal slowdown shows in the GT frequency
    sim.inject(0, {"utilization": 0})
    run(sim, clock, 10)
    idle = backend.sample(0)
    assert idle.utilization_pct == 0.0 and idle.processes == []
    assert idle.energy_mj is not None and idle.energy_mj >= hot.energy_mj  # type: ignore[operator]


def test_a_power_cap_is_applied_and_read_back(node: Node, clock: FakeClock) -> None:
    sim, backend = node(1)
    backend.inventory()
    sim.inject(0, {"utilization": 100})
    backend.set_power_limit(0, 100)
    hwmon = next((sim.root / "sys/class/drm/card0/device/hwmon").iterdir())
    assert (hwmon / "power1_max").read_text().strip() == "100000000"  # µW
    run(sim, clock, 30)
    backend.sample(0)
    run(sim, clock, 10)
    sample = backend.sample(0)
    assert sim.state(0)["power_limit_w"] == 100.0 and sample.power_limit_w == 100.0
    assert sample.power_w is not None and sample.power_w <= 100.5
    sim.inject(0, {"reset": True})  # a fresh board: the driver shows its default limit again
    assert (hwmon / "power1_max").read_text().strip() == "150000000"
    assert backend.sample(0).power_limit_w == 150.0


def test_a_reboot_restarts_the_energy_counter(node: Node, clock: FakeClock) -> None:
    sim, backend = node(1)
    backend.inventory()
    sim.inject(0, {"processes": [{"pid": 77, "used_memory_mib": 100, "sm_util": 90}]})
    run(sim, clock, 60)
    busy = backend.sample(0)
    assert busy.energy_mj is not None and busy.energy_mj > 60 * 35 * 1000
    assert sim.reboot()["boots"] == 2
    run(sim, clock, 1)
    after = backend.sample(0)
    assert not after.lost and after.processes == [] and after.power_w is None  # the counter went back
    assert after.energy_mj is not None and after.energy_mj < busy.energy_mj
    run(sim, clock, 2)
    assert backend.sample(0).power_w == pytest.approx(35, rel=0.05)  # idle again


def test_an_out_of_range_cap_is_refused_with_the_range_and_the_kernel_clamps(node: Node) -> None:
    sim, backend = node(1)
    backend.inventory()
    for watts in (200.0, 10.0):
        with pytest.raises(DriverRefused) as refused:
            backend.set_power_limit(0, watts)
        assert refused.value.code_name == "EINVAL" and "allowed 60-150 W" in refused.value.message
    # what the driver does with a write past the TDP that did not come through the backend: clamp
    hwmon = next((sim.root / "sys/class/drm/card0/device/hwmon").iterdir())
    (hwmon / "power1_max").write_text("400000000\n")
    sim.tick()
    assert (hwmon / "power1_max").read_text().strip() == "150000000"
    assert sim.state(0)["power_limit_w"] == 150.0


def test_a_clock_cap_and_its_reset(node: Node, clock: FakeClock) -> None:
    sim, backend = node(1)
    backend.inventory()
    sim.inject(0, {"utilization": 100})
    backend.lock_clocks(0, 300, 1200)
    run(sim, clock, 5)
    assert sim.state(0)["locked_clocks_mhz"] == [300, 1200]
    sample = backend.sample(0)
    assert sample.sm_clock_mhz is not None and sample.sm_clock_mhz <= 1200
    with pytest.raises(DriverRefused) as refused:
        backend.lock_clocks(0, 300, 2500)
    assert refused.value.code_name == "EINVAL" and "300-2050 MHz" in refused.value.message
    # a write outside RPn..RP0 straight to the file is EINVAL to the driver: the old value stays
    card = sim.root / "sys/class/drm/card0"
    (card / "gt_max_freq_mhz").write_text("2500\n")
    sim.tick()
    assert (card / "gt_max_freq_mhz").read_text().strip() == "1200"
    backend.reset_clocks(0)
    run(sim, clock, 5)
    assert sim.state(0)["locked_clocks_mhz"] is None
    assert (card / "gt_min_freq_mhz").read_text().strip() == "300"
    assert backend.sample(0).sm_clock_mhz == 2050


def test_an_unprivileged_node_refuses_every_write(node: Node) -> None:
    sim, backend = node(1, permissions="none")
    backend.inventory()
    with pytest.raises(DriverRefused) as power:
        backend.set_power_limit(0, 100)
    assert power.value.code_name == "EACCES" and "writable /sys" in power.value.message
    with pytest.raises(DriverRefused) as clocks:
        backend.lock_clocks(0, 300, 1000)
    assert clocks.value.code_name == "EACCES"
    sim.tick()
    assert sim.state(0)["power_limit_w"] == 150.0 and sim.state(0)["locked_clocks_mhz"] is None


def test_a_lost_card_vanishes_from_sysfs_and_comes_back(node: Node, clock: FakeClock) -> None:
    sim, backend = node(2)
    inventory = backend.inventory()
    sim.inject(1, {"lost": True})
    assert not (sim.root / "sys/bus/pci/devices" / inventory[1].pci_bus_id).exists()
    lost = backend.sample(1)
    assert lost.lost and lost.uuid == inventory[1].uuid and lost.power_w is None
    assert not backend.sample(0).lost  # the other card is not affected
    assert [entry.uuid for entry in backend.inventory()] == [inventory[0].uuid, inventory[1].uuid]
    assert not backend.probe(1)
    with pytest.raises(DriverError) as gone:
        backend.set_power_limit(1, 100)
    assert gone.value.code_name == "ENODEV" and not isinstance(gone.value, DriverRefused)
    result = sim.gpu_reset(1)
    assert result["effective"]
    assert backend.probe(1)
    run(sim, clock, 1)
    back = backend.sample(1)
    assert not back.lost and back.uuid == inventory[1].uuid and back.energy_mj is not None


def test_an_unloaded_driver_is_unavailable(node: Node, tmp_path: Path) -> None:
    sim, backend = node(1)
    backend.inventory()
    sim.inject(0, {"driver_unloaded": True})
    with pytest.raises(DriverUnavailable):
        backend.sample(0)
    with pytest.raises(DriverUnavailable):
        IntelBackend(sysfs_root=sim.root).open()
    sim.inject(0, {"driver_unloaded": False})
    assert backend.probe(0) and not backend.sample(0).lost
    with pytest.raises(DriverUnavailable):
        IntelBackend(sysfs_root=tmp_path / "empty").open()


def test_per_process_use_from_fdinfo(node: Node, clock: FakeClock) -> None:
    sim, backend = node(1)
    backend.inventory()
    sim.inject(0, {"processes": [{"pid": 4242, "used_memory_mib": 2048, "sm_util": 30},
                                 {"pid": 4343, "used_memory_mib": 1024, "sm_util": 50}]})
    first = backend.sample(0)
    assert {p.pid: p.used_memory_bytes for p in first.processes} == {4242: 2 << 30, 4343: 1 << 30}
    assert all(p.sm_util_pct is None for p in first.processes)  # no interval yet
    run(sim, clock, 10)
    sample = backend.sample(0)
    assert {p.pid: p.sm_util_pct for p in sample.processes} == {4242: pytest.approx(30, abs=0.5),
                                                                4343: pytest.approx(50, abs=0.5)}
    assert sample.utilization_pct == pytest.approx(80, abs=0.5)
    assert sample.memory_used_bytes == 3 << 30 and sample.memory_free_bytes == 13 << 30
    with pytest.raises(SimRefused) as refused:
        sim.gpu_reset(0)
    assert refused.value.reason == "in-use"


def test_the_xe_driver_layout(node: Node, clock: FakeClock) -> None:
    sim, backend = node(1, driver="xe")
    (entry,) = backend.inventory()
    assert entry.resource_name == "gpu.intel.com/xe" == backend.resource_name
    assert entry.memory_total_bytes == 16 * 1024**3 and entry.driver_version.startswith("xe")
    sim.inject(0, {"processes": [{"pid": 5000, "used_memory_mib": 512, "sm_util": 40}]})
    backend.sample(0)
    backend.lock_clocks(0, 500, 1500)
    assert (sim.root / "sys/class/drm/card0/device/tile0/gt0/freq0/max_freq").read_text().strip() == "1500"
    run(sim, clock, 10)
    sample = backend.sample(0)
    assert sample.utilization_pct == pytest.approx(40, abs=0.5)  # from drm-cycles / drm-total-cycles
    assert sample.memory_temperature_c is not None and sample.temperature_c is not None
    assert sample.sm_clock_mhz is not None and 500 <= sample.sm_clock_mhz <= 1500


def test_faults_an_intel_board_cannot_have_are_refused(node: Node) -> None:
    sim, _ = node(1)
    with pytest.raises(ValueError, match="Intel has no XIDs"):
        sim.inject(0, {"xid": 79})
    with pytest.raises(ValueError, match="no ECC"):
        sim.inject(0, {"ecc_dbe": 1})
    assert sim.diagnose(0, 1)["passed"]


def test_the_kernel_thread_keeps_the_tree_current(tmp_path: Path) -> None:
    """Real time: nobody calls tick(); the thread alone moves the energy counter and applies a cap."""
    sim = install(1, "FLEX170", workdir=tmp_path / "live")
    try:
        backend = IntelBackend(**sim.backend_kwargs())
        backend.open()
        sim.inject(0, {"utilization": 50})
        (energy,) = (sim.root / "sys/class/drm/card0/device/hwmon").glob("hwmon*/energy1_input")
        start = int(energy.read_text())
        backend.set_power_limit(0, 90)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (int(energy.read_text()) > start
                                                    and sim.state(0)["power_limit_w"] == 90.0):
            time.sleep(0.05)
        assert int(energy.read_text()) > start and sim.state(0)["power_limit_w"] == 90.0
    finally:
        sim.uninstall()


def test_fdinfo_counts_a_shared_client_once(tmp_path: Path) -> None:
    """A client seen through two processes (a forked child keeps the fd) counts once, for the lowest pid."""
    text = ("drm-driver:\ti915\ndrm-client-id:\t7\ndrm-pdev:\t0000:03:00.0\n"
            "drm-resident-local0:\t1024 KiB\ndrm-engine-compute:\t{busy} ns\ndrm-engine-capacity-compute:\t4\n")
    for pid in (300, 200):
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        (tmp_path / str(pid) / "fdinfo").mkdir()
        (tmp_path / str(pid) / "fd" / "5").symlink_to("/dev/dri/renderD128")
        (tmp_path / str(pid) / "fdinfo" / "5").write_text(text.format(busy=0))
    (tmp_path / "200" / "fd" / "6").symlink_to("/dev/null")  # not a DRM fd: never read
    before = {c.key: c for c in scan_proc(tmp_path)}
    assert [c.pid for c in before.values()] == [200]
    now = parse_fdinfo(text.format(busy=2_000_000_000), 200)
    assert now is not None
    use = device_use(before, [now], 1.0)  # 2 s busy over 4 engines in 1 s: half the class
    assert use.utilization_pct == 50.0 and use.per_pid_vram_bytes == {200: 1 << 20}
    assert parse_fdinfo("drm-driver:\tamdgpu\ndrm-client-id:\t1\ndrm-pdev:\t0000:01:00.0\n", 1) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_fdinfo_is_read_where_the_fd_directory_cannot_be_listed() -> None:
    """As /proc has it: another user's fd/ is 0500 (unlistable without CAP_DAC_READ_SEARCH), its
    fdinfo/ 0555. The scan falls back to fdinfo/ and tells DRM clients by their content."""
    with tempfile.TemporaryDirectory() as top:  # not under pytest's 0700 base: "nobody" must reach it
        _scan_as_nobody(Path(top))


def _scan_as_nobody(tmp_path: Path) -> None:
    process = tmp_path / "proc" / "4242"
    (process / "fd").mkdir(parents=True)
    (process / "fdinfo").mkdir()
    (process / "fd" / "5").symlink_to("/dev/dri/renderD128")
    (process / "fdinfo" / "5").write_text("drm-driver:\txe\ndrm-client-id:\t3\ndrm-pdev:\t0000:03:00.0\n"
                                          "drm-resident-vram0:\t2048 KiB\n")
    (process / "fdinfo" / "1").write_text("pos:\t0\nflags:\t02\n")  # not a DRM file
    for path, mode in ((tmp_path, 0o755), (tmp_path / "proc", 0o755), (process, 0o555), (process / "fd", 0o500),
                       (process / "fdinfo", 0o555), (process / "fdinfo" / "5", 0o444), (process / "fdinfo" / "1", 0o444)):
        path.chmod(mode)
    script = ("import encodings.ascii, os, sys; from pathlib import Path; from edge.devices.intel.fdinfo import scan_proc; "
              "os.setgid(65534); os.setuid(65534); "
              "print([(c.pid, c.client_id, c.vram_resident_bytes) for c in scan_proc(Path(sys.argv[1]))])")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "proc")], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip() == "[(4242, 3, 2097152)]", result.stderr
