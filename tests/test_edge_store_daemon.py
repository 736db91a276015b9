"""End to end with a real `kgpu edge run --backend sim`: a broken, unopenable or restored edge
database never stops enforcement, and the loss is reported; SIGTERM is bounded in time.
(The store-level cases, one per kind of damage: tests/test_edge_store_recovery.py.)"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edge.store import open_edge_store
from kgpu.lab.processes import wait_for
from shared.protocol import Kind, XidBody
from tests.helpers.edge_process import BUSY_POLICY, EdgeProcess

pytestmark = pytest.mark.slow

NODE = "edge-test"


def degraded(edge: EdgeProcess) -> list[str]:
    status, body = edge.request("GET", "/healthz")
    assert status == 200, body  # the node is healthy: its store is degraded, its enforcement is not
    return list(body["degraded"])


def outbox(db: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(db) as conn:
        return [(seq, json.loads(payload)["id"]) for seq, payload in
                conn.execute("SELECT seq, payload FROM outbox ORDER BY seq")]


def meta(db: Path, key: str) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])


def enforcing(edge: EdgeProcess) -> None:
    """The policy loop runs and its decisions are recorded: GPU 0 leaves power saving when its
    utilisation jumps, and goes back to it when it drops. First it is idle and in power saving (a
    daemon just started may not have sampled it idle yet: then a jump would leave nothing)."""
    edge.inject(0, utilization=0)
    wait_for(lambda: edge.metric("kgpu_gpu_power_saving_active", gpu="0") == 1.0, timeout=60,
             what="GPU 0 idle and in power saving")
    newest = max((d["seq"] for d in edge.decisions(limit=1)), default=-(2**62))
    for utilization, rule in ((100, "power_saving_exit"), (0, "power_saving")):
        edge.inject(0, utilization=utilization)
        found = wait_for(lambda rule=rule, after=newest: [d for d in edge.decisions(limit=50, rule=rule)
                                                          if d["seq"] > after and d["gpu_index"] == 0],
                         timeout=60, what=f"a new {rule} decision")
        newest = found[0]["seq"]


def test_a_zero_byte_database_is_moved_aside_and_enforcement_goes_on(
        edge_factory: Callable[..., EdgeProcess], tmp_path: Path) -> None:
    edge = edge_factory(config=BUSY_POLICY)
    enforcing(edge)
    assert edge.stop() == 0
    lost = len(outbox(edge.db))
    edge.db.write_bytes(b"")
    for side in ("-wal", "-shm"):
        edge.db.with_name(edge.db.name + side).unlink(missing_ok=True)
    edge.start()
    found = [d for d in degraded(edge) if d.startswith("store_recovered: ")]
    assert len(found) == 1 and "0 bytes" in found[0] and f"up to {lost} events" in found[0], found
    moved = list(edge.workdir.glob("edge.db.corrupt-*"))
    assert any(p.stat().st_size == 0 for p in moved)
    assert str(moved[0]) in found[0] or str(moved[-1]) in found[0]
    enforcing(edge)
    assert edge.metric("kgpu_store_recovered") == 1.0 and edge.metric("kgpu_store_persistent") == 1.0
    assert sum(1 for line in edge.log().splitlines() if '"level": "error"' in line and "moved it to" in line) == 1


@contextmanager
def running(edge: EdgeProcess) -> Iterator[EdgeProcess]:
    """A process started here and killed at the end whatever happens (edge_factory's cleanup)."""
    try:
        yield edge.start()
    finally:
        if edge.proc is not None and edge.proc.poll() is None:
            edge.kill9()


def test_a_damaged_last_seq_loses_no_xid(tmp_path: Path) -> None:
    edge = EdgeProcess(tmp_path / "edge")
    store, _ = open_edge_store(edge.db, NODE)
    store.record([(Kind.XID, XidBody(gpu_index=0, gpu_uuid="GPU-x", xid=31, action="ignored"))] * 20)
    store.close()
    with sqlite3.connect(edge.db) as conn:
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'last_seq'")  # seq 3 would collide: every write failed
    with running(edge):
        assert any(d.startswith("store_repaired: ") and "last_seq" in d for d in degraded(edge))
        edge.inject(1, xid=48)
        xids = wait_for(lambda: [e for e in edge.get("/api/v1/events?kind=xid")["events"] if e["body"]["xid"] == 48],
                        what="the XID event recorded")
        assert xids[0]["seq"] == 21
        assert edge.metric("kgpu_store_errors_total") == 0


def test_an_unopenable_database_leaves_the_daemon_enforcing_on_a_temporary_store(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("the store's directory is a file")
    edge = EdgeProcess(tmp_path / "edge", config=BUSY_POLICY, env={"TMPDIR": str(tmp_path)})
    edge.args[edge.args.index("--db") + 1] = str(blocked / "edge.db")
    with running(edge):
        found = [d for d in degraded(edge) if d.startswith("store_unavailable: ")]
        assert found and "temporary store" in found[0]
        enforcing(edge)
        assert edge.metric("kgpu_store_persistent") == 0.0
        assert "cannot be opened" in edge.log()
        assert list(tmp_path.glob("kgpu-edge-store-*/edge.db"))


def test_sigterm_is_bounded_when_the_database_is_stuck(edge_factory: Callable[..., EdgeProcess]) -> None:
    edge = edge_factory(config=BUSY_POLICY, env={"KGPU_SHUTDOWN_TIMEOUT": "1"})
    enforcing(edge)
    locker = sqlite3.connect(edge.db, isolation_level=None, timeout=30)
    locker.execute("BEGIN EXCLUSIVE")  # every write of the daemon now waits, then fails
    try:
        edge.inject(0, utilization=100)
        edge.inject(1, xid=48)
        wait_for(lambda: any("events held in memory" in d for d in degraded(edge)), timeout=60,
                 what="events held while the store is locked")
        assert edge.proc is not None
        code = edge.stop(timeout=60)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert code == 1
    assert "shutdown took longer than 1 s" in edge.log() and "events held in memory" in edge.log()
    seqs = [seq for seq, _ in outbox(edge.db)]
    assert seqs == list(range(1, len(seqs) + 1)) and seqs, "the outbox is intact and contiguous"


def test_backup_restore_starts_a_new_epoch_and_keeps_the_backup_s_events(
        edge_factory: Callable[..., EdgeProcess], tmp_path: Path) -> None:
    edge = edge_factory(config=BUSY_POLICY)
    enforcing(edge)
    backup = tmp_path / "edge-backup.db"
    with sqlite3.connect(edge.db) as conn:  # the documented online backup, while the daemon writes
        conn.execute("VACUUM INTO ?", (str(backup),))
    in_backup = outbox(backup)
    sidecar = edge.db.with_name("edge.db.generation")
    enforcing(edge)  # more events after the backup...
    wait_for(lambda: json.loads(sidecar.read_text())["last_seq"] > in_backup[-1][0], timeout=60,
             what="the generation file past the backup")  # ...and the sidecar knows of them
    assert edge.stop() == 0
    old_epoch = meta(edge.db, "outbox_epoch")
    newer = outbox(edge.db)
    assert len(newer) > len(in_backup)

    shutil.copy(backup, edge.db.with_name("edge.db.restore"))  # the documented restore: taken at the next start
    edge.start()
    assert any(d.startswith("store_rolled_back: ") for d in degraded(edge))
    (replaced,) = [p for p in edge.workdir.glob("edge.db.replaced-*") if not p.name.endswith(("-wal", "-shm"))]
    # the newer file is kept (not overwritten), its WAL beside it
    assert [event_id for _, event_id in outbox(replaced)] == [event_id for _, event_id in newer]
    assert not edge.db.with_name("edge.db.restore").exists()
    assert meta(edge.db, "outbox_epoch") != old_epoch, "a new epoch: no seq of the old one is reused"
    after = outbox(edge.db)
    # every event of the backup is still to be sent, renumbered 1..n in its order (nothing was
    # acked here: no cloud); those recorded after the backup were only in the newer file: gone
    assert [event_id for _, event_id in after[:len(in_backup)]] == [event_id for _, event_id in in_backup]
    assert [seq for seq, _ in after] == list(range(1, len(after) + 1))
    assert not {event_id for _, event_id in newer[len(in_backup):]} & {event_id for _, event_id in after}
    assert edge.metric("kgpu_store_repairs") >= 1
