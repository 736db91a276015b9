"""The sample history in tiers (cloud/store/history.py), on SQLite and on a real PostgreSQL server:
every sample kept raw, rolled up into bucket means by the retention pass (a late sample joins its
old bucket, nothing counted twice), each tier pruned by its own retention, the read answered by
the finest tier that fits the range in `limit` points, and the HTTP answer as cloud/openapi.yaml
describes it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient, TestServer

from cloud.app import build
from cloud.config import CloudSettings
from cloud.http.api import openapi_spec
from cloud.store import FleetStore, HistoryTiers, Incoming, sample_messages_table, sample_rollups_table
from shared.gpu import GpuSample
from shared.protocol import Kind, TelemetryBody, make_envelope
from tests.helpers.postgres import create_database, drop_database, pg_url  # noqa: F401  (pg_url: fixture)

T0 = 1_700_000_400.0  # a whole number of 10-minute buckets
NODE = "edge-a"
# small tiers so that a test covers every retention: raw 10 min, 1-min means 30 min, 10-min means 2 h
TIERS = HistoryTiers(raw_retention_s=600.0, rollups=((60, 1800.0), (600, 7200.0)))


@pytest.fixture
def store(db_url: str) -> Iterator[FleetStore]:
    with FleetStore(db_url, history_tiers=TIERS) as opened:
        yield opened


def telemetry(samples: list[GpuSample], node: str = NODE) -> Incoming:
    envelope = make_envelope(node, TelemetryBody(samples=samples), Kind.TELEMETRY)
    return Incoming(envelope=envelope, body=envelope.parsed_body(), received_at=max(s.ts for s in samples))


def sample(index: int, ts: float, **figures: Any) -> GpuSample:
    values = {"temperature_c": 60.0, "power_w": 200.0, "power_limit_w": 300.0, "utilization_pct": 50.0,
              "memory_used_bytes": 1 << 30, **figures}
    return GpuSample(index=index, uuid=f"GPU-{index}", ts=ts, **values)


def gpu0(k: int, ts: float | None = None) -> GpuSample:
    """GPU-0's k-th sample (every 10 s): figures that make every bucket's mean different, and a
    power reading only every other sample (a mean over the samples that have the figure)."""
    return sample(0, T0 + 10 * k if ts is None else ts, temperature_c=40.0 + k,
                  power_w=100.0 + k if k % 2 == 0 else None, memory_used_bytes=1000 * k,
                  sm_clock_mhz=1000 + k, memory_clock_mhz=2619, memory_util_pct=float(k % 3))


def fill(store: FleetStore, samples: int) -> None:
    """`samples` rounds 10 s apart from T0 of GPU-0 and GPU-1, one telemetry message a round."""
    batch = [telemetry([gpu0(k), sample(1, T0 + 10 * k)]) for k in range(samples)]
    for start in range(0, len(batch), 50):
        store.ingest(batch[start:start + 50])


def rollups(store: FleetStore, resolution: int, uuid: str = "GPU-0") -> dict[float, Any]:
    r = sample_rollups_table
    with store.reading("test") as conn:
        rows = conn.execute(sa.select(r).where(r.c.resolution_s == resolution, r.c.uuid == uuid))
        return {row.bucket_ts - T0: row for row in rows}


def raw_count(store: FleetStore) -> int:
    """Samples in the raw tier (each row holds a message's)."""
    with store.reading("test") as conn:
        return sum(len(json.loads(f)) for f in conn.execute(sa.select(sample_messages_table.c.figures)).scalars())


def raw_rows(store: FleetStore) -> int:
    with store.reading("test") as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(sample_messages_table)).scalar_one())


# ---- the store ------------------------------------------------------------------------------


def test_every_sample_is_kept_raw_and_a_message_delivered_twice_once(store: FleetStore) -> None:
    message = telemetry([gpu0(0), sample(1, T0)])
    store.ingest([message, telemetry([gpu0(1), gpu0(1)])])
    store.ingest([message])  # QoS 1 delivers it again
    answer = store.history(NODE, now=T0 + 20)
    assert answer.tier == "raw"
    assert [(r["uuid"], r["ts"] - T0) for r in answer.rows] == [("GPU-0", 0), ("GPU-1", 0), ("GPU-0", 10)]
    assert [r["sm_clock_mhz"] for r in answer.rows] == [1000, None, 1001]  # clocks kept at every sample
    assert answer.resolution_s == 10.0  # the spacing the edges sample at (the cloud is not told it)
    assert raw_count(store) == 3 and raw_rows(store) == 2  # a row per message


