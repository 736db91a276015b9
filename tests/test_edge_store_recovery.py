"""The edge store against a broken, rolled-back or overgrown database, on real SQLite files:
corruption moved aside and a fresh store, damaged meta repaired in place, a restored copy
detected by the generation sidecar (a new epoch), `start_new_epoch`, the outbox bound, the depth
counter and the pruning of the local logs."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge.store import EdgeStore, StoreSchemaError, open_edge_store
from shared.protocol import (
    ActionOutcome,
    DecisionBody,
    Envelope,
    GpuOfflineStats,
    Kind,
    OfflineSummaryBody,
    XidBody,
)
from shared.wire import WireModel

NODE = "edge-node-1"


def xid(n: int = 48) -> tuple[Kind, WireModel]:
    return Kind.XID, XidBody(gpu_index=0, gpu_uuid="GPU-0", xid=n, action="request_migration")


def decision(i: int = 0) -> tuple[Kind, WireModel]:
    return Kind.DECISION, DecisionBody(gpu_index=0, gpu_uuid="GPU-0", rule="power_cap", action="set_power_limit",
                                       value=200.0 + i, outcome=ActionOutcome.APPLIED, reason=f"decision {i}")


def summary(gpus: int = 8) -> tuple[Kind, WireModel]:
    stats = [GpuOfflineStats(index=i, uuid=f"GPU-{i}", samples=720, temperature_c=(40.0, 80.0, 61.5),
                             power_w=(90.0, 700.0, 410.2), utilization_pct=(0.0, 100.0, 55.5)) for i in range(gpus)]
    return Kind.OFFLINE_SUMMARY, OfflineSummaryBody(from_ts=1000.0, to_ts=4600.0, gpus=stats)


def filled(path: Path, events: int = 40, acked: int = 6) -> str:
    """A store at `path` with `events` recorded and `acked` acked; returns its epoch."""
    store, _ = open_edge_store(path, NODE)
    store.record([xid(i) for i in range(events)])
    store.ack(acked)
    epoch = store.epoch
    store.close()
    return epoch


def outbox_count(store: EdgeStore) -> int:
    with sqlite3.connect(store.path) as conn:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def bad_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:16] = b"not a database!!"
    path.write_bytes(bytes(data))


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:8192])


def broken_page(path: Path) -> None:
    """The outbox's root page made an invalid b-tree page: only `PRAGMA quick_check` sees it
    before the first read of that table."""
    with sqlite3.connect(path) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'outbox'").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(path.read_bytes())
    data[(root - 1) * page_size] = 0x07  # not a b-tree page type
    path.write_bytes(bytes(data))


def schema_abc(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = 'abc' WHERE key = 'schema_version'")


def checkpointed(path: Path) -> None:
    """Fold the WAL into the main file, as a crash-free close leaves it."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


@pytest.mark.parametrize("damage", [zero_bytes, bad_header, truncated, broken_page, schema_abc],
                         ids=lambda f: f.__name__)
def test_a_broken_file_is_moved_aside_and_a_fresh_store_starts(
        tmp_path: Path, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "edge.db"
    old_epoch = filled(db)
    checkpointed(db)
    damage(db)
    caplog.clear()
    store, recovery = open_edge_store(db, NODE)
    try:
        assert recovery is not None and recovery.persistent
        assert recovery.moved_to is not None and recovery.moved_to.exists()
        assert recovery.moved_to.parent == tmp_path and recovery.moved_to.name.startswith("edge.db.corrupt-")
        assert recovery.moved_to.with_name(recovery.moved_to.name + ".generation").exists()  # its sidecar went too
        assert store.epoch != old_epoch and store.last_seq() == 0
        assert "34 events not yet acked" in recovery.lost  # known from the sidecar
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1, [r.getMessage() for r in errors]  # ONE line says it all
        assert str(recovery.moved_to) in errors[0].getMessage()
        assert recovery.summary().startswith("store_recovered: ")
        assert store.notices == []  # the recovery said it; the fresh store has nothing to add
        store.record([xid()])  # and it works
        assert store.last_seq() == 1
    finally:
        store.close()


def test_a_damaged_last_seq_is_repaired_and_no_event_is_lost(tmp_path: Path) -> None:
    db = tmp_path / "edge.db"
    filled(db, events=40, acked=6)
    for bad in ("x1", "3", "-7"):
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (bad,))
        store, recovery = open_edge_store(db, NODE)
        try:
            assert recovery is None, "repaired in place, nothing moved"
            assert store.last_seq() >= 40 and store.notices and "store_repaired" in store.notices[0]
            before = store.last_seq()
            (envelope,) = store.record([xid(79)])  # before the repair this collided with seq 4 and failed
            assert envelope.seq == before + 1
        finally:
            store.close()


