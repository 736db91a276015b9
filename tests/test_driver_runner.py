"""DriverRunner: driver calls on one worker thread, bounded by a timeout."""

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from edge.devices.base import DriverRefused, DriverTimeout
from edge.driver.nvml import NvmlDriver
from edge.driver.runner import DriverRunner
from edge.sim import SimulatedNvml, install


@pytest.fixture
def sim() -> Iterator[SimulatedNvml]:
    simulated = install(2, "A100")
    yield simulated
    simulated.uninstall()


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of a test so 'hung' calls finish and their threads end."""
    event = threading.Event()
    yield event
    event.set()


async def test_calls_run_on_one_worker_thread_not_the_loop(sim: SimulatedNvml) -> None:
    runner = DriverRunner(NvmlDriver())
    await runner.start()
    await runner.open()
    names = {await runner.call(lambda: threading.current_thread().name) for _ in range(3)}
    assert len(names) == 1
    assert names.pop() != threading.current_thread().name
    assert await runner.device_count() == 2
    workers = {t for t in threading.enumerate() if t.name.startswith("kgpu-nvml")}
    await runner.close()
    assert not any(t.is_alive() for t in workers)  # close ends the worker thread
    assert await runner.device_count() == 2  # the next call starts a new one (NVML re-inits)
    await runner.close()


async def test_wrappers_reach_the_driver(sim: SimulatedNvml) -> None:
    runner = DriverRunner(NvmlDriver())
    await runner.open()
    inventory = await runner.inventory()
    assert [g.uuid for g in inventory] == [g.uuid for g in sim.gpus]
    await runner.set_power_limit(1, 250)
    await runner.lock_clocks(1, 210, 1005)
    assert sim.state(1)["locked_clocks_mhz"] == [210, 1005]
    await runner.reset_clocks(1)
    sample = await runner.sample(1)
    assert sample.power_limit_w == 250
    assert sim.state(1)["locked_clocks_mhz"] is None
    sim.inject(1, {"lost": True})
    assert (await runner.sample(1)).lost
    sim.inject(1, {"lost": False})
    assert await runner.probe(1) is True
    await runner.close()


async def test_driver_errors_reach_the_caller_and_are_remembered(sim: SimulatedNvml) -> None:
    runner = DriverRunner(NvmlDriver())
    await runner.open()
    with pytest.raises(DriverRefused) as refused:
        await runner.set_power_limit(0, 50)
    assert refused.value.code_name == "InvalidArgument"
    assert runner.last_error is refused.value
    assert runner.timeouts == 0
    await runner.close()


async def test_a_hung_call_times_out_and_the_next_call_still_works(
    release: threading.Event,
) -> None:
    runner = DriverRunner(NvmlDriver(), timeout_s=0.2)
    first = await runner.call(lambda: threading.current_thread().name)
    started = time.monotonic()
    with pytest.raises(DriverTimeout) as timed_out:
        await runner.call(release.wait, 30)  # stands for a driver call that never returns
    assert 0.15 <= time.monotonic() - started < 1.0
    assert timed_out.value.code_name == "Timeout"
    assert runner.timeouts == 1
    assert runner.last_error is timed_out.value
    assert runner.workers_replaced == 1
    second = await runner.call(lambda: threading.current_thread().name)
    assert second != first  # a fresh worker, the hung one abandoned
    assert await runner.call(sum, [1, 2, 3]) == 6
    await runner.stop()


async def test_calls_queued_behind_a_hung_one_move_to_the_fresh_worker(
    release: threading.Event,
) -> None:
    runner = DriverRunner(NvmlDriver(), timeout_s=0.2)
    hung = asyncio.create_task(runner.call(release.wait, 30))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(runner.call(lambda: "answered", timeout_s=3.0))
    with pytest.raises(DriverTimeout):
        await hung
    assert await queued == "answered"
    assert runner.timeouts == 1
    await runner.stop()


async def test_the_event_loop_keeps_running_while_a_call_blocks(release: threading.Event) -> None:
    runner = DriverRunner(NvmlDriver(), timeout_s=0.3)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    with pytest.raises(DriverTimeout):
        await runner.call(release.wait, 30)
    ticker.cancel()
    assert ticks >= 10
    await runner.stop()


async def test_a_cancelled_caller_does_not_leave_the_job_to_run_later(
    release: threading.Event,
) -> None:
    runner = DriverRunner(NvmlDriver(), timeout_s=5)
    ran: list[str] = []
    blocker = asyncio.create_task(runner.call(release.wait, 30))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(runner.call(ran.append, "late"))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    assert await blocker is True
    assert await runner.call(len, ran) == 0  # the cancelled job was dropped, not run
    await runner.stop()
