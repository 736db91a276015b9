"""The fleet store's plumbing: the engine, the write lock, error translation and the schema's
Alembic upgrade on open.

One SQLAlchemy 2 (Core) schema that runs on SQLite (a single controller, a lab) and PostgreSQL
(the fleet, several controller replicas). The schema is versioned with Alembic from the first
table on: the store runs `upgrade head` when it opens, so a newer kgpu migrates the database
and an older one refuses a database it does not know.

Every read and write of every part goes through `reading()` / `writing()`: one transaction, the
process-wide write mutex on SQLite (one writer anyway: threads queue on it, not on SQLite's busy
handler), and any database error turned into a `FleetStoreError` with the driver's reason.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple, Self

import sqlalchemy as sa
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine, make_url

from cloud.store.tiers import HistoryTiers
from shared.logs import get_logger
from shared.sqlite import durable_sqlite_engine, store_errors

log = get_logger(__name__)

ALEMBIC_DIR = Path(__file__).parent / "alembic"
DEFAULT_HISTORY_RESOLUTION_S = 0.0  # the raw tier keeps every sample (cloud/store/history.py)
DEFAULT_BUSY_TIMEOUT_MS = 10_000
_MIGRATION_LOCK_KEY = 0x6B677075  # "kgpu": PostgreSQL advisory lock around `upgrade head`


class FleetStoreError(RuntimeError):
    """The database could not do what was asked; `reason` is the driver's short message."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class DriverStatement(NamedTuple):
    """A statement compiled for the SQLite driver (`StoreBase._driver_statement`)."""

    sql: str
    names: list[str]  # its parameters, in the order the driver takes them
    fixed: dict[str, Any]  # values the statement fixes itself (a LIMIT's), by name


