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

A database that went back in time is told apart from a duplicate or a hole (cloud/store/epochs.py):
an event stored under its (node, epoch, seq) with another envelope id is a *conflict* (the edge's
database went back: the ack asks it for a new epoch), and a status whose `outbox_acked` is above
the node's acked_seq raises it (the fleet database went back: delivery resumes at once).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud.store.batch import Incoming, IngestResult, NodeWork, chunks
from cloud.store.epochs import (
    UNKNOWN_EPOCH,
    ConflictLedger,
    advance_acked,
    epoch_key,
    relabel_unknown_epoch,
    sort_already_stored,
    switch_epoch,
)
from cloud.store.latest import GpuKey, LatestSample, LatestSamples
from cloud.store.raw_history import RawHistoryWriter
from cloud.store.schema import decisions_table, events_table, gpus_table, nodes_table
from shared.gpu import GpuSample
from shared.logs import get_logger
from shared.protocol import (
    BODY_MODELS,
    EVENT_KINDS,
    DecisionBody,
    Envelope,
    Kind,
    StatusBody,
    TelemetryBody,
    TelemetryBodyStruct,
)
from shared.topics import NODE_NAME_RE
from shared.wire_structs import SampleFigures

log = get_logger(__name__)

__all__ = ["UNKNOWN_EPOCH", "Incoming", "IngestCore", "IngestResult", "epoch_key"]

INGESTED_KINDS = frozenset({Kind.STATUS, Kind.TELEMETRY}) | EVENT_KINDS
# decode_and_check(typed_body_only=True) gives the Struct; in-process callers may give the model
TELEMETRY_BODIES = (TelemetryBodyStruct, TelemetryBody)


