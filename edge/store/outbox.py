"""What the edge sends to the cloud: the outbox (rows leave it only when the cloud acks them),
the decision log and the local copy of the other events, and the applied commands whose results
go out through the outbox in the same transaction (at most once per command id).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edge.store.base import StoreBase, log
from edge.store.schema import (
    META_DRAINING,
    META_LAST_SEQ,
    commands_table,
    decisions_table,
    events_table,
    meta_get,
    meta_set,
    outbox_table,
)
from shared.body_fit import fit_body
from shared.protocol import (
    BODY_MODELS,
    EVENT_KINDS,
    MAX_PAYLOAD_BYTES,
    CommandResultBody,
    DecisionBody,
    Envelope,
    Kind,
    make_envelope,
)
from shared.wire import WireModel


class OutboxStore(StoreBase):
    """The outbox, the decision and event logs, and the applied commands."""

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
            envelopes = self._record_in(conn, items)
        self._recorded(len(envelopes))
        return envelopes

    def _recorded(self, count: int) -> None:
        """After the commit: the generation sidecar when due, the outbox bound."""
        if count:
            self._note_generation()
            self._after_record(count)

    def _record_in(self, conn: Connection, items: list[tuple[Kind, WireModel]]) -> list[Envelope]:
        """Insert in the caller's transaction (the counters move with it: see StoreBase._write)."""
        last = int(meta_get(conn, META_LAST_SEQ) or 0)
        size = 0
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
            size += len(payload)
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
        meta_set(conn, META_LAST_SEQ, str(last + len(envelopes)))
        with self._counter_lock:
            self._last_seq = last + len(envelopes)
            self._depth += len(envelopes)
            self._outbox_bytes += size
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
        """How many events the cloud has not acked yet (a counter kept with every add and ack:
        no query, safe to call after every ack)."""
        self._check_open()
        return self._depth

    def outbox_bytes(self) -> int:
        """Size of the unacked envelopes, in bytes (kept like the depth)."""
        return self._outbox_bytes

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
            last = int(meta_get(conn, META_LAST_SEQ) or 0)
            if upto > last:
                log.warning(
                    "ack beyond the last recorded seq; clamped",
                    extra={"ack_upto": upto, "last_seq": last},
                )
                upto = last
            gone = outbox_table.c.seq <= upto
            count, size = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(
                sa.func.sum(sa.func.length(sa.cast(outbox_table.c.payload, sa.LargeBinary))), 0)).where(gone)).one()
            if count:
                conn.execute(outbox_table.delete().where(gone))
            with self._counter_lock:
                self._depth -= int(count)
                self._outbox_bytes -= int(size)
        if count:
            self._note_generation()
        return int(count)

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
            return int(meta_get(conn, META_LAST_SEQ) or 0)

    def last_seq(self) -> int:
        """The highest seq ever assigned (survives acks and restarts)."""
        with self._read("last_seq") as conn:
            return int(meta_get(conn, META_LAST_SEQ) or 0)

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
                meta_set(conn, META_DRAINING, json.dumps(sorted(draining)))
            (envelope,) = self._record_in(conn, [(Kind.COMMAND_RESULT, result)])
        self._recorded(1)
        return envelope

    def draining(self) -> set[str]:
        """The GPUs the cloud asked to drain and has not undrained: kept across restarts."""
        with self._read("draining") as conn:
            raw = meta_get(conn, META_DRAINING)
        return set(json.loads(raw)) if raw else set()
