"""Runs every driver call on one dedicated thread, so a device backend (NVML, sysfs, amdsmi)
never blocks the asyncio loop.

A driver call can hang (a GPU stuck in a reset, a wedged kernel module). Each call is bounded
by a timeout; on timeout the caller gets `DriverTimeout` and the worker thread, which may be
stuck for good, is abandoned and replaced by a fresh one, so the daemon keeps going. Calls
still queued behind the hung one move to the new worker.

`not_answering` is true from a timeout until the driver answers a call again (with a result or
an error): the daemon reports itself degraded meanwhile, and recovers by itself.
"""

import asyncio
import concurrent.futures
import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from edge.devices.base import DeviceBackend, DriverTimeout
from shared.gpu import GpuInventory, GpuSample
from shared.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

_Job = tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future]

__all__ = ["DriverRunner", "DriverTimeout"]


class _Worker:
    """One thread draining one queue of jobs until told to stop (None) or retired."""

    def __init__(self, name: str) -> None:
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.retired = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.retired.is_set():
            job = self.jobs.get()
            if job is None:
                return
            fn, args, future = job
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before it started
            try:
                result = fn(*args)
            except BaseException as error:  # noqa: BLE001 - handed to the awaiting caller; the worker lives on
                future.set_exception(error)
            else:
                future.set_result(result)


@dataclass
class _Batch:
    """Where a `call_each` job stands, shared by the worker (writes) and the loop (reads)."""

    started_at: float  # monotonic: when the call running now started (the job's submission at first)
    results: list[Any] = field(default_factory=list)
    abandoned: bool = False  # timed out or cancelled: the worker makes no further call


