"""Opening the edge store whatever state its file is in, so that enforcement never waits on it.

- A file that is not a usable SQLite database (0 bytes, a bad header, truncated, failing
  `PRAGMA quick_check`, unreadable meta) is moved aside, with its WAL and SHM files, under a
  timestamped name beside it (kept for inspection), and a fresh store starts in a new epoch. The
  loss is said in one ERROR line and returned as a `Recovery` for /healthz and the status.
- A store that cannot be opened at all (a read-only or full disk, a file from a newer kgpu) is
  replaced by a store in a temporary directory, or in memory if even that fails: the node keeps
  enforcing its policy, without persistence, and says so loudly (`Recovery.persistent` False).

The generation sidecar (`<db>.generation`) is the store's memory outside the database file: the
epoch and the highest seq allocated and acked, written atomically (tmp + fsync + rename + fsync of
the directory). A database that is older than its sidecar was restored or lost its WAL; the store
then starts a new epoch before anything is sent (edge/store/epoch.py).
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool

from edge.store.base import StoreCorrupt, StoreError, StoreSchemaError, log
from edge.store.generation import GenerationFile, fsync_directory
from shared.paths import directory_problem

SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_HEADER_BYTES = 100  # the database header; a shorter file is truncated

# What SQLite says about a file that is not (or no longer) a database
CORRUPTION_REASONS = ("file is not a database", "database disk image is malformed", "malformed",
                      "file is encrypted", "unsupported file format")


def is_corruption(exc: StoreError) -> bool:
    """Whether the store refused the file because its content is broken (not the disk or a lock)."""
    if isinstance(exc, StoreCorrupt):
        return True
    reason = exc.reason.lower()
    return any(text in reason for text in CORRUPTION_REASONS)


def file_problem(path: Path) -> str | None:
    """Why the file at `path` cannot be an edge database, from its size and header alone; None if
    it may be one (or does not exist: a new store is made)."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "the file is empty (0 bytes)"
        with path.open("rb") as handle:
            head = handle.read(SQLITE_HEADER_BYTES)
    except FileNotFoundError:
        return None
    except OSError:
        return None  # unreadable: opening it will say why
    if not head.startswith(SQLITE_HEADER):
        return "the file does not start with the SQLite header (not a database, or overwritten)"
    if len(head) < SQLITE_HEADER_BYTES:
        return f"the file is truncated ({size} bytes, shorter than the 100-byte SQLite header)"
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")
    header_size_valid = head[24:28] == head[92:96]  # SQLite trusts the page count only then
    wal = path.with_name(path.name + "-wal")
    wal_has_frames = wal.exists() and wal.stat().st_size > 32  # a checkpoint cut short: the WAL completes it
    if header_size_valid and not wal_has_frames and page_size >= 512 and pages and size < pages * page_size:
        return f"the file is truncated ({size} bytes, its header says {pages} pages of {page_size})"
    return None


