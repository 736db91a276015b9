"""The edge store's plumbing: one SQLite engine shared by threads, short read and write
transactions (`BEGIN IMMEDIATE` behind an in-process write lock), every database or disk error
turned into a `StoreError` with SQLite's reason, and opening (or refusing) an existing file.
The data methods build on it: edge/store/outbox.py (what goes to the cloud) and
edge/store/local.py (what the node keeps for itself).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Self

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from edge.store.generation import Generation, GenerationFile
from edge.store.schema import (
    DEFAULT_BUSY_TIMEOUT_MS,
    DEFAULT_EVENTS_RETENTION,
    DEFAULT_SAMPLES_RETENTION,
    META_EPOCH,
    META_LAST_SEQ,
    META_NODE,
    META_SCHEMA,
    META_WRITE_CHECK,
    STORE_SCHEMA_VERSION,
    decisions_table,
    events_table,
    meta_get,
    meta_set,
    metadata,
    outbox_table,
)
from shared.logs import get_logger
from shared.sqlite import durable_sqlite_engine, store_errors
from shared.topics import NODE_NAME_RE

log = get_logger("edge.store")

# The writes that move the outbox counters (inside their transaction, under the write lock)
COUNTED_OPS = frozenset({"record", "record_command_result", "ack", "start_new_epoch", "shrink_summaries"})

_QUIET = logging.Logger("edge.store.open")
_QUIET.disabled = True

EPOCH_RE = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def new_epoch_id() -> str:
    return uuid.uuid4().hex[:16]


# ---- errors ---------------------------------------------------------------------------------


class StoreError(RuntimeError):
    """The database could not do what was asked (disk full, read-only, locked, corrupt).

    `reason` is SQLite's own short message, fit for /healthz and a log line.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class StoreSchemaError(StoreError):
    """The file was written by a newer kgpu; reading it with this one could corrupt it."""


class StoreCorrupt(StoreError):
    """The file is not a usable edge database (failed integrity check, unreadable meta): it is
    moved aside and a fresh store starts (edge/store/recovery.py)."""


# ---- the plumbing ---------------------------------------------------------------------------


