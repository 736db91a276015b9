"""Keeping the edge store's size in hand: the outbox bound and the pruning of the local logs.

The outbox bound. The cloud acks cumulatively and waits for every seq in order, so a row is never
deleted from the middle of the outbox (the cloud would wait on the hole forever). Past the bound
(`outbox_max_bytes`, `outbox_max_events`), the oldest `offline_summary` events are shrunk in
place: their body keeps its time range and loses its per-GPU statistics, so their bytes drop and
their seqs stay. Decisions, XIDs, health changes, migration requests and command results are
never dropped nor shrunk: when the bound is still exceeded the store keeps recording (the
enforcement and its record matter more than the bound), counts the events recorded over it,
logs a WARNING at most once a minute and reports it (`outbox_over_bound`).

The local logs (decisions, the copy of the other events) are pruned by age and by count, never
a row whose event the cloud has not acked yet.
"""

from __future__ import annotations

import sqlalchemy as sa

from edge.store.base import StoreBase, log
from edge.store.schema import decisions_table, events_table, outbox_table
from shared.logs import ThrottledLog
from shared.protocol import Envelope, Kind, OfflineSummaryBody

SCAN_CHUNK = 10_000  # outbox seqs looked at per pass when looking for summaries to shrink
PRUNE_CHUNK = 5_000  # rows deleted per transaction (the write lock is never held long)
OVER_BOUND_WARN_EVERY_S = 60.0


class MaintenanceStore(StoreBase):
    """The outbox bound and the log pruning."""

    outbox_max_bytes = 0  # 0: no bound (set by the daemon from its settings)
    outbox_max_events = 0
    outbox_over_bound_events = 0  # events recorded while the outbox was over its bound
    summaries_shrunk = 0
    _shrunk_upto = 0  # summaries up to this seq were already looked at
    _over_bound_log: ThrottledLog | None = None  # one WARNING a minute at most, per store

    def set_outbox_bound(self, max_bytes: int, max_events: int) -> None:
        self.outbox_max_bytes, self.outbox_max_events = max_bytes, max_events

    def outbox_over_bound(self) -> bool:
        """Whether the unacked events exceed the bound now."""
        return bool((self.outbox_max_bytes and self._outbox_bytes > self.outbox_max_bytes)
                    or (self.outbox_max_events and self._depth > self.outbox_max_events))

    def _after_record(self, recorded: int) -> None:
        super()._after_record(recorded)
        if not self.outbox_over_bound():
            return
        if self.outbox_max_bytes and self._outbox_bytes > self.outbox_max_bytes:
            self.shrink_summaries()
        if not self.outbox_over_bound():
            return
        self.outbox_over_bound_events += recorded
        if self._over_bound_log is None:
            self._over_bound_log = ThrottledLog(log, OVER_BOUND_WARN_EVERY_S)
        self._over_bound_log.log(
            "outbox_over_bound",
            "edge outbox over its bound: %d events, %d bytes unacked (bound %s events, %s bytes); recording "
            "anyway, %d events so far (is the cloud reachable and acking?)", self._depth, self._outbox_bytes,
            self.outbox_max_events or "no", self.outbox_max_bytes or "no", self.outbox_over_bound_events,
            extra={"db": str(self.path)})

    def shrink_summaries(self) -> int:
        """Shrink the oldest offline summaries in place until the outbox fits `outbox_max_bytes`
        (or none is left); returns the bytes saved."""
        t = outbox_table
        saved = 0
        while self._outbox_bytes > self.outbox_max_bytes:
            with self._write("shrink_summaries") as conn:
                last = self._last_seq
                start = max(self._shrunk_upto, self._last_seq - self._depth)
                if start >= last:
                    break
                end = min(start + SCAN_CHUNK, last)
                rows = conn.execute(sa.select(t.c.seq, t.c.payload).where(
                    t.c.seq > start, t.c.seq <= end, t.c.kind == str(Kind.OFFLINE_SUMMARY)).order_by(t.c.seq)).all()
                done, chunk_saved, shrunk = end, 0, 0
                for seq, payload in rows:
                    envelope = Envelope.model_validate_json(payload)
                    body = OfflineSummaryBody.model_validate(envelope.body)
                    if body.gpus:
                        small = OfflineSummaryBody(from_ts=body.from_ts, to_ts=body.to_ts, gpus=[])
                        text = envelope.model_copy(update={"body": small.model_dump(mode="json")}).to_json().decode()
                        conn.execute(t.update().where(t.c.seq == seq).values(payload=text))
                        chunk_saved += len(payload.encode()) - len(text.encode())
                        shrunk += 1
                    if self._outbox_bytes - chunk_saved <= self.outbox_max_bytes:
                        done = seq
                        break
                with self._counter_lock:
                    self._outbox_bytes -= chunk_saved
            saved += chunk_saved
            self.summaries_shrunk += shrunk
            self._shrunk_upto = done
        if saved:
            log.warning("edge outbox over %d bytes: shrank the oldest offline summaries by %d bytes (their "
                        "per-GPU statistics dropped, their time ranges and seqs kept)", self.outbox_max_bytes,
                        saved, extra={"db": str(self.path)})
        return saved

    def prune_logs(self, older_than: float, keep_rows: int) -> int:
        """Drop decisions and local event copies older than `older_than` (unix time) or beyond the
        newest `keep_rows`, never one the cloud has not acked; returns how many rows went."""
        total = 0
        for table, order in ((decisions_table, decisions_table.c.seq), (events_table, events_table.c.n)):
            while True:
                with self._write("prune_logs") as conn:
                    acked = self._last_seq - self._depth
                    cut = conn.execute(sa.select(order).order_by(order.desc()).offset(keep_rows).limit(1)
                                       ).scalar_one_or_none()
                    old = table.c.ts < older_than if cut is None else sa.or_(table.c.ts < older_than, order <= cut)
                    doomed = sa.select(order).where(table.c.seq <= acked, old).order_by(order).limit(PRUNE_CHUNK)
                    gone = int(conn.execute(table.delete().where(order.in_(doomed.scalar_subquery()))).rowcount or 0)
                total += gone
                if gone < PRUNE_CHUNK:
                    break
        return total
