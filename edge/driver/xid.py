"""XID errors as they happen, from NVML's event set, on a thread of their own.

XIDs are the driver's own report of a GPU fault (79: fallen off the bus, 48: double-bit ECC,
...). Polling cannot see them; NVML delivers them through an event set, and waiting on it
blocks, so the watcher has its own daemon thread. It survives a driver reload: any NVML error
tears the set down, backs off, re-initialises and registers the GPUs again.
"""

import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any

import pynvml

from edge.driver.nvml import NvmlDriver, code_name
from shared.gpu import XidEvent
from shared.logs import get_logger

log = get_logger(__name__)


def _handle_address(handle: Any) -> int:
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


class XidWatcher:
    """Calls `on_xid(XidEvent)` from its own thread for every XID any GPU reports.

    `on_xid` must be thread-safe; the daemon passes one that hands the event to asyncio with
    `loop.call_soon_threadsafe`. The watcher makes its own NVML calls (NVML is thread-safe);
    from `driver` it only reads the cached UUIDs, to name a GPU it could not ask itself.
    GPUs lost at registration are registered as soon as they answer again (tried every
    `retry_lost_s`), or at once after `refresh()`.
    """

    def __init__(
        self,
        driver: NvmlDriver | None,
        on_xid: Callable[[XidEvent], None],
        *,
        wait_ms: int = 500,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        retry_lost_s: float = 30.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._driver = driver
        self._on_xid = on_xid
        self._retry_lost_s = retry_lost_s
        self._lost_at_registration: set[int] = set()
        self._wait_ms = wait_ms
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._wall_clock = wall_clock
        self._stop = threading.Event()
        self._refresh = threading.Event()
        self._ready = threading.Event()
        self._registered: dict[int, tuple[int, str]] = {}  # handle address -> (index, uuid)
        self._thread: threading.Thread | None = None
        self.events = 0
        self.errors = 0
        self.last_error: str | None = None

    # ----- control -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kgpu-xid", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Ask the thread to end; it does within one wait period."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s if timeout_s is not None else self._wait_ms / 1000 + 2.0)
            if thread.is_alive():
                log.warning("XID watcher thread did not stop in time")
        self._thread = None

    def refresh(self) -> None:
        """Register the GPUs again, e.g. after a lost one came back."""
        self._refresh.set()

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the GPUs are registered (events from then on are delivered)."""
        return self._ready.wait(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def registered(self) -> dict[int, str]:
        """GPU index -> UUID of the GPUs whose XIDs are being watched."""
        return {index: uuid for index, uuid in self._registered.values()}

    # ----- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._initial_backoff_s
        while not self._stop.is_set():
            initialised = False
            failed = False
            event_set = None
            try:
                pynvml.nvmlInit()
                initialised = True
                event_set = pynvml.nvmlEventSetCreate()
                self._refresh.clear()
                self._register_all(event_set)
                self._ready.set()
                backoff = self._initial_backoff_s
                self._watch(event_set)
            except pynvml.NVMLError as error:
                failed = True
                self._note_error(f"{code_name(error)}: {error}", backoff)
            except Exception as error:  # a bug must not end the watching for good
                failed = True
                log.exception("XID watcher failed")
                self._note_error(repr(error), backoff)
            finally:
                self._ready.clear()
                self._registered = {}
                self._release(event_set, initialised)
            if failed and self._stop.wait(backoff):
                break
            if failed:
                backoff = min(backoff * 2, self._max_backoff_s)

    def _note_error(self, text: str, backoff: float) -> None:
        self.errors += 1
        self.last_error = text
        log.warning("XID watcher: %s; starting again in %.1f s", text, backoff)

    def _release(self, event_set: Any, initialised: bool) -> None:
        if event_set is not None:
            try:
                pynvml.nvmlEventSetFree(event_set)
            except pynvml.NVMLError as error:  # gone with the driver already
                log.debug("nvmlEventSetFree: %s", error)
        if initialised:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as error:
                log.debug("nvmlShutdown: %s", error)

    def _register_all(self, event_set: Any) -> None:
        self._registered = {}
        self._lost_at_registration = set(range(pynvml.nvmlDeviceGetCount()))
        self._register_lost(event_set)
        log.info("watching XIDs on %d GPU(s)", len(self._registered))

    def _register_lost(self, event_set: Any) -> None:
        """Register each GPU not registered yet; one lost (again) stays on the list."""
        for index in sorted(self._lost_at_registration):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                pynvml.nvmlDeviceRegisterEvents(
                    handle, pynvml.nvmlEventTypeXidCriticalError, event_set
                )
            except pynvml.NVMLError_NotSupported:
                log.info("gpu %d does not report XID events; not watching it", index,
                         extra={"gpu": index})
                self._lost_at_registration.discard(index)
                continue
            except (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_Unknown) as error:
                log.warning("gpu %d is lost (%s); will try to watch its XIDs again", index,
                            code_name(error), extra={"gpu": index})
                continue
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            self._registered = self._registered | {_handle_address(handle): (index, uuid)}
            self._lost_at_registration.discard(index)

    def _watch(self, event_set: Any) -> None:
        retry_at = time.monotonic() + self._retry_lost_s
        while not self._stop.is_set() and not self._refresh.is_set():
            if self._lost_at_registration and time.monotonic() >= retry_at:
                self._register_lost(event_set)  # a lost GPU may be back
                retry_at = time.monotonic() + self._retry_lost_s
            try:
                data = pynvml.nvmlEventSetWait_v2(event_set, self._wait_ms)
            except pynvml.NVMLError_Timeout:
                continue
            if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                self._dispatch(data)

    def _dispatch(self, data: Any) -> None:
        known = self._registered.get(_handle_address(data.device))
        if known is None:  # a handle we did not hand out: ask NVML who it is
            index = pynvml.nvmlDeviceGetIndex(data.device)
            uuid = self._driver.known_uuid(index) if self._driver is not None else None
            if uuid is None:
                raw = pynvml.nvmlDeviceGetUUID(data.device)
                uuid = raw.decode() if isinstance(raw, bytes) else raw
            known = (index, uuid)
        index, uuid = known
        event = XidEvent(index=index, uuid=uuid, xid=int(data.eventData), ts=self._wall_clock())
        self.events += 1
        log.warning("XID %d on gpu %d", event.xid, index, extra={"gpu": index, "xid": event.xid})
        try:
            self._on_xid(event)
        except Exception:
            log.exception("XID callback failed")