class StoreBase:
    """The controller's database connection. One instance per process; safe to share between
    threads."""

    def __init__(
        self,
        url: str,
        *,
        history_resolution_s: float = DEFAULT_HISTORY_RESOLUTION_S,
        history_tiers: HistoryTiers | None = None,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        sync_every_commit: bool = True,
        auto_checkpoint: bool = True,
    ) -> None:
        """`sync_every_commit`, `auto_checkpoint`: SQLite only (shared/sqlite.py
        `durable_sqlite_engine`); a store opened without auto checkpoints has `checkpoint_wal`
        called by its owner."""
        if history_resolution_s < 0:
            raise ValueError("history_resolution_s must not be negative")
        self.history_resolution_s = history_resolution_s  # raw tier: at most one sample per GPU per this
        self.history_tiers = history_tiers or HistoryTiers()
        self._busy_timeout_ms = busy_timeout_ms
        self._sync_every_commit = sync_every_commit
        self._auto_checkpoint = auto_checkpoint
        self._closed = False
        # SQLite has one writer anyway: queue threads on a mutex, not on its busy handler.
        self._write_lock = threading.Lock()
        self._compiled: dict[str, DriverStatement] = {}  # `_driver_statement`s, SQLite
        self._url_for_logs = "?"
        # What the SQLite file was before we opened it: absent, 0 bytes, or with data (size)
        self._sqlite_file_before: tuple[Path, int | None] | None = None
        with self._errors("open"):
            self._engine = self._make_engine(url)
        self._dialect = self._engine.dialect.name
        self._write_engine = self._engine.execution_options(kgpu_begin="IMMEDIATE")
        try:
            with self._errors("migrate"):
                self._migrate()
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for tests and diagnostics: parts use `reading`/`writing`)."""
        return self._engine

    def _make_engine(self, url: str) -> Engine:
        parsed = make_url(url)
        self._url_for_logs = parsed.render_as_string(hide_password=True)
        backend = parsed.get_backend_name()
        if backend == "postgresql":
            if parsed.get_driver_name() != "psycopg":
                parsed = parsed.set(drivername="postgresql+psycopg")  # the driver we ship
            return sa.create_engine(
                parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10}
            )
        if backend != "sqlite":
            raise ValueError(f"fleet store: unsupported database {backend!r} (sqlite, postgresql)")
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError("fleet store: SQLite needs a file (sqlite:///path/fleet.db)")
        path = Path(parsed.database)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FleetStoreError(
                f"fleet store: cannot create {path.parent}: {exc.strerror or exc}",
                reason=str(exc.strerror or exc),
            ) from exc
        try:
            self._sqlite_file_before = (path, path.stat().st_size)
        except FileNotFoundError:
            self._sqlite_file_before = (path, None)
        except OSError:
            pass  # SQLite says what is wrong with it when it opens it
        # An ack goes out right after the commit: the commit must survive power loss (the
        # telemetry writer, which sends none, opens it with sync_every_commit=False).
        return durable_sqlite_engine(parsed, self._busy_timeout_ms, sync_every_commit=self._sync_every_commit,
                                     auto_checkpoint=self._auto_checkpoint)

    def checkpoint_wal(self) -> None:
        """Copy the WAL's committed pages into the database file and sync both (SQLite's PASSIVE
        checkpoint: it waits for no reader or writer, and copies what it can). For a store
        opened with auto_checkpoint=False; nothing on PostgreSQL."""
        if self._dialect != "sqlite":
            return
        self._check_open()
        with self._errors("checkpoint"), self._engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _errors(self, op: str) -> AbstractContextManager[None]:
        """Every database error (Alembic's too) as a FleetStoreError with the driver's reason."""
        return store_errors("fleet store", op, FleetStoreError, logger=log, db=self._url_for_logs,
                            also=(CommandError,))

    def _check_open(self) -> None:
        if self._closed:
            raise FleetStoreError("fleet store: the store is closed", reason="closed")

    @contextmanager
    def reading(self, op: str) -> Iterator[Connection]:
        """One read transaction; `op` names it in errors and logs."""
        self._check_open()
        with self._errors(op), self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def writing(self, op: str) -> Iterator[Connection]:
        """One write transaction: committed on exit, rolled back on any exception."""
        self._check_open()
        lock = self._write_lock if self._dialect == "sqlite" else _NO_LOCK
        with self._errors(op), lock, self._write_engine.connect() as conn, conn.begin():
            yield conn

    def insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT, which has ON CONFLICT."""
        return pg_insert(table) if self._dialect == "postgresql" else sqlite_insert(table)

    @property
    def raw_sqlite(self) -> bool:
        """True where `execute_many` hands rows to the driver as they are (SQLite)."""
        return self._dialect == "sqlite"

    def json_param(self, value: Any) -> Any:
        """A JSON column's value as `execute_many` takes it: its JSON text where rows go to the
        driver as they are (`raw_sqlite`), the value itself elsewhere."""
        return json.dumps(value) if self.raw_sqlite else value

    def execute_many(self, conn: Connection, key: str, build: Callable[[], Any],
                     columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Run one INSERT (`build()`, bound by `columns`) for each row of `rows` (tuples in the
        order of `columns`). On SQLite the statement is compiled once per store (cached under
        `key`) and the rows go straight to the driver's `executemany`, in the connection's
        transaction: SQLAlchemy's per-row parameter processing was most of the ingest's store time
        (docs/benchmarks.md, "Cloud ingest rate"). So the rows must already be what the driver
        takes: JSON columns as their JSON text (`raw_sqlite`), numbers, strings, None. Elsewhere
        SQLAlchemy's executemany, with the rows as dicts (JSON columns as Python values there)."""
        if not rows:
            return
        if not self.raw_sqlite:
            conn.execute(build(), [dict(zip(columns, row, strict=True)) for row in rows])
            return
        sql, names, _fixed = self._driver_statement(conn, key, build, columns)
        index = {name: i for i, name in enumerate(columns)}
        positions = [index[name] for name in names]
        if positions == list(range(len(columns))):
            params: Sequence[Sequence[Any]] = rows
        else:
            params = [tuple(row[i] for i in positions) for row in rows]
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(sql, params)
        finally:
            cursor.close()

    def fetch_scalars(self, conn: Connection, key: str, build: Callable[[], Any],
                      params: Mapping[str, Any]) -> list[Any]:
        """The first column of one SELECT (`build()`, every parameter a `bindparam` named in
        `params`). On SQLite compiled once per store (cached under `key`) and run through the
        driver's cursor in the connection's transaction, as `execute_many` does: for a statement
        run once per node per batch, SQLAlchemy's execution (~75 µs of Python) was most of the
        cost against ~10 µs of SQLite. Elsewhere SQLAlchemy's execute."""
        if not self.raw_sqlite:
            return list(conn.execute(build(), dict(params)).scalars())
        sql, names, fixed = self._driver_statement(conn, key, build, list(params))
        values = [params[name] if name in params else fixed[name] for name in names]
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            return [row[0] for row in cursor.execute(sql, values)]
        finally:
            cursor.close()

    def _driver_statement(self, conn: Connection, key: str, build: Callable[[], Any],
                          columns: Sequence[str]) -> DriverStatement:
        """`build()` compiled for the driver once per store (cached under `key`), bound by
        `columns`: its SQL, its parameters' names in order, and the values it fixes itself (a
        LIMIT's)."""
        compiled = self._compiled.get(key)
        if compiled is None:
            statement = build().compile(dialect=conn.dialect, column_keys=list(columns))
            fixed = {name: value for name, value in statement.params.items() if name not in columns}
            compiled = DriverStatement(statement.string, list(statement.positiontup or []), fixed)
            self._compiled[key] = compiled
        return compiled

    def _migrate(self) -> None:
        """`alembic upgrade head`, in one transaction; refuse a schema newer than this code."""
        config = AlembicConfig()
        config.set_main_option("script_location", str(ALEMBIC_DIR))
        script = ScriptDirectory.from_config(config)
        with self.writing("migrate") as conn:
            if self._dialect == "postgresql":
                # Two replicas starting together must not both create the tables.
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
            current = MigrationContext.configure(conn).get_current_heads()
            known = {rev.revision for rev in script.walk_revisions()}
            unknown = [rev for rev in current if rev not in known]
            if unknown:
                raise FleetStoreError(
                    f"fleet store: the database schema is at revision {', '.join(unknown)}, "
                    "which this kgpu does not know (written by a newer version); upgrade kgpu",
                    reason="schema too new",
                )
            if set(current) == set(script.get_heads()):
                return
            if not current:
                self._say_new_database(conn)
            config.attributes["connection"] = conn
            alembic_command.upgrade(config, "head")
            log.info(
                "fleet store schema migrated",
                extra={"db": self._url_for_logs, "from": list(current), "to": script.get_heads()},
            )

    def _say_new_database(self, conn: Connection) -> None:
        """A database without kgpu's schema becomes a new, empty fleet database. Where a file was
        there already (0 bytes, or data but no kgpu tables), that is more likely a restore gone
        wrong than a first start: one clear WARNING, since every edge then re-sends only what it
        has not had acked (docs/operations.md, "Fleet database")."""
        before = self._sqlite_file_before
        tables = sa.inspect(conn).get_table_names()
        if before is not None and before[1] is not None:
            path, size = before
            holds = f" (it holds {', '.join(sorted(tables)[:5])})" if tables else ""
            what = "is empty (0 bytes)" if size == 0 else f"has {size} bytes but no kgpu tables{holds}"
            log.warning(
                "fleet store: %s %s: starting a new fleet database; if you meant to restore, stop "
                "and restore the backup", path, what, extra={"db": self._url_for_logs, "bytes": size},
            )
        elif before is None and tables:
            log.warning(
                "fleet store: the database has tables (%s) but no kgpu schema: creating kgpu's tables "
                "beside them, as a new fleet database; if you meant to restore, stop and restore the "
                "backup", ", ".join(sorted(tables)[:5]), extra={"db": self._url_for_logs},
            )
        else:
            log.info("fleet store: a new fleet database; creating the schema", extra={"db": self._url_for_logs})

    def close(self) -> None:
        """Release every connection."""
        if not self._closed:
            self._closed = True
            self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()



class _NoLock:
    """PostgreSQL serialises on row locks; no process-wide mutex needed."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_exc: object) -> None:
        return None


_NO_LOCK = _NoLock()
