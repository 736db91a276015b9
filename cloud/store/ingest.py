"""The exactly-once ingest core: a batch of edge messages applied in ONE transaction.

Events arrive at least once (MQTT QoS 1, edge retries until acked). `ingest` gives them an
exactly-once effect: a whole batch is ONE transaction, every event is keyed by
(node, outbox epoch, seq) under a unique constraint, and the node's `acked_seq` (the cumulative
ack sent back to the edge) is written in the same transaction as the events it covers. A crash
after the commit and before the ack therefore replays as duplicates, never as lost or doubled
rows. Two replicas ingesting the same node serialise on that node's row (`SELECT ... FOR UPDATE`
on PostgreSQL, `BEGIN IMMEDIATE` on SQLite); the unique constraint is the last line of defence.
The controller's ingest asks for `SKIP LOCKED` instead of waiting: a node the other replica holds
is left for its next batch (`IngestResult.deferred`).

An event whose node epoch is not yet known (no status seen) is stored under the epoch `""` and
moved to the real epoch when a status names it: "unknown" matches whatever epoch comes first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud.store.base import StoreBase
from cloud.store.schema import decisions_table, events_table, gpus_table, nodes_table, samples_table
from shared.gpu import GpuSample
from shared.logs import get_logger
from shared.protocol import (
    BODY_MODELS,
    EVENT_KINDS,
    DecisionBody,
    Envelope,
    GpuSummary,
    Kind,
    StatusBody,
    TelemetryBody,
)
from shared.topics import NODE_NAME_RE
from shared.wire import WireModel

log = get_logger(__name__)

UNKNOWN_EPOCH = ""
"""Epoch stored for events of a node whose outbox epoch no status has named yet (NOT NULL keeps
the unique constraint effective: NULLs never collide)."""

INGESTED_KINDS = frozenset({Kind.STATUS, Kind.TELEMETRY}) | EVENT_KINDS
_CHUNK_ROWS = 500  # names per `IN (...)`: far below SQLite's and PostgreSQL's bind limits
_ADVANCE_PAGE = 1000  # stored seqs read per step when walking acked_seq forward


@dataclass(frozen=True)
class Incoming:
    """One validated message from the edge, with the cloud time it was received."""

    envelope: Envelope
    body: WireModel  # already validated for envelope.kind
    received_at: float
    # The node's clock minus ours as the ingest estimates it (cloud/clock_skew.py); 0 when in
    # step. Status and sample times are kept as `ts - clock_skew`, so "a late one cannot win"
    # still holds after the edge's clock jumped back by hours.
    clock_skew: float = 0.0


@dataclass
class IngestResult:
    """What one `ingest` did, and the acks the controller must publish because of it."""

    # node -> (acked_seq, epoch): the cumulative ack for every node that sent events in the
    # batch, duplicates included (a duplicate means the edge missed our previous ack).
    acks: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    stored: int = 0
    duplicates: int = 0
    gaps: dict[str, int] = field(default_factory=dict)  # node -> events stored beyond a hole
    stale: int = 0  # events sent before a status that changed the node's epoch: dropped
    # With skip_locked: the messages of nodes another replica had locked, not applied (the
    # caller offers them again in its next batch, before anything newer).
    deferred: list[Incoming] = field(default_factory=list)


# ---- per-batch working state ----------------------------------------------------------------


@dataclass
class _NodeWork:
    """One node's row while a batch is applied to it (written back once at the end)."""

    row: dict[str, Any]
    epoch_before: str | None
    adopted_epoch: bool = False  # a status named the epoch of a node that had none
    epoch_changed: bool = False  # a status named a different epoch: acked_seq restarts
    gpu_summaries: list[GpuSummary] | None = None  # from the newest status applied
    samples: list[GpuSample] = field(default_factory=list)
    # (epoch in effect when the event arrived, the event); the epoch decides stale or not
    events: list[tuple[str | None, Incoming]] = field(default_factory=list)
    sent_events: bool = False

    @property
    def name(self) -> str:
        return str(self.row["name"])


def _chunks(rows: Sequence[Any], size: int = _CHUNK_ROWS) -> Iterator[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def epoch_key(epoch: str | None) -> str:
    """A node's outbox epoch as stored in the events and decisions tables."""
    return UNKNOWN_EPOCH if epoch is None else epoch


def _ranges(numbers: Iterable[int], limit: int = 5) -> str:
    """`[3, 4, 5, 8]` -> "3-5,8" (the first `limit` ranges), for a readable log line."""
    spans: list[tuple[int, int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], n)
        else:
            spans.append((n, n))
    text = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans[:limit])
    return text + (",..." if len(spans) > limit else "")


