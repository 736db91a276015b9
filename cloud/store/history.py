"""The sample history in tiers: every sample for the last hour (the raw tier, `sample_messages`:
one row per telemetry message, cloud/store/raw_history.py), then the means of 1-minute buckets for
a day and of 10-minute buckets for a month (`sample_rollups`; configurable: cloud/store/tiers.py),
and the read that picks the tier answering a range within a point budget.

The ingest only inserts raw rows (no read, issue 17). The coarser tiers are rolled up in the
retention pass (`maintain_history`, every few minutes): the samples of the raw rows stored since
the last pass, by row id, are summed into their buckets inside the database (the rows' JSON taken
apart by `json_each` / `jsonb_array_elements`, then `INSERT ... SELECT ... GROUP BY ... ON CONFLICT
DO UPDATE` adding sums and counts), so a late sample joins its old bucket and nothing is counted
twice (the pass's progress is written in the same transaction as the sums). Then each tier drops
what is older than its retention; a raw row goes only once it is rolled up, all its samples
together (by the row's ts, its earliest sample's).

On PostgreSQL two ingest transactions may commit their ids out of order; the pass takes a SHARE
lock on `sample_messages` for an instant before reading the highest id, which waits for the inserts
in flight, so that no id below it can still appear.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud.store.base import StoreBase
from cloud.store.raw_history import point_columns, point_count, point_dict, raw_points
from cloud.store.schema import (
    ROLLED_UP_FIGURES,
    history_rollup_state_table,
    sample_messages_table,
    sample_rollups_table,
)
from cloud.store.tiers import Tier, bucket_mean, candidate_tiers, observed_spacing
from shared.logs import get_logger

log = get_logger(__name__)

# raw rows (messages, 8 samples each on an 8-GPU node) summed per transaction: the write lock is never held long
ROLLUP_CHUNK_IDS = 6_250
PRUNE_CHUNK_ROWS = 2_500  # raw rows (messages) deleted per transaction
STATE_KEY = "samples"
PG_LOCK_TIMEOUT = "5s"  # the instant SHARE lock: a pass that cannot have it tries again next time


@dataclass(frozen=True)
class HistoryAnswer:
    """A history read: the tier that answered, its resolution and the points."""

    tier: str  # "raw", "60s", ...
    # seconds between points: a roll-up's bucket; raw: history_resolution, else the spacing seen
    resolution_s: float
    rows: list[dict[str, Any]]


@dataclass
class HistoryResult:
    """What one `maintain_history` pass did."""

    rolled_up: int = 0  # raw samples summed into the coarser tiers
    raw_deleted: int = 0  # raw samples deleted (their rows, every sample of a message at once)
    rollups_deleted: dict[str, int] = field(default_factory=dict)  # tier name -> rows


class HistoryMixin(StoreBase):
    """Roll-up, retention and tiered reads of the sample history (see the module docstring)."""

    # ---- the retention pass ----------------------------------------------------------------

    def maintain_history(self, now: float | None = None) -> HistoryResult:
        """Roll the new raw rows up into every coarser tier, then drop what each tier keeps no
        longer. Small transactions; safe to run on several replicas at once (each chunk locks the
        progress row: a chunk is summed once)."""
        now = time.time() if now is None else now
        result = HistoryResult()
        rollups = self.history_tiers.tiers[1:]
        if rollups:
            result.rolled_up = self._roll_up(rollups, now)
        result.raw_deleted = self._prune_raw(now - self.history_tiers.raw_retention_s, bool(rollups))
        for tier in rollups:
            result.rollups_deleted[tier.name] = self._prune_rollups(tier, now - tier.retention_s)
        return result

    def _roll_up(self, tiers: tuple[Tier, ...], now: float) -> int:
        """Every tier's sums from the raw rows not rolled up yet, in chunks of ids; the samples summed."""
        s = sample_messages_table
        with self.writing("history roll-up bound") as conn:
            if self._dialect == "postgresql":
                conn.execute(sa.text(f"SET LOCAL lock_timeout = '{PG_LOCK_TIMEOUT}'"))
                conn.execute(sa.text("LOCK TABLE sample_messages IN SHARE MODE"))
            upper = conn.execute(sa.select(sa.func.max(s.c.id))).scalar_one_or_none()
            if upper is None:
                return 0
            st = history_rollup_state_table
            conn.execute(self.insert(st).values(name=STATE_KEY, rolled_id=0, updated_at=now)
                         .on_conflict_do_nothing(index_elements=["name"]))
        rolled = 0
        while True:
            with self.writing("history roll-up") as conn:
                # FOR UPDATE: a replica's pass waits for the other's chunk, then reads where it ended
                done = self._rolled_id(conn, lock=True)
                if done >= upper:
                    return rolled
                end = min(upper, done + ROLLUP_CHUNK_IDS)
                for tier in tiers:
                    conn.execute(self._rollup_insert(tier, done, end))
                rolled += int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(point_count(self._dialect)), 0))
                                           .where(s.c.id > done, s.c.id <= end)).scalar_one())
                self._set_rolled_id(conn, end, now)
            time.sleep(0)  # let a waiting writer (the ingest) have the lock between chunks

    def _rollup_insert(self, tier: Tier, after: int, upto: int) -> Any:
        """INSERT ... SELECT: the samples of the raw rows with after < id <= upto, summed per GPU
        and bucket, added to what the tier holds already."""
        s, r = sample_messages_table, sample_rollups_table
        res = tier.resolution_s
        each, point = point_columns(self._dialect)
        ts, uuid = point["ts"], point["uuid"]
        if self._dialect == "postgresql":
            bucket = sa.func.floor(ts / res) * res
        else:
            bucket = sa.cast(ts / res, sa.Integer) * res  # ts > 0: truncation is floor
        figures = [point[name] for name in ROLLED_UP_FIGURES]
        select = (
            sa.select(s.c.node, sa.literal(res, sa.Integer), uuid, bucket, sa.func.count(),
                      *[sa.func.sum(f) for f in figures], *[sa.func.count(f) for f in figures])
            .select_from(s, each)
            .where(s.c.id > after, s.c.id <= upto)
            .group_by(s.c.node, uuid, bucket)
        )
        columns = ["node", "resolution_s", "uuid", "bucket_ts", "n",
                   *[f"{name}_sum" for name in ROLLED_UP_FIGURES], *[f"{name}_n" for name in ROLLED_UP_FIGURES]]
        stmt = self.insert(r).from_select(columns, select)
        added = stmt.excluded
        return stmt.on_conflict_do_update(
            index_elements=["node", "resolution_s", "uuid", "bucket_ts"],
            set_={
                "n": r.c.n + added.n,
                **{f"{name}_sum": sa.func.coalesce(r.c[f"{name}_sum"] + added[f"{name}_sum"],
                                                   r.c[f"{name}_sum"], added[f"{name}_sum"])
                   for name in ROLLED_UP_FIGURES},
                **{f"{name}_n": r.c[f"{name}_n"] + added[f"{name}_n"] for name in ROLLED_UP_FIGURES},
            },
        )

    def _rolled_id(self, conn: Connection, *, lock: bool = False) -> int:
        st = history_rollup_state_table
        query = sa.select(st.c.rolled_id).where(st.c.name == STATE_KEY)
        found = conn.execute(query.with_for_update() if lock else query).scalar_one_or_none()
        return int(found or 0)

    def _set_rolled_id(self, conn: Connection, rolled_id: int, now: float) -> None:
        st = history_rollup_state_table
        stmt = self.insert(st).values(name=STATE_KEY, rolled_id=rolled_id, updated_at=now)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={"rolled_id": stmt.excluded.rolled_id, "updated_at": stmt.excluded.updated_at}))

    def _prune_raw(self, cutoff: float, only_rolled: bool) -> int:
        """Raw rows older than `cutoff` (and, with roll-up tiers, already rolled up), in chunks;
        the samples they held."""
        s = sample_messages_table
        deleted = 0
        while True:
            with self.writing("history prune raw") as conn:
                doomed = sa.select(s.c.id).where(s.c.ts < cutoff)
                if only_rolled:
                    doomed = doomed.where(s.c.id <= self._rolled_id(conn))
                ids = list(conn.execute(doomed.limit(PRUNE_CHUNK_ROWS)).scalars())
                if ids:  # RETURNING: another replica's pass may have deleted some of them meanwhile
                    gone = conn.execute(s.delete().where(s.c.id.in_(ids)).returning(point_count(self._dialect)))
                    deleted += sum(int(n) for n in gone.scalars())
            if len(ids) < PRUNE_CHUNK_ROWS:
                return deleted
            time.sleep(0)

    def _prune_rollups(self, tier: Tier, cutoff: float) -> int:
        """A tier's buckets older than `cutoff`, one bucket (every GPU's) per transaction."""
        r = sample_rollups_table
        deleted = 0
        while True:
            with self.writing(f"history prune {tier.name}") as conn:
                oldest = conn.execute(sa.select(sa.func.min(r.c.bucket_ts))
                                      .where(r.c.resolution_s == tier.resolution_s)).scalar_one_or_none()
                if oldest is None or oldest >= cutoff:
                    return deleted
                result = conn.execute(r.delete().where(r.c.resolution_s == tier.resolution_s,
                                                       r.c.bucket_ts < min(cutoff, oldest + tier.resolution_s)))
                deleted += int(result.rowcount or 0)
            time.sleep(0)

    # ---- reads -------------------------------------------------------------------------------

    def history(self, node: str, uuid: str | None = None, since: float | None = None,
                until: float | None = None, limit: int = 2000, *, now: float | None = None) -> HistoryAnswer:
        """A node's history (one GPU's with `uuid`) in time order: the points with since <= ts <=
        until (and the bucket overlapping `since`) from the finest tier that keeps the whole range
        within `limit` points; when even the coarsest has more, its newest `limit`. Without
        `since`: the raw tier's newest `limit` points (what the history was before tiers). A
        bucket's point has its start as `ts` and the means of its samples; the coarser tiers lag
        the raw one by up to a retention pass."""
        now = time.time() if now is None else now
        limit = max(0, limit)
        candidates = candidate_tiers(self.history_tiers, now=now, since=since)
        if since is None:
            candidates = candidates[:1]
        with self.reading("history") as conn:
            chosen, rows = candidates[-1], None
            for tier in candidates[:-1]:
                if tier.raw:  # the raw samples' count and their read are one bounded read
                    points = raw_points(conn, node, uuid, since, until, limit + 1)
                    if len(points) <= limit:
                        chosen, rows = tier, [point_dict(node, p) for p in points]
                        break
                elif self._count(conn, tier, node, uuid, since, until, limit + 1) <= limit:
                    chosen = tier
                    break
            if rows is None:
                rows = self._points(conn, chosen, node, uuid, since, until, limit)
        if chosen.raw:
            resolution = self.history_resolution_s or observed_spacing(rows) or 0.0
        else:
            resolution = float(chosen.resolution_s)
        return HistoryAnswer(tier=chosen.name, resolution_s=resolution, rows=rows)

    def _range(self, tier: Tier, node: str, uuid: str | None, since: float | None,
               until: float | None) -> tuple[sa.ColumnElement[float], list[Any]]:
        """A roll-up tier's rows in the range (the raw tier's samples: `raw_points`)."""
        t = sample_rollups_table
        stamp = t.c.bucket_ts
        where = [t.c.node == node, t.c.resolution_s == tier.resolution_s]
        if uuid is not None:
            where.append(t.c.uuid == uuid)
        if since is not None:  # a bucket that overlaps the range is in it (a range shorter than a bucket)
            where.append(stamp > since - tier.resolution_s)
        if until is not None:
            where.append(stamp <= until)
        return stamp, where

    def _count(self, conn: Connection, tier: Tier, node: str, uuid: str | None, since: float | None,
               until: float | None, at_most: int) -> int:
        """A roll-up tier's points in the range, counted up to `at_most` (a bounded read)."""
        _stamp, where = self._range(tier, node, uuid, since, until)
        inner = sa.select(sa.literal(1)).select_from(sample_rollups_table).where(*where).limit(at_most).subquery()
        return int(conn.execute(sa.select(sa.func.count()).select_from(inner)).scalar_one())

    def _points(self, conn: Connection, tier: Tier, node: str, uuid: str | None, since: float | None,
                until: float | None, limit: int) -> list[dict[str, Any]]:
        if tier.raw:
            return [point_dict(node, p) for p in raw_points(conn, node, uuid, since, until, limit)]
        t = sample_rollups_table
        stamp, where = self._range(tier, node, uuid, since, until)
        newest = (sa.select(t).where(*where).order_by(stamp.desc(), t.c.uuid.desc()).limit(limit).subquery())
        ordered = sa.select(newest).order_by(newest.c[stamp.name], newest.c.uuid)
        return [_bucket_row(r._mapping) for r in conn.execute(ordered)]


_WHOLE_FIGURES = frozenset({"memory_used_bytes", "sm_clock_mhz", "memory_clock_mhz"})  # means rounded


def _bucket_row(row: Any) -> dict[str, Any]:
    """A roll-up row in the shape of a raw sample: the bucket's start as `ts`, the means."""
    out: dict[str, Any] = {"node": row["node"], "uuid": row["uuid"], "ts": float(row["bucket_ts"])}
    for name in ROLLED_UP_FIGURES:
        mean = bucket_mean(row[f"{name}_sum"], row[f"{name}_n"])
        out[name] = round(mean) if mean is not None and name in _WHOLE_FIGURES else mean
    return out
