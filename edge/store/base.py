"""The edge store's plumbing: one SQLite engine shared by threads, short read and write
transactions (`BEGIN IMMEDIATE` behind an in-process write lock), every database or disk error
turned into a `StoreError` with SQLite's reason, and opening (or refusing) an existing file.
The data methods build on it: edge/store/outbox.py (what goes to the cloud) and
edge/store/local.py (what the node keeps for itself).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Self

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

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
    meta_get,
    meta_set,
    metadata,
)
from shared.logs import get_logger
from shared.sqlite import durable_sqlite_engine, store_errors
from shared.topics import NODE_NAME_RE

log = get_logger("edge.store")


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
        self._closed = False
        self._last_write_error: str | None = None  # of the latest real write, None if it committed
        self.events_truncated = 0  # events cut to fit the message size limit (shared.protocol.fit_body)
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
        """Every database/disk error as a StoreError with SQLite's reason."""
        return store_errors("edge store", op, StoreError, logger=log, db=str(self.path))

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("edge store: the store is closed", reason="closed")

    @contextmanager
    def _read(self, op: str) -> Iterator[Connection]:
        """A short read transaction (one consistent snapshot in WAL mode)."""
        self._check_open()
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
            raise
        if op != "check_writable":
            self._last_write_error = None

    def _open(self) -> None:
        """Create the schema, or check that an existing one is one we can read."""
        with self._write("open") as conn:
            has_meta = sa.inspect(conn).has_table("meta")
            if has_meta:
                found = meta_get(conn, META_SCHEMA)
                if found is not None and int(found) > STORE_SCHEMA_VERSION:
                    raise StoreSchemaError(
                        f"edge store {self.path} has schema version {found}, newer than this "
                        f"kgpu supports ({STORE_SCHEMA_VERSION}); upgrade kgpu or move the file "
                        "away",
                        reason="schema too new",
                    )
            metadata.create_all(conn)
            if meta_get(conn, META_SCHEMA) is None:
                meta_set(conn, META_SCHEMA, str(STORE_SCHEMA_VERSION))
            if meta_get(conn, META_LAST_SEQ) is None:
                meta_set(conn, META_LAST_SEQ, "0")
            if meta_get(conn, META_EPOCH) is None:
                meta_set(conn, META_EPOCH, uuid.uuid4().hex[:16])
            self._epoch = str(meta_get(conn, META_EPOCH))
            owner = meta_get(conn, META_NODE)
            if owner is None:
                meta_set(conn, META_NODE, self.node)
            elif owner != self.node:
                # Not fatal (a renamed node keeps its history), but worth saying: seqs are per node.
                log.warning(
                    "edge store was created for another node",
                    extra={"db": str(self.path), "db_node": owner},
                )

    def close(self) -> None:
        """Release every connection (checkpoints the WAL when the last one closes)."""
        if not self._closed:
            self._closed = True
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