class StoreBase:
    """The store's engine and transactions; EdgeStore (edge/store/__init__.py) adds the data."""

    def __init__(
        self,
        path: str | Path,
        node: str,
        *,
        events_retention: int = DEFAULT_EVENTS_RETENTION,
        samples_retention: int = DEFAULT_SAMPLES_RETENTION,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> None:
        if not NODE_NAME_RE.match(node):
            raise ValueError(f"not a valid node name: {node!r}")
        if events_retention < 1:
            raise ValueError("events_retention must be at least 1")
        if samples_retention < 1:
            raise ValueError("samples_retention must be at least 1")
        self.path = Path(path)
        self.node = node
        self.events_retention = events_retention
        self.samples_retention = samples_retention
        self._busy_timeout_ms = busy_timeout_ms
        self._write_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._closed = False
        self._last_write_error: str | None = None  # of the latest real write, None if it committed
        self.events_truncated = 0  # events cut to fit the message size limit (shared.body_fit.fit_body)
        # Kept with every add and ack (seqs in the outbox are contiguous), never counted per ack
        self._depth = 0
        self._outbox_bytes = 0
        self._last_seq = 0
        self.notices: list[str] = []  # what opening found and repaired (shown in /healthz until a restart)
        self.created = False  # the database file was made by this open
        self._generation = GenerationFile(self.path) if self._uses_sidecar() else None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"edge store: cannot create {self.path.parent}: {exc.strerror or exc}",
                reason=str(exc.strerror or exc),
            ) from exc
        self._engine = self._make_engine()
        # Same pool and listeners; its transactions start with BEGIN IMMEDIATE.
        self._write_engine = self._engine.execution_options(kgpu_begin="IMMEDIATE")
        try:
            self._open()
            self._after_open()
        except BaseException:
            self._engine.dispose()
            raise

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for tests and diagnostics; use the methods for data)."""
        return self._engine

    def _make_engine(self) -> Engine:
        # edge nodes lose power: durable commits (shared/sqlite.py)
        return durable_sqlite_engine(f"sqlite:///{self.path}", self._busy_timeout_ms)

    def _errors(self, op: str) -> AbstractContextManager[None]:
        """Every database/disk error as a StoreError with SQLite's reason (logged, except at open:
        the opener says in one line what it did about it, edge/store/recovery.py)."""
        return store_errors("edge store", op, StoreError, logger=_QUIET if op == "open" else log,
                            db=str(self.path))

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("edge store: the store is closed", reason="closed")

    def _uses_sidecar(self) -> bool:
        """Whether this store keeps a generation file (not a store in memory)."""
        return True

    def _read_lock(self) -> threading.Lock | None:
        """A lock reads must hold too (only a store on one shared connection needs one)."""
        return None

    @contextmanager
    def _read(self, op: str) -> Iterator[Connection]:
        """A short read transaction (one consistent snapshot in WAL mode)."""
        self._check_open()
        lock = self._read_lock()
        if lock is not None:
            with lock, self._errors(op), self._engine.connect() as conn, conn.begin():
                yield conn
            return
        with self._errors(op), self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _write(self, op: str) -> Iterator[Connection]:
        """A short write transaction, committed on exit, rolled back on any exception."""
        self._check_open()
        try:
            with (
                self._errors(op),
                self._write_lock,
                self._write_engine.connect() as conn,
                conn.begin(),
            ):
                yield conn
        except StoreError as exc:
            if op != "check_writable":
                self._last_write_error = exc.reason
            if op in COUNTED_OPS:  # moved inside a transaction that did not commit
                self._reload_counters()
            raise
        if op != "check_writable":
            self._last_write_error = None

    def _reload_counters(self) -> None:
        """The outbox counters read again from the database (after a write that did not commit)."""
        try:
            with self._write_lock, self._engine.connect() as conn, conn.begin():
                last, oldest, size = self._outbox_figures(conn)
                with self._counter_lock:
                    self._last_seq = last
                    self._depth = 0 if oldest is None else last - oldest + 1
                    self._outbox_bytes = size
        except Exception as exc:  # noqa: BLE001 - the database is failing: the next success corrects them
            log.warning("cannot read the outbox counters again: %s", exc)

    @staticmethod
    def _outbox_figures(conn: Connection) -> tuple[int, int | None, int]:
        """last_seq, the oldest pending seq and the pending bytes, as stored."""
        last = int(meta_get(conn, META_LAST_SEQ) or 0)
        oldest = conn.execute(sa.select(sa.func.min(outbox_table.c.seq))).scalar_one()
        size = conn.execute(sa.select(sa.func.coalesce(
            sa.func.sum(sa.func.length(sa.cast(outbox_table.c.payload, sa.LargeBinary))), 0))).scalar_one()
        return last, None if oldest is None else int(oldest), int(size)

    def _open(self) -> None:
        """Create the schema, or check that an existing one is one we can read and repair what
        can be repaired in place (a damaged last_seq); StoreCorrupt when the file is broken."""
        with self._write("open") as conn:
            self._check_integrity(conn)
            has_meta = sa.inspect(conn).has_table("meta")
            self.created = not has_meta
            if has_meta:
                found = meta_get(conn, META_SCHEMA)
                if found is not None:
                    try:
                        version = int(found)
                    except ValueError:
                        raise StoreCorrupt(f"edge store {self.path}: schema_version {found[:40]!r} is not a "
                                           "number", reason="unreadable schema_version") from None
                    if version > STORE_SCHEMA_VERSION:
                        raise StoreSchemaError(
                            f"edge store {self.path} has schema version {found}, newer than this "
                            f"kgpu supports ({STORE_SCHEMA_VERSION}); upgrade kgpu or move the file "
                            "away",
                            reason="schema too new",
                        )
            metadata.create_all(conn)
            if meta_get(conn, META_SCHEMA) is None:
                meta_set(conn, META_SCHEMA, str(STORE_SCHEMA_VERSION))
            self._last_seq = self._checked_last_seq(conn)
            epoch = meta_get(conn, META_EPOCH)
            if epoch is not None and not EPOCH_RE.match(epoch):
                self._repaired(f"outbox epoch {epoch[:40]!r} is unreadable; a new epoch starts")
                epoch = None
                self._epoch_damaged = True
            if epoch is None:
                epoch = new_epoch_id()
                meta_set(conn, META_EPOCH, epoch)
            self._epoch = epoch
            _, oldest, self._outbox_bytes = self._outbox_figures(conn)
            self._depth = 0 if oldest is None else self._last_seq - oldest + 1
            owner = meta_get(conn, META_NODE)
            if owner is None:
                meta_set(conn, META_NODE, self.node)
            elif owner != self.node:
                # Not fatal (a renamed node keeps its history), but worth saying: seqs are per node.
                log.warning(
                    "edge store was created for another node",
                    extra={"db": str(self.path), "db_node": owner},
                )

    _epoch_damaged = False

    def _check_integrity(self, conn: Connection) -> None:
        """`PRAGMA quick_check`: a file whose pages or indexes are broken is not used (reading it
        would fail later, one table at a time, or worse, return wrong rows)."""
        rows = [str(row[0]) for row in conn.exec_driver_sql("PRAGMA quick_check(5)")]
        if rows != ["ok"]:
            found = "; ".join(line.strip() for row in rows for line in row.splitlines()
                              if line.strip() and not line.startswith("***"))
            raise StoreCorrupt(f"edge store {self.path} failed its integrity check: {found[:300]}",
                               reason="integrity check failed")

    def _checked_last_seq(self, conn: Connection) -> int:
        """last_seq, repaired when it is not a number or below a seq already used (the next event
        would collide with a stored one and every write would fail)."""
        raw = meta_get(conn, META_LAST_SEQ)
        highest = max(
            int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(table.c.seq), 0))).scalar_one())
            for table in (outbox_table, decisions_table, events_table)
        )
        try:
            value = int(raw) if raw is not None else None
        except ValueError:
            value = None
        if raw is None and highest == 0:
            value = 0  # a new database
        elif value is None or value < highest:
            self._repaired(f"meta last_seq {str(raw)[:40]!r} was damaged (the highest stored seq is "
                           f"{highest}); repaired to {highest}")
            value = highest
        if raw != str(value):
            meta_set(conn, META_LAST_SEQ, str(value))
        return value

    def _repaired(self, what: str) -> None:
        self.notices.append(f"store_repaired: {what}")
        log.error("edge store %s repaired at open: %s", self.path, what, extra={"db": str(self.path)})

    def _after_open(self) -> None:
        """Checks that need the whole store (the generation sidecar: edge/store/epoch.py)."""

    def _after_record(self, recorded: int) -> None:
        """After `recorded` events were committed (the outbox bound: edge/store/maintenance.py)."""

    def _generation_now(self) -> Generation:
        with self._counter_lock:
            return Generation(self._epoch, self._last_seq, self._last_seq - self._depth)

    def note_generation(self) -> None:
        """Write the generation sidecar if it is behind and due (called every cycle by the daemon,
        so that seqs recorded just before a crash reach it within seconds)."""
        if not self._closed:
            self._note_generation()

    def _note_generation(self, *, force: bool = False) -> None:
        if self._generation is not None:
            self._generation.note(self._generation_now(), force=force)

    def close(self) -> None:
        """Release every connection (checkpoints the WAL when the last one closes)."""
        if not self._closed:
            self._closed = True
            self._note_generation(force=True)
            self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- health --------------------------------------------------------------------------------

    def check_writable(self) -> str | None:
        """None if a tiny write transaction commits, else why not (for /healthz 'degraded').

        A nearly full disk may still take this one-row update in place while bigger writes
        fail: see `last_write_error` for what the latest real write said."""
        try:
            with self._write("check_writable") as conn:
                meta_set(conn, META_WRITE_CHECK, repr(time.time()))
        except StoreError as exc:
            return exc.reason
        return None

    @property
    def last_write_error(self) -> str | None:
        """Why the latest real write failed, or None once one has committed since."""
        return self._last_write_error


