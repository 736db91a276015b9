"""The generation sidecar: `<db>.generation`, the edge store's memory kept outside its database.

It holds the outbox epoch and the highest seq allocated and acked in it. A database found older
than its sidecar (same epoch, lower last_seq or acked_upto; or another epoch) was restored from a
backup or lost its WAL: its seqs would be reused, and the cloud would take new events for
duplicates of the ones it stored under those seqs. The store then starts a new epoch before it
sends anything (edge/store/epoch.py).

Written atomically (tmp file, fsync, rename, fsync of the directory) and cheaply: when the epoch
changes, when last_seq or acked_upto moved `step` past the written values, when they moved at
all and `interval_s` went by (checked at the next write), and at close; never per event. So a
rollback of fewer than `step` seqs within `interval_s` of a crash can go unseen here; the cloud's
`conflict` ack (docs/protocol.md) covers the events it already stored.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.logs import get_logger

log = get_logger("edge.store")

GENERATION_STEP = 64
GENERATION_INTERVAL_S = 5.0


@dataclass(frozen=True)
class Generation:
    """The outbox epoch and the highest seq allocated (`last_seq`) and acked in it."""

    epoch: str
    last_seq: int
    acked_upto: int


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` survive a power cut (best effort where it cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class GenerationFile:
    """Read at open, written when due (see the module)."""

    def __init__(self, db: Path, step: int = GENERATION_STEP, interval_s: float = GENERATION_INTERVAL_S) -> None:
        self.path = db.with_name(db.name + ".generation")
        self.step = step
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._written: Generation | None = None
        self._written_at = 0.0
        self.failed: str | None = None  # why the latest write failed, None when it worked

    def read(self) -> Generation | None:
        """The sidecar's content; None when it is absent or unreadable (then it is rewritten)."""
        try:
            raw: Any = json.loads(self.path.read_text())
            generation = Generation(str(raw["epoch"]), int(raw["last_seq"]), int(raw["acked_upto"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("generation file %s is unreadable (%s); writing it again", self.path, exc)
            return None
        return generation

    def note(self, generation: Generation, *, force: bool = False) -> None:
        """Write `generation` if it is due; a failed write is logged once, not raised: the
        sidecar is a safety net, the database stays the truth."""
        with self._lock:
            old = self._written
            if not force and old is not None and old.epoch == generation.epoch:
                moved = max(generation.last_seq - old.last_seq, generation.acked_upto - old.acked_upto)
                if moved <= 0:
                    return
                if moved < self.step and time.monotonic() - self._written_at < self.interval_s:
                    return
            self._write(generation)

    def _write(self, generation: Generation) -> None:
        data = json.dumps({"epoch": generation.epoch, "last_seq": generation.last_seq,
                           "acked_upto": generation.acked_upto, "written_at": round(time.time(), 3)})
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with tmp.open("w") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(self.path)
            fsync_directory(self.path.parent)
        except OSError as exc:
            if self.failed is None:
                log.warning("cannot write the generation file %s: %s", self.path, exc.strerror or exc)
            self.failed = str(exc.strerror or exc)
            return
        self.failed = None
        self._written = generation
        self._written_at = time.monotonic()
