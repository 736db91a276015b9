"""The SQLite set-up both stores use (the edge's and the cloud's fleet store on SQLite)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from shared.logs import get_logger

log = get_logger(__name__)


def durable_sqlite_engine(url: str | URL, busy_timeout_ms: int, *, sync_every_commit: bool = True,
                          auto_checkpoint: bool = True) -> Engine:
    """An engine whose commits survive power loss (WAL, synchronous=FULL), with foreign keys on.

    For a writer whose commits need not each survive a power loss (the cloud's telemetry writer,
    cloud/sample_writer.py): `sync_every_commit=False` (synchronous=NORMAL) leaves the sync to the
    WAL's checkpoints (a commit survives a crash of the process at once, a power loss once a
    checkpoint has synced it; SQLite's WAL is never corrupted either way), and
    `auto_checkpoint=False` (wal_autocheckpoint=0) leaves the checkpoints to the opener, who runs
    them off its commits' path (cloud/wal_checkpointer.py).

    Transactions begin with `BEGIN <mode>`, the mode taken from the connection's execution option
    `kgpu_begin` (DEFERRED by default; IMMEDIATE for writers, so that two writers never read the
    same counter). pysqlite's own implicit BEGIN comes only before the first write, so a
    read-then-write would not be one transaction: SQLAlchemy's "begin" event issues it instead.
    """
    engine = sa.create_engine(
        url, connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            mode = cur.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("sqlite refused WAL journal mode", extra={"journal_mode": mode})
            cur.execute(f"PRAGMA synchronous={'FULL' if sync_every_commit else 'NORMAL'}")
            if not auto_checkpoint:
                cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("kgpu_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def db_error_reason(exc: BaseException) -> str:
    """The driver's message without SQLAlchemy's statement dump and link."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        text = str(exc.orig).strip()
        return text.splitlines()[0] if text else type(exc.orig).__name__
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@contextmanager
def store_errors(
    what: str, op: str, error: type[Exception], *, logger: logging.Logger, db: str,
    also: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """Turn every database or disk error (and those in `also`) met by `op` into the store's
    error class, `error(message, reason)` with the driver's short reason, logged once as
    `<what> <op> failed`. An error already of the store's own type passes through unchanged."""
    caught: tuple[type[BaseException], ...] = (SQLAlchemyError, sqlite3.Error, OSError, *also)
    try:
        yield
    except caught as exc:
        if isinstance(exc, error):
            raise
        reason = db_error_reason(exc)
        logger.error("%s %s failed: %s", what, op, reason, extra={"db": db})
        raise error(f"{what}: {op} failed: {reason}", reason) from exc
