"""Outbox epochs and the two ways a database goes back in time, as the fleet store sees them.

A node's events are keyed by (node, outbox epoch, seq). Two failures break the promise that a
seq names one event, and each is told apart here from an ordinary duplicate or hole:

- **the edge's database went back** (a backup restored, its WAL lost): the edge numbers new
  events with seqs the cloud already holds, in the same epoch. An event whose (node, epoch, seq)
  is stored under a *different* envelope id is a **conflict**, not a duplicate: it is not
  stored, nothing from that seq on is acked, and the ack says `conflict`, on which the edge
  starts a new epoch and renumbers what it has not had acked (docs/protocol.md);
- **the fleet database went back** (restored from a backup, replaced by an empty one): the
  edge's status says up to which seq a cloud acked it before (`outbox_acked`); the store moves
  the node's acked_seq up to there, so delivery resumes at once instead of waiting forever at a
  hole the edge can never fill (it deleted those events when they were acked).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud.store.base import StoreBase
from cloud.store.batch import Incoming, IngestResult, NodeWork
from cloud.store.schema import decisions_table, events_table
from shared.logs import get_logger
from shared.protocol import Envelope

log = get_logger(__name__)

UNKNOWN_EPOCH = ""
"""Epoch stored for events of a node whose outbox epoch no status has named yet (NOT NULL keeps
the unique constraint effective: NULLs never collide)."""

_CHUNK_SEQS = 500  # seqs per `IN (...)`: far below SQLite's and PostgreSQL's bind limits
_ADVANCE_PAGE = 1000  # stored seqs read per step when walking acked_seq forward
_FLOOR_STORED_SCAN = 10_000  # stored seqs read to name what a restored floor skips


def epoch_key(epoch: str | None) -> str:
    """A node's outbox epoch as stored in the events and decisions tables."""
    return UNKNOWN_EPOCH if epoch is None else epoch


def seq_ranges(numbers: Iterable[int], limit: int = 5) -> str:
    """`[3, 4, 5, 8]` -> "3-5,8" (the first `limit` ranges), for a readable log line."""
    spans: list[tuple[int, int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], n)
        else:
            spans.append((n, n))
    return _spans_text(spans, limit)


def missing_ranges(low: int, high: int, present: Sequence[int], limit: int = 5) -> str:
    """The seqs in `low..high` that are not in `present` (sorted), as "1-99,101" text, without
    listing them one by one (a replaced database may miss millions)."""
    spans: list[tuple[int, int]] = []
    start = low
    for seq in present:
        if seq < start or seq > high:
            continue
        if seq > start:
            spans.append((start, seq - 1))
        start = seq + 1
    if start <= high:
        spans.append((start, high))
    return _spans_text(spans, limit) if spans else "none"


def _spans_text(spans: list[tuple[int, int]], limit: int) -> str:
    text = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans[:limit])
    return text + (",..." if len(spans) > limit else "")


def conflicting_seqs(conn: Connection, node: str, epoch: str | None, sent: dict[int, str]) -> list[int]:
    """The seqs of `sent` (seq -> envelope id) stored for this node and epoch under another
    envelope id: events the edge numbered again after its database went back. A seq not stored
    (pruned by retention) cannot be told apart from a duplicate and is taken as one."""
    t = events_table
    seqs = sorted(sent)
    found: list[int] = []
    for start in range(0, len(seqs), _CHUNK_SEQS):
        rows = conn.execute(
            sa.select(t.c.seq, t.c.msg_id).where(
                t.c.node == node, t.c.epoch == epoch_key(epoch), t.c.seq.in_(seqs[start : start + _CHUNK_SEQS])
            )
        )
        found.extend(int(seq) for seq, msg_id in rows if msg_id != sent[int(seq)])
    return sorted(found)


