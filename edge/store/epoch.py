"""A new outbox epoch when the store went back in time.

Seqs are unique within an epoch; the cloud deduplicates by (node, epoch, seq). A database that
was restored from a backup or lost its WAL would give new events seqs the cloud already stored
and acked: it would take them for duplicates and they would vanish. So when the generation
sidecar (edge/store/generation.py) shows the database is older than what this node already did,
or the cloud says `conflict` (edge/sync.py), the store starts a new epoch: the pending events are
renumbered 1..n in their order and nothing is taken for a duplicate.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edge.store.base import StoreBase, log, new_epoch_id
from edge.store.schema import (
    META_EPOCH,
    META_LAST_SEQ,
    decisions_table,
    events_table,
    meta_get,
    meta_set,
    outbox_table,
)
from shared.protocol import Envelope

RENUMBER_CHUNK = 5_000


class EpochStore(StoreBase):
    """`start_new_epoch` and the rollback check at open."""

    def start_new_epoch(self, reason: str) -> str:
        """In ONE transaction: a new random epoch, the pending events renumbered 1..n in their
        order (their stored envelopes too), last_seq = n, acked_upto = 0. The local decision and
        event logs move with them (their older rows get seqs <= 0, in the same order). Logs one
        WARNING with the reason and keeps it in `notices` (/healthz, the status) until a restart;
        returns the new epoch (`self.epoch` at once)."""
        with self._write("start_new_epoch") as conn:
            old_epoch = meta_get(conn, META_EPOCH)
            last = int(meta_get(conn, META_LAST_SEQ) or 0)
            oldest = conn.execute(sa.select(sa.func.min(outbox_table.c.seq))).scalar_one()
            acked = last if oldest is None else int(oldest) - 1
            pending = last - acked
            if acked > 0:
                for table in (outbox_table, decisions_table, events_table):
                    _shift_seqs(conn, table, acked)
                _renumber_envelopes(conn, acked)
            epoch = new_epoch_id()
            meta_set(conn, META_EPOCH, epoch)
            meta_set(conn, META_LAST_SEQ, str(pending))
            _, _, size = self._outbox_figures(conn)
            with self._counter_lock:
                self._epoch, self._last_seq, self._depth, self._outbox_bytes = epoch, pending, pending, size
        # the latest one only: a cloud that keeps saying `conflict` must not grow the list
        self.notices[:] = [n for n in self.notices if not n.startswith("store_rolled_back: ")]
        self.notices.append(f"store_rolled_back: {reason}; new outbox epoch {epoch}, {pending} pending events "
                            "renumbered")
        log.warning("edge store: new outbox epoch %s (was %s): %s; %d pending events renumbered 1..%d",
                    epoch, old_epoch, reason, pending, pending,
                    extra={"db": str(self.path), "old_epoch": old_epoch, "epoch": epoch, "pending": pending})
        self._note_generation(force=True)
        return epoch

    def _after_open(self) -> None:
        """Compare the database with its generation sidecar; start a new epoch before anything is
        sent when the database is older than what this node already did."""
        super()._after_open()
        if self._generation is None:
            return
        found = self._generation.read()
        now = self._generation_now()
        reason: str | None = None
        if self._epoch_damaged:
            reason = "the database's outbox epoch was unreadable"
        elif found is None:
            pass
        elif found.epoch != now.epoch:
            if self.created:
                what = (f"edge database {self.path} was missing and a new one started (epoch {now.epoch}); the "
                        f"previous one (epoch {found.epoch}, up to {found.last_seq - found.acked_upto} events "
                        "not acked by the cloud) is gone")
                self.notices.append(f"store_recovered: {what}")
                log.error("%s", what, extra={"db": str(self.path)})
            else:
                reason = (f"database restored or replaced: it holds epoch {now.epoch}, its generation file "
                          f"{self._generation.path} says {found.epoch}")
        elif now.last_seq < found.last_seq or now.acked_upto < found.acked_upto:
            reason = (f"database restored from an older copy: last_seq {now.last_seq}, acked {now.acked_upto} "
                      f"in the file; {found.last_seq}, {found.acked_upto} in {self._generation.path}")
        if reason is None:
            self._note_generation(force=True)
            return
        self.start_new_epoch(reason)


def _shift_seqs(conn: Connection, table: sa.Table, by: int) -> None:
    """seq := seq - by on every row, in two passes so that no row ever meets another's seq
    (SQLite checks uniqueness row by row): first above every seq in use, then down."""
    low, high = conn.execute(sa.select(sa.func.min(table.c.seq), sa.func.max(table.c.seq))).one()
    if low is None:
        return
    span = int(high) - int(low) + 1
    conn.execute(table.update().values(seq=table.c.seq + span))
    conn.execute(table.update().values(seq=table.c.seq - span - by))


def _renumber_envelopes(conn: Connection, by: int) -> None:
    """The stored envelopes carry their seq: rewrite it (the first `"seq":` of the JSON is the
    envelope's, its fields come before the body; otherwise parsed and written again)."""
    t = outbox_table
    after = 0
    while True:
        rows = conn.execute(sa.select(t.c.seq, t.c.payload).where(t.c.seq > after).order_by(t.c.seq)
                            .limit(RENUMBER_CHUNK)).all()
        if not rows:
            return
        updates = []
        for seq, payload in rows:
            old, new = f'"seq":{seq + by},', f'"seq":{seq},'
            head = payload[:payload.find('"body"')] if '"body"' in payload else ""
            if old in head:
                text = payload.replace(old, new, 1)
            else:
                text = Envelope.model_validate_json(payload).model_copy(update={"seq": seq}).to_json().decode()
            updates.append({"s": seq, "p": text})
        conn.execute(t.update().where(t.c.seq == sa.bindparam("s")).values(payload=sa.bindparam("p")), updates)
        after = rows[-1][0]