def test_roll_up_means_late_samples_and_retention_per_tier(store: FleetStore) -> None:
    fill(store, 90)  # 15 minutes
    # two replicas' passes at once: every raw row is summed once, whichever runs first
    with ThreadPoolExecutor(2) as pool:
        passes = list(pool.map(lambda _: store.maintain_history(now=T0 + 905), range(2)))
    assert sum(p.rolled_up for p in passes) == 180
    # raw keeps 10 minutes: what is older went, once rolled up (k = 0..30 of both GPUs)
    assert sum(p.raw_deleted for p in passes) == 62 and raw_count(store) == 180 - 62

    minutes = rollups(store, 60)
    assert sorted(minutes) == [60.0 * j for j in range(15)]
    for j in range(15):
        row = minutes[60.0 * j]
        assert row.n == 6 and row.power_w_n == 3
    means = store.history(NODE, "GPU-0", since=T0, until=T0 + 899, limit=1000, now=T0 + 905)
    assert means.tier == "60s" and means.resolution_s == 60.0  # raw no longer holds T0
    assert [r["ts"] - T0 for r in means.rows] == [60.0 * j for j in range(15)]
    for j, row in enumerate(means.rows):
        assert row["temperature_c"] == pytest.approx(40 + 6 * j + 2.5)
        assert row["power_w"] == pytest.approx(100 + 6 * j + 2)  # the even k of the bucket only
        assert row["memory_used_bytes"] == 6000 * j + 2500 and isinstance(row["memory_used_bytes"], int)
        assert row["power_limit_w"] == 300.0 and row["utilization_pct"] == 50.0
        # the clock chart's figures: means too, the clocks whole MHz
        assert row["sm_clock_mhz"] == round(1000 + 6 * j + 2.5) and isinstance(row["sm_clock_mhz"], int)
        assert row["memory_clock_mhz"] == 2619 and row["memory_util_pct"] == pytest.approx(1.0)
    tens = rollups(store, 600)
    assert {b: r.n for b, r in tens.items()} == {0.0: 60, 600.0: 30}
    assert tens[600.0].temperature_c_sum / tens[600.0].temperature_c_n == pytest.approx(40 + 74.5)

    # a late sample (an edge back from an outage) joins its old bucket; a second pass adds nothing twice
    store.ingest([telemetry([gpu0(0, ts=T0 + 15).model_copy(update={"temperature_c": 1000.0})])])
    second = store.maintain_history(now=T0 + 905)
    assert second.rolled_up == 1 and second.raw_deleted == 1  # older than raw's 10 minutes: rolled, then gone
    bucket = rollups(store, 60)[0.0]
    assert bucket.n == 7 and bucket.temperature_c_sum == pytest.approx(sum(40.0 + k for k in range(6)) + 1000)
    assert rollups(store, 600)[0.0].n == 61
    assert store.maintain_history(now=T0 + 905).rolled_up == 0
    assert rollups(store, 60)[0.0].n == 7

    # each tier by its own retention: 1-minute buckets older than 30 minutes, 10-minute older than 2 h
    third = store.maintain_history(now=T0 + 2000)
    assert third.rollups_deleted == {"60s": 2 * 4, "600s": 0}  # buckets T0 .. T0+180 of both GPUs
    assert raw_count(store) == 0  # every sample is older than 10 minutes by now
    assert min(rollups(store, 60)) == 240.0
    fourth = store.maintain_history(now=T0 + 7800)
    assert fourth.rollups_deleted == {"60s": 2 * 11, "600s": 2}
    assert rollups(store, 60) == {} and sorted(rollups(store, 600)) == [600.0]


def test_the_finest_tier_that_fits_the_range_in_limit_points_answers(store: FleetStore) -> None:
    fill(store, 240)  # 40 minutes of both GPUs
    now = T0 + 2400
    store.maintain_history(now=now)

    def read(since: float | None, limit: int, **kw: Any) -> tuple[str, float, list[dict[str, Any]]]:
        answer = store.history(NODE, since=since, limit=limit, now=now, **kw)
        return answer.tier, answer.resolution_s, answer.rows

    tier, resolution, rows = read(now - 300, 1000)  # 5 minutes: every sample
    assert (tier, resolution, len(rows)) == ("raw", 10.0, 60)
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows) and rows[0]["ts"] == now - 300
    tier, resolution, rows = read(now - 300, 20)  # 60 samples do not fit in 20 points: 1-minute means
    assert (tier, resolution, len(rows)) == ("60s", 60.0, 10)
    tier, _, rows = read(now - 600 - 5, 5000)  # "the last 10 minutes", asked a moment before `now`
    assert tier == "raw" and len(rows) == 120
    tier, _, rows = read(now - 1200, 5000)  # raw keeps 10 minutes only
    assert (tier, len(rows)) == ("60s", 40)
    tier, _, rows = read(now - 2000, 5000)  # 1-minute means keep 30 minutes
    assert tier == "600s" and [r["ts"] - T0 for r in rows] == [0, 0, 600, 600, 1200, 1200, 1800, 1800]
    tier, _, rows = read(now - 300, 1)  # nothing fits: the coarsest tier's newest point
    assert tier == "600s" and [(r["uuid"], r["ts"] - T0) for r in rows] == [("GPU-1", 1800)]
    tier, _, rows = read(None, 7)  # no range: the newest raw samples
    assert tier == "raw" and len(rows) == 7 and rows[-1]["ts"] == T0 + 2390
    tier, _, rows = read(now - 300, 1000, until=now - 200, uuid="GPU-1")
    assert tier == "raw" and [r["ts"] - now for r in rows] == list(range(-300, -199, 10))
    assert {r["uuid"] for r in rows} == {"GPU-1"}
    assert store.history("edge-z", since=now - 300, now=now).rows == []