class IngestCore(RawHistoryWriter):
    """Writes what the edges send: node rows, GPUs, the sample history (cloud/store/raw_history.py),
    events and decisions."""

    def __init__(self, *args: Any, latest_sample_every: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conflict_ledger = ConflictLedger()
        # `gpus.sample` at most once per this many seconds of sample time per GPU (cloud/store/latest.py)
        self.latest = LatestSamples(latest_sample_every)

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
            if w.sent_events or w.floor_from is not None:
                upto, epoch = int(w.row["acked_seq"]), w.row["outbox_epoch"]
                first_conflict = self.conflict_ledger.first(w.name, epoch)
                if first_conflict is not None and w.sent_events:
                    result.conflicted.add(w.name)
                    upto = min(upto, first_conflict - 1)
                result.acks[w.name] = (upto, epoch)
        return result

    def _lock_nodes(
        self, conn: Connection, by_node: dict[str, list[Incoming]], skip_locked: bool = False
    ) -> dict[str, NodeWork]:
        """Create the batch's unknown nodes, then lock every node row, in name order (so two
        replicas never wait on each other in a circle); with skip_locked, only the rows no one
        else holds."""
        names = sorted(by_node)
        empty_list, empty_map = self.json_param([]), self.json_param({})  # JSON columns (execute_many)
        fresh = [
            # name, online (it is talking to us), first_seen, last_seen, outbox_epoch, acked_seq, gaps,
            # degraded, labels
            (name, True, seen, seen, None, 0, 0, empty_list, empty_map)
            for name in names
            for seen in (min(i.received_at for i in by_node[name]),)
        ]
        self.execute_many(
            conn, "nodes:fresh",
            lambda: self.insert(nodes_table).on_conflict_do_nothing(index_elements=["name"]),
            _FRESH_NODE_COLUMNS, fresh,
        )
        work: dict[str, NodeWork] = {}
        for chunk in chunks(names):
            rows = conn.execute(
                sa.select(*(nodes_table.c[c] for c in ("name", *_NODE_MUTABLE)))  # not the labels: not ours
                .where(nodes_table.c.name.in_(chunk))
                .order_by(nodes_table.c.name)
                .with_for_update(skip_locked=skip_locked)
            )
            for row in rows:
                values = dict(row._mapping)
                work[values["name"]] = NodeWork(row=values, epoch_before=values["outbox_epoch"], loaded=dict(values))
        return work

    def _apply(self, w: NodeWork, item: Incoming) -> None:
        """Fold one message into the node's working state, in the order it arrived."""
        env, row = item.envelope, w.row
        row["last_seen"] = max(row["last_seen"], item.received_at)
        if env.kind == Kind.STATUS:
            assert isinstance(item.body, StatusBody)
            self._apply_status(w, env, item.body, env.ts - item.clock_skew)
        elif env.kind == Kind.TELEMETRY:
            assert isinstance(item.body, TELEMETRY_BODIES)
            skew = item.clock_skew  # onto our clock: see Incoming.clock_skew (the copy only where stored whole)
            if item.body.samples:
                w.messages.append([(s.ts - skew, s) for s in item.body.samples])
        else:
            w.sent_events = True
            w.events.append((row["outbox_epoch"], item))

    def _apply_status(self, w: NodeWork, env: Envelope, body: StatusBody, made: float) -> None:
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
            pod_map_source=body.pod_map_source,
        )
        w.gpu_summaries = list(body.gpus)
        new_epoch = body.outbox_epoch
        if new_epoch is None:
            return  # an edge that does not say keeps the epoch it had
        if new_epoch != row["outbox_epoch"]:
            switch_epoch(w, env, new_epoch, self.conflict_ledger)
        if body.outbox_acked is not None and body.outbox_acked > row["acked_seq"]:
            # A controller acked these before, and this database does not hold them: it was
            # restored from a backup or replaced. The edge deleted them; waiting is forever.
            if w.floor_from is None:
                w.floor_from = int(row["acked_seq"])
            row["acked_seq"] = body.outbox_acked

    def _store_events(self, conn: Connection, work: dict[str, NodeWork], out: IngestResult) -> None:
        """Insert the new events of every node (one statement per chunk), then move acked_seq.

        A seq already stored is a duplicate only if it is stored with the same envelope id;
        under another id it is a conflict (cloud/store/epochs.py), and from the node's first
        conflicting seq on nothing of its epoch is stored (the edge sends it again, renumbered)."""
        candidates: list[tuple[NodeWork, Incoming]] = []
        seen_before: list[tuple[NodeWork, Incoming]] = []  # at or below acked_seq: stored already?
        for w in work.values():
            if w.adopted_epoch:
                relabel_unknown_epoch(conn, w)
            epoch = w.row["outbox_epoch"]
            first_conflict = self.conflict_ledger.first(w.name, epoch)
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
                if first_conflict is not None and seq >= first_conflict:
                    out.conflicts += 1  # the edge's diverged history: it comes again, renumbered
                elif seq in current:
                    out.duplicates += 1
                elif seq <= w.row["acked_seq"]:
                    seen_before.append((w, item))
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
        seen_before += [(w, item) for w, item in candidates if (w.name, item.envelope.seq) not in stored]
        sort_already_stored(conn, work, seen_before, stored, out, self.conflict_ledger)
        out.stored += len(stored)

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
            if w.sent_events or w.epoch_changed or w.adopted_epoch or w.floor_from is not None:
                advance_acked(self, conn, w, sorted(new_seqs.get(w.name, [])), out)

    def _store_gpus(self, conn: Connection, work: dict[str, NodeWork]) -> None:
        """Merge status summaries and latest samples into the `gpus` rows of the batch's nodes.

        Written without reading the rows first (the read was most of the cost of telemetry):
        summaries and samples each upsert only their own columns, and "a late sample never
        replaces a newer one" is the upsert's WHERE. Only nodes with a status in the batch read
        their GPU keys, to drop GPUs the inventory no longer lists."""
        g = gpus_table
        as_json = self.json_param  # JSON columns (execute_many)
        summaries: dict[tuple[str, str], tuple[Any, ...]] = {}  # in the order of _GPU_SUMMARY_INSERT
        newest: dict[GpuKey, LatestSample] = {}
        for w in work.values():
            now = w.row["last_seen"]
            for s in w.gpu_summaries or ():  # an empty list is more likely a broken driver than no GPUs
                summaries[(w.name, s.uuid)] = (
                    w.name, s.uuid, s.index, s.name, str(s.health), s.power_limit_w, now, s.pci_bus_id,
                    s.driver_version, as_json(list(s.pods)), s.remediation, s.vendor, s.backend, s.platform,
                    s.resource_name, as_json(list(s.capabilities) if s.capabilities is not None else None),
                )  # sample and sample_ts are left out: NULL until telemetry sets them
            name = w.name
            latest: dict[str, tuple[float, SampleFigures]] = {}
            power_limit: dict[str, tuple[float, float]] = {}  # uuid -> (ts, the newest limit sent)
            for message in w.messages:  # the newest of the batch wins; of equal ts, the later one
                for ts, sample in message:
                    uuid = sample.uuid
                    known = latest.get(uuid)
                    if known is None or ts >= known[0]:
                        latest[uuid] = (ts, sample)
                    enforced = sample.power_limit_w
                    if enforced is not None and ts >= power_limit.get(uuid, _NEVER)[0]:
                        power_limit[uuid] = (ts, enforced)
            for uuid, (ts, sample) in latest.items():
                limit_at = power_limit.get(uuid)
                newest[(name, uuid)] = LatestSample(ts, sample, limit_at[1] if limit_at else None, now)
        with_status = [w.name for w in work.values() if w.gpu_summaries]
        for chunk in chunks(with_status):
            gone = [
                (node, uuid)
                for node, uuid in conn.execute(sa.select(g.c.node, g.c.uuid).where(g.c.node.in_(chunk)))
                if (node, uuid) not in summaries and (node, uuid) not in newest  # telemetry: still there
            ]
            for node, uuid in gone:
                conn.execute(g.delete().where(g.c.node == node, g.c.uuid == uuid))
            self.latest.forget(gone)

        def summary_upsert() -> Any:
            stmt = self.insert(g)
            return stmt.on_conflict_do_update(index_elements=["node", "uuid"],
                                              set_={c: stmt.excluded[c] for c in _GPU_SUMMARY_COLUMNS})

        self.execute_many(conn, "gpu_summaries", summary_upsert, _GPU_SUMMARY_INSERT, list(summaries.values()))
        if newest or self.latest.waiting:
            self._write_latest(conn, self.latest.choose(newest))

    def latest_due_in(self) -> float | None:
        """Seconds until a latest sample that waits is due (0: now), None when none waits. Read
        between writes (the writer thread alone changes what waits)."""
        return self.latest.due_in()

    def flush_latest(self, *, everything: bool = False) -> int:
        """Write the latest samples that waited long enough (all of them with `everything`, at
        shutdown): the ingest calls it while no batch comes (cloud/store/latest.py). How many."""
        due = self.latest.flush(everything=everything)
        if due:
            with self.writing("latest_samples") as conn:
                self._write_latest(conn, due)
        return len(due)

    def _write_latest(self, conn: Connection, chosen: dict[GpuKey, LatestSample]) -> None:
        """Upsert the chosen latest samples into `gpus`: "a late sample never replaces a newer
        one" is the upsert's WHERE."""
        g = gpus_table
        raw = self.raw_sqlite  # the sample column as its JSON text (execute_many)
        rows = [
            (node, uuid, latest.sample.index, None, None, latest.power_limit_w,
             _stored_sample(latest.sample, latest.ts, as_text=raw), latest.ts, latest.updated_at)
            for (node, uuid), latest in chosen.items()
        ]

        def upsert() -> Any:
            stmt = self.insert(g)
            return stmt.on_conflict_do_update(
                index_elements=["node", "uuid"],
                set_={
                    **{c: stmt.excluded[c] for c in ("index", "sample", "sample_ts", "updated_at")},
                    "power_limit_w": sa.func.coalesce(stmt.excluded["power_limit_w"], g.c.power_limit_w),
                },
                where=sa.or_(g.c.sample_ts.is_(None), stmt.excluded["sample_ts"] >= g.c.sample_ts),
            )

        self.execute_many(conn, "gpu_samples", upsert, _GPU_SAMPLE_COLUMNS, rows)

    def _write_nodes(self, conn: Connection, work: dict[str, NodeWork]) -> None:
        """Write the node rows back (acked_seq in the same transaction as its events): a node
        that sent only telemetry, its `last_seen` alone (most of them, most of the time); one
        whose status or events changed more, every column the ingest keeps."""
        t = nodes_table
        json_columns = {c for c in _NODE_MUTABLE if isinstance(t.c[c].type, sa.JSON)}
        seen_only: list[tuple[Any, ...]] = []
        whole: list[tuple[Any, ...]] = []
        for w in work.values():
            row, loaded = w.row, w.loaded
            changed = [c for c in _NODE_MUTABLE if row[c] != loaded[c]]
            if changed == ["last_seen"]:
                seen_only.append((w.name, row["last_seen"]))
            elif changed:
                whole.append((w.name, *(self.json_param(row[c]) if c in json_columns else row[c]
                                        for c in _NODE_MUTABLE)))
        for columns, rows in ((("last_seen",), seen_only), (_NODE_MUTABLE, whole)):
            self.execute_many(
                conn, f"nodes:{','.join(columns)}",
                lambda columns=columns: t.update().where(t.c.name == sa.bindparam("b_name"))  # type: ignore[misc]
                .values({c: sa.bindparam(f"b_{c}") for c in columns}),
                ("b_name", *(f"b_{c}" for c in columns)), rows)

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
    "outbox_epoch", "acked_seq", "gaps", "degraded", "status_ts", "pod_map_source",
)
_GPU_SUMMARY_COLUMNS = (  # what a status sets
    "index", "name", "health", "power_limit_w", "updated_at", "pci_bus_id", "driver_version", "pods",
    "remediation", "vendor", "backend", "platform", "resource_name", "capabilities")


