"""The raw tier of the sample history as one row per telemetry message (cloud/store/raw_history.py,
alembic 0013), on SQLite and on a real PostgreSQL server: a message's GPUs in one row, a message
delivered twice stored once, the per-GPU spacing, reads that bound, filter and order the samples
(not the rows) as one row per sample did, roll-up sums equal to the input's, and the migration
from one row per sample (and back) with the same answers."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

import cloud.store.history as history_module
import cloud.store.raw_history as raw_module
from cloud.store import FleetStore, HistoryTiers, Incoming, sample_messages_table, sample_rollups_table
from cloud.store.base import ALEMBIC_DIR
from cloud.store.schema import RAW_FIGURES, RAW_ROW_SPAN_S, ROLLED_UP_FIGURES
from shared.gpu import GpuSample
from shared.protocol import Kind, TelemetryBody, make_envelope

T0 = 1_700_000_400.0  # a whole number of 10-minute buckets
NODE = "edge-a"
TIERS = HistoryTiers(raw_retention_s=600.0, rollups=((60, 1800.0), (600, 7200.0)))
FIGURES = RAW_FIGURES[2:]  # after uuid and ts


@pytest.fixture
def store(db_url: str) -> Iterator[FleetStore]:
    with FleetStore(db_url, history_tiers=TIERS) as opened:
        yield opened


def telemetry(samples: list[GpuSample], node: str = NODE, skew: float = 0.0) -> Incoming:
    envelope = make_envelope(node, TelemetryBody(samples=samples), Kind.TELEMETRY)
    return Incoming(envelope=envelope, body=envelope.parsed_body(), received_at=max(s.ts for s in samples),
                    clock_skew=skew)


def sample(index: int, ts: float, **figures: Any) -> GpuSample:
    values = {"temperature_c": 60.0, "power_w": 200.0, "power_limit_w": 300.0, "utilization_pct": 50.0,
              "memory_used_bytes": 1 << 30, **figures}
    return GpuSample(index=index, uuid=f"GPU-{index}", ts=ts, **values)


def odd_sample(rng: random.Random, index: int, ts: float) -> GpuSample:
    """Figures with every digit a double has, and each missing now and then."""
    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.2 else value
    return GpuSample(index=index, uuid=f"GPU-{index}", ts=ts, temperature_c=maybe(rng.uniform(20, 90)),
                     power_w=maybe(rng.uniform(50, 700)), power_limit_w=maybe(rng.choice([300.0, 450.5, 700.0])),
                     utilization_pct=maybe(rng.uniform(0, 100)), memory_used_bytes=maybe(rng.randrange(1 << 40)),
                     memory_util_pct=maybe(rng.uniform(0, 100)), sm_clock_mhz=maybe(rng.randrange(300, 2100)),
                     memory_clock_mhz=maybe(rng.randrange(800, 2700)))


def as_point(node: str, s: GpuSample, skew: float = 0.0) -> dict[str, Any]:
    """What the raw tier answers for a sample: worked out from the sample, not by the store."""
    return {"node": node, "uuid": s.uuid, "ts": s.ts - skew, **{name: getattr(s, name) for name in FIGURES}}


def newest(points: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    ordered = sorted(points, key=lambda p: (p["ts"], p["uuid"]))
    return ordered[max(0, len(ordered) - limit):]


def rows(store: FleetStore) -> list[tuple[str, float, list[list[Any]]]]:
    t = sample_messages_table
    with store.reading("test") as conn:
        return [(node, ts, json.loads(figures))
                for node, ts, figures in conn.execute(sa.select(t.c.node, t.c.ts, t.c.figures).order_by(t.c.id))]


# ---- writing ------------------------------------------------------------------------------------


def test_a_message_is_one_row_and_a_message_delivered_twice_is_stored_once(store: FleetStore) -> None:
    messages = [telemetry([sample(i, T0 + 10 * k + 0.001 * i, temperature_c=40.0 + k + i) for i in range(8)])
                for k in range(3)]
    store.ingest(messages + [messages[0]])  # twice in one batch
    store.ingest([messages[1]])  # and again later
    # another message whose earliest sample has a stored message's ts is taken for a repeat too
    store.ingest([telemetry([sample(0, T0 + 10, temperature_c=99.0), sample(9, T0 + 11)])])
    stored = rows(store)
    assert [(node, ts - T0, len(figures)) for node, ts, figures in stored] == [
        (NODE, 0.0, 8), (NODE, 10.0, 8), (NODE, 20.0, 8)]  # ts: the message's earliest sample
    assert [p[0] for p in stored[0][2]] == [f"GPU-{i}" for i in range(8)]
    assert stored[1][2][3] == ["GPU-3", T0 + 10 * 1 + 0.001 * 3, 44.0, 200.0, 300.0, 50.0, 1 << 30, None, None, None]
    expected = [as_point(NODE, s) for m in messages for s in m.body.samples]  # type: ignore[union-attr]
    assert store.history(NODE, limit=100, now=T0 + 30).rows == newest(expected, 100)
    # the ingest's other work is unchanged: the latest sample of each GPU is the newest one
    gpus = {g["uuid"]: g for g in store.node(NODE)["gpus"]}  # type: ignore[index]
    assert gpus["GPU-0"]["sample_ts"] == T0 + 20 and gpus["GPU-7"]["sample"]["temperature_c"] == 49.0
    assert gpus["GPU-9"]["sample_ts"] == T0 + 11  # (the latest samples are not the history)


def test_a_sample_twice_in_a_message_and_a_message_spread_wider_than_a_row(store: FleetStore) -> None:
    wide = [sample(0, T0), sample(0, T0), sample(1, T0 + 5), sample(0, T0 + RAW_ROW_SPAN_S + 1),
            sample(1, T0 + 3 * RAW_ROW_SPAN_S)]
    store.ingest([telemetry(list(reversed(wide)))])  # in any order
    assert [(ts - T0, [p[0] for p in figures]) for _node, ts, figures in rows(store)] == [
        (0.0, ["GPU-0", "GPU-1"]), (RAW_ROW_SPAN_S + 1, ["GPU-0"]), (3 * RAW_ROW_SPAN_S, ["GPU-1"])]
    assert len(store.samples(NODE)) == 4
    store.ingest([telemetry(wide)])  # delivered again: the same rows, nothing added
    assert len(rows(store)) == 3 and len(store.samples(NODE)) == 4


def test_history_resolution_keeps_one_sample_per_gpu_per_spacing(open_store_factory: Any) -> None:
    store = open_store_factory(history_resolution_s=30.0)
    # GPU-0 in every message every 10 s from T0, GPU-1 from the second message on; the clock 2 s ahead
    messages = [telemetry([sample(i, T0 + 2 + 10 * k, temperature_c=float(k)) for i in (0, 1) if k or not i],
                          skew=2.0) for k in range(9)]
    store.ingest(messages[:5])
    store.ingest(messages[5:])  # the GPUs' last stored samples come from the rows of the first batch
    kept = {"GPU-0": [0, 3, 6], "GPU-1": [1, 4, 7]}  # per GPU: the first, then each 30 s after the last kept
    assert [(ts - T0, [p[0] for p in figures]) for _n, ts, figures in rows(store)] == [
        (10.0 * k, [g for g, ks in kept.items() if k in ks]) for k in sorted(kept["GPU-0"] + kept["GPU-1"])]
    for uuid, ks in kept.items():
        assert [(p["ts"] - T0, p["temperature_c"]) for p in store.samples(NODE, uuid)] == [(10.0 * k, k) for k in ks]
    store.ingest([messages[8]])  # nothing of it is 30 s after what is stored: no row
    assert len(rows(store)) == 6


@pytest.fixture
def open_store_factory(db_url: str) -> Iterator[Any]:
    opened: list[FleetStore] = []

    def open_(**kwargs: Any) -> FleetStore:
        opened.append(FleetStore(db_url, history_tiers=TIERS, **kwargs))
        return opened[-1]

    yield open_
    for s in opened:
        s.close()


# ---- reading ------------------------------------------------------------------------------------


def test_reads_bound_filter_and_order_samples_as_one_row_per_sample_did(store: FleetStore,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raw_module, "RAW_PAGE_ROWS", 16)  # many pages: the read's stopping rule is exercised
    rng = random.Random(7)
    messages, expected = [], []
    for k in range(120):  # a message every 5 s, its GPUs up to 36 s apart (or 70: two rows), some late
        at = T0 + 5 * k + 0.01 * rng.random() - (50 * rng.random() if k % 7 == 3 else 0)
        spread = 70 / 3 if k % 11 == 5 else 12.0  # (no two messages start at the same ts: see the first test)
        gpus = [odd_sample(rng, i, at + spread * i) for i in range(4) if rng.random() < 0.9]
        if gpus:
            messages.append(telemetry(gpus, skew=1.5))
            expected += [as_point(NODE, s, skew=1.5) for s in gpus]
    rng.shuffle(messages)
    for start in range(0, len(messages), 25):
        store.ingest(messages[start:start + 25])
    now = T0 + 600
    reads = [(None, None, None, limit) for limit in (2000, 7, 30, 50, 64, 100, 333)]
    for since, until, uuid, limit in reads + [(None, None, "GPU-2", 9), (None, None, "GPU-0", 50),
                                      (T0 + 100, None, None, 2000), (T0 + 100.25, T0 + 300, None, 40),
                                      (T0 + 200, T0 + 450, "GPU-1", 1000), (T0 + 599, None, None, 5),
                                      (T0 + 250, T0 + 250.5, None, 3)]:
        want = [p for p in expected if (uuid is None or p["uuid"] == uuid) and (since is None or p["ts"] >= since)
                and (until is None or p["ts"] <= until)]
        answer = store.history(NODE, uuid, since, until, limit, now=now)
        if len(want) <= limit or since is None:
            assert answer.tier == "raw", (since, until, uuid, limit)
            assert answer.rows == newest(want, limit), (since, until, uuid, limit)
        else:  # the tier choice counts samples: more than `limit` of them go to the 1-minute means
            assert answer.tier == "60s", (since, until, uuid, limit)
        if until is None:
            assert store.samples(NODE, uuid, since, limit) == newest(want, limit)
    assert store.history("edge-z", now=now).rows == []


# ---- rolling up and pruning ----------------------------------------------------------------------


def test_roll_up_sums_are_the_inputs_sums(store: FleetStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history_module, "ROLLUP_CHUNK_IDS", 7)  # chunks end inside a batch and a bucket
    rng = random.Random(11)
    nodes = ["edge-a", "edge-b"]
    inputs: list[tuple[str, GpuSample]] = []
    batch = []
    for k in range(60):  # 10 minutes, every 10 s; edge-b's GPUs sampled a little later
        for n, node in enumerate(nodes):
            gpus = [odd_sample(rng, i, T0 + 10 * k + 0.5 * n + 0.01 * i) for i in range(3)]
            batch.append(telemetry(gpus, node=node))
            inputs += [(node, s) for s in gpus]
    store.ingest(batch[:50])
    first = store.maintain_history(now=T0 + 601)
    store.ingest(batch[50:])
    late = [odd_sample(rng, i, T0 + 65 + i) for i in range(2)]  # late: joins its old buckets
    store.ingest([telemetry(late, node="edge-b")])
    inputs += [("edge-b", s) for s in late]
    second = store.maintain_history(now=T0 + 601)
    assert first.rolled_up + second.rolled_up == len(inputs) and first.rolled_up == 25 * 3 * 2
    assert store.maintain_history(now=T0 + 601).rolled_up == 0

    for resolution in (60, 600):
        want: dict[tuple[str, str, float], dict[str, Any]] = defaultdict(
            lambda: {"n": 0, **{f"{f}_sum": None for f in ROLLED_UP_FIGURES}, **{f"{f}_n": 0 for f in ROLLED_UP_FIGURES}})
        for node, s in inputs:
            bucket = want[(node, s.uuid, (s.ts // resolution) * resolution)]
            bucket["n"] += 1
            for f in ROLLED_UP_FIGURES:
                if getattr(s, f) is not None:
                    bucket[f"{f}_sum"] = (bucket[f"{f}_sum"] or 0) + getattr(s, f)
                    bucket[f"{f}_n"] += 1
        r = sample_rollups_table
        with store.reading("test") as conn:
            got = {(row.node, row.uuid, row.bucket_ts): row._mapping
                   for row in conn.execute(sa.select(r).where(r.c.resolution_s == resolution))}
        assert sorted(got) == sorted(want)
        for key, bucket in want.items():
            for column, value in bucket.items():
                assert got[key][column] == (pytest.approx(value, rel=1e-12) if value is not None else None), (key, column)
    means = store.history("edge-b", "GPU-1", since=T0, until=T0 + 599, limit=5, now=T0 + 601)
    assert means.tier == "600s"
    [point] = means.rows
    figures = [s for node, s in inputs if node == "edge-b" and s.uuid == "GPU-1"]
    temperatures = [s.temperature_c for s in figures if s.temperature_c is not None]
    assert point["temperature_c"] == pytest.approx(sum(temperatures) / len(temperatures))


def test_retention_and_prune_samples_count_samples(store: FleetStore) -> None:
    store.ingest([telemetry([sample(i, T0 + 10 * k) for i in range(8)]) for k in range(6)])
    assert store.prune_samples(T0 + 15) == 16  # two messages, eight samples each
    assert [p["ts"] - T0 for p in store.samples(NODE, "GPU-3")] == [20.0, 30.0, 40.0, 50.0]
    done = store.maintain_history(now=T0 + 645)  # raw keeps 600 s: the message at T0 + 40 goes (rolled first)
    assert (done.rolled_up, done.raw_deleted) == (32, 24)
    assert len(rows(store)) == 1


# ---- the migration from one row per sample, and back ----------------------------------------------


def _alembic(conn: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.attributes["connection"] = conn
    return config


def test_the_migration_groups_samples_into_messages_keeps_answers_and_progress_and_goes_back(db_url: str) -> None:
    rng = random.Random(3)
    # (node, GPU, k) in the order the old ingest stored them: ids 1, 2, ...
    order = [(node, i, k) for k in range(3) for node, gpus in (("edge-a", 3), ("edge-b", 1)) for i in range(gpus)]
    order += [("edge-a", 0, 3), ("edge-a", 1, 3), ("edge-b", 0, 3)]  # ids 13..15: rolled up to here
    order += [("edge-a", 2, 3)]  # id 16: its message (edge-a at k = 3) straddles the progress
    order += [(node, i, k) for k in (4, 5) for node, gpus in (("edge-a", 3), ("edge-b", 1)) for i in range(gpus)]
    inserted = [(node, odd_sample(rng, i, T0 + 10 * k + 0.123456789)) for node, i, k in order]
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        command.upgrade(_alembic(conn), "0012")
        for node in ("edge-a", "edge-b"):
            conn.execute(sa.text("INSERT INTO nodes (name, online, first_seen, last_seen, acked_seq, gaps, degraded, "
                                 "labels) VALUES (:n, true, 1, 1, 0, 0, '[]', '{}')"), {"n": node})
        columns = ", ".join(RAW_FIGURES)
        for node, s in inserted:
            conn.execute(sa.text(f"INSERT INTO samples (node, {columns}) VALUES (:node, "
                                 f"{', '.join(':' + c for c in RAW_FIGURES)})"), as_point(node, s))
        conn.execute(sa.text("INSERT INTO history_rollup_state (name, rolled_id, updated_at) VALUES ('samples', 15, 1)"))
    engine.dispose()

    expected = {node: [as_point(n, s) for n, s in inserted if n == node] for node in ("edge-a", "edge-b")}
    with FleetStore(db_url, history_tiers=TIERS) as store:  # upgrades to head
        for node, points in expected.items():  # every figure back exactly, in time order
            assert store.history(node, limit=1000, now=T0 + 60).rows == newest(points, 1000)
            assert store.history(node, "GPU-2", T0 + 20, T0 + 40, 10, now=T0 + 60).rows == [
                p for p in newest(points, 1000) if p["uuid"] == "GPU-2" and T0 + 20 <= p["ts"] <= T0 + 40]
        upgraded = ids_and_rows(store)
        # the seven messages rolled up whole first (in the order of their first sample), the
        # straddling one (edge-a at k = 3) after them, then the rest; the progress: the seventh
        assert [(node, round((ts - T0) / 10), len(figures)) for _id, node, ts, figures in upgraded] == [
            ("edge-a", 0, 3), ("edge-b", 0, 1), ("edge-a", 1, 3), ("edge-b", 1, 1), ("edge-a", 2, 3), ("edge-b", 2, 1),
            ("edge-b", 3, 1), ("edge-a", 3, 3), ("edge-a", 4, 3), ("edge-b", 4, 1), ("edge-a", 5, 3), ("edge-b", 5, 1)]
        assert [i for i, *_rest in upgraded] == list(range(1, 13)) and rolled_id(store.engine) == 7
        store.ingest([telemetry([s for n, s in inserted if n == "edge-b"][-1:], node="edge-b")])  # stored: no row
        assert ids_and_rows(store) == upgraded

    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        command.downgrade(_alembic(conn), "0012")
    with engine.connect() as conn:
        back = conn.execute(sa.text(f"SELECT id, node, {columns} FROM samples ORDER BY id")).all()
    assert sorted(tuple(r[1:]) for r in back) == sorted(
        (node, s.uuid, s.ts, *(getattr(s, f) for f in FIGURES)) for node, s in inserted)  # exactly
    # the rolled-up messages' 13 samples first: the progress is the last of their ids
    assert rolled_id(engine) == 13 and {(r[1], round((r[3] - T0) / 10)) for r in back[:13]} == {
        (node, k) for node in ("edge-a", "edge-b") for k in range(3)} | {("edge-b", 3)}
    engine.dispose()

    with FleetStore(db_url, history_tiers=TIERS) as store:  # and up again: the same rows, the same progress
        assert ids_and_rows(store) == upgraded and rolled_id(store.engine) == 7
        # the next pass rolls up what was not: the straddling message whole (3 samples), k = 4, 5 (8)
        assert store.maintain_history(now=T0 + 60).rolled_up == 3 + 8


def rolled_id(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT rolled_id FROM history_rollup_state")).scalar_one())


def ids_and_rows(store: FleetStore) -> list[tuple[int, str, float, list[list[Any]]]]:
    t = sample_messages_table
    with store.reading("test") as conn:
        return [(int(i), node, ts, json.loads(figures)) for i, node, ts, figures
                in conn.execute(sa.select(t.c.id, t.c.node, t.c.ts, t.c.figures).order_by(t.c.id))]
