"""cloud/store/: the fleet store, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from cloud.store import FleetStore, FleetStoreError, Incoming, IngestResult, gpus_table, metadata
from shared.gpu import GpuSample, Health
from shared.protocol import (
    AckBody,
    ActionOutcome,
    DecisionBody,
    Envelope,
    GpuSummary,
    HealthBody,
    Kind,
    StatusBody,
    TelemetryBody,
    XidBody,
    make_envelope,
)
from shared.wire import WireModel
from tests.helpers.postgres import create_database, drop_database, pg_url  # noqa: F401

T0 = 1_700_000_000.0
NODE = "edge-a"
OTHER = "edge-b"

# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database per test on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet' / 'fleet.db'}"
        return
    server_url = request.getfixturevalue("pg_url")  # skips when PostgreSQL is not installed
    url = create_database(server_url)
    yield url
    drop_database(url)


@pytest.fixture
def open_store(db_url: str) -> Iterator[Callable[..., FleetStore]]:
    """Open FleetStores on this test's database; all are closed at the end."""
    opened: list[FleetStore] = []

    def open_(**kwargs: Any) -> FleetStore:
        store = FleetStore(db_url, **kwargs)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[..., FleetStore]) -> FleetStore:
    return open_store()


# ---- message builders -----------------------------------------------------------------------


def incoming(
    node: str, body: WireModel, kind: Kind, *, seq: int | None = None, ts: float = T0,
    received_at: float | None = None,
) -> Incoming:
    # the same seq is the same envelope (its id): another id under a stored seq is a conflict
    same_id = {"id": f"{node}-{kind}-{seq}"} if seq is not None else {}
    envelope = make_envelope(node, body, kind, seq).model_copy(update={"ts": ts, **same_id})
    return Incoming(envelope=envelope, body=envelope.parsed_body(),
                    received_at=ts if received_at is None else received_at)


def gpu(index: int, health: Health = Health.HEALTHY, limit: float = 300.0) -> GpuSummary:
    return GpuSummary(index=index, uuid=f"GPU-{index}", name="NVIDIA H100", health=health,
                      power_limit_w=limit)


def status(
    node: str = NODE, *, epoch: str | None = "epoch-1", state: str = "online", ts: float = T0,
    received_at: float | None = None, gpus: list[GpuSummary] | None = None,
    version: str = "0.1.0", depth: int = 0, degraded: list[str] | None = None,
) -> Incoming:
    body = StatusBody(
        state=state, version=version, gpus=[gpu(0), gpu(1)] if gpus is None else gpus,
        policy_name="default", policy_version=3, outbox_depth=depth, outbox_epoch=epoch,
        degraded=degraded or [],
    )
    return incoming(node, body, Kind.STATUS, ts=ts, received_at=received_at)


def sample(index: int, ts: float, **figures: Any) -> GpuSample:
    values = {"temperature_c": 60.0, "power_w": 200.0, "power_limit_w": 300.0,
              "utilization_pct": 50.0, "memory_used_bytes": 1 << 30, **figures}
    return GpuSample(index=index, uuid=f"GPU-{index}", ts=ts, **values)


def telemetry(node: str, samples: list[GpuSample], ts: float = T0) -> Incoming:
    return incoming(node, TelemetryBody(samples=samples), Kind.TELEMETRY, ts=ts)


def xid(node: str, seq: int, ts: float | None = None) -> Incoming:
    body = XidBody(gpu_index=0, gpu_uuid="GPU-0", xid=48, action="request_migration")
    return incoming(node, body, Kind.XID, seq=seq, ts=T0 + seq if ts is None else ts)


def decision(node: str, seq: int, ts: float | None = None, rule: str = "thermal_step_down") -> Incoming:
    body = DecisionBody(
        gpu_index=0, gpu_uuid="GPU-0", rule=rule, action="set_power_limit", value=250.0,
        outcome=ActionOutcome.APPLIED, reason=f"decision {seq}", inputs={"temperature_c": 88},
        policy_version=3,
    )
    return incoming(node, body, Kind.DECISION, seq=seq, ts=T0 + seq if ts is None else ts)


