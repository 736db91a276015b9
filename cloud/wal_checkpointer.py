"""The sample writer process's WAL checkpoints, on a thread of their own, after each batch.

The telemetry writer (cloud/sample_writer.py) is the drain's slowest stage, and its commit was a
tenth of its time: SQLite's WAL synced at every commit (synchronous=FULL), then, every thousand
pages, the checkpoint (the WAL copied into the database file, both synced) in the same commit, so
10-25 ms a batch during which it decoded nothing. Its store is opened with neither
(`sync_every_commit=False`, `auto_checkpoint=False`: shared/sqlite.py) and a PASSIVE checkpoint
runs here after each batch, while the writer decodes the next one (SQLite works without the GIL).

What that gives up: a telemetry commit survives a crash of the process as before, and a power loss
once the checkpoint after it has synced it (a fraction of a second later, in a drain); the
controller's own writes (events, statuses, acks) still sync at every commit. Telemetry reaches the
controller at QoS 0: a power loss of the controller's machine loses what was in flight anyway.
"""

from __future__ import annotations

import logging
import threading

from cloud.store.base import FleetStoreError, StoreBase
from shared.logs import ThrottledLog, get_logger

log = get_logger(__name__)

FAILURE_LOG_EVERY_S = 60.0


class WalCheckpointer:
    """Checkpoints `store`'s WAL on a thread of its own each time it is asked (`request`); at most
    one waits: requests while one runs make one more after it."""

    def __init__(self, store: StoreBase) -> None:
        self._store = store
        self._asked = threading.Event()
        self._stopping = False
        self.checkpoints = 0  # done, failed ones not counted
        self._failures = ThrottledLog(log, FAILURE_LOG_EVERY_S, level=logging.ERROR)
        self._thread = threading.Thread(target=self._run, name="wal-checkpoints", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """A batch was committed: checkpoint it soon (returns at once)."""
        self._asked.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """No more requests: the last checkpoint runs (what was committed, synced) before this returns."""
        self._stopping = True
        self._asked.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            self._asked.wait()
            self._asked.clear()
            try:
                self._store.checkpoint_wal()
                self.checkpoints += 1
            except FleetStoreError as exc:  # the next batch's checkpoint tries again
                self._failures.log("failed", "sample writer: WAL checkpoint failed: %s", exc)
            if self._stopping:
                return
