"""The telemetry the ingest hands to the sample writer process (cloud/sample_writer.py), gathered
while the child writes and handed over whole as soon as it is free.

The child's cost of a batch is a fixed part (every node's row, every GPU's latest sample: the
same whatever the batch's length) and a part per message (its history rows). Handing it each of
the ingest's batches as it came (at most two in flight) made the batch as long as what queued
while the child wrote the one before, often 1,000-2,000 messages of a backlog, so a quarter of
the child's time went to the fixed part again and again. Here the telemetry waits in ONE list
while the child writes; the moment it answers, the whole list (up to `batch_size` messages) goes
to it: the longer the child is behind, the longer its next batch, and the less it costs a message.

Telemetry comes here two ways. Most of it straight from the telemetry connection's network thread
(`offer`, cloud/ingest.py `Ingestor.take_telemetry`): peeked at and budgeted there, it never
crosses the event loop one message at a time (the loop's hand-overs, queues and batch gathering
were a quarter of the controller's CPU in a backlog drain, docs/benchmarks.md). The rest (a
message the peek could not read, validated in full on the loop) with the ingest's batches
(`hand`). A batch goes to a free child once `batch_interval_s` has passed since its oldest
message arrived, or at once when `batch_size` wait: a steady fleet's telemetry is written in
batches of a tenth of a second, as before, not one message at a time.

While the child writes a batch, the next one's first messages go to it ahead (`take_ahead`, on the
sample thread, a frame's worth at a time: cloud/sample_writer.py `SampleWriterProcess.write`), so
that it decodes them the moment it is done instead of waiting for its answer to reach the loop and
the next batch to come back (traced: 30-40 ms a batch, a fifth of a backlog drain). They stay here,
in `ahead`, at the head of the next batch, until it is written.

Bounded as before: at most `batch_size` messages and `max_bytes` of payload (the ingest queue's
bounds) wait here (in `waiting` and `ahead`); beyond, `offer` blocks the network thread (paho reads
nothing more: back-pressure to the broker; counted in `room_waits`, logged) and `room` makes the
ingest wait before it gathers its next batch, so at most two batches' worth is held (one waiting,
one being written).
`waiting`, `ahead` and `writing` change under `_lock` (the network thread, the sample thread and
the loop); `run` and `write` run on the loop.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable

from cloud.ingest_queue import Queued
from shared.logs import ThrottledLog, get_logger

ROOM_WAIT_SLICE_S = 0.5  # `offer` waits for room in slices, so that a closed hand-over frees it
ROOM_LOG_EVERY_S = 10.0  # the warning that telemetry waits, at most this often

log = get_logger(__name__)


class SampleHandOver:
    """Telemetry waiting for the child, and the batch it is writing; `run` hands it over."""

    def __init__(self, write: Callable[[list[Queued]], Awaitable[None]], batch_size: int,
                 batch_interval_s: float = 0.0, max_bytes: int = 0) -> None:
        self._write = write
        self.batch_size = max(1, batch_size)
        self.batch_interval_s = max(0.0, batch_interval_s)
        self.max_bytes = max(0, max_bytes)  # payload bytes `offer` lets wait, at most (0: no bound)
        self.waiting: list[Queued] = []  # oldest first
        self.waiting_bytes = 0
        self.room_waits = 0  # times `offer` found no room and held its network thread
        self._room_log = ThrottledLog(log, ROOM_LOG_EVERY_S)
        self._held = False  # an `offer` waits for room
        self.ahead: list[Queued] = []  # the next batch's head, sent to the child ahead (`take_ahead`)
        self.ahead_bytes = 0
        self.writing: list[Queued] = []  # the batch the child is writing (or being retried)
        self.closed = False  # `run` has ended: `offer` takes nothing more
        self._lock = threading.Condition()  # network thread (offer) against the loop
        # `run` asleep: woken (on the loop) once this many wait; inf while it is awake
        self._wake_at = math.inf
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # set by `run` each time it takes a batch
        self._loop: asyncio.AbstractEventLoop | None = None

    def pending(self) -> int:
        return len(self.waiting) + len(self.ahead) + len(self.writing)

    def held(self) -> int:
        """Messages waiting for the next batch (sent ahead or not), not the batch being written."""
        return len(self.waiting) + len(self.ahead)

    def held_bytes(self) -> int:
        """Their payload bytes."""
        return self.waiting_bytes + self.ahead_bytes

    def oldest(self) -> float | None:
        """When the oldest message here was queued (time.monotonic()), None when none is."""
        first = self.writing or self.ahead or self.waiting
        return first[0].at if first else None

    # -- in ---------------------------------------------------------------------------------------

    def offer(self, queued: Queued) -> bool:
        """On the network thread: one message, once there is room for it (waits meanwhile);
        False when the hand-over is closed or not running yet (the caller sends it the loop's way)."""
        with self._lock:
            if not self._fits(queued.size):
                self._note_full()
                self._held = True  # a batch is as full as it gets: `run` gathers no longer
                self._signal_locked()
                try:
                    while not self.closed and not self._fits(queued.size):
                        self._lock.wait(ROOM_WAIT_SLICE_S)
                finally:
                    self._held = False
            if self.closed or self._loop is None:
                return False
            self.waiting.append(queued)
            self.waiting_bytes += queued.size
            self._signal_locked()
            return True

    def _signal_locked(self) -> None:
        """Wake `run` if what it waits for is here now (under `_lock`; from any thread)."""
        if not self._ready(self._wake_at):
            return
        self._wake_at = math.inf
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop is closed: the process is ending
            pass

    def _ready(self, count: float) -> bool:
        """At least `count` messages wait, or an offer is held for room (under `_lock`)."""
        held = self.held()
        return held >= count or (self._held and held > 0)

    def _fits(self, size: int) -> bool:
        """Room for a message of `size` bytes (under `_lock`): always when none waits."""
        held = self.held()
        return not held or (held < self.batch_size
                               and (not self.max_bytes or self.held_bytes() + size <= self.max_bytes))

    def _note_full(self) -> None:
        self.room_waits += 1
        self._room_log.log("full", "telemetry waits for the sample writer process (%d messages, %d bytes): not "
                           "reading telemetry from the broker until it takes them", self.held(), self.held_bytes())

    async def room(self) -> int:
        """How many messages the next batch may hand over (waits while `batch_size` wait here)."""
        while self.held() >= self.batch_size:
            self._room.clear()
            await self._room.wait()
        return self.batch_size - self.held()

    async def hand(self, samples: list[Queued]) -> None:
        """On the loop: a batch's telemetry, to the child with the next batch it takes."""
        if samples:
            with self._lock:
                self.waiting += samples
                self.waiting_bytes += sum(q.size for q in samples)
                self._signal_locked()

    def take_ahead(self, sent: int, frame: int) -> list[Queued]:
        """On the sample thread, while the child writes `writing`: the next batch's messages to
        send it ahead, those of `ahead` after the first `sent` (sent already), once whole frames
        of `frame` messages wait (then moved from `waiting` to `ahead`)."""
        with self._lock:
            whole = len(self.waiting) // frame * frame
            take = min(whole, self.batch_size - len(self.ahead))
            if take > 0:
                moved, self.waiting = self.waiting[:take], self.waiting[take:]
                moved_bytes = sum(q.size for q in moved)
                self.ahead += moved
                self.ahead_bytes += moved_bytes
                self.waiting_bytes -= moved_bytes
            return self.ahead[sent:]

    # -- out --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: whatever waits, up to `batch_size`, written as one batch, then the next."""
        self._loop = asyncio.get_running_loop()
        try:
            while True:
                await self._until(1)  # something waits
                oldest = (self.ahead or self.waiting)[0].at
                left = oldest + self.batch_interval_s - time.monotonic()
                if left > 0:  # a fresh message: gather for the rest of the interval, unless a batch is full
                    try:
                        await asyncio.wait_for(self._until(self.batch_size), left)
                    except TimeoutError:
                        pass
                with self._lock:  # the messages sent ahead first: the child has them already
                    room = max(0, self.batch_size - len(self.ahead))
                    self.writing, self.waiting = self.ahead + self.waiting[:room], self.waiting[room:]
                    self.ahead, self.ahead_bytes = [], 0
                    self.waiting_bytes = sum(q.size for q in self.waiting)
                    self._lock.notify_all()  # room for the network thread
                self._room.set()  # ... and for the ingest's next batch
                try:
                    await self._write(self.writing)
                finally:
                    self.writing = []
        finally:
            with self._lock:
                self.closed = True
                self._wake_at = math.inf
                self._lock.notify_all()

    async def _until(self, count: int) -> None:
        """Wait until at least `count` messages wait here (or an offer is held for room)."""
        while True:
            with self._lock:
                if self._ready(count):
                    self._wake_at = math.inf
                    return
                self._wake_at = count
                self._wake.clear()
            try:
                await self._wake.wait()
            finally:
                with self._lock:
                    self._wake_at = math.inf
