"""cloud/services.py: the one periodic runner of every part's leader work (the batch bus: tests/test_batch_bus.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from cloud.services import WARN_EVERY_S, Periodic, run_periodically
from cloud.store import FleetStoreError

LONG = 3600.0  # an interval no test waits out: only a wake-up or "again" runs the next step


async def _until(condition: object, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def _running(periodic: Periodic, condition: object) -> None:
    task = asyncio.create_task(run_periodically(periodic))
    try:
        await _until(condition)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_step_that_has_more_to_do_runs_again_at_once() -> None:
    calls: list[int] = []

    async def step() -> bool:
        calls.append(1)
        return len(calls) < 4  # three times "more to do", then wait the (long) interval

    await _running(Periodic("again", step, LONG), lambda: len(calls) >= 4)
    await asyncio.sleep(0.1)
    assert len(calls) == 4  # the fourth said "done": nothing runs before the interval


async def test_a_wake_up_runs_the_next_step_without_waiting_the_interval() -> None:
    wake = asyncio.Event()
    calls: list[int] = []

    async def step() -> None:
        calls.append(1)

    task = asyncio.create_task(run_periodically(Periodic("woken", step, LONG, wake=wake)))
    try:
        await _until(lambda: len(calls) == 1)
        wake.set()
        await _until(lambda: len(calls) == 2)
        assert not wake.is_set()  # cleared before the step looked, so the next wake counts
    finally:
        task.cancel()


async def test_failures_never_end_the_loop_and_expected_ones_are_one_throttled_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    async def step() -> bool:
        calls.append(1)
        if len(calls) <= 3:
            raise FleetStoreError("fleet store: read failed: database is locked")
        if len(calls) == 4:
            raise RuntimeError("a bug")
        return len(calls) < 6

    with caplog.at_level(logging.WARNING, logger="cloud.services"):
        await _running(Periodic("scan", step, 0.01, expected=(FleetStoreError,)), lambda: len(calls) >= 6)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(warnings) == 1 and "database is locked" in warnings[0].getMessage(), warnings
    assert WARN_EVERY_S > 1  # the three failures came within the throttle window
    assert len(errors) == 1 and errors[0].exc_info is not None and "scan failed" in errors[0].getMessage()