class IngestCore(StoreBase):
    """Writes what the edges send: node rows, GPUs, the sample history, events and decisions."""

    def ingest(self, batch: Sequence[Incoming], *, skip_locked: bool = False) -> IngestResult:
        """Apply a batch of edge messages in ONE transaction; see the module docstring.

        `skip_locked` (PostgreSQL; SQLite has one writer anyway): nodes whose row another
        replica holds are not waited for; their messages come back in `result.deferred`. Replicas
        sharing a subscription get every node's messages in turns, so without it each replica's
        batch would wait for the other's whole transaction on the nodes they share."""
        batch = list(batch)
        _check_batch(batch)  # ValueError before the database is touched
        result = IngestResult()
        if not batch:
            return result
        by_node: dict[str, list[Incoming]] = defaultdict(list)
        for item in batch:
            by_node[item.envelope.node].append(item)
        with self.writing("ingest") as conn:
            work = self._lock_nodes(conn, by_node, skip_locked)
            if len(work) < len(by_node):
                result.deferred = [item for item in batch if item.envelope.node not in work]
                if not work:
                    return result
            for name in sorted(work):
                for item in by_node[name]:
                    self._apply(work[name], item)
            self._store_events(conn, work, result)
            self._store_gpus(conn, work)
            self._store_samples(conn, work)
            self._write_nodes(conn, work)
        for w in work.values():
            if w.sent_events:
                result.acks[w.name] = (int(w.row["acked_seq"]), w.row["outbox_epoch"])
        return result

    def _lock_nodes(
        self, conn: Connection, by_node: dict[str, list[Incoming]], skip_locked: bool = False
    ) -> dict[str, _NodeWork]:
        """Create the batch's unknown nodes, then lock every node row, in name order (so two
        replicas never wait on each other in a circle); with skip_locked, only the rows no one
        else holds."""
        names = sorted(by_node)
        fresh: list[dict[str, Any]] = [
            {
                "name": name,
                "online": True,  # it is talking to us
                "first_seen": min(i.received_at for i in by_node[name]),
                "last_seen": min(i.received_at for i in by_node[name]),
                "outbox_epoch": None,
                "acked_seq": 0,
                "gaps": 0,
                "degraded": [],
                "labels": {},
            }
            for name in names
        ]
        conn.execute(
            self.insert(nodes_table).on_conflict_do_nothing(index_elements=["name"]), fresh
        )
        work: dict[str, _NodeWork] = {}
        for chunk in _chunks(names):
            rows = conn.execute(
                sa.select(nodes_table)
                .where(nodes_table.c.name.in_(chunk))
                .order_by(nodes_table.c.name)
                .with_for_update(skip_locked=skip_locked)
            )
            for row in rows:
                values = dict(row._mapping)
                work[values["name"]] = _NodeWork(row=values, epoch_before=values["outbox_epoch"])
        return work

    def _apply(self, w: _NodeWork, item: Incoming) -> None:
        """Fold one message into the node's working state, in the order it arrived."""
        env, row = item.envelope, w.row
        row["last_seen"] = max(row["last_seen"], item.received_at)
        if env.kind == Kind.STATUS:
            assert isinstance(item.body, StatusBody)
            self._apply_status(w, env, item.body, env.ts - item.clock_skew)
        elif env.kind == Kind.TELEMETRY:
            assert isinstance(item.body, TelemetryBody)
            samples = item.body.samples
            if item.clock_skew:  # onto our clock: see Incoming.clock_skew
                samples = [s.model_copy(update={"ts": s.ts - item.clock_skew}) for s in samples]
            w.samples.extend(samples)
        else:
            w.sent_events = True
            w.events.append((row["outbox_epoch"], item))

    def _apply_status(self, w: _NodeWork, env: Envelope, body: StatusBody, made: float) -> None:
        """`made`: the status's ts corrected by the node's clock skew (what status_ts keeps)."""
        row = w.row
        if body.state == "offline" and row["status_ts"] is not None and made < row["status_ts"]:
            # A last will is made when the edge connects, so it carries an old ts, but the broker
            # only publishes it when that connection dies: "offline" is true now, whatever its ts.
            # (A stale will cannot come later: the edge's next status replaces the retained one.)
            row["online"] = False
            log.info("node went offline (last will)", extra={"node": w.name, "msg_id": env.id})
            return
        if row["status_ts"] is not None and made < row["status_ts"]:
            log.info(
                "older status ignored (out-of-order delivery)",
                extra={"node": w.name, "msg_id": env.id, "status_ts": row["status_ts"]},
            )
            return
        row.update(
            status_ts=made,
            online=body.state == "online",
            daemon_version=body.version,
            policy_name=body.policy_name,
            policy_version=body.policy_version,
            outbox_depth=body.outbox_depth,
            degraded=list(body.degraded),
        )
        w.gpu_summaries = list(body.gpus)
        new_epoch = body.outbox_epoch
        if new_epoch is None or new_epoch == row["outbox_epoch"]:
            return  # an edge that does not say keeps the epoch it had
        if row["outbox_epoch"] is None:
            # The first epoch named: events so far (stored under "unknown") belong to it.
            w.adopted_epoch = True
            w.events = [(new_epoch if tag is None else tag, item) for tag, item in w.events]
        else:
            log.warning(
                "node outbox epoch changed (its database was re-created): acked_seq restarts",
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

    def _store_events(self, conn: Connection, work: dict[str, _NodeWork], out: IngestResult) -> None:
        """Insert the new events of every node (one statement per chunk), then move acked_seq."""
        candidates: list[tuple[_NodeWork, Incoming]] = []
        for w in work.values():
            if w.adopted_epoch:
                self._relabel_unknown_epoch(conn, w)
            epoch = w.row["outbox_epoch"]
            current: dict[int, Incoming] = {}
            for tag, item in w.events:
                if tag != epoch:
                    out.stale += 1
                    log.warning(
                        "event from before the node's epoch change dropped",
                        extra={"node": w.name, "msg_id": item.envelope.id,
                               "seq": item.envelope.seq, "epoch": tag},
                    )
                    continue
                seq = int(item.envelope.seq or 0)
                if seq in current or seq <= w.row["acked_seq"]:
                    out.duplicates += 1
                else:
                    current[seq] = item
            candidates.extend((w, current[seq]) for seq in sorted(current))

        stored: set[tuple[str, int]] = set()
        rows = [
            {
                "node": w.name,
                "epoch": epoch_key(w.row["outbox_epoch"]),
                "seq": item.envelope.seq,
                "msg_id": item.envelope.id,
                "kind": str(item.envelope.kind),
                "ts": item.envelope.ts,
                "received_at": item.received_at,
                "body": item.envelope.body,
            }
            for w, item in candidates
        ]
        if rows:
            inserted = conn.execute(
                self.insert(events_table)
                .on_conflict_do_nothing(index_elements=["node", "epoch", "seq"])
                .returning(events_table.c.node, events_table.c.seq),
                rows,
            )
            stored.update((node, int(seq)) for node, seq in inserted)
        out.stored += len(stored)
        out.duplicates += len(candidates) - len(stored)

        decisions = [
            _decision_row(w, item)
            for w, item in candidates
            if item.envelope.kind == Kind.DECISION and (w.name, item.envelope.seq) in stored
        ]
        if decisions:
            conn.execute(
                self.insert(decisions_table).on_conflict_do_nothing(
                    index_elements=["node", "epoch", "seq"]
                ),
                decisions,
            )

        new_seqs: dict[str, list[int]] = defaultdict(list)
        for node, seq in stored:
            new_seqs[node].append(seq)
        for w in work.values():
            if w.sent_events or w.epoch_changed or w.adopted_epoch:
                self._advance_acked(conn, w, sorted(new_seqs.get(w.name, [])), out)

    def _relabel_unknown_epoch(self, conn: Connection, w: _NodeWork) -> None:
        """Events stored before the node's epoch was known are moved to that epoch."""
        for table in (events_table, decisions_table):
            conn.execute(
                table.update()
                .where(table.c.node == w.name, table.c.epoch == UNKNOWN_EPOCH)
                .values(epoch=w.row["outbox_epoch"])
            )

    def _advance_acked(
        self, conn: Connection, w: _NodeWork, new_seqs: list[int], out: IngestResult
    ) -> None:
        """Move acked_seq over every consecutive stored seq; count new events beyond a hole."""
        t = events_table
        acked = int(w.row["acked_seq"])
        epoch = epoch_key(w.row["outbox_epoch"])
        beyond: list[int] = []
        while True:
            page = list(
                conn.execute(
                    sa.select(t.c.seq)
                    .where(t.c.node == w.name, t.c.epoch == epoch, t.c.seq > acked)
                    .order_by(t.c.seq)
                    .limit(_ADVANCE_PAGE)
                ).scalars()
            )
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
                "missing": _ranges(missing),
                "beyond_hole": len(past_hole),
            },
        )

    def _store_gpus(self, conn: Connection, work: dict[str, _NodeWork]) -> None:
        """Merge status summaries and latest samples into the `gpus` rows of the batch's nodes.

        Written without reading the rows first (the read was most of the cost of telemetry):
        summaries and samples each upsert only their own columns, and "a late sample never
        replaces a newer one" is the upsert's WHERE. Only nodes with a status in the batch read
        their GPU keys, to drop GPUs the inventory no longer lists."""
        g = gpus_table
        summaries: dict[tuple[str, str], dict[str, Any]] = {}
        newest: dict[tuple[str, str], GpuSample] = {}
        power_limit: dict[tuple[str, str], float] = {}
        for w in work.values():
            now = w.row["last_seen"]
            for s in w.gpu_summaries or ():  # an empty list is more likely a broken driver than no GPUs
                summaries[(w.name, s.uuid)] = {
                    "node": w.name, "uuid": s.uuid, "index": s.index, "name": s.name,
                    "health": str(s.health), "power_limit_w": s.power_limit_w, "sample": None,
                    "sample_ts": None, "updated_at": now, "pci_bus_id": s.pci_bus_id,
                    "driver_version": s.driver_version,
                }
            for sample in sorted(w.samples, key=lambda x: x.ts):  # the newest of the batch wins
                newest[(w.name, sample.uuid)] = sample
                if sample.power_limit_w is not None:
                    power_limit[(w.name, sample.uuid)] = sample.power_limit_w
        with_status = [w.name for w in work.values() if w.gpu_summaries]
        for chunk in _chunks(with_status):
            gone = [
                (node, uuid)
                for node, uuid in conn.execute(sa.select(g.c.node, g.c.uuid).where(g.c.node.in_(chunk)))
                if (node, uuid) not in summaries and (node, uuid) not in newest  # telemetry: still there
            ]
            for node, uuid in gone:
                conn.execute(g.delete().where(g.c.node == node, g.c.uuid == uuid))
        # executemany of one cached statement each: SQLAlchemy batches it into multi-row INSERTs
        # ("insertmanyvalues") instead of compiling a new multi-row statement for every batch
        if summaries:
            stmt = self.insert(g)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["node", "uuid"],
                    set_={c: stmt.excluded[c] for c in _GPU_SUMMARY_COLUMNS},
                ),
                list(summaries.values()),
            )
        if newest:
            rows = [
                {"node": node, "uuid": uuid, "index": sample.index, "name": None, "health": None,
                 "power_limit_w": power_limit.get((node, uuid)), "sample": sample.model_dump(mode="json"),
                 "sample_ts": sample.ts, "updated_at": work[node].row["last_seen"]}
                for (node, uuid), sample in newest.items()
            ]
            stmt = self.insert(g)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["node", "uuid"],
                    set_={
                        **{c: stmt.excluded[c] for c in ("index", "sample", "sample_ts", "updated_at")},
                        "power_limit_w": sa.func.coalesce(stmt.excluded["power_limit_w"], g.c.power_limit_w),
                    },
                    where=sa.or_(g.c.sample_ts.is_(None), stmt.excluded["sample_ts"] >= g.c.sample_ts),
                ),
                rows,
            )

    def _store_samples(self, conn: Connection, work: dict[str, _NodeWork]) -> None:
        """Downsample telemetry into `samples`: at most one row per GPU per resolution."""
        with_samples = [w for w in work.values() if w.samples]
        if not with_samples:
            return
        s = samples_table
        last: dict[tuple[str, str], float] = {}
        for chunk in _chunks([w.name for w in with_samples]):
            query = (
                sa.select(s.c.node, s.c.uuid, sa.func.max(s.c.ts))
                .where(s.c.node.in_(chunk))
                .group_by(s.c.node, s.c.uuid)
            )
            for node, uuid, ts in conn.execute(query):
                last[(node, uuid)] = float(ts)
        rows: list[dict[str, Any]] = []
        for w in with_samples:
            for sample in sorted(w.samples, key=lambda x: x.ts):
                key = (w.name, sample.uuid)
                previous = last.get(key)
                if previous is not None and sample.ts - previous < self.history_resolution_s:
                    continue
                last[key] = sample.ts
                rows.append(
                    {
                        "node": w.name,
                        "uuid": sample.uuid,
                        "ts": sample.ts,
                        "temperature_c": sample.temperature_c,
                        "power_w": sample.power_w,
                        "power_limit_w": sample.power_limit_w,
                        "utilization_pct": sample.utilization_pct,
                        "memory_used_bytes": sample.memory_used_bytes,
                    }
                )
        for chunk in _chunks(rows):
            conn.execute(s.insert(), list(chunk))

    def _write_nodes(self, conn: Connection, work: dict[str, _NodeWork]) -> None:
        """Write every node row back (acked_seq in the same transaction as its events)."""
        t = nodes_table
        stmt = (
            t.update()
            .where(t.c.name == sa.bindparam("b_name"))
            .values({c: sa.bindparam(f"b_{c}") for c in _NODE_MUTABLE})
        )
        params = [
            {"b_name": w.name, **{f"b_{c}": w.row[c] for c in _NODE_MUTABLE}}
            for w in work.values()
        ]
        conn.execute(stmt, params)

    def mark_offline(self, node: str, ts: float) -> None:
        """The broker says the node is gone (its last will), at cloud time `ts`.

        Ignored if we heard from the node after `ts` (a will delivered late must not hide a
        node that is back). The edge's status_ts is not touched: it is on the edge's clock."""
        if not NODE_NAME_RE.match(node):
            raise ValueError(f"not a valid node name: {node!r}")
        t = nodes_table
        with self.writing("mark_offline") as conn:
            conn.execute(
                self.insert(t)
                .values(name=node, online=False, first_seen=ts, last_seen=ts, acked_seq=0,
                        gaps=0, degraded=[], labels={})
                .on_conflict_do_nothing(index_elements=["name"])
            )
            result = conn.execute(
                t.update().where(t.c.name == node, t.c.last_seen <= ts).values(online=False)
            )
        if result.rowcount:
            log.info("node marked offline", extra={"node": node})
        else:
            log.info("late offline notice ignored: node seen since", extra={"node": node})



