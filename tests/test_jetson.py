"""The Jetson backend (edge/devices/jetson) over the simulated module tree (edge/sim/jetson).

The backend reads and writes the tree's files exactly as it would a real module's; the simulation's
kernel validates what was written and keeps the files current from the GPU's physics. A fake clock
drives the physics, so nothing here sleeps to let time pass.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.devices.base import Capability, DeviceBackend, DriverRefused
from edge.devices.jetson import NO_POWER_CAP, JetsonBackend, open_jetson, present
from edge.sim.jetson import PROFILES, SimulatedJetson, install
from edge.sim.jetson.tree import GPU_DEVFREQ
from edge.sim.lib import SimRefused

MHZ = 1_000_000

# What jetson-stats 7.2.2 reads (rbonghi/jetson_stats, jtop/core/<file>), as globs under the root:
# the simulated tree must have each, where jtop looks for it.
JTOP_READS: dict[str, tuple[str, ...]] = {
    "gpu.py find_igpu": ("sys/class/devfreq/*/device/of_node/name",),
    "gpu.py igpu_read_status": ("sys/devices/platform/bus@0/17000000.gpu/load",
                                "sys/devices/platform/bus@0/17000000.gpu/railgate_enable"),
    "gpu.py igpu_read_freq": tuple(f"sys/class/devfreq/*/{name}" for name in
                                   ("governor", "cur_freq", "max_freq", "min_freq")),
    "temperature.py get_virtual_thermal_temperature": ("sys/devices/virtual/thermal/thermal_zone*/type",
                                                       "sys/devices/virtual/thermal/thermal_zone*/temp"),
    "power.py find_all_i2c_power_monitor": ("sys/bus/i2c/devices/*/name",
                                            "sys/bus/i2c/devices/*/hwmon/hwmon*/in1_label",
                                            "sys/bus/i2c/devices/*/hwmon/hwmon*/in1_input",
                                            "sys/bus/i2c/devices/*/hwmon/hwmon*/curr1_input",
                                            "sys/bus/i2c/devices/*/hwmon/hwmon*/curr1_crit"),
    "memory.py meminfo": ("proc/meminfo",),
    "processes.py ProcessService": ("sys/kernel/debug/nvmap/iovmm/maps",),
    "jetson_variables.py": ("etc/nv_tegra_release", "sys/firmware/devicetree/base/model",
                            "proc/device-tree/compatible", "sys/firmware/devicetree/base/serial-number"),
    "nvpmodel (the tool jtop runs)": ("etc/nvpmodel.conf",),
}
JTOP_MEMINFO = re.compile(r"(?P<key>[^:]+):\s+(?P<value>.+)\s+(?P<unit>.)B")  # jtop/core/memory.py
JTOP_POWER_MODE = re.compile(r"NV Power Mode: (?P<name>\w+)")  # jtop/core/nvpmodel.py


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _start(tmp_path: Path, clock: FakeClock, model: str = "ORIN-NX", **kwargs: object
           ) -> tuple[SimulatedJetson, JetsonBackend]:
    sim = install(1, model, clock=clock, seed="node-a", workdir=tmp_path / "jetson", **kwargs)  # type: ignore[arg-type]
    backend = open_jetson(**sim.backend_kwargs())
    backend.open()
    return sim, backend


@pytest.fixture
def nx(tmp_path: Path, clock: FakeClock) -> Iterator[tuple[SimulatedJetson, JetsonBackend]]:
    sim, backend = _start(tmp_path, clock)
    yield sim, backend
    sim.uninstall()


def test_inventory_and_samples_follow_the_module(nx: tuple[SimulatedJetson, JetsonBackend],
                                                 clock: FakeClock) -> None:
    sim, backend = nx
    assert isinstance(backend, DeviceBackend)
    assert (backend.backend, backend.vendor, backend.resource_name) == ("jetson", "nvidia", "nvidia.com/gpu")
    [entry] = backend.inventory()
    assert entry.uuid == backend.uuid_of(0) == sim.gpu.uuid and entry.uuid.startswith("JETSON-")
    assert entry.name == "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"
    assert (entry.vendor, entry.backend, entry.platform, entry.resource_name) == (
        "nvidia", "jetson", "jetson-orin", "nvidia.com/gpu")
    assert entry.architecture == "ampere" and entry.driver_version == "36.4.3"
    assert entry.supported_sm_clocks_mhz == [918, 816, 714, 612, 510, 408, 306]
    assert entry.memory_total_bytes == PROFILES["ORIN-NX"].memory_total_mib * 1024 * 1024
    assert sorted(entry.capabilities) == ["clock_limit", "power_mode"]
    assert backend.capabilities(0) == {Capability.CLOCK_LIMIT, Capability.POWER_MODE}
    assert entry.power_limit_max_w is None and "power_limit_max_w" in entry.missing

    idle = backend.sample(0)
    assert not idle.lost and idle.utilization_pct == 0.0
    assert idle.sm_clock_mhz == 306 and idle.power_limit_w is None
    assert idle.temperature_c is not None and 25 < idle.temperature_c < 45
    assert idle.power_w is not None and 0.5 < idle.power_w < 3
    assert {"power_limit_w", "ecc_dbe_volatile", "throttle_reasons"} <= set(idle.missing)
    assert "utilization_pct" not in idle.missing and "processes" not in idle.missing

    sim.inject(0, {"processes": [{"pid": 4242, "used_memory_mib": 2048, "sm_util": 80}]})
    clock.now += 120
    busy = backend.sample(0)
    assert busy.utilization_pct == 80.0
    assert busy.sm_clock_mhz == 714  # the 15 W mode (the NX's default) caps the GPU at 714 MHz
    assert busy.power_w is not None and busy.power_w > idle.power_w + 3
    assert busy.temperature_c is not None and busy.temperature_c > idle.temperature_c + 5
    assert busy.memory_used_bytes is not None and idle.memory_used_bytes is not None
    assert busy.memory_used_bytes - idle.memory_used_bytes == 2048 * 1024 * 1024
    assert [(p.pid, p.used_memory_bytes) for p in busy.processes] == [(4242, 2048 * 1024 * 1024)]

    sim.inject(0, {"temperature_c": 90})
    hot = backend.sample(0)
    assert hot.temperature_c == pytest.approx(90, abs=0.01)
    assert sim.state(0)["temperature_c"] == pytest.approx(hot.temperature_c, abs=0.01)


def test_clock_cap_is_written_read_back_and_obeyed(tmp_path: Path, clock: FakeClock) -> None:
    sim, backend = _start(tmp_path, clock, "AGX-ORIN")
    try:
        max_freq = sim.root / GPU_DEVFREQ / "max_freq"
        sim.inject(0, {"utilization": 100})
        clock.now += 60
        free = backend.sample(0)
        assert free.sm_clock_mhz == 1300  # MAXN: the whole table
        backend.lock_clocks(0, 0, 700)  # the highest OPP at or below 700 MHz
        assert int(max_freq.read_text()) == 612 * MHZ
        assert sim.state(0)["devfreq_max_mhz"] == 612
        clock.now += 60
        capped = backend.sample(0)
        assert capped.sm_clock_mhz == 612
        assert capped.power_w is not None and free.power_w is not None and capped.power_w < free.power_w * 0.5
        backend.reset_clocks(0)
        assert int(max_freq.read_text()) == 1_300_500_000

        # nvpmodel: a 15 W mode caps the GPU at 408 MHz, and a clock cap never lifts a mode's cap
        backend.set_power_mode(0, 1)
        assert backend.power_mode() == ("MODE_15W", 1)
        assert sim.state(0)["devfreq_max_mhz"] == 408
        backend.lock_clocks(0, 0, 1000)
        assert int(max_freq.read_text()) == 408 * MHZ
        with pytest.raises(DriverRefused, match="Invalid power mode ID 9"):
            backend.set_power_mode(0, 9)
    finally:
        sim.uninstall()


def test_refusals_name_their_reason(tmp_path: Path, clock: FakeClock) -> None:
    sim, backend = _start(tmp_path / "root", clock)
    try:
        with pytest.raises(DriverRefused) as no_cap:
            backend.set_power_limit(0, 10)
        assert NO_POWER_CAP in no_cap.value.message
        with pytest.raises(DriverRefused, match="below the GPU's lowest frequency 306 MHz") as low:
            backend.lock_clocks(0, 0, 100)
        assert low.value.code_name == "EINVAL"
        # another writer's out-of-range and unparsable values: the kernel clamps, or keeps the old one
        max_freq = sim.root / GPU_DEVFREQ / "max_freq"
        max_freq.write_text("5000000000\n")
        sim.tick()
        assert int(max_freq.read_text()) == 918 * MHZ
        max_freq.write_text("fast\n")
        sim.tick()
        assert int(max_freq.read_text()) == 918 * MHZ
    finally:
        sim.uninstall()

    unprivileged, backend = _start(tmp_path / "none", clock, permissions="none")
    try:
        max_freq = unprivileged.root / GPU_DEVFREQ / "max_freq"
        before = max_freq.read_text()
        with pytest.raises(DriverRefused, match="not writable") as denied:
            backend.lock_clocks(0, 0, 500)
        assert denied.value.code_name == "EACCES"
        assert max_freq.read_text() == before
        with pytest.raises(DriverRefused, match="Permission denied"):
            backend.set_power_mode(0, 1)
        assert backend.power_mode() == ("15W", 2)
    finally:
        unprivileged.uninstall()


def test_simulation_refuses_what_a_jetson_cannot_do(nx: tuple[SimulatedJetson, JetsonBackend],
                                                    tmp_path: Path) -> None:
    sim, _ = nx
    with pytest.raises(SimRefused, match="no reset"):
        sim.gpu_reset(0)
    with pytest.raises(ValueError, match="no XIDs"):
        sim.inject(0, {"xid": 79})
    with pytest.raises(ValueError, match="no GPU ECC"):
        sim.inject(0, {"ecc_dbe": 1})
    with pytest.raises(ValueError, match="exactly one integrated GPU"):
        install(2, "ORIN-NX", workdir=tmp_path / "two")
    assert sim.diagnose(0, 1)["passed"] is True


def test_lost_gpu_and_back_after_a_reboot(nx: tuple[SimulatedJetson, JetsonBackend], clock: FakeClock) -> None:
    sim, backend = nx
    [known] = backend.inventory()
    sim.inject(0, {"utilization": 50})
    clock.now += 10
    before = backend.sample(0)
    sim.inject(0, {"lost": True})
    assert not (sim.root / "sys/class/devfreq/17000000.gpu").exists()
    lost = backend.sample(0)
    assert lost.lost and lost.uuid == known.uuid and lost.power_w is None
    assert backend.probe(0) is False
    assert backend.inventory() == [known]
    assert sim.state(0)["recovery_action"] == "reboot"
    assert sim.reboot()["boots"] == 2
    assert backend.probe(0) is True
    clock.now += 10
    back = backend.sample(0)
    assert not back.lost and back.utilization_pct == 0.0
    assert back.energy_mj is not None and before.energy_mj is not None and back.energy_mj >= before.energy_mj


def test_energy_is_the_integral_of_rail_power(nx: tuple[SimulatedJetson, JetsonBackend], clock: FakeClock) -> None:
    sim, backend = nx
    first = backend.sample(0)
    physics_start = sim.gpu.energy_mj
    energies = [first.energy_mj]
    for step in range(240):  # two simulated minutes, a sample every 0.5 s, the load changing
        if step % 60 == 0:
            sim.inject(0, {"utilization": (step // 60) * 30})
        clock.now += 0.5
        energies.append(backend.sample(0).energy_mj)
    assert all(e is not None for e in energies)
    assert energies == sorted(energies)  # type: ignore[type-var]
    measured = energies[-1] - energies[0]  # type: ignore[operator]
    exact = sim.gpu.energy_mj - physics_start
    assert exact > 500_000  # several hundred joules: the figure means something
    assert measured == pytest.approx(exact, rel=0.02)


def test_tree_is_where_jetson_stats_reads(nx: tuple[SimulatedJetson, JetsonBackend], tmp_path: Path) -> None:
    sim, backend = nx
    for reader, patterns in JTOP_READS.items():
        for pattern in patterns:
            assert list(sim.root.glob(pattern)), f"{reader} reads {pattern}: not in the simulated tree"
    meminfo = (sim.root / "proc/meminfo").read_text().splitlines()
    assert all(JTOP_MEMINFO.search(line.strip()) for line in meminfo)
    assert (sim.root / "sys/class/devfreq/17000000.gpu/device/of_node/name").read_text().strip("\x00") == "gpu"
    done = backend._nvpmodel("-q")
    match = JTOP_POWER_MODE.search(done.stdout)
    assert match and match["name"] == "15W"
    assert present(sim.root) and not present(tmp_path / "empty")


def test_kernel_thread_validates_writes_on_its_own(tmp_path: Path) -> None:
    sim = install(1, "ORIN-NANO", workdir=tmp_path / "nano")
    try:
        max_freq = sim.root / GPU_DEVFREQ / "max_freq"
        assert os.stat(max_freq).st_mode & 0o777 == 0o644
        max_freq.write_text("1\n")  # below the table: devfreq shows the lowest OPP
        deadline = time.monotonic() + 30
        while int(max_freq.read_text()) != 306 * MHZ:
            assert time.monotonic() < deadline, "the simulated kernel never clamped max_freq"
            time.sleep(0.05)
    finally:
        sim.uninstall()


def test_parsers_read_other_modules_formats(tmp_path: Path) -> None:
    """What the simulated Orin tree does not show: Xavier's GPU-therm zone, Thor's INA238 (power in
    µW), an L4T nvpmodel.conf with its other knobs, nvmap sizes in M, `nvpmodel -q` as jtop reads it."""
    from edge.devices.jetson import sysfs

    zone = tmp_path / "sys/devices/virtual/thermal/thermal_zone1"
    zone.mkdir(parents=True)
    (zone / "type").write_text("GPU-therm\n")
    (zone / "temp").write_text("41500\n")
    assert sysfs.find_gpu_thermal_zone(tmp_path) == zone / "temp"
    hwmon = tmp_path / "sys/bus/i2c/devices/2-0044/hwmon/hwmon5"
    hwmon.mkdir(parents=True)
    (hwmon.parent.parent / "name").write_text("ina238\n")
    for name, value in (("in1_input", "19800"), ("curr1_input", "2500"), ("power1_input", "49500000")):
        (hwmon / name).write_text(value + "\n")
    rails = sysfs.find_rails(tmp_path)
    assert list(rails) == ["VIN"] and rails["VIN"].watts() == pytest.approx(49.5)
    assert sysfs.gpu_rail(rails) is None  # the system input is not the GPU's figure

    conf = """