def move_aside(path: Path, label: str = "corrupt", *, with_generation: bool = True) -> Path:
    """Rename the database and its WAL/SHM files to `<name>.<label>-<UTC time>[-wal|-shm]`
    beside it, and its generation file (which describes it) with them unless told otherwise;
    returns the new name of the database file."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{label}-{stamp}-{n}")
    for suffix in ("-wal", "-shm", "-journal", *((".generation",) if with_generation else ())):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    if path.exists():
        path.rename(target)
    fsync_directory(path.parent)
    return target


# ---- opening whatever the file is ------------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    """What opening the store had to do: shown in /healthz and the status until a restart."""

    problem: str  # what was wrong
    moved_to: Path | None  # where the old file is now (None when nothing was moved)
    lost: str  # what was lost, as far as known
    persistent: bool = True  # False: the store now is temporary (lost at a restart)

    def summary(self) -> str:
        where = f"; old file kept at {self.moved_to}" if self.moved_to else ""
        kind = "store_recovered" if self.persistent else "store_unavailable"
        return f"{kind}: {self.problem}{where}; {self.lost}"


def _what_was_there(path: Path) -> str:
    """What the sidecar says the moved file held (the loss, as far as known)."""
    generation = GenerationFile(path).read()
    if generation is None:
        return "what it held is unknown (no generation file)"
    unacked = max(0, generation.last_seq - generation.acked_upto)
    return (f"lost: up to {unacked} events not yet acked by the cloud (epoch {generation.epoch}, "
            f"seqs {generation.acked_upto + 1}..{generation.last_seq} or more), the local decision log "
            "and history; the policy cache and drain marks come again from the cloud")


def open_store(store_class: type[Any], path: Path, node: str, **options: Any) -> tuple[Any, Recovery | None]:
    """`store_class(path, node, **options)`, or, when that file is broken, a fresh one in its place
    (the broken file moved aside), or, when nothing can be opened there, a temporary store. A
    `<db>.restore` file (a backup put there by an operator) first takes the database's place."""
    restore_from_backup(path)
    problem = file_problem(path)
    if problem is None:
        try:
            return store_class(path, node, **options), None
        except StoreSchemaError as exc:  # a newer kgpu's file: keep it untouched for that kgpu
            return _temporary(store_class, path, node, options, exc.reason, str(exc))
        except StoreError as exc:
            if not is_corruption(exc):
                return _temporary(store_class, path, node, options, exc.reason, str(exc))
            problem = str(exc)
    lost = _what_was_there(path)
    try:
        moved = move_aside(path)
    except OSError as exc:
        return _temporary(store_class, path, node, options, f"cannot move it aside: {exc}", problem)
    try:
        store = store_class(path, node, **options)
    except StoreError as exc:
        return _temporary(store_class, path, node, options, exc.reason, f"{problem}; a fresh store failed too: {exc}")
    recovery = Recovery(problem=f"edge database {path} was unusable: {problem}", moved_to=moved, lost=lost)
    log.error("edge store recovered: %s; moved it to %s and started a fresh store (outbox epoch %s); %s",
              problem, moved, store.epoch, lost, extra={"db": str(path), "moved_to": str(moved)})
    return store, recovery


def restore_from_backup(path: Path) -> None:
    """`<db>.restore` becomes the database; the file it replaces is kept as `<db>.replaced-<time>`.
    The generation file stays: it describes what this node did last, so a backup older than that
    starts a new epoch at once (edge/store/epoch.py)."""
    restore = path.with_name(path.name + ".restore")
    if not restore.exists():
        return
    try:
        replaced = move_aside(path, "replaced", with_generation=False) if path.exists() else None
        restore.rename(path)
        fsync_directory(path.parent)
    except OSError as exc:
        log.error("cannot restore the edge store from %s: %s; opening %s as it is", restore, exc, path)
        return
    log.warning("edge store restored from %s%s", restore,
                f"; the file it replaced is kept at {replaced}" if replaced else "", extra={"db": str(path)})


def _temporary(store_class: type[Any], path: Path, node: str, options: dict[str, Any], reason: str,
               detail: str) -> tuple[Any, Recovery]:
    """A store that keeps the daemon enforcing when the real one cannot be opened."""
    place = directory_problem(path)
    if place is not None:  # the directory's fault: say that rather than SQLite's "unable to open"
        reason = detail = place
    try:
        where = Path(tempfile.mkdtemp(prefix="kgpu-edge-store-")) / "edge.db"
        store = store_class(where, node, **options)
    except (StoreError, OSError):
        where, store = Path(":memory:"), MemoryEdgeStore.of(store_class)(where, node, **options)
    recovery = Recovery(problem=f"edge database {path} cannot be opened: {reason}", moved_to=None,
                        lost=f"running on a temporary store at {where}: events are kept only until a restart",
                        persistent=False)
    log.error("edge store %s cannot be opened (%s); enforcing the policy anyway with a temporary store at "
              "%s: nothing recorded now survives a restart. Fix the file or the disk and restart", path,
              detail, where, extra={"db": str(path), "temporary_db": str(where)})
    return store, recovery


class MemoryEdgeStore:
    """The last resort: the same store on one in-memory SQLite connection (reads take the write
    lock too, as one connection cannot run two transactions at once)."""

    @staticmethod
    def of(store_class: type[Any]) -> type[Any]:
        class InMemory(store_class):
            def _make_engine(self) -> Engine:
                engine = sa.create_engine("sqlite://", poolclass=StaticPool,
                                          connect_args={"check_same_thread": False})

                @sa.event.listens_for(engine, "connect")
                def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                    dbapi_conn.isolation_level = None

                @sa.event.listens_for(engine, "begin")
                def _on_begin(conn: Any) -> None:
                    conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('kgpu_begin', 'DEFERRED')}")

                return engine

            def _uses_sidecar(self) -> bool:
                return False

            def _read_lock(self) -> threading.Lock | None:
                return self._write_lock

        return InMemory
