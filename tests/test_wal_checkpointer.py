"""The telemetry writer's SQLite store: commits not synced one by one and no checkpoint of its own
in the commit (shared/sqlite.py), its WAL checkpointed on a thread after each batch
(cloud/wal_checkpointer.py); the real child process does it (cloud/sample_writer.py)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from cloud.sample_writer import SampleWriterProcess, WriterSettings
from cloud.store import FleetStore
from cloud.store.ingest import IngestCore
from cloud.wal_checkpointer import WalCheckpointer
from kgpu.lab.processes import wait_for
from tests.test_fleet_store import sample, telemetry
from tests.test_sample_writer import raw


def _store_file(tmp_path: Path) -> tuple[str, Path]:
    """A fleet database with its schema, closed (its WAL checkpointed into the file)."""
    path = tmp_path / "fleet.db"
    url = f"sqlite:///{path}"
    FleetStore(url).close()
    return url, path


def _pragmas(store: IngestCore) -> tuple[int, int]:
    with store.engine.connect() as conn:
        sync = conn.exec_driver_sql("PRAGMA synchronous").scalar_one()
        auto = conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one()
    return int(sync), int(auto)


def _a_batch(nodes: int, now: float) -> list:  # type: ignore[type-arg]
    return [telemetry(f"node-{n}", [sample(i, now) for i in range(8)], ts=now) for n in range(nodes)]


def test_a_store_without_synced_commits_or_checkpoints_leaves_them_to_checkpoint_wal(tmp_path: Path) -> None:
    url, path = _store_file(tmp_path)
    default = IngestCore(url)
    assert _pragmas(default) == (2, 1000)  # FULL, SQLite's default checkpoint every 1,000 pages
    default.close()
    store = IngestCore(url, sync_every_commit=False, auto_checkpoint=False)
    try:
        assert _pragmas(store) == (1, 0)  # NORMAL, never
        before = path.stat().st_size
        now = time.time()
        for step in range(6):  # some 1,500 pages of WAL: past the automatic checkpoint's 1,000
            store.ingest(_a_batch(500, now + step))
        assert path.stat().st_size == before  # all of it still in the WAL
        store.checkpoint_wal()
        assert path.stat().st_size > before
        with sqlite3.connect(path) as conn:  # nothing left to copy: the WAL is all in the file
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and frames == copied
    finally:
        store.close()


def test_the_checkpointer_checkpoints_after_each_request_and_once_more_at_stop(tmp_path: Path) -> None:
    url, path = _store_file(tmp_path)
    store = IngestCore(url, sync_every_commit=False, auto_checkpoint=False)
    checkpoints = WalCheckpointer(store)
    try:
        before = path.stat().st_size
        store.ingest(_a_batch(200, time.time()))
        checkpoints.request()
        wait_for(lambda: checkpoints.checkpoints >= 1, what="a checkpoint after the batch")
        assert path.stat().st_size > before
        done = checkpoints.checkpoints
        store.ingest(_a_batch(200, time.time() + 1))
        checkpoints.stop()
        assert checkpoints.checkpoints == done + 1  # the last commits synced before it returned
    finally:
        store.close()


def test_the_sample_writer_process_checkpoints_what_it_writes(tmp_path: Path) -> None:
    """The real child: its batches reach the database file (not only the WAL) without anyone
    else committing, and its own connection never checkpoints in a commit."""
    url, path = _store_file(tmp_path)
    before = path.stat().st_size
    process = SampleWriterProcess(WriterSettings(db=url))
    try:
        now = time.time()
        for step in range(3):
            assert process.write([raw(f"node-{n}", now + step, tuple(range(8))) for n in range(300)]).samples == 2400
        wait_for(lambda: path.stat().st_size > before, what="the child's batches checkpointed into the file")
    finally:
        process.stop(10.0)
    with sqlite3.connect(path) as conn:  # stopped: its last checkpoint left nothing in the WAL
        busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and frames == copied
