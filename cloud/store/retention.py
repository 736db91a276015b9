"""Retention of the edge events and decisions the fleet store keeps: by age and by row count.

Without it they are kept forever (an event flood was measured at ~4.5 GB of database an hour).
`apply_retention` deletes, oldest first (by row id, the order they were stored in), every row older
than the policy's age and the oldest rows beyond its row count, in small transactions so that the
write lock (the ingest's too) is never held for long.

Deleting an event must never make the ingest take a re-sent copy for a new one. The ingest treats
an event of the node's current outbox epoch as a duplicate when its seq is <= the node's
`acked_seq` (a comparison: no row needed); only the rows above it (stored beyond a hole, waiting
for the missing seqs) are read to move `acked_seq` on. So an event is deleted only if it is of an
epoch the node has left, or its seq is <= its node's `acked_seq`. Decisions are copies of their
events for the API; any of them may go.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud.store.base import StoreBase
from cloud.store.schema import decisions_table, events_table, nodes_table
from shared.logs import get_logger

log = get_logger(__name__)

RETENTION_BATCH_ROWS = 1000  # rows looked at (and at most deleted) per transaction
RETENTION_BATCHES_PER_CALL = 50  # then `more` says to call again (the caller yields in between)


@dataclass(frozen=True)
class RetentionPolicy:
    max_age_s: float  # rows older than this go (events: by arrival; decisions: by the edge's ts)
    max_rows: int  # each table keeps at most this many rows (the newest)


@dataclass
class RetentionResult:
    events: int = 0
    decisions: int = 0
    more: bool = False  # stopped at RETENTION_BATCHES_PER_CALL: call again
    # where the next call goes on (row ids already looked at and kept), per table
    cursors: dict[str, int] | None = None


class RetentionMixin(StoreBase):
    """Age and size bounds for the events and decisions tables (see the module docstring)."""

    def apply_retention(self, policy: RetentionPolicy, *, now: float | None = None,
                        cursors: dict[str, int] | None = None,
                        batch_rows: int = RETENTION_BATCH_ROWS,
                        max_batches: int = RETENTION_BATCHES_PER_CALL) -> RetentionResult:
        """Delete what the policy says may go, in transactions of at most `batch_rows` rows; stop
        after `max_batches` of them with `more=True` and the `cursors` to pass to the next call."""
        cutoff = (time.time() if now is None else now) - policy.max_age_s
        result = RetentionResult(cursors=dict(cursors or {}))
        assert result.cursors is not None
        batches = 0
        for table in (events_table, decisions_table):
            after = result.cursors.get(table.name, 0)
            with self.reading(f"retention {table.name}") as conn:
                excess = _row_count(conn, table) - policy.max_rows
            while True:
                if batches >= max_batches:
                    result.more = True
                    return result
                batches += 1
                deleted, after, done = self._retention_batch(table, cutoff, excess, after, batch_rows)
                excess -= deleted
                if table is events_table:
                    result.events += deleted
                else:
                    result.decisions += deleted
                result.cursors[table.name] = after
                if done:
                    break
                time.sleep(0)  # let a waiting writer (the ingest) have the lock between batches
        return result

    def _retention_batch(self, table: sa.Table, cutoff: float, excess: int, after: int,
                         batch_rows: int) -> tuple[int, int, bool]:
        """One transaction: look at the next `batch_rows` rows by id after `after` and delete
        those that may go (older than `cutoff`, or among the `excess` oldest). Returns (deleted,
        the last id looked at, whether this table is done for this round)."""
        t, n = table, nodes_table
        stamp = t.c.received_at if table is events_table else t.c.ts
        query = (sa.select(t.c.id, stamp.label("stamp"), t.c.epoch, t.c.seq, n.c.outbox_epoch, n.c.acked_seq)
                 .join(n, n.c.name == t.c.node)
                 .where(t.c.id > after)
                 .order_by(t.c.id)
                 .limit(batch_rows))
        with self.writing(f"retention {table.name}") as conn:
            rows = list(conn.execute(query))
            doomed: list[int] = []
            done = len(rows) < batch_rows
            for r in rows:
                if r.stamp >= cutoff and len(doomed) >= excess:
                    done = True  # newer than the cutoff and within the row bound: by id, so is the rest
                    break
                if table is events_table and not _acked(r):
                    continue  # above its node's acked_seq: the ingest still needs it
                doomed.append(int(r.id))
            deleted = _delete(conn, t, doomed) if doomed else 0
        return deleted, int(rows[-1].id) if rows else after, done


def _acked(row: Any) -> bool:
    current = row.outbox_epoch if row.outbox_epoch is not None else ""
    return bool(row.epoch != current or row.seq <= row.acked_seq)


def _row_count(conn: Connection, table: sa.Table) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def _delete(conn: Connection, table: sa.Table, ids: list[int]) -> int:
    result = conn.execute(table.delete().where(table.c.id.in_(ids)))
    return int(result.rowcount or len(ids))
