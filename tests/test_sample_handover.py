"""cloud/sample_handover.py: the telemetry of the ingest's batches waits while the sample writer
process writes, and goes to it whole, up to `batch_size`, the moment it is free."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from cloud.ingest_queue import Queued
from cloud.sample_handover import SampleHandOver


def _queued(n: int, at: float = 0.0) -> list[Queued]:
    return [Queued(incoming=cast(Any, None), size=1, at=at + i, node=f"n{i}") for i in range(n)]


def test_what_waits_while_the_child_writes_goes_over_as_one_batch_up_to_batch_size() -> None:
    written: list[int] = []

    async def scenario() -> tuple[list[int], int, float | None, int]:
        go = asyncio.Event()

        async def write(batch: list[Queued]) -> None:  # the child: busy until told
            written.append(len(batch))
            await go.wait()
            go.clear()

        handover = SampleHandOver(write, batch_size=10)
        runner = asyncio.create_task(handover.run())
        try:
            await handover.hand(_queued(3))
            await asyncio.sleep(0)  # the first three go at once: the child was free
            while not written:
                await asyncio.sleep(0.001)
            for _ in range(4):  # four batches while it writes: they wait together
                assert await handover.room() > 0
                await handover.hand(_queued(3, at=100.0))
            pending_while_busy = handover.pending()
            oldest = handover.oldest()
            go.set()  # free: the twelve waiting go over, ten now, two after
            while len(written) < 2:
                await asyncio.sleep(0.001)
            room_now = await handover.room()
            go.set()
            while len(written) < 3:
                await asyncio.sleep(0.001)
            go.set()
            while handover.pending():
                await asyncio.sleep(0.001)
            return written, pending_while_busy, oldest, room_now
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    sizes, pending_while_busy, oldest, room_now = asyncio.run(scenario())
    assert sizes == [3, 10, 2]
    assert pending_while_busy == 15 and oldest == 0.0  # the batch being written is the oldest
    assert room_now == 8  # two wait: the next batch may hand over eight


def test_room_waits_while_a_whole_batch_waits() -> None:
    async def scenario() -> tuple[bool, bool]:
        go = asyncio.Event()

        async def write(batch: list[Queued]) -> None:
            await go.wait()

        handover = SampleHandOver(write, batch_size=5)
        runner = asyncio.create_task(handover.run())
        try:
            await handover.hand(_queued(5))  # being written
            while not handover.writing:
                await asyncio.sleep(0.001)
            await handover.hand(_queued(5))  # waiting: no room
            room = asyncio.create_task(handover.room())
            await asyncio.sleep(0.05)
            blocked = not room.done()
            go.set()  # the first is written, the waiting five go to the child: room again
            await asyncio.wait_for(room, 5)
            return blocked, room.result() == 5
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    blocked, full_room = asyncio.run(scenario())
    assert blocked and full_room
