"""The fleet store's reads: nodes with their GPU summaries, the dashboard's fleet view, what the
parts need to know of each node, events and decisions newest first, the sample history, and its
pruning.

The parts (policies, rollouts, commands, migration) never read the ingest core's tables
themselves: they call these methods, passing their own transaction's `conn` when the read must
see the same snapshot as their own tables."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud.store.base import StoreBase
from cloud.store.batch import chunks
from cloud.store.ingest import UNKNOWN_EPOCH, epoch_key
from cloud.store.raw_history import point_count, point_dict, raw_points
from cloud.store.schema import (
    decisions_table,
    events_table,
    gpus_table,
    migration_triggers_table,
    nodes_table,
    reboots_table,
    sample_messages_table,
)
from shared.gpu import Health
from shared.protocol import Kind


class FleetQueries(StoreBase):
    """Reads of the ingest core's tables, shared by the API, the dashboard and the parts."""

    @contextmanager
    def _using(self, op: str, conn: Connection | None) -> Iterator[Connection]:
        """The caller's transaction if it gives one, else a read transaction of our own."""
        if conn is not None:
            yield conn
        else:
            with self.reading(op) as own:
                yield own

    def nodes(self) -> list[dict[str, Any]]:
        """Every node, by name, each with a summary of its GPUs (in pages: see `nodes_page`)."""
        found: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page, after = self.nodes_page(after, 1000)
            found += page
            if after is None:
                return found

    def nodes_page(self, after: str | None, limit: int, *, gpu_limit: int = 0, compact: bool = False,
                   search: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Up to `limit` nodes by name after `after`, each with `gpu_summary` (over all its GPUs)
        and, with `gpu_limit`, `gpus`: its first `gpu_limit` GPUs by index with their latest
        samples (with `compact`, only the figures of COMPACT_SAMPLE, extracted by the database:
        no sample is decoded), and `gpus_truncated`. Returns (rows, the name the next page starts after, or None
        when this is the last). One read transaction of three queries, each bounded by the page
        (the GPUs of one node by `gpu_limit`, however many it has). With `search`, only the nodes
        whose name or labels contain it, or with a GPU whose UUID, model or vendor does (case
        aside): the dashboard's search over a fleet larger than its snapshot."""
        n = nodes_table
        query = sa.select(n).order_by(n.c.name).limit(max(0, limit) + 1)
        if after is not None:
            query = query.where(n.c.name > after)
        if search:
            query = query.where(_node_matches(search))
        with self.reading("nodes page") as conn:
            nodes = [dict(r._mapping) for r in conn.execute(query)]
            more = len(nodes) > limit
            nodes = nodes[:limit]
            names = [row["name"] for row in nodes]
            summaries = _gpu_summaries(conn, names) if names else {}
            gpus = _first_gpus(conn, names, gpu_limit, compact) if names and gpu_limit > 0 else {}
        for row in nodes:
            row["gpu_summary"] = summaries.get(row["name"]) or _empty_summary()
            if gpu_limit > 0:
                listed = gpus.get(row["name"], [])
                row["gpus"] = listed
                row["gpus_truncated"] = row["gpu_summary"]["count"] > len(listed)
        return nodes, (names[-1] if more and names else None)

    def fleet_summary(self) -> dict[str, Any]:
        """The fleet in figures, computed by the database (two aggregate queries, no row read):
        `nodes`, `online`, `gpus`, `unhealthy_gpus` (unhealthy or lost) and `power_w`, the latest
        power of the online nodes' GPUs summed (None when none reports power)."""
        n, g = nodes_table, gpus_table
        power = g.c.sample["power_w"].as_float()
        with self.reading("fleet summary") as conn:
            nodes = conn.execute(sa.select(sa.func.count(), sa.func.sum(sa.case((n.c.online.is_(True), 1), else_=0)))
                                 .select_from(n)).one()
            gpus = conn.execute(sa.select(
                sa.func.count(),
                sa.func.sum(sa.case((g.c.health.in_([str(Health.UNHEALTHY), str(Health.LOST)]), 1), else_=0)),
                sa.func.sum(sa.case((n.c.online.is_(True), power), else_=None)),
            ).select_from(g.join(n, n.c.name == g.c.node))).one()
        return {"nodes": int(nodes[0] or 0), "online": int(nodes[1] or 0), "gpus": int(gpus[0] or 0),
                "unhealthy_gpus": int(gpus[1] or 0),
                "power_w": round(float(gpus[2]), 3) if gpus[2] is not None else None}

    def node_names(self, conn: Connection | None = None) -> list[str]:
        """The name of every node the fleet store knows, sorted."""
        with self._using("node names", conn) as c:
            return list(c.execute(sa.select(nodes_table.c.name).order_by(nodes_table.c.name)).scalars())

    def node_states(self, conn: Connection | None = None,
                    names: Collection[str] | None = None) -> dict[str, dict[str, Any]]:
        """name -> what the parts decide on: `online`, `labels` (as shown), the `policy_name` and
        `policy_version` it reports, its `daemon_version`, `degraded` and `last_seen`. Every
        node, or those of `names` the store knows."""
        n = nodes_table
        query = sa.select(n.c.name, n.c.online, n.c.labels, n.c.policy_name, n.c.policy_version,
                          n.c.daemon_version, n.c.degraded, n.c.last_seen)
        if names is not None:
            query = query.where(n.c.name.in_(list(names)))
        with self._using("node states", conn) as c:
            return {r.name: dict(r._mapping) for r in c.execute(query)}

    def online_nodes(self, conn: Connection | None = None) -> set[str]:
        """The nodes whose last status said online."""
        with self._using("online nodes", conn) as c:
            return set(c.execute(sa.select(nodes_table.c.name).where(nodes_table.c.online.is_(True))).scalars())

    def show_labels(self, labels: Mapping[str, Mapping[str, str]], conn: Connection | None = None) -> int:
        """Set the labels the API and the dashboard show for these nodes (the policies part's:
        the labels it matches on); nodes the store does not know are skipped. Within the caller's
        write transaction if it gives one. Returns how many rows changed."""
        if not labels:
            return 0
        n = nodes_table
        if conn is None:
            with self.writing("show labels") as own:
                return self.show_labels(labels, own)
        changed = 0
        for name, shown in labels.items():
            changed += int(conn.execute(n.update().where(n.c.name == name).values(labels=dict(shown))).rowcount or 0)
        return changed

    def node(self, name: str, gpu_limit: int = 1024) -> dict[str, Any] | None:
        """One node with its first `gpu_limit` GPUs by index (and their latest samples), its
        `gpu_summary` over all of them and `gpus_truncated`; or None. Three queries."""
        with self.reading("node") as conn:
            row = conn.execute(sa.select(nodes_table).where(nodes_table.c.name == name)).first()
            if row is None:
                return None
            summary = _gpu_summaries(conn, [name]).get(name) or _empty_summary()
            gpus = _first_gpus(conn, [name], gpu_limit).get(name, []) if gpu_limit > 0 else []
        return {**dict(row._mapping), "gpu_summary": summary, "gpus": gpus,
                "gpus_truncated": summary["count"] > len(gpus)}

    def events(
        self,
        node: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Stored events, newest first: one node's by seq (`_newest_first`), all nodes' by edge
        time; `since` (edge time) is inclusive."""
        return self.events_page(node, kind, since, limit)[0]

    def events_page(self, node: str | None = None, kind: str | None = None, since: float | None = None,
                    limit: int = 100, after: Sequence[Any] | None = None) -> tuple[list[dict[str, Any]], Key | None]:
        """One page of `events`: (rows, the key the next page starts after, or None at the end).
        `after` is a key this method returned (a ValueError if it is not one)."""
        t = events_table
        where = [t.c.kind == str(kind)] if kind is not None else []
        if since is not None:
            where.append(t.c.ts >= since)
        return self._newest_first("events", t, node, where, limit, after)

    def decisions(
        self, node: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Decisions of the edges' policies and health checks, newest first (as `events`)."""
        return self.decisions_page(node, since, limit)[0]

    def decisions_page(self, node: str | None = None, since: float | None = None, limit: int = 100,
                       after: Sequence[Any] | None = None) -> tuple[list[dict[str, Any]], Key | None]:
        """One page of `decisions` (as `events_page`)."""
        t = decisions_table
        return self._newest_first("decisions", t, node, [t.c.ts >= since] if since is not None else [], limit, after)

    def _newest_first(self, op: str, t: sa.Table, node: str | None, where: list[Any], limit: int,
                      after: Sequence[Any] | None) -> tuple[list[dict[str, Any]], Key | None]:
        """Rows of `t` newest first, a page of `limit` after the key `after`. All nodes' rows by
        (ts, id) (key `("all", ts, id)`); one node's by its `seq`, not its clock, which may have
        jumped: its current outbox epoch's rows by seq (key `("seq", epoch, seq)`), then older
        epochs' by time (keys `("older", epoch)` for their start, `("time", epoch, ts, id)`),
        `epoch` being the one current on the first page, so that a walk stays consistent when the
        node changes epoch meanwhile."""
        phase, current, position = _check_key(after, node is not None)
        if limit <= 0:
            return [], None

        def by_time(conn: Connection, extra: list[Any], start: Sequence[Any] | None,
                    count: int) -> list[dict[str, Any]]:
            query = sa.select(t).where(*where, *extra).order_by(t.c.ts.desc(), t.c.id.desc()).limit(count)
            if start is not None:
                ts, row_id = start
                query = query.where(sa.or_(t.c.ts < ts, sa.and_(t.c.ts == ts, t.c.id < row_id)))
            return [dict(r._mapping) for r in conn.execute(query)]

        with self.reading(op) as conn:
            if node is None:
                rows = by_time(conn, [], position, limit + 1)
                key: Key | None = ("all", rows[limit - 1]["ts"], rows[limit - 1]["id"]) if len(rows) > limit else None
                return _epochs_out(rows[:limit]), key
            if current is None:
                current = epoch_key(conn.execute(
                    sa.select(nodes_table.c.outbox_epoch).where(nodes_table.c.name == node)
                ).scalar_one_or_none())
            rows = []
            if phase == "seq":
                query = (sa.select(t).where(t.c.node == node, t.c.epoch == current, *where)
                         .order_by(t.c.seq.desc()).limit(limit + 1))
                if position is not None:
                    query = query.where(t.c.seq < position[0])
                rows = [dict(r._mapping) for r in conn.execute(query)]
                if len(rows) > limit:
                    return _epochs_out(rows[:limit]), ("seq", current, rows[limit - 1]["seq"])
                position = None
            older = by_time(conn, [t.c.node == node, t.c.epoch != current], position, limit - len(rows) + 1)
        if len(rows) + len(older) <= limit:
            return _epochs_out(rows + older), None
        if len(rows) == limit:  # a page of the current epoch's rows only: the older ones come next
            return _epochs_out(rows), ("older", current)
        last = older[limit - len(rows) - 1]
        return _epochs_out((rows + older)[:limit]), ("time", current, last["ts"], last["id"])

    def samples(
        self, node: str, uuid: str | None = None, since: float | None = None, limit: int = 2000
    ) -> list[dict[str, Any]]:
        """The raw history's samples in time order; when more match, the newest `limit` of them
        (what `history` answers from the raw tier, without its choice of tier)."""
        with self.reading("samples") as conn:
            return [point_dict(node, p) for p in raw_points(conn, node, uuid, since, None, max(0, limit))]

    def prune_samples(self, older_than: float) -> int:
        """Drop the raw history's rows with ts < older_than (a message's samples together, by its
        earliest); returns how many samples."""
        t = sample_messages_table
        with self.writing("prune_samples") as conn:
            gone = conn.execute(t.delete().where(t.c.ts < older_than).returning(point_count(self._dialect)))
            return sum(int(n) for n in gone.scalars())

    # -- for the migration part

    def node_liveness(self, conn: Connection | None = None) -> dict[str, tuple[bool, float]]:
        """name -> (online, last_seen) of every node: no JSON column decoded (a scan of
        thousands of nodes reads this every few seconds)."""
        n = nodes_table
        with self._using("node liveness", conn) as c:
            return {r.name: (bool(r.online), float(r.last_seen))
                    for r in c.execute(sa.select(n.c.name, n.c.online, n.c.last_seen))}

    def pod_map_sources(self, conn: Connection | None = None) -> dict[str, str]:
        """name -> where the node's newest status took its GPUs' `pods` from ("pod-resources" |
        "processes"), for the nodes whose status said (the migration part's fleet view)."""
        n = nodes_table
        with self._using("pod map sources", conn) as c:
            return {r.name: str(r.pod_map_source) for r in c.execute(
                sa.select(n.c.name, n.c.pod_map_source).where(n.c.pod_map_source.is_not(None)))}

    def gpu_states(self, conn: Connection | None = None) -> list[dict[str, Any]]:
        """Every GPU row by index, without its latest sample (see `gpu_samples`)."""
        g = gpus_table
        with self._using("gpu states", conn) as c:
            return [dict(r._mapping) for r in c.execute(
                sa.select(*[col for col in g.c if col.name != "sample"]).order_by(g.c.index))]

    def node_scan(self, conn: Connection | None = None) -> dict[str, tuple[bool, float, float | None, str | None]]:
        """name -> (online, last_seen, status_ts, pod_map_source) of every node, as plain tuples
        (no JSON decoded): the migration scan's read of every pass. `status_ts` moves with every
        status applied, the only message that changes a GPU's health, pods or remediation, so
        the scan re-reads the GPU rows of the nodes whose `status_ts` moved (`gpu_views`)."""
        n = nodes_table
        with self._using("node scan", conn) as c:
            return {r[0]: (bool(r[1]), float(r[2]), r[3], r[4]) for r in c.execute(
                sa.select(n.c.name, n.c.online, n.c.last_seen, n.c.status_ts, n.c.pod_map_source))}

    def gpu_views(self, nodes: Collection[str] | None = None, conn: Connection | None = None) -> list[GpuViewRow]:
        """(node, uuid, index, name, health, pods, remediation, resource_name) of every GPU by
        index, or of the GPUs of `nodes` (`chunks` of names a query): what the migration scan decides
        on, without the sample and the other JSON columns."""
        g = gpus_table
        query = sa.select(g.c.node, g.c.uuid, g.c.index, g.c.name, g.c.health, g.c.pods, g.c.remediation,
                          g.c.resource_name).order_by(g.c.index)
        with self._using("gpu views", conn) as c:
            if nodes is None:
                return [_gpu_view_row(r) for r in c.execute(query)]
            return [_gpu_view_row(r) for chunk in chunks(sorted(nodes))
                    for r in c.execute(query.where(g.c.node.in_(chunk)))]

    def node_reports(self, conn: Connection | None = None) -> dict[str, tuple[bool, str | None, int | None]]:
        """name -> (online, policy_name, policy_version) its edge reports, of every node (no
        JSON decoded): what policy resolution reads of the fleet on every pass."""
        n = nodes_table
        with self._using("node reports", conn) as c:
            return {r[0]: (bool(r[1]), r[2], r[3]) for r in c.execute(
                sa.select(n.c.name, n.c.online, n.c.policy_name, n.c.policy_version))}

    def node_label_texts(self, conn: Connection | None = None) -> dict[str, str]:
        """name -> the labels shown for it as their JSON text (not decoded: the policies part
        compares it with its own on every pass, and decodes only what differs)."""
        n = nodes_table
        with self._using("node label texts", conn) as c:
            return {r[0]: r[1] for r in c.execute(sa.select(n.c.name, sa.cast(n.c.labels, sa.Text)))}

    def gpu_samples(self, conn: Connection | None = None) -> dict[tuple[str, str], Any]:
        """(node, uuid) -> the latest sample of every GPU that has one."""
        g = gpus_table
        with self._using("gpu samples", conn) as c:
            return {(r.node, r.uuid): r.sample for r in c.execute(
                sa.select(g.c.node, g.c.uuid, g.c.sample).where(g.c.sample_ts.is_not(None)))}

    def fleet_latest_samples(self, newer_than: float,
                             keep: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
        """The fleet exporter's read: every GPU of an online node whose latest sample is at least
        as new as `newer_than` (its `sample_ts`, the edge's ts less the clock skew), ordered by
        node and index: `node`, `uuid`, `index`, `name`, `pci_bus_id`, `driver_version`,
        `health`, `vendor` (None: an older edge, NVIDIA), `sample`, and `last_xid`, the XID of
        its newest stored XID event (None: none).
        With `keep`, only the nodes it keeps (their names are read first, so the other nodes'
        samples are never decoded). One read transaction of two queries (plus one per 1,000
        nodes kept), whatever the fleet's size."""
        g, n, e = gpus_table, nodes_table, events_table
        query = (sa.select(g.c.node, g.c.uuid, g.c.index, g.c.name, g.c.pci_bus_id, g.c.driver_version, g.c.health,
                           g.c.vendor, g.c.sample)
                 .join(n, n.c.name == g.c.node)
                 .where(n.c.online.is_(True), g.c.sample_ts >= newer_than)
                 .order_by(g.c.node, g.c.index, g.c.uuid))
        xids = sa.select(e.c.node, e.c.body).where(e.c.kind == str(Kind.XID)).order_by(e.c.id)
        with self.reading("fleet latest samples") as conn:
            if keep is None:
                rows = [dict(r._mapping) for r in conn.execute(query)]
            else:
                names = sorted(name for name in conn.execute(
                    sa.select(n.c.name).where(n.c.online.is_(True))).scalars() if keep(name))
                rows = [dict(r._mapping) for start in range(0, len(names), 1000)
                        for r in conn.execute(query.where(g.c.node.in_(names[start:start + 1000])))]
            last_xid: dict[tuple[str, str], int] = {}
            for r in conn.execute(xids):  # XIDs are rare: the newest per GPU wins
                body = r.body or {}
                if body.get("gpu_uuid") and isinstance(body.get("xid"), int):
                    last_xid[(r.node, body["gpu_uuid"])] = body["xid"]
        for row in rows:
            row["last_xid"] = last_xid.get((row["node"], row["uuid"]))
        return rows

    def policy_outcomes(self, nodes: Sequence[str]) -> dict[str, dict[str, Any]]:
        """vendor -> how the power policy acts on the GPUs of `nodes` (issue 16): `gpus`, and of
        those whose edge has recorded a policy action (`POLICY_RULES`), how many the newest one
        `applied` and how many it recorded `advisory` (the device has no such knob, or refused),
        with that newest advisory `reason`. An older edge's GPUs (no vendor) are NVIDIA's. Two
        queries per 1,000 nodes; the decisions read are those of the policy's rules only."""
        g, d = gpus_table, decisions_table
        vendor = sa.func.coalesce(g.c.vendor, "nvidia")
        out: dict[str, dict[str, Any]] = {}
        newest_advisory: dict[str, float] = {}  # vendor -> ts of the reason kept
        with self.reading("policy outcomes") as conn:
            for start in range(0, len(nodes), 1000):
                chunk = list(nodes[start:start + 1000])
                for name, count in conn.execute(sa.select(vendor, sa.func.count()).where(g.c.node.in_(chunk))
                                                .group_by(vendor)):
                    entry = out.setdefault(str(name), {"gpus": 0, "applied": 0, "advisory": 0, "reason": None})
                    entry["gpus"] += int(count)
                rank = sa.func.row_number().over(partition_by=(d.c.node, d.c.gpu_uuid),
                                                 order_by=(d.c.ts.desc(), d.c.id.desc())).label("rank")
                newest = (sa.select(d.c.node, d.c.gpu_uuid, d.c.outcome, d.c.reason, d.c.ts, rank)
                          .where(d.c.node.in_(chunk), d.c.gpu_uuid.is_not(None), d.c.rule.in_(POLICY_RULES),
                                 d.c.outcome.in_(["applied", "advisory"])).subquery())
                query = (sa.select(vendor, newest.c.outcome, newest.c.reason, newest.c.ts)
                         .join(g, sa.and_(g.c.node == newest.c.node, g.c.uuid == newest.c.gpu_uuid))
                         .where(newest.c.rank == 1))
                for name, outcome, reason, ts in conn.execute(query):
                    entry = out.setdefault(str(name), {"gpus": 0, "applied": 0, "advisory": 0, "reason": None})
                    entry[str(outcome)] += 1
                    if outcome == "advisory" and float(ts) >= newest_advisory.get(str(name), -math.inf):
                        newest_advisory[str(name)] = float(ts)
                        entry["reason"] = reason
        return dict(sorted(out.items()))

    def migration_requests(self, received_since: float, limit: int = 500,
                           conn: Connection | None = None) -> list[dict[str, Any]]:
        """`migration_request` events received since then that no migration has consumed yet
        (`migration_triggers`), oldest first: `id`, `node`, `ts`, `received_at`, `body`."""
        e, trig = events_table, migration_triggers_table
        consumed = sa.select(trig.c.event_id).where(trig.c.event_id == e.c.id).exists()
        query = (sa.select(e.c.id, e.c.node, e.c.ts, e.c.received_at, e.c.body)
                 .where(e.c.kind == str(Kind.MIGRATION_REQUEST), e.c.received_at >= received_since,
                        ~consumed)
                 .order_by(e.c.id).limit(max(0, limit)))
        with self._using("migration requests", conn) as c:
            return [dict(r._mapping) for r in c.execute(query)]

    def reboot_requests(self, limit: int = 500, conn: Connection | None = None) -> list[dict[str, Any]]:
        """`reboot_request` events the reboot part has not taken yet (no `reboots` row), oldest
        first: `id`, `node`, `seq`, `ts`, `received_at`, `body`."""
        e, r = events_table, reboots_table
        taken = sa.select(r.c.event_id).where(r.c.event_id == e.c.id).exists()
        query = (sa.select(e.c.id, e.c.node, e.c.seq, e.c.ts, e.c.received_at, e.c.body)
                 .where(e.c.kind == str(Kind.REBOOT_REQUEST), ~taken).order_by(e.c.id).limit(max(0, limit)))
        with self._using("reboot requests", conn) as c:
            return [dict(row._mapping) for row in c.execute(query)]

    def gpu_health_history(self, nodes: Sequence[str], limit: int = 5000,
                           conn: Connection | None = None) -> dict[tuple[str, str], list[tuple[float, float, str]]]:
        """(node, uuid) -> its GPU health events as (edge ts, received_at, current), newest
        first by the node's own order: seq within its current outbox epoch, then older epochs by
        time (not by the edge's ts alone: its clock may have jumped). At most `limit` events per
        200 nodes, the newest by id."""
        e, n = events_table, nodes_table
        found: dict[tuple[str, str], list[tuple[tuple[bool, float, int], tuple[float, float, str]]]] = \
            defaultdict(list)
        names = sorted(set(nodes))
        with self._using("gpu health history", conn) as c:
            for chunk in (names[i:i + 200] for i in range(0, len(names), 200)):
                current = {r.name: epoch_key(r.outbox_epoch) for r in c.execute(
                    sa.select(n.c.name, n.c.outbox_epoch).where(n.c.name.in_(chunk)))}
                for r in c.execute(
                    sa.select(e.c.id, e.c.node, e.c.epoch, e.c.seq, e.c.ts, e.c.received_at, e.c.body)
                    .where(e.c.kind == str(Kind.HEALTH), e.c.node.in_(chunk))
                    .order_by(e.c.id.desc()).limit(limit)
                ):
                    body = r.body or {}
                    if body.get("gpu_uuid"):
                        in_epoch = r.epoch == current.get(r.node)
                        order = (in_epoch, float(r.seq) if in_epoch else float(r.ts), int(r.id))
                        found[(r.node, body["gpu_uuid"])].append(
                            (order, (float(r.ts), float(r.received_at), str(body.get("current")))))
        return {key: [event for _, event in sorted(rows, key=lambda row: row[0], reverse=True)]
                for key, rows in found.items()}


GpuViewRow = tuple[str, str, int, str | None, str | None, list[str] | None, str | None, str | None]
"""A GPU as `gpu_views` reads it: (node, uuid, index, name, health, pods, remediation, resource_name)."""
Key = tuple[Any, ...]
"""Where a page of a listing ends: JSON scalars, for the API to hand back as an opaque cursor."""


def _check_key(after: Sequence[Any] | None, one_node: bool) -> tuple[str, str | None, list[Any] | None]:
    """(phase, epoch, position) of a newest-first key, or a ValueError for anything else."""
    if after is None:
        return "seq", None, None
    key = list(after)
    if not one_node:
        if len(key) == 3 and key[0] == "all" and _is_number(key[1]) and _is_int(key[2]):
            return "time", None, [float(key[1]), key[2]]
    elif len(key) == 3 and key[0] == "seq" and isinstance(key[1], str) and _is_int(key[2]):
        return "seq", key[1], [key[2]]
    elif len(key) == 2 and key[0] == "older" and isinstance(key[1], str):
        return "time", key[1], None
    elif len(key) == 4 and key[0] == "time" and isinstance(key[1], str) and _is_number(key[2]) and _is_int(key[3]):
        return "time", key[1], [float(key[2]), key[3]]
    raise ValueError("not a key of this listing")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _epochs_out(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        row["epoch"] = _epoch_out(row["epoch"])
    return rows


def _epoch_out(epoch: str) -> str | None:
    return None if epoch == UNKNOWN_EPOCH else epoch


def _gpu_view_row(r: Any) -> GpuViewRow:
    return (r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])


def _gpu_out(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "node"}


def _empty_summary() -> dict[str, Any]:
    by_health: dict[str, int] = {str(h): 0 for h in Health}
    return {"count": 0, **by_health, "unknown": 0, "power_w": None, "max_temperature_c": None}


def _gpu_summaries(conn: Connection, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """node -> its GPUs' counts by health and the fleet-view figures of their latest samples
    (`power_w` summed, `max_temperature_c`): one aggregate query over every GPU of `names`,
    computed by the database (no sample is decoded here)."""
    g = gpus_table
    healths = [str(h) for h in Health]
    query = (sa.select(g.c.node, sa.func.count(),
                       *[sa.func.sum(sa.case((g.c.health == h, 1), else_=0)) for h in healths],
                       sa.func.sum(g.c.sample["power_w"].as_float()),
                       sa.func.max(g.c.sample["temperature_c"].as_float()))
             .where(g.c.node.in_(list(names))).group_by(g.c.node))
    found: dict[str, dict[str, Any]] = {}
    for row in conn.execute(query):
        count, by_health = int(row[1]), {h: int(row[2 + i] or 0) for i, h in enumerate(healths)}
        power, temperature = row[2 + len(healths)], row[3 + len(healths)]
        found[row[0]] = {"count": count, **by_health, "unknown": count - sum(by_health.values()),
                         "power_w": round(float(power), 3) if power is not None else None,
                         "max_temperature_c": float(temperature) if temperature is not None else None}
    return found


# The edge's power policy rules (edge/policy.py RULE_*): the decisions whose outcome says whether the
# policy's knob acted on a GPU (`policy_outcomes`).
POLICY_RULES = ("thermal_step_down", "thermal_critical", "thermal_restore", "power_saving", "power_saving_exit",
                "power_cap")

COMPACT_SAMPLE = ("ts", "temperature_c", "power_w", "power_limit_w", "utilization_pct")
"""The figures of a GPU's latest sample that the dashboard's overview shows."""


def _first_gpus(conn: Connection, names: Sequence[str], limit: int,
                compact: bool = False) -> dict[str, list[dict[str, Any]]]:
    """node -> its first `limit` GPU rows by index (then uuid), with their latest samples (or,
    `compact`, the COMPACT_SAMPLE figures of them): one query, bounded by `limit` per node
    however many GPUs a node has."""
    g = gpus_table
    rank = sa.func.row_number().over(partition_by=g.c.node, order_by=(g.c.index, g.c.uuid)).label("rank")
    ranked = sa.select(g.c.node, g.c.uuid, rank).where(g.c.node.in_(list(names))).subquery()
    columns: list[Any] = [g]
    if compact:
        columns = [c for c in g.c if c.name != "sample"]
        columns += [g.c.sample[name].as_float().label(f"compact_{name}") for name in COMPACT_SAMPLE]
        # sample_ts, not sample: a GPU row a status made before 2026-12-05 holds the JSON null there
        columns.append((g.c.sample_ts.is_not(None)).label("has_sample"))
    query = (sa.select(*columns).join(ranked, sa.and_(ranked.c.node == g.c.node, ranked.c.uuid == g.c.uuid))
             .where(ranked.c.rank <= limit).order_by(g.c.node, g.c.index, g.c.uuid))
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in conn.execute(query):
        gpu = dict(row._mapping)
        if compact:
            figures = {name: gpu.pop(f"compact_{name}") for name in COMPACT_SAMPLE}
            gpu["sample"] = figures if gpu.pop("has_sample") else None
        found[row.node].append(_gpu_out(gpu))
    return found


def _node_matches(search: str) -> sa.ColumnElement[bool]:
    """A node whose name or labels (as JSON text) contain `search`, or with a GPU whose UUID, model
    or vendor does; LIKE's wildcards in `search` match themselves."""
    n, g = nodes_table, gpus_table
    pattern = "%" + search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"

    def has(column: Any) -> sa.ColumnElement[bool]:
        return sa.func.lower(sa.cast(column, sa.String)).like(pattern, escape="\\")

    gpu = sa.select(g.c.node).where(sa.or_(has(g.c.uuid), has(g.c.name), has(g.c.vendor)))
    return sa.or_(has(n.c.name), has(n.c.labels), n.c.name.in_(gpu))


class DecodedLabels:
    """Node labels from their JSON text (`FleetQueries.node_label_texts`), decoded once per
    distinct text: a fleet's nodes share a few label sets, and the parts that read them do so on
    every pass over every node. At most `kept` texts are kept (then the cache starts again)."""

    def __init__(self, kept: int = 10_000) -> None:
        self.kept = kept
        self._decoded: dict[str, dict[str, str]] = {}

    def __call__(self, text: str | None) -> dict[str, str]:
        if text is None:
            return {}
        labels = self._decoded.get(text)
        if labels is None:
            if len(self._decoded) >= self.kept:
                self._decoded.clear()
            labels = self._decoded[text] = dict(json.loads(text) or {})
        return labels