_NODE_MUTABLE = (
    "online", "last_seen", "daemon_version", "policy_name", "policy_version", "outbox_depth",
    "outbox_epoch", "acked_seq", "gaps", "degraded", "status_ts",
)
_GPU_SUMMARY_COLUMNS = (  # what a status sets
    "index", "name", "health", "power_limit_w", "updated_at", "pci_bus_id", "driver_version")


def _check_batch(batch: Sequence[Incoming]) -> None:
    """Refuse a batch holding anything the cloud does not ingest, before any write."""
    for item in batch:
        env = item.envelope
        if env.kind not in INGESTED_KINDS:
            raise ValueError(
                f"{env.kind!s} is a cloud-to-edge kind; the fleet store ingests only status, "
                "telemetry and events"
            )
        model = BODY_MODELS[env.kind]
        if not isinstance(item.body, model):
            raise ValueError(
                f"{env.kind!s} message {env.id} carries {type(item.body).__name__}, "
                f"not {model.__name__}"
            )
        if env.kind in EVENT_KINDS and (env.seq is None or env.seq < 1):
            raise ValueError(
                f"{env.kind!s} event {env.id} from {env.node} has no seq (got {env.seq!r}); "
                "events come from the outbox and are numbered from 1"
            )


def _decision_row(w: _NodeWork, item: Incoming) -> dict[str, Any]:
    body = item.body
    assert isinstance(body, DecisionBody)
    return {
        "node": w.name,
        "epoch": epoch_key(w.row["outbox_epoch"]),
        "seq": item.envelope.seq,
        "ts": item.envelope.ts,
        "gpu_uuid": body.gpu_uuid,
        "rule": body.rule,
        "action": body.action,
        "value": body.value,
        "outcome": str(body.outcome),
        "reason": body.reason,
        "policy_version": body.policy_version,
    }
