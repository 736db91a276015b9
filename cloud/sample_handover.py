"""The telemetry the ingest hands to the sample writer process (cloud/sample_writer.py), gathered
while the child writes and handed over whole as soon as it is free.

The child's cost of a batch is a fixed part (every node's row, every GPU's latest sample: the
same whatever the batch's length) and a part per message (its history rows). Handing it each of
the ingest's batches as it came (at most two in flight) made the batch as long as what queued
while the child wrote the one before, often 1,000-2,000 messages of a backlog, so a quarter of
the child's time went to the fixed part again and again. Here the batches' telemetry waits in
ONE list while the child writes; the moment it answers, the whole list (up to `batch_size`
messages) goes to it: the longer the child is behind, the longer its next batch, and the less it
costs a message. The child waits only while the controller encodes a batch's first frame.

Bounded as before: the ingest gathers a batch only while fewer than `batch_size` messages wait
here, and at most that many more (`room`), so at most two batches' worth is held (one waiting,
one being written). Only the event loop touches this; `write` runs the child's write (retried
while it fails) and delivers what was written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from cloud.ingest_queue import Queued


class SampleHandOver:
    """Telemetry waiting for the child, and the batch it is writing; `run` hands it over."""

    def __init__(self, write: Callable[[list[Queued]], Awaitable[None]], batch_size: int) -> None:
        self._write = write
        self.batch_size = max(1, batch_size)
        self.waiting: list[Queued] = []  # oldest first
        self.writing: list[Queued] = []  # the batch the child is writing (or being retried)
        self._changed = asyncio.Condition()

    def pending(self) -> int:
        return len(self.waiting) + len(self.writing)

    def oldest(self) -> float | None:
        """When the oldest message here was queued (time.monotonic()), None when none is."""
        first = self.writing or self.waiting
        return first[0].at if first else None

    async def room(self) -> int:
        """How many messages the next batch may hand over (waits while `batch_size` wait here)."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.waiting) < self.batch_size)
        return self.batch_size - len(self.waiting)

    async def hand(self, samples: list[Queued]) -> None:
        """A batch's telemetry: to the child with the next batch it takes."""
        if samples:
            async with self._changed:
                self.waiting += samples
                self._changed.notify_all()

    async def run(self) -> None:
        """Until cancelled: whatever waits, up to `batch_size`, written as one batch, then the next."""
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self.waiting))
                self.writing, self.waiting = self.waiting[:self.batch_size], self.waiting[self.batch_size:]
                self._changed.notify_all()  # room for the ingest's next batch
            try:
                await self._write(self.writing)
            finally:
                self.writing = []