def drop_events_from(conn: Connection, node: str, epoch: str | None, seqs: Sequence[int]) -> None:
    """Delete events just inserted that belong to a history the edge is about to renumber."""
    t = events_table
    for start in range(0, len(seqs), _CHUNK_SEQS):
        conn.execute(
            t.delete().where(
                t.c.node == node, t.c.epoch == epoch_key(epoch), t.c.seq.in_(list(seqs[start : start + _CHUNK_SEQS]))
            )
        )


def log_restored_floor(conn: Connection, node: str, epoch: str | None, old: int, new: int) -> None:
    """One WARNING naming the node and the seqs the fleet database does not have."""
    t = events_table
    present = list(
        conn.execute(
            sa.select(t.c.seq)
            .where(t.c.node == node, t.c.epoch == epoch_key(epoch), t.c.seq > old, t.c.seq <= new)
            .order_by(t.c.seq)
            .limit(_FLOOR_STORED_SCAN)
        ).scalars()
    )
    log.warning(
        "node %s says seqs up to %d were acked before by a controller whose database this is not: "
        "restored or replaced fleet database; acked_seq moves from %d to %d, and the events %s of "
        "epoch %s are not in this database (the edge deleted them when they were acked)",
        node, new, old, new, missing_ranges(old + 1, new, present), epoch,
        extra={"node": node, "epoch": epoch, "old_acked_seq": old, "acked_seq": new},
    )


class ConflictLedger:
    """The lowest conflicting seq found per node in its current epoch, kept by this process.

    From that seq on, nothing of the epoch is stored or acked: everything the edge numbered
    there after going back in time comes again, renumbered in its new epoch. A controller that
    restarts finds the conflict again at the edge's next re-send (it re-sends in seq order from
    its last ack, so the first conflicting seq comes before any later one)."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    def first(self, node: str, epoch: str | None) -> int | None:
        """The first conflicting seq of the node's `epoch`, or None."""
        with self._lock:
            held = self._first.get(node)
        return held[1] if held is not None and held[0] == epoch_key(epoch) else None

    def note(self, node: str, epoch: str | None, seq: int) -> bool:
        """Record a conflicting seq; True when it is the node's first in this epoch (log it)."""
        key = epoch_key(epoch)
        with self._lock:
            held = self._first.get(node)
            if held is not None and held[0] == key:
                self._first[node] = (key, min(held[1], seq))
                return False
            self._first[node] = (key, seq)
            return True

    def forget(self, node: str) -> None:
        """The node started another epoch: its old conflict no longer matters."""
        with self._lock:
            self._first.pop(node, None)


# ---- the ingest's epoch steps (called by cloud/store/ingest.py, inside its transaction) -----


def switch_epoch(w: NodeWork, env: Envelope, new_epoch: str, ledger: ConflictLedger) -> None:
    """A status names another outbox epoch than the node's: adopt it, or restart acked_seq."""
    row = w.row
    w.floor_from = None  # a floor raised earlier in the batch was for the old epoch
    ledger.forget(w.name)
    if row["outbox_epoch"] is None:
        # The first epoch named: events so far (stored under "unknown") belong to it.
        w.adopted_epoch = True
        w.events = [(new_epoch if tag is None else tag, item) for tag, item in w.events]
    else:
        log.warning(
            "node outbox epoch changed (its database was re-created, or it went back in time): "
            "acked_seq restarts",
            extra={
                "node": w.name,
                "msg_id": env.id,
                "old_epoch": row["outbox_epoch"],
                "new_epoch": new_epoch,
                "old_acked_seq": row["acked_seq"],
            },
        )
        w.epoch_changed = True
        row["acked_seq"] = 0
    row["outbox_epoch"] = new_epoch


def relabel_unknown_epoch(conn: Connection, w: NodeWork) -> None:
    """Events stored before the node's epoch was known are moved to that epoch."""
    for table in (events_table, decisions_table):
        conn.execute(
            table.update()
            .where(table.c.node == w.name, table.c.epoch == UNKNOWN_EPOCH)
            .values(epoch=w.row["outbox_epoch"])
        )