@pytest.fixture(autouse=True)
def temporary_stores_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temporary stores of these tests go under tmp_path, not /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_a_newer_schema_is_kept_untouched_and_the_daemon_gets_a_temporary_store(tmp_path: Path) -> None:
    db = tmp_path / "edge.db"
    filled(db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(StoreSchemaError):
        EdgeStore(db, NODE)
    store, recovery = open_edge_store(db, NODE)
    try:
        assert recovery is not None and not recovery.persistent and recovery.moved_to is None
        assert recovery.summary().startswith("store_unavailable: ")
        assert store.path != db
        store.record([xid()])
        assert store.outbox_depth() == 1
    finally:
        store.close()
    with sqlite3.connect(db) as conn:  # the newer kgpu's file is as it was
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "999"


def test_a_database_that_cannot_be_opened_runs_on_a_temporary_store(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("a file where the store's directory should be")
    store, recovery = open_edge_store(blocked / "edge.db", NODE)
    try:
        assert recovery is not None and not recovery.persistent
        store.record([decision()])
        assert [d["reason"] for d in store.decisions()] == ["decision 0"]
    finally:
        store.close()


def test_a_restored_copy_starts_a_new_epoch_and_keeps_its_pending_events(tmp_path: Path) -> None:
    db = tmp_path / "edge.db"
    store, _ = open_edge_store(db, NODE)
    store.record([decision(i) if i % 2 else xid(i) for i in range(50)])
    store.ack(10)
    with sqlite3.connect(db) as conn:  # the documented online backup
        conn.execute("VACUUM INTO ?", (str(tmp_path / "backup.db"),))
    store.record([xid(i) for i in range(100)])
    store.ack(80)  # the cloud stored seqs up to 80 of this epoch
    old_epoch = store.epoch
    store.close()
    with sqlite3.connect(tmp_path / "backup.db") as conn:
        backed_up = [r[0] for r in conn.execute("SELECT id FROM outbox ORDER BY seq")]
    for name in ("edge.db", "edge.db-wal", "edge.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.db", db)

    store, recovery = open_edge_store(db, NODE)
    try:
        assert recovery is None
        assert store.epoch != old_epoch, "the restored file must not reuse seqs 11..80 of the old epoch"
        assert any(n.startswith("store_rolled_back: ") for n in store.notices)
        pending = store.outbox_pending(1000)
        assert [e.id for e in pending] == backed_up, "every event of the backup still pending, in order"
        assert [e.seq for e in pending] == list(range(1, 41))
        assert store.acked_upto() == 0 and store.last_seq() == 40 and store.outbox_depth() == 40
        newest = store.decisions(limit=1)[0]
        assert newest["seq"] == 40 and newest["id"] == pending[39].id  # the decision log moved with them
    finally:
        store.close()
    again, _ = open_edge_store(db, NODE)  # the sidecar now describes the new epoch: no second change
    try:
        assert again.notices == [] and again.epoch == store.epoch
    finally:
        again.close()


def test_start_new_epoch_renumbers_the_pending_events_in_one_go(tmp_path: Path) -> None:
    store, _ = open_edge_store(tmp_path / "edge.db", NODE)
    try:
        store.record([decision(i) if i % 3 == 0 else xid(i) for i in range(30)])
        store.ack(12)
        pending_ids = [e.id for e in store.outbox_pending(100)]
        first = store.epoch
        epoch = store.start_new_epoch("the cloud holds other events under these seqs")
        assert epoch == store.epoch != first
        pending = store.outbox_pending(100)
        assert [e.id for e in pending] == pending_ids and [e.seq for e in pending] == list(range(1, 19))
        with sqlite3.connect(store.path) as conn:
            stored = [json.loads(p)["seq"] for (p,) in conn.execute("SELECT payload FROM outbox ORDER BY seq")]
        assert stored == list(range(1, 19)), "the stored envelopes carry the new seqs"
        assert (store.last_seq(), store.acked_upto(), store.outbox_depth()) == (18, 0, 18)
        seqs = [d["seq"] for d in store.decisions(limit=100)]
        assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == 10 and min(seqs) <= 0
        (new,) = store.record([xid(1)])
        assert new.seq == 19
        assert store.ack(19) == 19 and store.outbox_depth() == 0
        assert store.start_new_epoch("nothing pending") != epoch and store.last_seq() == 0
    finally:
        store.close()


def test_outbox_depth_counter_stays_right_across_record_ack_and_restart(tmp_path: Path) -> None:
    db = tmp_path / "edge.db"
    store, _ = open_edge_store(db, NODE)
    store.record([xid(i) for i in range(25)])
    store.ack(7)
    store.ack(7)  # idempotent
    store.record([decision(1)])
    assert store.outbox_depth() == outbox_count(store) == 19
    bytes_before = store.outbox_bytes()
    store.close()
    store, _ = open_edge_store(db, NODE)
    try:
        assert store.outbox_depth() == outbox_count(store) == 19
        assert store.outbox_bytes() == bytes_before
        store.ack(100)  # clamped to last_seq
        assert store.outbox_depth() == outbox_count(store) == 0 and store.outbox_bytes() == 0
    finally:
        store.close()


def test_past_the_bound_summaries_shrink_and_decisions_stay(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, _ = open_edge_store(tmp_path / "edge.db", NODE)
    try:
        store.record([summary(), decision(0), summary(), xid(), summary(), decision(1)])
        full = store.outbox_bytes()
        decisions_before = [e.model_dump() for e in store.outbox_pending(10) if e.kind is not Kind.OFFLINE_SUMMARY]
        store.set_outbox_bound(max_bytes=full - 1000, max_events=0)
        store.record([decision(2)])
        pending = store.outbox_pending(10)
        assert [e.seq for e in pending] == list(range(1, 8)), "no seq taken out of the outbox"
        bodies = [OfflineSummaryBody.model_validate(e.body) for e in pending if e.kind is Kind.OFFLINE_SUMMARY]
        assert bodies[0].gpus == [] and (bodies[0].from_ts, bodies[0].to_ts) == (1000.0, 4600.0)
        assert bodies[-1].gpus, "only the oldest as many as needed"
        assert [e.model_dump() for e in pending if e.kind is not Kind.OFFLINE_SUMMARY][:3] == decisions_before
        assert not store.outbox_over_bound() and store.outbox_bytes() < full
        assert store.summaries_shrunk >= 1

        store.set_outbox_bound(max_bytes=100, max_events=3)  # beyond any shrinking
        store.record([decision(3), xid(31)])
        assert store.outbox_over_bound() and store.outbox_over_bound_events == 2
        assert store.outbox_depth() == 9, "recorded anyway: enforcement and its record come first"
        assert all(OfflineSummaryBody.model_validate(e.body).gpus == [] for e in store.outbox_pending(20)
                   if e.kind is Kind.OFFLINE_SUMMARY)
        assert any("over its bound" in r.getMessage() for r in caplog.records)
        assert Envelope.model_validate_json(store.outbox_pending(20)[-1].to_json()).kind is Kind.XID
    finally:
        store.close()


def test_local_logs_are_pruned_by_age_and_count_never_unacked(tmp_path: Path) -> None:
    store, _ = open_edge_store(tmp_path / "edge.db", NODE)
    try:
        store.record([decision(i) for i in range(300)] + [xid(i) for i in range(50)])
        store.ack(200)
        with sqlite3.connect(store.path) as conn:  # the first 50 decisions are ten days old
            conn.execute("UPDATE decisions SET ts = ts - 10 * 86400 WHERE seq <= 50")
        gone = store.prune_logs(time.time() - 7 * 86400, keep_rows=100_000)
        assert gone == 50
        assert min(d["seq"] for d in store.decisions(limit=1000)) == 51
        gone = store.prune_logs(time.time() - 7 * 86400, keep_rows=120)
        seqs = [d["seq"] for d in store.decisions(limit=1000)]
        assert min(seqs) == 181 and len(seqs) == 120 and gone == 130
        gone = store.prune_logs(time.time() + 3600, keep_rows=100)  # everything is "old" now
        seqs = [d["seq"] for d in store.decisions(limit=1000)]
        assert min(seqs) == 201, "decisions the cloud has not acked stay"
        assert store.outbox_depth() == 150 and outbox_count(store) == 150
    finally:
        store.close()


def test_the_last_resort_store_in_memory_works_from_several_threads() -> None:
    import threading

    from edge.store.recovery import MemoryEdgeStore

    store = MemoryEdgeStore.of(EdgeStore)(Path(":memory:"), NODE)
    try:
        def write(k: int) -> None:
            for i in range(20):
                store.record([decision(k * 100 + i), xid(i)])
                store.decisions(limit=5)
        threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert store.last_seq() == 160 and store.outbox_depth() == 160
        assert [e.seq for e in store.outbox_pending(1000)] == list(range(1, 161))
        assert store.ack(100) == 100 and store.outbox_depth() == 60
    finally:
        store.close()


def test_a_vanished_database_is_reported_from_its_generation_file(tmp_path: Path) -> None:
    db = tmp_path / "edge.db"
    old_epoch = filled(db, events=40, acked=6)
    for name in ("edge.db", "edge.db-wal", "edge.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)  # a volume that did not mount, an rm by mistake
    store, recovery = open_edge_store(db, NODE)
    try:
        assert recovery is None and store.epoch != old_epoch
        (notice,) = store.notices
        assert notice.startswith("store_recovered: ") and "missing" in notice and "34 events" in notice
    finally:
        store.close()
