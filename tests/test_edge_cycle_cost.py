"""What an edge cycle costs beyond its NVML calls (issue 17: within 2x of a bare NVML loop,
measured by bench/edge_overhead.py): counted here, never timed.

- a cycle hands every GPU's sample to the driver's thread in one job (`DriverRunner.call_each`),
  not one hop per GPU, and `call_each` keeps what `call` promises: each call bounded from its
  start, errors handed back per call, a hung call timed out and the worker replaced;
- a node without the kubelet's pod-resources socket never loads grpc (12 MiB of the RSS).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.config import EdgeSettings
from edge.daemon import EdgeDaemon
from edge.devices.base import DriverRefused, DriverTimeout
from edge.driver.nvml import NvmlDriver
from edge.driver.runner import DriverRunner
from edge.main import choose_backend
from edge.sim import SimulatedNvml, install
from shared.gpu import GpuSample

LOAD = {"processes": [{"pid": 1, "used_memory_mib": 512, "sm_util": 60}]}


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of a test so 'hung' calls finish and their threads end."""
    event = threading.Event()
    yield event
    event.set()


async def test_a_cycle_hands_all_samples_to_the_driver_thread_in_one_job(tmp_path: Path) -> None:
    settings = EdgeSettings(node="cost", backend="sim", sim_gpus=8, interval=1, db=tmp_path / "edge.db",
                            http="127.0.0.1:0")
    sim, backend = choose_backend(settings)
    daemon = EdgeDaemon(settings, sim=sim, backend=backend)
    try:
        await daemon.start()
        for index in range(8):
            sim.inject(index, LOAD)
        await daemon.cycle()  # the first: MIG states read once, baselines set
        jobs, cycles = daemon.runner.jobs, 3
        for _ in range(cycles):
            await daemon.cycle()
        assert daemon.runner.jobs - jobs == cycles  # one hop a cycle for 8 GPUs (was 8)
        assert len(daemon.gpus) == 8
        for view in daemon.gpus.values():
            assert view.sample is not None and not view.sample.lost
            assert [p.pid for p in view.sample.processes] == [1]
        assert daemon.counters.cycles == cycles + 1
        # the samples were kept (history), and the pod map was refreshed from this cycle's processes
        assert len(daemon.store.samples(limit=10_000)) == 8 * (cycles + 1)
        assert daemon.pod_map.source == "processes"  # no kubelet socket here: NVML's processes
        assert daemon.pod_map.snapshot() == {view.inventory.uuid: [] for view in daemon.gpus.values()}
    finally:
        await daemon.stop()
        sim.uninstall()


@pytest.fixture
def sim() -> Iterator[SimulatedNvml]:
    simulated = install(2, "A100")
    yield simulated
    simulated.uninstall()


async def test_call_each_gives_each_result_or_error_in_order(sim: SimulatedNvml) -> None:
    runner = DriverRunner(NvmlDriver())
    await runner.open()
    driver = runner.driver
    jobs = runner.jobs
    results = await runner.call_each(driver.set_power_limit, [(0, 250.0), (1, 50.0), (1, 260.0)])
    assert runner.jobs - jobs == 1
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], DriverRefused) and results[1].code_name == "InvalidArgument"
    assert runner.last_error is results[1]
    samples = await runner.call_each(driver.sample, [(0,), (1,)])
    assert [s.index for s in samples if isinstance(s, GpuSample)] == [0, 1]
    assert [s.power_limit_w for s in samples if isinstance(s, GpuSample)] == [250, 260]
    assert await runner.call_each(driver.sample, []) == []
    await runner.close()


async def test_call_each_bounds_each_call_from_its_start(sim: SimulatedNvml) -> None:
    runner = DriverRunner(NvmlDriver(), timeout_s=1.0)
    # four calls of 0.4 s: 1.6 s in all, each well within its own 1 s
    results = await runner.call_each(time.sleep, [(0.4,)] * 4)
    assert results == [None] * 4
    assert runner.timeouts == 0
    await runner.stop()


async def test_call_each_times_out_a_hung_call_and_makes_none_after_it(release: threading.Event) -> None:
    runner = DriverRunner(NvmlDriver(), timeout_s=0.3)
    made: list[str] = []

    def step(name: str) -> str:
        made.append(name)
        if name == "hangs":
            release.wait(30)  # stands for a driver call that never returns
        return name

    first = await runner.call(lambda: threading.current_thread().name)
    results = await runner.call_each(step, [("a",), ("hangs",), ("after",)])
    assert results[0] == "a"
    assert isinstance(results[1], DriverTimeout) and len(results) == 2
    assert runner.timeouts == 1 and runner.workers_replaced == 1 and runner.not_answering
    release.set()
    assert await runner.call(lambda: threading.current_thread().name) != first  # a fresh worker
    assert not runner.not_answering
    assert await runner.call(len, made) == 2  # "after" was never made, even once the hung call returned
    await runner.stop()


def test_no_pod_resources_socket_never_loads_grpc(tmp_path: Path) -> None:
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from edge.podresources import GpuPodMap\n"
        f"pod_map = GpuPodMap(Path({str(tmp_path / 'kubelet.sock')!r}), lambda pid: None)\n"
        "asyncio.run(pod_map.refresh({'GPU-a': 'GPU-a'}, {'GPU-a': [1]}))\n"
        "print(pod_map.source, dict(pod_map.fallbacks), 'grpc' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.split() == ["processes", "{'absent':", "1}", "False"]