# ---- over HTTP, against the description -----------------------------------------------------


async def test_the_http_answer_matches_the_description(tmp_path: Path) -> None:
    controller = build(CloudSettings(db=f"sqlite:///{tmp_path / 'fleet.db'}", no_kube=True, api_insecure=True))
    store, now = controller.store, time.time()
    start = now - 1800  # the last 30 minutes, every 10 s, of two GPUs
    batch = [telemetry([sample(0, start + 10 * k, temperature_c=50.0 + k % 7), sample(1, start + 10 * k)])
             for k in range(180)]
    store.ingest(batch)
    store.maintain_history(now=now)
    spec = openapi_spec()
    op = spec.document["paths"]["/api/v1/nodes/{node}/samples"]["get"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = spec.document
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    async def get(client: TestClient, query: str, status: int = 200) -> dict[str, Any]:
        response = await client.get(f"/api/v1/nodes/{NODE}/samples?{query}")
        body = await response.json()
        assert response.status == status, body
        schema = resolve(op["responses"][str(status)])["content"]["application/json"]["schema"]
        errors = [(list(e.absolute_path), e.message) for e in spec.validator(schema).iter_errors(body)]
        assert not errors, (query, errors[:5])
        return body  # type: ignore[no-any-return]

    try:
        async with TestClient(TestServer(controller.http_app())) as client:
            every = await get(client, f"since={now - 1800}&limit=1000")
            assert (every["node"], every["tier"], every["resolution_s"], len(every["samples"])) == (NODE, "raw", 10.0, 360)
            one = await get(client, f"since={now - 1800}&until={now}&limit=100&uuid=GPU-0")
            assert (one["tier"], one["resolution_s"]) == ("60s", 60.0)
            assert 30 <= len(one["samples"]) <= 31 and {s["uuid"] for s in one["samples"]} == {"GPU-0"}
            assert all(50.0 <= s["temperature_c"] <= 56.0 for s in one["samples"])
            older = await get(client, f"since={now - 2 * 86400}&limit=100&gpu=GPU-1")  # the former name
            assert older["tier"] == "600s" and {s["uuid"] for s in older["samples"]} == {"GPU-1"}
            assert len((await get(client, "limit=5"))["samples"]) == 5
            bad = await get(client, f"since={now}&until={now - 60}", status=400)
            assert "after" in bad["error"]
            await get(client, "until=never", status=400)
    finally:
        controller.close()


def test_the_tiers_are_settings(tmp_path: Path) -> None:
    settings = CloudSettings(history_tiers="30s:2h, 5m:2d", history_raw_retention="15m", history_retention="1d")
    assert settings.history_tier_spec == (900.0, ((30, 7200.0), (300, 86400.0)))  # history_retention bounds all
    assert HistoryTiers(*settings.history_tier_spec).tiers[2].name == "300s"
    assert CloudSettings().history_tier_spec == (3600.0, ((60, 86400.0), (600, 30 * 86400.0)))
    for bad, says in [("1m", "RESOLUTION:RETENTION"), ("10m:1d,1m:2d", "finest first"), ("1m:30m", "keeps at least"),
                      ("1.5s:1h", "whole seconds"), ("x:1d", "not a duration")]:
        with pytest.raises(ValueError, match=says):
            CloudSettings(history_tiers=bad)
    assert CloudSettings(history_tiers="").history_tier_spec[1] == ()
    with FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}", history_tiers=HistoryTiers(600.0, ())) as raw_only:
        raw_only.ingest([telemetry([sample(0, T0 + 10 * k)]) for k in range(3)])  # a message a cycle
        assert raw_only.maintain_history(now=T0 + 615).raw_deleted == 2  # no tier to roll into: by age only


def test_the_migration_keeps_one_of_rows_stored_twice_before_the_index_was_unique(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    from cloud.store.base import ALEMBIC_DIR

    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0008")
        conn.execute(sa.text("INSERT INTO nodes (name, online, first_seen, last_seen, acked_seq, gaps, degraded, "
                             "labels) VALUES ('edge-a', true, 1, 1, 0, 0, '[]', '{}')"))
        for ts, temperature in [(T0, 40.0), (T0, 40.0), (T0 + 10, 41.0)]:
            conn.execute(sa.text("INSERT INTO samples (node, uuid, ts, temperature_c) VALUES ('edge-a', 'GPU-0', "
                                 ":ts, :t)"), {"ts": ts, "t": temperature})
    engine.dispose()
    with FleetStore(db_url) as store:  # upgrades to head
        rows = store.history(NODE, now=T0 + 20).rows
        assert [(r["ts"] - T0, r["temperature_c"]) for r in rows] == [(0, 40.0), (10, 41.0)]
        store.ingest([telemetry([sample(0, T0 + 10)])])  # stored already: left alone
        assert raw_count(store) == 2
