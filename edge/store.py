"""The edge daemon's durable store: SQLite through SQLAlchemy 2 (Core).

The edge keeps deciding while the cloud is unreachable, so everything it decides is written here
before it is sent: the outbox is the queue towards the cloud (rows leave it only when the cloud
acks them), the decision log is kept for good, and a bounded copy of the other events, the
telemetry history, the last policy and the applied command ids let the daemon restart without
losing or repeating anything.

The API is synchronous; the daemon calls it through `asyncio.to_thread`, so it is safe to call
from several threads: one Engine (a pool of connections), short transactions, `BEGIN IMMEDIATE`
for every write (so two writers never read the same `last_seq`) and an in-process write lock (so
threads queue on a cheap mutex instead of SQLite's sleeping busy handler).

Every database or disk error reaches the caller as a `StoreError` with a readable reason
("database or disk is full", "attempt to write a readonly database", "database is locked"); the
store stays usable once the condition clears.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from shared.gpu import GpuInventory, GpuSample
from shared.logs import get_logger
from shared.sqlite import db_error_reason, durable_sqlite_engine
from shared.policy import PowerPolicy
from shared.protocol import (
    BODY_MODELS,
    EVENT_KINDS,
    MAX_PAYLOAD_BYTES,
    CommandResultBody,
    DecisionBody,
    Envelope,
    Kind,
    fit_body,
    make_envelope,
)
from shared.topics import NODE_NAME_RE
from shared.wire import WireModel

log = get_logger(__name__)

STORE_SCHEMA_VERSION = 1
"""Bump when a table changes; an older kgpu refuses to open a newer file (it would misread it)."""

DEFAULT_EVENTS_RETENTION = 100_000
DEFAULT_SAMPLES_RETENTION = 500_000  # rows; ~3.6 days of 8 GPUs sampled every 5 s
DEFAULT_BUSY_TIMEOUT_MS = 5_000

_META_SCHEMA = "schema_version"
_META_LAST_SEQ = "last_seq"
_META_NODE = "node"
_META_EPOCH = "outbox_epoch"
_META_WRITE_CHECK = "write_check_ts"
_META_DRAINING = "draining"  # JSON list of the GPU uuids the cloud asked to drain

# ---- schema ---------------------------------------------------------------------------------

metadata = sa.MetaData()

meta_table = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.String, nullable=False),
)

outbox_table = sa.Table(
    "outbox",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("id", sa.String, nullable=False),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # the envelope, exactly as it will be sent
)

decisions_table = sa.Table(
    "decisions",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("id", sa.String, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("gpu_uuid", sa.String),
    sa.Column("gpu_index", sa.Integer),
    sa.Column("rule", sa.String, nullable=False),
    sa.Column("action", sa.String, nullable=False),
    sa.Column("value", sa.Float),
    sa.Column("outcome", sa.String, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("inputs", sa.JSON, nullable=False),
    sa.Column("policy_version", sa.Integer),
    sa.Index("ix_decisions_gpu_uuid_seq", "gpu_uuid", "seq"),
    sa.Index("ix_decisions_rule_seq", "rule", "seq"),
)

# `n` is a local row number: retention only ever deletes the oldest rows, so "keep the newest N"
# is a cheap primary-key range delete (`n <= max(n) - N`) instead of a count or an OFFSET scan.
events_table = sa.Table(
    "events_log",
    metadata,
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("seq", sa.Integer, nullable=False, unique=True),
    sa.Column("id", sa.String, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("body", sa.JSON, nullable=False),
    sa.Index("ix_events_log_kind_n", "kind", "n"),
)

policy_table = sa.Table(
    "policy_cache",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("policy", sa.Text, nullable=False),
    sa.Column("cached_at", sa.Float, nullable=False),
    sa.CheckConstraint("id = 1", name="policy_cache_single_row"),
)

commands_table = sa.Table(
    "applied_commands",
    metadata,
    sa.Column("command_id", sa.String, primary_key=True),
    sa.Column("command", sa.String, nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
)

inventory_table = sa.Table(
    "inventory",
    metadata,
    sa.Column("gpu_index", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("uuid", sa.String, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
)

samples_table = sa.Table(
    "samples",
    metadata,
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("gpu_uuid", sa.String, nullable=False),
    sa.Column("gpu_index", sa.Integer, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_samples_ts", "ts"),
    sa.Index("ix_samples_gpu_uuid_ts", "gpu_uuid", "ts"),
)


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


# ---- the store ------------------------------------------------------------------------------


class EdgeStore:
    """The edge daemon's SQLite database. One instance per process; share it between threads."""

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

    @contextmanager
    def _errors(self, op: str) -> Iterator[None]:
        """Turn every database/disk error into a StoreError with SQLite's reason."""
        try:
            yield
        except StoreError:
            raise
        except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
            reason = db_error_reason(exc)
            log.error("edge store %s failed: %s", op, reason, extra={"db": str(self.path)})
            raise StoreError(f"edge store: {op} failed: {reason}", reason=reason) from exc

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
                found = _meta_get(conn, _META_SCHEMA)
                if found is not None and int(found) > STORE_SCHEMA_VERSION:
                    raise StoreSchemaError(
                        f"edge store {self.path} has schema version {found}, newer than this "
                        f"kgpu supports ({STORE_SCHEMA_VERSION}); upgrade kgpu or move the file "
                        "away",
                        reason="schema too new",
                    )
            metadata.create_all(conn)
            if _meta_get(conn, _META_SCHEMA) is None:
                _meta_set(conn, _META_SCHEMA, str(STORE_SCHEMA_VERSION))
            if _meta_get(conn, _META_LAST_SEQ) is None:
                _meta_set(conn, _META_LAST_SEQ, "0")
            if _meta_get(conn, _META_EPOCH) is None:
                _meta_set(conn, _META_EPOCH, uuid.uuid4().hex[:16])
            self._epoch = str(_meta_get(conn, _META_EPOCH))
            owner = _meta_get(conn, _META_NODE)
            if owner is None:
                _meta_set(conn, _META_NODE, self.node)
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

    def __enter__(self) -> EdgeStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- outbox and events ---------------------------------------------------------------------

    def record(self, items: Sequence[tuple[Kind, WireModel]]) -> list[Envelope]:
        """Write events in ONE transaction: all get consecutive seqs and are in the outbox, or
        none is. DECISION bodies also go to the decision log, the others to the events log."""
        items = list(items)
        if not items:
            return []
        for kind, body in items:  # refuse the whole batch before touching the database
            if kind not in EVENT_KINDS:
                allowed = ", ".join(sorted(EVENT_KINDS))
                raise ValueError(f"{kind!s} is not an event kind; only {allowed} go to the outbox")
            if not isinstance(body, BODY_MODELS[kind]):
                raise TypeError(
                    f"{kind} expects {BODY_MODELS[kind].__name__}, got {type(body).__name__}"
                )
        with self._write("record") as conn:
            return self._record_in(conn, items)

    def _record_in(self, conn: Connection, items: list[tuple[Kind, WireModel]]) -> list[Envelope]:
        last = int(_meta_get(conn, _META_LAST_SEQ) or 0)
        envelopes: list[Envelope] = []
        rows: list[dict[str, Any]] = []
        for i, (kind, body) in enumerate(items):
            envelope = make_envelope(self.node, body, kind, last + i + 1)
            payload = envelope.to_json()
            if len(payload) > MAX_PAYLOAD_BYTES:  # the broker would drop it: cut it to fit
                body = fit_body(self.node, kind, body)
                items[i] = (kind, body)
                envelope = make_envelope(self.node, body, kind, envelope.seq)
                self.events_truncated += 1
                log.warning("%s event of %d bytes cut to fit the %d-byte message limit", kind, len(payload),
                            MAX_PAYLOAD_BYTES, extra={"node": self.node, "msg_id": envelope.id})
                payload = envelope.to_json()
            envelopes.append(envelope)
            rows.append({"seq": envelope.seq, "id": envelope.id, "kind": str(kind), "ts": envelope.ts,
                         "payload": payload.decode()})
        conn.execute(outbox_table.insert(), rows)
        decisions: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        for env, (kind, body) in zip(envelopes, items, strict=True):
            if kind == Kind.DECISION:
                assert isinstance(body, DecisionBody)
                decisions.append(
                    {
                        "seq": env.seq,
                        "id": env.id,
                        "ts": env.ts,
                        "gpu_uuid": body.gpu_uuid,
                        "gpu_index": body.gpu_index,
                        "rule": body.rule,
                        "action": body.action,
                        "value": body.value,
                        "outcome": str(body.outcome),
                        "reason": body.reason,
                        "inputs": env.body.get("inputs", {}),  # already JSON-ready
                        "policy_version": body.policy_version,
                    }
                )
            else:
                events.append(
                    {
                        "seq": env.seq,
                        "id": env.id,
                        "ts": env.ts,
                        "kind": str(kind),
                        "body": env.body,
                    }
                )
        if decisions:
            conn.execute(decisions_table.insert(), decisions)
        if events:
            conn.execute(events_table.insert(), events)
            newest = conn.execute(sa.select(sa.func.max(events_table.c.n))).scalar_one()
            conn.execute(
                events_table.delete().where(events_table.c.n <= newest - self.events_retention)
            )
        _meta_set(conn, _META_LAST_SEQ, str(last + len(envelopes)))
        return envelopes

    def outbox_pending(self, limit: int = 100, after_seq: int = 0) -> list[Envelope]:
        """Unacked envelopes with seq > after_seq, oldest first."""
        with self._read("outbox_pending") as conn:
            rows = conn.execute(
                sa.select(outbox_table.c.payload)
                .where(outbox_table.c.seq > after_seq)
                .order_by(outbox_table.c.seq)
                .limit(max(0, limit))
            ).scalars()
            return [Envelope.model_validate_json(payload) for payload in rows]

    def outbox_depth(self) -> int:
        """How many events the cloud has not acked yet."""
        with self._read("outbox_depth") as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(outbox_table)).scalar_one()

    def oldest_pending_ts(self) -> float | None:
        """When the longest-waiting unacked event was recorded (lowest seq), None if none."""
        with self._read("oldest_pending_ts") as conn:
            return conn.execute(
                sa.select(outbox_table.c.ts).order_by(outbox_table.c.seq).limit(1)
            ).scalar_one_or_none()

    def ack(self, upto: int) -> int:
        """The cloud has stored every event with seq <= upto: drop them from the outbox.

        Idempotent. An ack beyond our last seq (a cloud that remembers a wiped database, or a
        bogus message) is clamped to last_seq and logged."""
        if upto <= 0:
            return 0
        with self._write("ack") as conn:
            last = int(_meta_get(conn, _META_LAST_SEQ) or 0)
            if upto > last:
                log.warning(
                    "ack beyond the last recorded seq; clamped",
                    extra={"ack_upto": upto, "last_seq": last},
                )
                upto = last
            result = conn.execute(outbox_table.delete().where(outbox_table.c.seq <= upto))
            return int(result.rowcount or 0)

    @property
    def epoch(self) -> str:
        """Random id of this outbox, made with the database: seqs are unique within one epoch."""
        return self._epoch

    def acked_upto(self) -> int:
        """The highest seq up to which every event has left the outbox (the cloud acked them).

        One snapshot: read as two (the outbox, then last_seq), an event recorded in between
        would count as acked although it was never sent, and the sync would never send it."""
        with self._read("acked_upto") as conn:
            oldest = conn.execute(sa.select(sa.func.min(outbox_table.c.seq))).scalar_one()
            if oldest is not None:
                return int(oldest) - 1
            return int(_meta_get(conn, _META_LAST_SEQ) or 0)

    def last_seq(self) -> int:
        """The highest seq ever assigned (survives acks and restarts)."""
        with self._read("last_seq") as conn:
            return int(_meta_get(conn, _META_LAST_SEQ) or 0)

    def decisions(
        self,
        limit: int = 100,
        before_seq: int | None = None,
        gpu_uuid: str | None = None,
        rule: str | None = None,
    ) -> list[dict[str, Any]]:
        """The decision log, newest first; page back with before_seq=<last seq seen>."""
        t = decisions_table
        query = sa.select(t).order_by(t.c.seq.desc()).limit(max(0, limit))
        if before_seq is not None:
            query = query.where(t.c.seq < before_seq)
        if gpu_uuid is not None:
            query = query.where(t.c.gpu_uuid == gpu_uuid)
        if rule is not None:
            query = query.where(t.c.rule == rule)
        with self._read("decisions") as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def events(
        self, limit: int = 100, kind: str | None = None, before_seq: int | None = None
    ) -> list[dict[str, Any]]:
        """The local copy of non-decision events (newest first): seq, id, ts, kind, body."""
        t = events_table
        query = (
            sa.select(t.c.seq, t.c.id, t.c.ts, t.c.kind, t.c.body)
            .order_by(t.c.n.desc())
            .limit(max(0, limit))
        )
        if kind is not None:
            query = query.where(t.c.kind == str(kind))
        if before_seq is not None:
            query = query.where(t.c.seq < before_seq)
        with self._read("events") as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    # -- policy --------------------------------------------------------------------------------

    def cache_policy(self, policy: PowerPolicy) -> bool:
        """Keep the newest policy for an offline restart. An older or equal version is ignored
        (False): a delayed or replayed policy message must never roll the node back."""
        with self._write("cache_policy") as conn:
            cached = conn.execute(
                sa.select(policy_table.c.version).where(policy_table.c.id == 1)
            ).scalar_one_or_none()
            if cached is not None and policy.version <= cached:
                return False
            row = {
                "version": policy.version,
                "policy": json.dumps(policy.dump()),
                "cached_at": time.time(),
            }
            if cached is None:
                conn.execute(policy_table.insert().values(id=1, **row))
            else:
                conn.execute(policy_table.update().where(policy_table.c.id == 1).values(**row))
            return True

    def cached_policy(self) -> PowerPolicy | None:
        """The newest policy seen, or None. An unreadable cache is logged and treated as empty."""
        with self._read("cached_policy") as conn:
            text = conn.execute(
                sa.select(policy_table.c.policy).where(policy_table.c.id == 1)
            ).scalar_one_or_none()
        if text is None:
            return None
        try:
            return PowerPolicy.model_validate_json(text)
        except ValidationError as exc:
            log.warning("cached policy is unreadable; ignoring it", extra={"error": str(exc)[:300]})
            return None

    # -- commands ------------------------------------------------------------------------------

    def command_applied(self, command_id: str) -> bool:
        """Whether this command id was already carried out (commands are at most once)."""
        with self._read("command_applied") as conn:
            return (
                conn.execute(
                    sa.select(commands_table.c.command_id).where(
                        commands_table.c.command_id == command_id
                    )
                ).first()
                is not None
            )

    def record_command_result(
        self, command_id: str, command: str, result: CommandResultBody,
        draining: Iterable[str] | None = None,
    ) -> Envelope | None:
        """In ONE transaction, mark the command applied, keep the GPUs now `draining` (when
        given) and queue its result event.

        None when the id was already applied: the result was queued then, and must not be twice."""
        if result.command_id != command_id:
            raise ValueError(
                f"result is for command {result.command_id!r}, not {command_id!r}"
            )
        with self._write("record_command_result") as conn:
            seen = conn.execute(
                sa.select(commands_table.c.command_id).where(
                    commands_table.c.command_id == command_id
                )
            ).first()
            if seen is not None:
                return None
            conn.execute(
                commands_table.insert().values(
                    command_id=command_id,
                    command=command,
                    applied_at=time.time(),
                    ok=result.ok,
                    detail=result.detail,
                )
            )
            if draining is not None:
                _meta_set(conn, _META_DRAINING, json.dumps(sorted(draining)))
            (envelope,) = self._record_in(conn, [(Kind.COMMAND_RESULT, result)])
            return envelope

    def draining(self) -> set[str]:
        """The GPUs the cloud asked to drain and has not undrained: kept across restarts."""
        with self._read("draining") as conn:
            raw = _meta_get(conn, _META_DRAINING)
        return set(json.loads(raw)) if raw else set()

    # -- inventory -----------------------------------------------------------------------------

    def save_inventory(self, gpus: Sequence[GpuInventory]) -> None:
        """Replace the inventory with what the driver reports now (GPUs can disappear)."""
        with self._write("save_inventory") as conn:
            conn.execute(inventory_table.delete())
            if gpus:
                conn.execute(
                    inventory_table.insert(),
                    [
                        {"gpu_index": g.index, "uuid": g.uuid, "data": g.model_dump_json()}
                        for g in gpus
                    ],
                )

    def inventory(self) -> list[GpuInventory]:
        """The last saved inventory, by GPU index."""
        with self._read("inventory") as conn:
            rows = conn.execute(
                sa.select(inventory_table.c.data).order_by(inventory_table.c.gpu_index)
            ).scalars()
            return [GpuInventory.model_validate_json(data) for data in rows]

    # -- telemetry history ---------------------------------------------------------------------

    def add_samples(self, samples: Sequence[GpuSample]) -> None:
        """Append telemetry; past `samples_retention` rows the oldest are dropped."""
        if not samples:
            return
        t = samples_table
        with self._write("add_samples") as conn:
            conn.execute(
                t.insert(),
                [
                    {
                        "ts": s.ts,
                        "gpu_uuid": s.uuid,
                        "gpu_index": s.index,
                        "data": s.model_dump_json(),
                    }
                    for s in samples
                ],
            )
            newest = conn.execute(sa.select(sa.func.max(t.c.n))).scalar_one()
            conn.execute(t.delete().where(t.c.n <= newest - self.samples_retention))

    def samples(
        self, gpu_uuid: str | None = None, since: float | None = None, limit: int = 1000
    ) -> list[GpuSample]:
        """Samples with ts >= since, in time order; when more match, the newest `limit` of them."""
        t = samples_table
        inner = sa.select(t.c.n, t.c.ts, t.c.data).order_by(t.c.ts.desc(), t.c.n.desc())
        if gpu_uuid is not None:
            inner = inner.where(t.c.gpu_uuid == gpu_uuid)
        if since is not None:
            inner = inner.where(t.c.ts >= since)
        newest = inner.limit(max(0, limit)).subquery()
        query = sa.select(newest.c.data).order_by(newest.c.ts, newest.c.n)
        with self._read("samples") as conn:
            return [GpuSample.model_validate_json(data) for data in conn.execute(query).scalars()]

    def prune_samples(self, older_than: float) -> int:
        """Drop samples with ts < older_than; returns how many."""
        with self._write("prune_samples") as conn:
            result = conn.execute(samples_table.delete().where(samples_table.c.ts < older_than))
            return int(result.rowcount or 0)

    # -- health --------------------------------------------------------------------------------

    def check_writable(self) -> str | None:
        """None if a tiny write transaction commits, else why not (for /healthz 'degraded').

        A nearly full disk may still take this one-row update in place while bigger writes
        fail: see `last_write_error` for what the latest real write said."""
        try:
            with self._write("check_writable") as conn:
                _meta_set(conn, _META_WRITE_CHECK, repr(time.time()))
        except StoreError as exc:
            return exc.reason
        return None

    @property
    def last_write_error(self) -> str | None:
        """Why the latest real write failed, or None once one has committed since."""
        return self._last_write_error


# ---- helpers --------------------------------------------------------------------------------


def _meta_get(conn: Connection, key: str) -> str | None:
    return conn.execute(
        sa.select(meta_table.c.value).where(meta_table.c.key == key)
    ).scalar_one_or_none()


def _meta_set(conn: Connection, key: str, value: str) -> None:
    stmt = sqlite_insert(meta_table).values(key=key, value=value)
    conn.execute(
        stmt.on_conflict_do_update(index_elements=[meta_table.c.key], set_={"value": value})
    )
