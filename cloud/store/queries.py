"""The fleet store's reads: nodes with their GPU summaries, the dashboard's fleet view, what the
parts need to know of each node, events and decisions newest first, the sample history, and its
pruning.

The parts (policies, rollouts, commands, migration) never read the ingest core's tables
themselves: they call these methods, passing their own transaction's `conn` when the read must
see the same snapshot as their own tables."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud.store.base import StoreBase
from cloud.store.ingest import UNKNOWN_EPOCH, epoch_key
from cloud.store.schema import (
    decisions_table,
    events_table,
    gpus_table,
    migration_triggers_table,
    nodes_table,
    samples_table,
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

    def _nodes_with_gpus(self, op: str) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Every node by name with its GPU rows: two queries, whatever the fleet's size."""
        with self.reading(op) as conn:
            nodes = [dict(r._mapping) for r in conn.execute(
                sa.select(nodes_table).order_by(nodes_table.c.name))]
            gpus: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for row in conn.execute(sa.select(gpus_table).order_by(gpus_table.c.index)):
                gpus[row.node].append(dict(row._mapping))
        return [(n, gpus.get(n["name"], [])) for n in nodes]

    def nodes(self) -> list[dict[str, Any]]:
        """Every node, by name, each with a summary of its GPUs."""
        return [{**n, "gpu_summary": _gpu_summary(gpus)} for n, gpus in self._nodes_with_gpus("nodes")]

    def fleet(self) -> list[dict[str, Any]]:
        """Every node as `node()` shows it (GPUs and their latest samples): the dashboard's
        overview, in one read transaction of two queries rather than one per node."""
        return [{**n, "gpu_summary": _gpu_summary(gpus), "gpus": [_gpu_out(g) for g in gpus]}
                for n, gpus in self._nodes_with_gpus("fleet")]

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

    def node(self, name: str) -> dict[str, Any] | None:
        """One node with its GPUs (and their latest samples), or None."""
        with self.reading("node") as conn:
            row = conn.execute(
                sa.select(nodes_table).where(nodes_table.c.name == name)
            ).first()
            if row is None:
                return None
            gpus = [dict(r._mapping) for r in conn.execute(
                sa.select(gpus_table).where(gpus_table.c.node == name).order_by(gpus_table.c.index)
            )]
        return {**dict(row._mapping), "gpu_summary": _gpu_summary(gpus),
                "gpus": [_gpu_out(g) for g in gpus]}

    def events(
        self,
        node: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Stored events, newest first: one node's by seq (`_newest_first`), all nodes' by edge
        time; `since` (edge time) is inclusive."""
        t = events_table
        where = [t.c.kind == str(kind)] if kind is not None else []
        if since is not None:
            where.append(t.c.ts >= since)
        rows = self._newest_first("events", t, node, where, limit)
        for row in rows:
            row["epoch"] = _epoch_out(row["epoch"])
        return rows

    def decisions(
        self, node: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Decisions of the edges' policies and health checks, newest first (as `events`)."""
        t = decisions_table
        rows = self._newest_first("decisions", t, node, [t.c.ts >= since] if since is not None else [], limit)
        for row in rows:
            row["epoch"] = _epoch_out(row["epoch"])
        return rows

    def _newest_first(self, op: str, t: sa.Table, node: str | None, where: list[Any],
                      limit: int) -> list[dict[str, Any]]:
        """Rows of `t` newest first. For one node the order is its `seq`, not its clock, which
        may have jumped: the current outbox epoch's rows by seq, then older epochs' by ts."""
        limit = max(0, limit)
        by_time = sa.select(t).where(*where).order_by(t.c.ts.desc(), t.c.id.desc())
        with self.reading(op) as conn:
            if node is None:
                return [dict(r._mapping) for r in conn.execute(by_time.limit(limit))]
            current = epoch_key(conn.execute(
                sa.select(nodes_table.c.outbox_epoch).where(nodes_table.c.name == node)
            ).scalar_one_or_none())
            rows = [dict(r._mapping) for r in conn.execute(
                sa.select(t).where(t.c.node == node, t.c.epoch == current, *where)
                .order_by(t.c.seq.desc()).limit(limit))]
            if len(rows) < limit:
                rows += [dict(r._mapping) for r in conn.execute(
                    by_time.where(t.c.node == node, t.c.epoch != current).limit(limit - len(rows)))]
        return rows

    def samples(
        self, node: str, uuid: str | None = None, since: float | None = None, limit: int = 2000
    ) -> list[dict[str, Any]]:
        """Downsampled history in time order; when more match, the newest `limit` of them."""
        s = samples_table
        inner = sa.select(s).where(s.c.node == node).order_by(s.c.ts.desc(), s.c.id.desc())
        if uuid is not None:
            inner = inner.where(s.c.uuid == uuid)
        if since is not None:
            inner = inner.where(s.c.ts >= since)
        newest = inner.limit(max(0, limit)).subquery()
        query = sa.select(newest).order_by(newest.c.ts, newest.c.id)
        with self.reading("samples") as conn:
            return [
                {k: v for k, v in r._mapping.items() if k != "id"} for r in conn.execute(query)
            ]

    def prune_samples(self, older_than: float) -> int:
        """Drop history rows with ts < older_than; returns how many."""
        with self.writing("prune_samples") as conn:
            result = conn.execute(samples_table.delete().where(samples_table.c.ts < older_than))
            return int(result.rowcount or 0)

    # -- for the migration part

    def node_liveness(self, conn: Connection | None = None) -> dict[str, tuple[bool, float]]:
        """name -> (online, last_seen) of every node: no JSON column decoded (a scan of
        thousands of nodes reads this every few seconds)."""
        n = nodes_table
        with self._using("node liveness", conn) as c:
            return {r.name: (bool(r.online), float(r.last_seen))
                    for r in c.execute(sa.select(n.c.name, n.c.online, n.c.last_seen))}

    def gpu_states(self, conn: Connection | None = None) -> list[dict[str, Any]]:
        """Every GPU row by index, without its latest sample (see `gpu_samples`)."""
        g = gpus_table
        with self._using("gpu states", conn) as c:
            return [dict(r._mapping) for r in c.execute(
                sa.select(*[col for col in g.c if col.name != "sample"]).order_by(g.c.index))]

    def gpu_samples(self, conn: Connection | None = None) -> dict[tuple[str, str], Any]:
        """(node, uuid) -> the latest sample of every GPU that has one."""
        g = gpus_table
        with self._using("gpu samples", conn) as c:
            return {(r.node, r.uuid): r.sample for r in c.execute(
                sa.select(g.c.node, g.c.uuid, g.c.sample).where(g.c.sample.is_not(None)))}

    def fleet_latest_samples(self, newer_than: float,
                             keep: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
        """The fleet exporter's read: every GPU of an online node whose latest sample is at least
        as new as `newer_than` (its `sample_ts`, the edge's ts less the clock skew), ordered by
        node and index: `node`, `uuid`, `index`, `name`, `pci_bus_id`, `driver_version`,
        `health`, `sample`, and `last_xid`, the XID of its newest stored XID event (None: none).
        With `keep`, only the nodes it keeps (their names are read first, so the other nodes'
        samples are never decoded). One read transaction of two queries (plus one per 1,000
        nodes kept), whatever the fleet's size."""
        g, n, e = gpus_table, nodes_table, events_table
        query = (sa.select(g.c.node, g.c.uuid, g.c.index, g.c.name, g.c.pci_bus_id, g.c.driver_version, g.c.health,
                           g.c.sample)
                 .join(n, n.c.name == g.c.node)
                 .where(n.c.online.is_(True), g.c.sample.is_not(None), g.c.sample_ts >= newer_than)
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



def _epoch_out(epoch: str) -> str | None:
    return None if epoch == UNKNOWN_EPOCH else epoch


def _gpu_out(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "node"}


def _gpu_summary(gpus: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts by health and fleet-view figures from the latest samples."""
    by_health = {str(h): 0 for h in Health}
    by_health["unknown"] = 0
    power: list[float] = []
    temperatures: list[float] = []
    for gpu in gpus:
        health = gpu["health"] if gpu["health"] in by_health else "unknown"
        by_health[health] += 1
        sample = gpu["sample"] or {}
        if sample.get("power_w") is not None:
            power.append(float(sample["power_w"]))
        if sample.get("temperature_c") is not None:
            temperatures.append(float(sample["temperature_c"]))
    return {
        "count": len(gpus),
        **by_health,
        "power_w": round(sum(power), 3) if power else None,
        "max_temperature_c": max(temperatures) if temperatures else None,
    }