class DriverRunner:
    """Async front of a device backend (NVML, Jetson, AMD, Intel): each method runs the backend's
    on the worker thread."""

    def __init__(self, driver: DeviceBackend, *, timeout_s: float = 5.0,
                 thread_name: str = "kgpu-nvml") -> None:
        self.driver = driver
        self.timeout_s = timeout_s
        self.timeouts = 0
        self.last_error: Exception | None = None
        self.last_timeout: DriverTimeout | None = None
        self._timed_out_at: float | None = None  # monotonic, of the latest timeout
        self._answered_at: float | None = None  # monotonic, of the latest call that returned
        self.workers_replaced = 0
        self.jobs = 0  # handed to the worker thread, each one hop there and back (a cycle's samples: one)
        self._thread_name = thread_name
        self._serial = itertools.count(1)
        self._worker: _Worker | None = None
        self._worker_lock = threading.Lock()

    def _current_worker(self) -> _Worker:
        with self._worker_lock:
            if self._worker is None:
                self._worker = _Worker(f"{self._thread_name}-{next(self._serial)}")
            return self._worker

    def _replace(self, hung: _Worker) -> None:
        """Abandon a worker stuck in a call; its queued jobs go to a fresh one."""
        with self._worker_lock:
            if self._worker is not hung:
                return  # another timeout already replaced it
            hung.retired.set()
            fresh = _Worker(f"{self._thread_name}-{next(self._serial)}")
            while True:
                try:
                    job = hung.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    fresh.jobs.put(job)
            hung.jobs.put(None)
            self._worker = fresh
            self.workers_replaced += 1
        log.warning("driver call hung; abandoned thread %s, now using %s",
                    hung.thread.name, fresh.thread.name)

    async def call(self, fn: Callable[..., T], *args: Any, timeout_s: float | None = None) -> T:
        """fn(*args) on the worker thread; DriverTimeout if it takes longer than the timeout."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        worker = self._current_worker()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs += 1
        worker.jobs.put((fn, args, future))
        waiting = asyncio.wrap_future(future)
        try:
            done, _ = await asyncio.wait({waiting}, timeout=limit)
        except asyncio.CancelledError:
            waiting.cancel()
            raise
        if not done:
            waiting.cancel()  # drops the job if it has not started yet
            raise self._timed_out(worker, fn, limit)
        self._answered_at = time.monotonic()  # a result or an error: either way it answered
        try:
            return waiting.result()
        except Exception as error:
            self.last_error = error
            raise

    def _timed_out(self, worker: _Worker, fn: Callable[..., Any], limit: float) -> DriverTimeout:
        """Count a call that did not return within `limit`, replace its stuck worker, and give
        the error to raise or return."""
        self.timeouts += 1
        name = getattr(fn, "__qualname__", repr(fn))
        error = DriverTimeout("Timeout", f"{name} did not return within {limit:g} s")
        self.last_error = self.last_timeout = error
        self._timed_out_at = time.monotonic()
        self._replace(worker)
        return error

    async def call_each(self, fn: Callable[..., T], calls: Sequence[tuple[Any, ...]],
                        timeout_s: float | None = None) -> list[T | Exception]:
        """fn(*args) for each args of `calls`, in order, handed to the worker thread as one job (one
        thread hop for a cycle's samples rather than one per GPU). Each call is bounded as `call`
        bounds one, from the moment it starts. Returns each call's result or the Exception it
        raised; when one times out, the list ends with its DriverTimeout and the calls after it
        are not made (the worker is replaced, as `call` does)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        batch = _Batch(time.monotonic())

        def run_all() -> None:
            for args in calls:
                if batch.abandoned:
                    return
                batch.started_at = time.monotonic()
                try:
                    result: T | Exception = fn(*args)
                except Exception as error:  # noqa: BLE001 - the caller's, per call
                    result = error
                batch.results.append(result)

        worker = self._current_worker()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs += 1
        worker.jobs.put((run_all, (), future))
        waiting = asyncio.wrap_future(future)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=max(0.0, batch.started_at + limit - time.monotonic()))
                if done:
                    break
                if time.monotonic() < batch.started_at + limit:
                    continue  # the call running now started later: it has its own bound
                batch.abandoned = True
                waiting.cancel()
                results = list(batch.results)
                return [*results, self._timed_out(worker, fn, limit)]
        except asyncio.CancelledError:
            batch.abandoned = True
            waiting.cancel()
            raise
        self._answered_at = time.monotonic()
        waiting.result()  # run_all itself raises only a BaseException: let it through
        for result in batch.results:
            if isinstance(result, Exception):
                self.last_error = result
        return batch.results

    @property
    def not_answering(self) -> bool:
        """True from a timed-out call until a later call returns (the driver answers again)."""
        if self._timed_out_at is None:
            return False
        return self._answered_at is None or self._answered_at < self._timed_out_at

    def _stop_worker(self) -> _Worker | None:
        with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.jobs.put(None)  # it ends once the jobs before this are done
        return worker

    async def start(self) -> None:
        """Start the worker thread now rather than on the first call."""
        self._current_worker()

    async def stop(self, timeout_s: float = 2.0) -> None:
        """End the worker thread after its queued calls; a later call starts a new one.

        Waits at most `timeout_s` for it: a hung worker is left behind (it is a daemon thread).
        """
        worker = self._stop_worker()
        if worker is not None:
            await asyncio.to_thread(worker.thread.join, timeout_s)

    # ----- the driver's methods, awaited ---------------------------------------------------

    async def open(self) -> None:
        await self.call(self.driver.open)

    async def close(self) -> None:
        """Close the driver and end the worker thread."""
        try:
            await self.call(self.driver.close)
        finally:
            await self.stop()

    async def device_count(self) -> int:
        return await self.call(self.driver.device_count)

    async def inventory(self) -> list[GpuInventory]:
        return await self.call(self.driver.inventory)

    async def sample(self, index: int) -> GpuSample:
        return await self.call(self.driver.sample, index)

    async def probe(self, index: int) -> bool:
        return await self.call(self.driver.probe, index)

    async def set_power_limit(self, index: int, watts: float) -> None:
        await self.call(self.driver.set_power_limit, index, watts)

    async def lock_clocks(self, index: int, min_mhz: int, max_mhz: int) -> None:
        await self.call(self.driver.lock_clocks, index, min_mhz, max_mhz)

    async def reset_clocks(self, index: int) -> None:
        await self.call(self.driver.reset_clocks, index)