def health_event(node: str, seq: int, ts: float | None = None) -> Incoming:
    body = HealthBody(level="gpu", gpu_index=0, gpu_uuid="GPU-0", previous=Health.HEALTHY,
                      current=Health.UNHEALTHY, reasons=["xid 48"])
    return incoming(node, body, Kind.HEALTH, seq=seq, ts=T0 + seq if ts is None else ts)


def count(store: FleetStore, table: str) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def stored_seqs(store: FleetStore, node: str = NODE) -> list[int]:
    with store.engine.connect() as conn:
        return [int(s) for s in conn.execute(
            sa.text("SELECT seq FROM events WHERE node = :n ORDER BY seq"), {"n": node}
        ).scalars()]


# ---- schema ---------------------------------------------------------------------------------

HEAD_REVISION = max(p.name.split("_")[0] for p in
                    (Path(__file__).resolve().parent.parent / "cloud" / "store" / "alembic" / "versions").glob("0*.py"))


def test_migrations_create_the_schema_and_a_second_open_is_a_no_op(
    open_store: Callable[..., FleetStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cloud.store")
    first = open_store()
    assert "fleet store schema migrated" in caplog.text
    tables = set(sa.inspect(first.engine).get_table_names())
    assert {"nodes", "gpus", "sample_messages", "events", "decisions", "alembic_version"} <= tables
    with first.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [(HEAD_REVISION,)]
        # The hand-written migration and the tables the store queries are the same schema.
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []
    first.ingest([status()])
    first.close()

    caplog.clear()
    second = open_store()
    assert "fleet store schema migrated" not in caplog.text
    with second.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [(HEAD_REVISION,)]
    assert [n["name"] for n in second.nodes()] == [NODE]  # data kept


def test_a_schema_newer_than_this_code_is_refused(open_store: Callable[..., FleetStore]) -> None:
    store = open_store()
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    store.close()
    with pytest.raises(FleetStoreError, match="9999.*newer version"):
        open_store()


# ---- status ---------------------------------------------------------------------------------


def test_status_upserts_the_node_and_its_gpus_and_goes_offline(store: FleetStore) -> None:
    store.ingest([status(ts=T0, received_at=T0 + 0.5, depth=7, degraded=["nvml"])])
    node = store.node(NODE)
    assert node is not None
    assert node["online"] is True
    assert node["daemon_version"] == "0.1.0"
    assert (node["policy_name"], node["policy_version"]) == ("default", 3)
    assert node["outbox_depth"] == 7
    assert node["outbox_epoch"] == "epoch-1"
    assert node["degraded"] == ["nvml"]
    assert node["status_ts"] == T0
    assert node["first_seen"] == node["last_seen"] == T0 + 0.5
    assert node["labels"] == {}
    assert [(g["uuid"], g["index"], g["health"], g["power_limit_w"]) for g in node["gpus"]] == [
        ("GPU-0", 0, "healthy", 300.0), ("GPU-1", 1, "healthy", 300.0)]
    assert node["gpu_summary"]["count"] == 2 and node["gpu_summary"]["healthy"] == 2

    store.ingest([status(ts=T0 + 10, gpus=[gpu(0, Health.UNHEALTHY, 250.0)], state="offline")])
    node = store.node(NODE)
    assert node is not None and node["online"] is False
    assert [(g["uuid"], g["health"], g["power_limit_w"]) for g in node["gpus"]] == [
        ("GPU-0", "unhealthy", 250.0)]  # GPU-1 is no longer in the inventory
    assert node["first_seen"] == T0 + 0.5
    [listed] = store.nodes()
    assert listed["name"] == NODE and listed["online"] is False
    assert listed["gpu_summary"]["unhealthy"] == 1
    assert store.node("nope") is None


def test_an_older_status_does_not_regress_state_but_last_seen_advances(store: FleetStore) -> None:
    store.ingest([status(ts=T0 + 100, received_at=T0 + 100, version="0.2.0", depth=1)])
    # (an *offline* status always applies: see test_last_will_with_an_old_ts_still_marks_the_node_offline)
    store.ingest([status(ts=T0 + 50, received_at=T0 + 200, version="0.1.0", depth=99,
                         state="online", epoch="epoch-old", gpus=[gpu(0, Health.LOST)])])
    node = store.node(NODE)
    assert node is not None
    assert node["online"] is True
    assert node["daemon_version"] == "0.2.0"
    assert node["outbox_depth"] == 1
    assert node["outbox_epoch"] == "epoch-1"
    assert node["status_ts"] == T0 + 100
    assert node["last_seen"] == T0 + 200
    assert {g["health"] for g in node["gpus"]} == {"healthy"}

    # Inside one batch too: the newest status wins whatever the order.
    store.ingest([status(OTHER, ts=T0 + 9, version="new"), status(OTHER, ts=T0 + 1, version="old")])
    other = store.node(OTHER)
    assert other is not None and other["daemon_version"] == "new"


def test_mark_offline_and_a_late_notice(store: FleetStore) -> None:
    store.ingest([status(received_at=T0 + 10)])
    store.mark_offline(NODE, T0 + 5)  # the will is older than what we heard since: ignored
    assert store.node(NODE)["online"] is True  # type: ignore[index]
    store.mark_offline(NODE, T0 + 20)
    assert store.node(NODE)["online"] is False  # type: ignore[index]
    store.ingest([status(ts=T0 + 30, received_at=T0 + 30)])  # back
    assert store.node(NODE)["online"] is True  # type: ignore[index]
    store.mark_offline("never-seen", T0)
    assert store.node("never-seen")["online"] is False  # type: ignore[index]
    with pytest.raises(ValueError):
        store.mark_offline("Not A Node!", T0)


# ---- telemetry ------------------------------------------------------------------------------


def test_telemetry_keeps_the_latest_sample_and_downsamples_history(
    open_store: Callable[..., FleetStore],
) -> None:
    store = open_store(history_resolution_s=60.0)
    # 5 s samples over 3 minutes for two GPUs, in several batches, of a node never seen before.
    for start in range(0, 180, 30):
        store.ingest([telemetry(NODE, [sample(i, T0 + t, temperature_c=40.0 + t)
                                       for t in range(start, start + 30, 5) for i in (0, 1)])])
    node = store.node(NODE)
    assert node is not None and node["online"] is True  # telemetry created it
    gpu0 = next(g for g in node["gpus"] if g["uuid"] == "GPU-0")
    assert gpu0["sample_ts"] == T0 + 175
    assert gpu0["sample"]["temperature_c"] == 40.0 + 175
    assert gpu0["health"] is None  # no status yet

    history = store.samples(NODE, "GPU-0")
    assert [h["ts"] - T0 for h in history] == [0, 60, 120]
    assert history[0]["temperature_c"] == 40.0 and history[0]["memory_used_bytes"] == 1 << 30
    assert len(store.samples(NODE)) == 6
    assert [h["ts"] - T0 for h in store.samples(NODE, "GPU-1", since=T0 + 60, limit=1)] == [120]

    # A late sample never replaces a newer latest one.
    store.ingest([telemetry(NODE, [sample(0, T0 + 100, temperature_c=1.0)])])
    gpu0 = next(g for g in store.node(NODE)["gpus"] if g["uuid"] == "GPU-0")  # type: ignore[index]
    assert gpu0["sample_ts"] == T0 + 175

    assert store.prune_samples(T0 + 60) == 2
    assert [h["ts"] - T0 for h in store.samples(NODE, "GPU-0")] == [60, 120]


def test_history_resolution_is_configurable(open_store: Callable[..., FleetStore]) -> None:
    store = open_store(history_resolution_s=10.0)
    store.ingest([telemetry(NODE, [sample(0, T0 + t) for t in range(0, 60, 5)])])
    assert [h["ts"] - T0 for h in store.samples(NODE)] == [0, 10, 20, 30, 40, 50]


# ---- events ---------------------------------------------------------------------------------


def test_the_same_batch_twice_is_all_duplicates_and_is_acked_again(store: FleetStore) -> None:
    batch = [status(), xid(NODE, 1), decision(NODE, 2), health_event(NODE, 3)]
    first = store.ingest(batch)
    assert (first.stored, first.duplicates, first.stale, first.gaps) == (3, 0, 0, {})
    assert first.acks == {NODE: (3, "epoch-1")}

    second = store.ingest(batch)
    assert (second.stored, second.duplicates) == (0, 3)
    assert second.acks == {NODE: (3, "epoch-1")}  # re-sent: the edge missed the first one
    assert count(store, "events") == 3 and count(store, "decisions") == 1

    # Telemetry or status alone asks for no ack.
    assert store.ingest([status(ts=T0 + 1)]).acks == {}


def test_duplicates_inside_one_batch(store: FleetStore) -> None:
    result = store.ingest([xid(NODE, 1), xid(NODE, 1), xid(NODE, 2), xid(NODE, 1)])
    assert (result.stored, result.duplicates) == (2, 2)
    assert stored_seqs(store) == [1, 2]


def test_out_of_order_seqs_inside_a_batch(store: FleetStore) -> None:
    result = store.ingest([status(), xid(NODE, 3), xid(NODE, 1), decision(NODE, 4), xid(NODE, 2)])
    assert result.stored == 4 and result.gaps == {}
    assert result.acks[NODE] == (4, "epoch-1")
    assert stored_seqs(store) == [1, 2, 3, 4]


def test_a_gap_is_counted_and_closes_when_the_missing_event_arrives(
    store: FleetStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.ingest([status()])
    with caplog.at_level(logging.WARNING, logger="cloud.store"):
        result = store.ingest([xid(NODE, 1), xid(NODE, 2), xid(NODE, 4)])
    assert result.stored == 3
    assert result.acks[NODE] == (2, "epoch-1")
    assert result.gaps == {NODE: 1}
    [line] = [r for r in caplog.records if "hole" in r.getMessage()]
    assert line.node == NODE and line.missing == "3"  # type: ignore[attr-defined]
    assert store.node(NODE)["gaps"] == 1  # type: ignore[index]

    # 4 again (the edge retries everything unacked) is a duplicate, still beyond the hole.
    again = store.ingest([xid(NODE, 4)])
    assert (again.stored, again.duplicates, again.gaps) == (0, 1, {})
    assert again.acks[NODE] == (2, "epoch-1")

    filled = store.ingest([xid(NODE, 3)])
    assert filled.acks[NODE] == (4, "epoch-1")
    assert filled.gaps == {}
    node = store.node(NODE)
    assert node is not None and node["acked_seq"] == 4 and node["gaps"] == 1


def test_an_epoch_change_resets_acked_seq_and_new_seqs_are_stored(
    store: FleetStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.ingest([status(epoch="epoch-1"), xid(NODE, 1), xid(NODE, 2), xid(NODE, 3)])
    with caplog.at_level(logging.WARNING, logger="cloud.store"):
        result = store.ingest([status(epoch="epoch-2", ts=T0 + 60), xid(NODE, 1), decision(NODE, 2)])
    assert any("epoch changed" in r.getMessage() and r.node == NODE  # type: ignore[attr-defined]
               for r in caplog.records)
    assert (result.stored, result.duplicates) == (2, 0)
    assert result.acks == {NODE: (2, "epoch-2")}
    node = store.node(NODE)
    assert node is not None and (node["outbox_epoch"], node["acked_seq"]) == ("epoch-2", 2)
    assert sorted((e["epoch"], e["seq"]) for e in store.events(NODE)) == [
        ("epoch-1", 1), ("epoch-1", 2), ("epoch-1", 3), ("epoch-2", 1), ("epoch-2", 2)]
    assert [(d["epoch"], d["seq"]) for d in store.decisions(NODE)] == [("epoch-2", 2)]


def test_an_epoch_change_alone_resets_the_ack(store: FleetStore) -> None:
    store.ingest([status(epoch="epoch-1"), xid(NODE, 1), xid(NODE, 2)])
    store.ingest([status(epoch="epoch-2", ts=T0 + 1)])
    assert store.node(NODE)["acked_seq"] == 0  # type: ignore[index]
    assert store.ingest([xid(NODE, 1)]).acks == {NODE: (1, "epoch-2")}


def test_events_sent_before_an_epoch_change_in_the_same_batch_are_stale(store: FleetStore) -> None:
    store.ingest([status(epoch="epoch-1"), xid(NODE, 1)])
    result = store.ingest([xid(NODE, 2), status(epoch="epoch-2", ts=T0 + 5), xid(NODE, 1)])
    assert (result.stored, result.stale, result.duplicates) == (1, 1, 0)
    assert result.acks == {NODE: (1, "epoch-2")}


def test_events_before_any_status_take_the_first_epoch_named(store: FleetStore) -> None:
    first = store.ingest([xid(NODE, 1), xid(NODE, 2)])
    assert first.acks == {NODE: (2, None)}
    node = store.node(NODE)
    assert node is not None and node["outbox_epoch"] is None and node["online"] is True
    assert [e["epoch"] for e in store.events(NODE)] == [None, None]

    # The first status to name an epoch adopts the events so far: no reset, no re-store.
    second = store.ingest([status(epoch="epoch-1"), xid(NODE, 2), xid(NODE, 3)])
    assert (second.stored, second.duplicates) == (1, 1)
    assert second.acks == {NODE: (3, "epoch-1")}
    assert {e["epoch"] for e in store.events(NODE)} == {"epoch-1"}


def test_decision_events_fill_the_decisions_table(store: FleetStore) -> None:
    store.ingest([status(), decision(NODE, 1, rule="power_cap"), xid(NODE, 2)])
    [row] = store.decisions()
    assert row["node"] == NODE and row["epoch"] == "epoch-1" and row["seq"] == 1
    assert row["ts"] == T0 + 1
    assert (row["gpu_uuid"], row["rule"], row["action"], row["value"]) == (
        "GPU-0", "power_cap", "set_power_limit", 250.0)
    assert (row["outcome"], row["reason"], row["policy_version"]) == ("applied", "decision 1", 3)
    [event] = store.events(kind="decision")
    assert event["body"]["inputs"] == {"temperature_c": 88}  # the full body is in events


def test_event_and_decision_queries_filter_and_put_the_newest_first(store: FleetStore) -> None:
    store.ingest(
        [status(NODE), status(OTHER, epoch="epoch-9")]
        + [xid(NODE, s) if s % 2 else decision(NODE, s) for s in range(1, 7)]
        + [health_event(OTHER, s) for s in range(1, 4)]
    )
    everything = store.events(limit=1000)
    assert len(everything) == 9
    assert [e["ts"] for e in everything] == sorted((e["ts"] for e in everything), reverse=True)
    assert [e["seq"] for e in store.events(NODE)] == [6, 5, 4, 3, 2, 1]
    assert [e["seq"] for e in store.events(NODE, kind="xid")] == [5, 3, 1]
    assert [e["seq"] for e in store.events(NODE, since=T0 + 4)] == [6, 5, 4]
    assert [e["seq"] for e in store.events(NODE, limit=2)] == [6, 5]
    assert {e["node"] for e in store.events(kind=Kind.HEALTH)} == {OTHER}
    assert store.events(kind="command_result") == []
    one = store.events(OTHER, limit=1)[0]
    assert (one["epoch"], one["kind"], one["received_at"]) == ("epoch-9", "health", T0 + 3)
    assert one["body"]["reasons"] == ["xid 48"] and len(one["msg_id"]) > 0

    assert [d["seq"] for d in store.decisions(NODE)] == [6, 4, 2]
    assert [d["seq"] for d in store.decisions(NODE, since=T0 + 3, limit=1)] == [6]
    assert store.decisions(OTHER) == []


def test_a_lost_ack_replays_as_duplicates(db_url: str) -> None:
    """The controller commits, crashes before publishing the ack, restarts: the edge resends
    everything and nothing is stored twice."""
    batch = [status(), *(xid(NODE, s) for s in range(1, 51)), decision(NODE, 51)]
    before = FleetStore(db_url)
    before.ingest(batch)  # committed; the IngestResult (the ack) is lost with the process
    before.close()

    after = FleetStore(db_url)
    try:
        replay = after.ingest(batch + [xid(NODE, 52)])
        assert (replay.stored, replay.duplicates) == (1, 51)
        assert replay.acks == {NODE: (52, "epoch-1")}
        assert count(after, "events") == 52 and count(after, "decisions") == 1
    finally:
        after.close()


def test_two_replicas_ingesting_the_same_batch_store_one_copy(
    open_store: Callable[..., FleetStore],
) -> None:
    """Two controllers on one database (PostgreSQL: row locks; SQLite: one writer at a time)."""
    replicas = [open_store(), open_store()]
    nodes = [f"edge-{i}" for i in range(8)]
    for round_ in range(5):
        batch = [status(n, ts=T0 + round_) for n in nodes] + [
            (decision if s % 3 == 0 else xid)(n, s)
            for n in nodes for s in range(round_ * 20 + 1, round_ * 20 + 21)
        ]
        start = threading.Barrier(2)
        results: list[IngestResult] = []
        errors: list[BaseException] = []

        def ingest(store: FleetStore, start: threading.Barrier, batch: list[Incoming],
                   results: list[IngestResult], errors: list[BaseException]) -> None:
            start.wait()
            try:
                results.append(store.ingest(batch))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=ingest, args=(r, start, batch, results, errors)) for r in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert errors == []
        assert sorted((r.stored, r.duplicates) for r in results) == [(0, 160), (160, 0)]
        assert results[0].acks == results[1].acks == {n: ((round_ + 1) * 20, "epoch-1")
                                                      for n in nodes}
    assert count(replicas[0], "events") == 8 * 100
    assert count(replicas[0], "decisions") == 8 * 33


def test_concurrent_batches_for_one_node_lose_no_update(
    open_store: Callable[..., FleetStore],
) -> None:
    """Two replicas, different events of the same node at the same time: the node row is
    read-modified-written by both, so without the row lock one `gaps` increment would vanish."""
    replicas = [open_store(), open_store()]
    replicas[0].ingest([status()])
    rounds = 15
    errors: list[BaseException] = []
    for r in range(rounds):
        start = threading.Barrier(2)

        def ingest(store: FleetStore, seq: int, start: threading.Barrier) -> None:
            start.wait()
            try:
                store.ingest([xid(NODE, seq)])  # beyond the hole at 1: each is one gap
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=ingest, args=(replicas[i], 100 + 2 * r + i, start))
                   for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    node = replicas[1].node(NODE)
    assert node is not None and node["gaps"] == 2 * rounds and node["acked_seq"] == 0


def test_skip_locked_defers_the_nodes_another_replica_holds(store: FleetStore) -> None:
    """What the ingest uses with replicas: a node whose row another transaction holds is not
    waited for; its messages come back deferred, the other nodes' are stored, and offered again
    once the row is free they are stored exactly once."""
    store.ingest([status(NODE), status(OTHER)])
    if store.engine.dialect.name == "sqlite":  # one writer at a time: nothing can be held
        result = store.ingest([decision(NODE, 1), xid(OTHER, 1)], skip_locked=True)
        assert result.deferred == [] and result.stored == 2
        return
    nodes = metadata.tables["nodes"]
    with store.engine.connect() as other, other.begin():  # another replica, mid-transaction
        other.execute(sa.select(nodes).where(nodes.c.name == NODE).with_for_update())
        result = store.ingest([decision(NODE, 1), xid(OTHER, 1), decision(NODE, 2)], skip_locked=True)
        assert [(i.envelope.node, i.envelope.seq) for i in result.deferred] == [(NODE, 1), (NODE, 2)]
        assert result.stored == 1 and result.acks == {OTHER: (1, "epoch-1")}
        held = store.ingest(result.deferred, skip_locked=True)  # still held: all deferred, nothing written
        assert len(held.deferred) == 2 and held.stored == 0 and held.acks == {}
    again = store.ingest(held.deferred, skip_locked=True)
    assert again.deferred == [] and again.stored == 2 and again.acks == {NODE: (2, "epoch-1")}
    assert stored_seqs(store, NODE) == [1, 2] and stored_seqs(store, OTHER) == [1]


# ---- refusals and errors --------------------------------------------------------------------


def test_cloud_to_edge_kinds_are_refused_before_any_write(store: FleetStore) -> None:
    ack = make_envelope(NODE, AckBody(upto=3, epoch="epoch-1"), Kind.ACK)
    with pytest.raises(ValueError, match="cloud-to-edge"):
        store.ingest([xid(NODE, 1), Incoming(ack, ack.parsed_body(), T0)])
    assert store.nodes() == [] and count(store, "events") == 0

    no_seq = xid(NODE, 1)
    unnumbered = Incoming(no_seq.envelope.model_copy(update={"seq": None}), no_seq.body, T0)
    with pytest.raises(ValueError, match="no seq"):
        store.ingest([unnumbered])
    wrong_body = Incoming(xid(NODE, 1).envelope, status().body, T0)
    with pytest.raises(ValueError, match="StatusBody"):
        store.ingest([wrong_body])
    assert store.ingest([]) == IngestResult()


def test_a_database_error_surfaces_as_fleet_store_error(store: FleetStore) -> None:
    store.ingest([status(), xid(NODE, 1)])
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE decisions"))
    with pytest.raises(FleetStoreError, match="fleet store: ingest failed") as caught:
        store.ingest([decision(NODE, 2)])
    assert "decisions" in caught.value.reason
    # The batch rolled back as a whole: no event 2, the ack did not move.
    assert stored_seqs(store) == [1]
    assert store.node(NODE)["acked_seq"] == 1  # type: ignore[index]
    store.close()
    with pytest.raises(FleetStoreError, match="closed"):
        store.nodes()


def test_an_unreachable_database_is_a_fleet_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FleetStoreError, match="cannot create"):
        FleetStore(f"sqlite:///{blocker / 'sub' / 'fleet.db'}")
    with pytest.raises(FleetStoreError, match="open failed|migrate failed"):
        FleetStore("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(ValueError, match="unsupported"):
        FleetStore("mysql://localhost/x")


def test_envelope_helpers_round_trip() -> None:
    """The builders above make what the edge sends (guards the tests, not the store)."""
    item = xid(NODE, 7)
    assert Envelope.model_validate_json(item.envelope.to_json()) == item.envelope
    assert item.envelope.seq == 7 and item.envelope.ts == T0 + 7


def test_last_will_with_an_old_ts_still_marks_the_node_offline(tmp_path) -> None:
    """The edge's last will is built at connect time; it must win over newer online statuses."""
    import time as _time

    from cloud.store import FleetStore, Incoming
    from shared.protocol import Kind, StatusBody, make_envelope

    store = FleetStore(f"sqlite:///{tmp_path / 'will.db'}")
    will = make_envelope("n1", StatusBody(state="offline"), Kind.STATUS)  # made first: oldest ts
    _time.sleep(0.01)
    online = make_envelope("n1", StatusBody(state="online", version="1", outbox_epoch="e1"), Kind.STATUS)
    now = _time.time()
    store.ingest([Incoming(online, online.parsed_body(), now)])
    assert store.node("n1")["online"] is True
    store.ingest([Incoming(will, will.parsed_body(), now + 1)])
    node = store.node("n1")
    assert node["online"] is False and node["daemon_version"] == "1"  # other fields keep the newer status
    store.close()


def test_a_gpu_a_status_names_has_no_sample_until_telemetry_sets_one(
    open_store: Callable[..., FleetStore],
) -> None:
    """A status's GPU row keeps SQL NULL in `sample` (once the JSON null, which `IS NOT NULL`
    took for a sample); every read that says whether a GPU has a sample agrees."""
    store = open_store()
    store.ingest([status()])
    (page, _after) = store.nodes_page(None, 10, gpu_limit=8, compact=True)
    assert [g["sample"] for g in page[0]["gpus"]] == [None, None]
    node = store.node(NODE)
    assert node is not None and [g["sample"] for g in node["gpus"]] == [None, None]
    assert store.gpu_samples() == {}
    with store.reading("test") as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(gpus_table).where(gpus_table.c.sample.is_(None))).scalar() == 2
    store.ingest([telemetry(NODE, [sample(0, T0 + 1, temperature_c=66.0)], ts=T0 + 1)])
    (page, _after) = store.nodes_page(None, 10, gpu_limit=8, compact=True)
    compact = {g["uuid"]: g["sample"] for g in page[0]["gpus"]}
    assert compact["GPU-1"] is None and compact["GPU-0"] is not None
    assert compact["GPU-0"]["temperature_c"] == 66.0
    assert set(store.gpu_samples()) == {(NODE, "GPU-0")}
