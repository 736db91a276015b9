"""The raw tier of the sample history: one row of `sample_messages` per telemetry message, its GPUs'
samples as JSON in `figures` (cloud/store/schema.py), written by the ingest and read back as one
point per sample.

Why one row a message: eight rows a message (one per GPU, 11 parameters, 3 b-trees each) were about
half of the sample writer process's time per message (docs/benchmarks.md). What a sample row gave
for free is kept here: a message delivered twice is stored once (unique (node, ts), ts the earliest
of the row's samples), `history_resolution_s` still means at most one sample per GPU per that long,
and reads bound, filter and order the samples themselves, not the rows (`raw_points`).

The roll-up (cloud/store/history.py) reads the samples inside the database (`point_columns`): SQLite's
`json_each`, PostgreSQL's `jsonb_array_elements`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from operator import attrgetter, itemgetter
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection

from cloud.store.base import StoreBase
from cloud.store.batch import NodeWork, chunks
from cloud.store.schema import (
    RAW_FIGURES,
    RAW_ROW_SPAN_S,
    ROLLED_UP_FIGURES,
    sample_messages_table,
    sample_point_table,
)
from shared.wire_structs import SampleFigures

RAW_PAGE_ROWS = 500  # rows per read while gathering a read's newest points
_ROW_COLUMNS = ("node", "ts", "figures")

# One sample in `figures`: the types of RAW_FIGURES (from the point's description, schema.py).
Point = tuple[Any, ...]
_POINT_TYPES = tuple(c.type.python_type | None if c.nullable else c.type.python_type
                     for c in (sample_point_table.c[name] for name in RAW_FIGURES))
_decode_points: Any = msgspec.json.Decoder(list[tuple[_POINT_TYPES]]).decode  # type: ignore[valid-type]
_encode = msgspec.json.Encoder().encode
_figures_of = attrgetter(*ROLLED_UP_FIGURES)  # a sample's figures after (uuid, ts), in RAW_FIGURES' order
_by_ts = itemgetter(0)
_point_order = itemgetter(1, 0)  # (ts, uuid): the order of the reads, as with one row per sample


def decode_points(figures: str | bytes) -> list[Point]:
    """A row's `figures` as tuples in the order of RAW_FIGURES (numbers typed: a float figure
    written as `60` by PostgreSQL's migration reads as 60.0)."""
    return _decode_points(figures)


def point_dict(node: str, point: Point) -> dict[str, Any]:
    """A point as the raw tier has always answered it: node, uuid, ts and the figures."""
    return {"node": node, **dict(zip(RAW_FIGURES, point))}


class RawHistoryWriter(StoreBase):
    """The ingest's half of the raw tier (a mixin of IngestCore)."""

    def _store_samples(self, conn: Connection, work: Mapping[str, NodeWork]) -> None:
        """Each telemetry message of the batch as one row (no read: a message stored already,
        delivered twice, is left alone by the unique index). With a `history_resolution_s`, at
        most one sample per GPU per that long: a sample closer than that to its GPU's last stored
        one is left out of its message's row, and a message left with none writes no row; the
        last stored samples cost one read of the batch's nodes' newest rows."""
        with_samples = [w for w in work.values() if w.messages]
        if not with_samples:
            return
        spacing = self.history_resolution_s
        last = self._last_stored(conn, with_samples, spacing) if spacing > 0 else {}
        rows: list[tuple[str, float, str]] = []
        encode, figures_of = _encode, _figures_of
        for w in with_samples:
            name = w.name
            seen = last.get(name, {})  # uuid -> ts of its newest sample stored (or kept in this batch)
            messages = [sorted(m, key=_by_ts) for m in w.messages]
            if len(messages) > 1:
                messages.sort(key=_first_ts)  # per GPU in time order, as the spacing wants
            for message in messages:
                points: list[Point] = []
                start = 0.0  # the row's ts: its first sample's
                for ts, sample in message:
                    uuid = sample.uuid
                    previous = seen.get(uuid)
                    if previous is not None and (ts == previous or (spacing and ts - previous < spacing)):
                        continue  # the same sample twice in the batch, or closer than the spacing
                    seen[uuid] = ts
                    if not points:
                        start = ts
                    elif ts - start > RAW_ROW_SPAN_S:  # spread wider than a row may be: the rest in another
                        rows.append((name, start, encode(points).decode()))
                        points, start = [], ts
                    points.append((uuid, ts, *figures_of(sample)))
                if points:
                    rows.append((name, start, encode(points).decode()))
        t = sample_messages_table
        self.execute_many(conn, "sample_messages",
                          lambda: self.insert(t).on_conflict_do_nothing(index_elements=["node", "ts"]),
                          _ROW_COLUMNS, rows)

    def _last_stored(self, conn: Connection, work: Sequence[NodeWork], spacing: float) -> dict[str, dict[str, float]]:
        """node -> uuid -> ts of the GPU's newest sample stored from `spacing` before the batch's
        oldest on (an older one decides nothing): the rows from RAW_ROW_SPAN_S before that (a
        row's samples are at most that much after its ts), by the (node, ts) index."""
        t = sample_messages_table
        last: dict[str, dict[str, float]] = {}
        for chunk in chunks(work):
            since = min(ts for w in chunk for m in w.messages for ts, _s in m) - spacing
            query = sa.select(t.c.node, t.c.figures).where(t.c.node.in_([w.name for w in chunk]),
                                                         t.c.ts >= since - RAW_ROW_SPAN_S)
            for node, figures in conn.execute(query):
                newest = last.setdefault(node, {})
                for point in decode_points(figures):
                    uuid, ts = point[0], point[1]
                    if ts > newest.get(uuid, -math.inf):
                        newest[uuid] = ts
        return last