# nvpmodel_p3701_0005.conf
< PARAM TYPE=FILE NAME=CPU_ONLINE >
CORE_0 /sys/devices/system/cpu/cpu0/online
< PARAM TYPE=CLOCK NAME=GPU >
MAX_FREQ /sys/devices/platform/17000000.ga10b/devfreq/17000000.ga10b/max_freq
< POWER_MODEL ID=0 NAME=MAXN >
CPU_ONLINE CORE_0 1
GPU MAX_FREQ -1
< POWER_MODEL ID=1 NAME=MODE_15W >
CPU_ONLINE CORE_0 1
GPU MIN_FREQ 0
GPU MAX_FREQ 420750000 # a comment
< PM_CONFIG DEFAULT=1 >
"""
    modes, default = sysfs.parse_nvpmodel_conf(conf)
    assert default == 1
    assert [(m.id, m.name, m.budget_w, m.gpu_max_hz) for m in modes] == [
        (0, "MAXN", None, -1), (1, "MODE_15W", 15.0, 420_750_000)]
    assert sysfs.parse_nvpmodel_query("NV Fan Mode:quiet\nNV Power Mode: MODE_15W\n1\n") == ("MODE_15W", 1)
    assert sysfs.parse_nvpmodel_query("nvpmodel: command failed\n") is None
    table = "CLIENT  PROCESS  PID  SIZE\nuser  gst-launch-1.0  812  12M\nuser  python3  4242  2048K\ntotal  14336K\n"
    assert [(c.pid, c.size_bytes) for c in sysfs.parse_nvmap(table)] == [(812, 12 * 1024**2), (4242, 2048 * 1024)]
