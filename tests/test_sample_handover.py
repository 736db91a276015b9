"""cloud/sample_handover.py: the telemetry of the ingest's batches waits while the sample writer
process writes, and goes to it whole, up to `batch_size`, the moment it is free."""

from __future__ import annotations

import asyncio
import dataclasses
import time
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


def test_a_network_thread_offers_waits_for_room_and_fresh_messages_are_gathered_for_the_interval() -> None:
    """`offer` from another thread (the telemetry connection's): what it hands over is written in
    batches; while `batch_size` wait it blocks (paho reads no more: back-pressure); a message that
    is fresh waits up to `batch_interval_s` for company, not a write of its own."""
    written: list[list[float]] = []
    interval = 0.3

    async def scenario() -> tuple[list[bool], float, bool]:
        go = asyncio.Event()

        async def write(batch: list[Queued]) -> None:
            written.append([q.at for q in batch])
            await go.wait()
            go.clear()

        handover = SampleHandOver(write, batch_size=4, batch_interval_s=interval)
        runner = asyncio.create_task(handover.run())
        await asyncio.sleep(0)  # running: offers are taken
        loop = asyncio.get_running_loop()
        try:
            started = time.monotonic()
            first = await loop.run_in_executor(None, handover.offer, _queued(1, at=time.monotonic())[0])
            while not written:
                await asyncio.sleep(0.005)
            gathered_for = time.monotonic() - started
            # the child busy: four wait, the fifth offer blocks its thread until the child is free
            results: list[bool] = [first]
            for q in _queued(4, at=time.monotonic()):
                results.append(await loop.run_in_executor(None, handover.offer, q))
            fifth = loop.run_in_executor(None, handover.offer, _queued(1, at=time.monotonic())[0])
            await asyncio.sleep(0.2)
            blocked = not fifth.done()
            go.set()  # the four go to the child: room for the fifth
            results.append(await asyncio.wait_for(fifth, 5))
            go.set()
            while handover.pending():
                go.set()
                await asyncio.sleep(0.01)
            return results, gathered_for, blocked
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    results, gathered_for, blocked = asyncio.run(scenario())
    assert results == [True] * 6
    assert gathered_for >= interval * 0.9  # one fresh message waited for the interval, not written at once
    assert blocked
    assert [len(batch) for batch in written] == [1, 4, 1]


def test_offer_takes_nothing_once_the_hand_over_has_stopped() -> None:
    async def scenario() -> tuple[bool, bool]:
        async def write(batch: list[Queued]) -> None:
            return None

        handover = SampleHandOver(write, batch_size=1, batch_interval_s=0.0)
        runner = asyncio.create_task(handover.run())
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        taken = await loop.run_in_executor(None, handover.offer, _queued(1)[0])
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return taken, await loop.run_in_executor(None, handover.offer, _queued(1)[0])

    assert asyncio.run(scenario()) == (True, False)


def test_a_byte_bound_holds_the_network_thread_and_ends_the_gathering_at_once() -> None:
    """`max_bytes` (the ingest queue's byte bound): an offer that would pass it waits, and the
    batch that waits goes to the child then, not at the end of a long gathering interval."""
    written: list[int] = []

    async def scenario() -> float:
        async def write(batch: list[Queued]) -> None:
            written.append(len(batch))

        handover = SampleHandOver(write, batch_size=100, batch_interval_s=30.0, max_bytes=10)
        runner = asyncio.create_task(handover.run())
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        try:
            started = time.monotonic()
            for q in [dataclasses.replace(q, size=4) for q in _queued(3, at=time.monotonic())]:
                assert await asyncio.wait_for(loop.run_in_executor(None, handover.offer, q), 10)
            while sum(written) < 2:
                await asyncio.sleep(0.01)
            return time.monotonic() - started
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    took = asyncio.run(scenario())
    assert took < 10.0 and written[0] == 2  # 4 + 4 fit in 10 bytes, the third waited for them


def test_the_next_batchs_head_goes_ahead_in_whole_frames_and_leads_the_next_batch() -> None:
    """`take_ahead` (the sample thread, while the child writes): whole frames move from `waiting`
    to `ahead` and come back after those already sent; they still count against the bound (room,
    pending) and are the first of the next batch."""
    written: list[list[float]] = []

    async def scenario() -> tuple[list[list[float]], list[int], int, int, int]:
        go = asyncio.Event()

        async def write(batch: list[Queued]) -> None:
            written.append([q.at for q in batch])
            await go.wait()
            go.clear()

        handover = SampleHandOver(write, batch_size=10)
        runner = asyncio.create_task(handover.run())
        try:
            await handover.hand(_queued(1))
            while not written:
                await asyncio.sleep(0.001)
            await handover.hand(_queued(5, at=100.0))  # while the child writes
            loop = asyncio.get_running_loop()
            first = await loop.run_in_executor(None, handover.take_ahead, 0, 2)  # two whole frames of two
            again = await loop.run_in_executor(None, handover.take_ahead, len(first), 2)  # one left: no frame
            room, pending = await handover.room(), handover.pending()
            go.set()
            while len(written) < 2:
                await asyncio.sleep(0.001)
            go.set()
            return written, [len(first), len(again)], room, pending, len(handover.ahead)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    batches, taken, room, pending, ahead_after = asyncio.run(scenario())
    assert taken == [4, 0]
    assert room == 5 and pending == 6  # the four ahead still wait: 5 of 10 taken, 1 being written
    assert batches == [[0.0], [100.0, 101.0, 102.0, 103.0, 104.0]]  # the four ahead first, then the rest
    assert ahead_after == 0