def _first_ts(message: list[tuple[float, SampleFigures]]) -> float:
    return message[0][0]


def raw_points(conn: Connection, node: str, uuid: str | None, since: float | None, until: float | None,
               limit: int) -> list[Point]:
    """A node's (one GPU's with `uuid`) newest `limit` samples with since <= ts <= until, in time
    order (ts, then uuid), as tuples of RAW_FIGURES. Reads the rows newest first, a page at a
    time, and stops once no older row can hold a sample among the newest `limit`: a bounded read."""
    t = sample_messages_table
    if limit <= 0:
        return []
    where = [t.c.node == node]
    if since is not None:  # a row holds samples up to RAW_ROW_SPAN_S after its ts
        where.append(t.c.ts >= since - RAW_ROW_SPAN_S)
    if until is not None:
        where.append(t.c.ts <= until)
    page = max(16, min(RAW_PAGE_ROWS, limit + 1))
    found: list[Point] = []
    older_than: float | None = None
    while True:
        query = sa.select(t.c.ts, t.c.figures).where(*where)
        if older_than is not None:
            query = query.where(t.c.ts < older_than)  # (node, ts) is unique: the next page
        rows = conn.execute(query.order_by(t.c.ts.desc()).limit(page)).all()
        for _ts, figures in rows:
            for point in decode_points(figures):
                if ((uuid is None or point[0] == uuid) and (since is None or point[1] >= since)
                        and (until is None or point[1] <= until)):
                    found.append(point)
        if len(found) >= limit:
            found.sort(key=_point_order, reverse=True)
            del found[limit:]
        if len(rows) < page:
            break
        older_than = float(rows[-1][0])
        if len(found) == limit and found[-1][1] >= older_than + RAW_ROW_SPAN_S:
            break  # an older row's samples are older than these (before its ts + RAW_ROW_SPAN_S)
    found.sort(key=_point_order)
    return found


def point_count(dialect: str) -> sa.ColumnElement[int]:
    """SQL: the samples in a row (the length of its `figures`)."""
    figures = sample_messages_table.c.figures
    if dialect == "postgresql":
        return sa.func.json_array_length(sa.cast(figures, sa.JSON))
    return sa.func.json_array_length(figures)


def point_columns(dialect: str) -> tuple[Any, dict[str, sa.ColumnElement[Any]]]:
    """SQL: the samples of `sample_messages` rows as rows of their own, for an INSERT ... SELECT
    that stays in the database: the table function to select from beside the table (each row's
    samples), and each of RAW_FIGURES as a column of it (uuid as text, the rest as floats)."""
    figures = sample_messages_table.c.figures
    columns: dict[str, sa.ColumnElement[Any]] = {}
    if dialect == "postgresql":
        each = sa.func.jsonb_array_elements(sa.cast(figures, JSONB)).table_valued("value", joins_implicitly=True)
        for i, name in enumerate(RAW_FIGURES):
            value = each.c.value.op("->>")(sa.literal_column(str(i)))
            columns[name] = value if name == "uuid" else sa.cast(value, sa.Float)
    else:
        each = sa.func.json_each(figures).table_valued("value", joins_implicitly=True)
        for i, name in enumerate(RAW_FIGURES):
            columns[name] = sa.func.json_extract(each.c.value, sa.literal_column(f"'$[{i}]'"))
    return each, columns