def sort_already_stored(
    conn: Connection, work: dict[str, NodeWork], seen_before: list[tuple[NodeWork, Incoming]],
    stored: set[tuple[str, int]], out: IngestResult, ledger: ConflictLedger,
) -> None:
    """Sort the events whose seq was stored already into duplicates (same envelope id) and
    conflicts (another id). Events of this batch stored beyond a node's first conflict are
    taken out again (`stored` too): they belong to the history the edge will renumber."""
    sent: dict[str, dict[int, str]] = defaultdict(dict)
    for w, item in seen_before:
        sent[w.name][int(item.envelope.seq or 0)] = item.envelope.id
    for name, by_seq in sent.items():
        epoch = work[name].row["outbox_epoch"]
        found = conflicting_seqs(conn, name, epoch, by_seq)
        out.duplicates += len(by_seq) - len(found)
        if not found:
            continue
        out.conflicts += len(found)
        if ledger.note(name, epoch, found[0]):
            log.error(
                "node %s sent seqs %s of epoch %s with other envelope ids than the events "
                "stored under them: its database went back in time (a restored backup, a "
                "lost WAL). Not stored; acked only up to seq %d, and the ack asks the edge "
                "to start a new outbox epoch and send them again",
                name, seq_ranges(found), epoch, found[0] - 1,
                extra={"node": name, "epoch": epoch, "conflicts": seq_ranges(found)},
            )
        first = ledger.first(name, epoch)
        assert first is not None
        beyond = sorted(seq for node, seq in stored if node == name and seq > first)
        if beyond:
            drop_events_from(conn, name, epoch, beyond)
            stored.difference_update((name, seq) for seq in beyond)
            out.conflicts += len(beyond)


# The next seqs a node has stored above its acked_seq: one statement for every call (a statement
# built per call cost SQLAlchemy ~300 µs of Python, once per node per batch of a catch-up).
_STORED_ABOVE = (
    sa.select(events_table.c.seq)
    .where(events_table.c.node == sa.bindparam("node"), events_table.c.epoch == sa.bindparam("epoch"),
           events_table.c.seq > sa.bindparam("above"))
    .order_by(events_table.c.seq)
    .limit(_ADVANCE_PAGE)
)


def _stored_above_query() -> sa.Select[tuple[int]]:
    return _STORED_ABOVE


def advance_acked(store: StoreBase, conn: Connection, w: NodeWork, new_seqs: list[int], out: IngestResult) -> None:
    """Move acked_seq over every consecutive stored seq; count new events beyond a hole. A floor
    a status raised in this batch (a restored fleet database) is logged and counted here."""
    acked = int(w.row["acked_seq"])
    if w.floor_from is not None:
        log_restored_floor(conn, w.name, w.row["outbox_epoch"], w.floor_from, acked)
        out.restored[w.name] = (w.floor_from, acked)
    epoch = epoch_key(w.row["outbox_epoch"])
    beyond: list[int] = []
    while True:
        page = [int(seq) for seq in store.fetch_scalars(
            conn, "stored_above", _stored_above_query,
            {"node": w.name, "epoch": epoch, "above": acked})]
        for i, seq in enumerate(page):
            if seq != acked + 1:
                beyond = page[i:]
                break
            acked = seq
        if beyond or len(page) < _ADVANCE_PAGE:
            break
    w.row["acked_seq"] = acked
    past_hole = [seq for seq in new_seqs if seq > acked]
    if not past_hole:
        return
    w.row["gaps"] = int(w.row["gaps"]) + len(past_hole)
    out.gaps[w.name] = out.gaps.get(w.name, 0) + len(past_hole)
    present = set(beyond)
    missing = [s for s in range(acked + 1, beyond[-1]) if s not in present] if beyond else []
    log.warning(
        "events beyond a hole in seq: stored, not acked until the missing ones arrive",
        extra={
            "node": w.name,
            "epoch": w.row["outbox_epoch"],
            "acked_seq": acked,
            "missing": seq_ranges(missing),
            "beyond_hole": len(past_hole),
        },
    )
