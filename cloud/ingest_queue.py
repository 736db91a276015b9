"""The ingest's bounded queue (`IngestQueue` of `Queued` messages) and its writer threads
(`WriterThread`): what cloud/ingest.py hands messages through, between the MQTT link and the store."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from cloud.sample_writer import RawTelemetry
from cloud.store import Incoming


class WriterThread(Executor):
    """The ingest's own writer: ONE daemon thread running the fleet-store writes in order, apart
    from the pool that HTTP reads use. A daemon, so that a write stuck in a database that is gone
    cannot hold up the controller's exit (SQLite and PostgreSQL roll back a transaction cut short)."""

    def __init__(self, name: str = "kgpu-ingest") -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, lambda: fn(*args, **kwargs)))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, call = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._jobs.put(None)  # after the jobs already queued
        if wait:
            self._thread.join()


@dataclasses.dataclass(frozen=True)
class Queued:
    """A message waiting to be written: its payload size (the queue's byte bound) and when it
    was queued (`Ingestor.backlog_age_s`)."""

    incoming: Incoming
    size: int
    at: float  # time.monotonic()
    node: str  # the node whose budget backlog it counts in (its topic's)
    raw: RawTelemetry | None = None  # telemetry for the sample writer process, when there is one


class IngestQueue(asyncio.Queue[Queued]):
    """An asyncio queue bounded by messages AND by payload bytes (a message is let in whenever
    the queue is empty, however large). `put` waits for room; `put_nowait` raises QueueFull."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        super().__init__(maxsize=max_messages)
        self.max_bytes = max_bytes
        self.bytes = 0

    def _init(self, maxsize: int) -> None:
        self._queue: collections.deque[Queued] = collections.deque()

    def _put(self, item: Queued) -> None:
        self._queue.append(item)
        self.bytes += item.size

    def _get(self) -> Queued:
        item = self._queue.popleft()
        self.bytes -= item.size
        return item

    def full(self) -> bool:
        return super().full() or (self.max_bytes > 0 and self.bytes >= self.max_bytes and bool(self._queue))

    def oldest(self) -> float | None:
        """When the oldest queued message was queued (monotonic), None when empty."""
        return self._queue[0].at if self._queue else None