_GPU_SUMMARY_INSERT = ("node", "uuid", *_GPU_SUMMARY_COLUMNS)  # a status's GPU row (no sample: SQL NULL)


_FRESH_NODE_COLUMNS = (  # a node row made by the first message of a node not known yet
    "name", "online", "first_seen", "last_seen", "outbox_epoch", "acked_seq", "gaps", "degraded", "labels")
_GPU_SAMPLE_COLUMNS = (  # what a sample sets (the upsert of _store_gpus)
    "node", "uuid", "index", "name", "health", "power_limit_w", "sample", "sample_ts", "updated_at")
_NEVER = (-math.inf, 0.0)


_encode_json = msgspec.json.Encoder().encode


def _stored_sample(sample: SampleFigures, ts: float, *, as_text: bool) -> str | dict[str, Any]:
    """The latest sample as the `gpus.sample` column keeps it, whole, with its ts on our clock
    (Incoming.clock_skew): JSON text for the raw SQLite path (`execute_many`), else a dict. A
    Struct (shared/wire_structs.py) from the wire, or a `GpuSample` model (in-process callers)."""
    if isinstance(sample, msgspec.Struct):
        if ts != sample.ts:
            sample = msgspec.structs.replace(sample, ts=ts)
        return _encode_json(sample).decode() if as_text else msgspec.to_builtins(sample)
    assert isinstance(sample, GpuSample)
    if ts != sample.ts:
        sample = sample.model_copy(update={"ts": ts})
    return sample.model_dump_json() if as_text else sample.model_dump(mode="json")


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
        if not isinstance(item.body, TELEMETRY_BODIES if env.kind is Kind.TELEMETRY else model):
            raise ValueError(
                f"{env.kind!s} message {env.id} carries {type(item.body).__name__}, "
                f"not {model.__name__}"
            )
        if env.kind in EVENT_KINDS and (env.seq is None or env.seq < 1):
            raise ValueError(
                f"{env.kind!s} event {env.id} from {env.node} has no seq (got {env.seq!r}); "
                "events come from the outbox and are numbered from 1"
            )


def _decision_row(w: NodeWork, item: Incoming) -> dict[str, Any]:
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
