"""Databases that go back in time (docs/protocol.md, "Databases that go back in time").

- The edge's database goes back (a backup restored, its WAL lost): it numbers new events with
  seqs the cloud already holds. The fleet store calls them conflicts, not duplicates; the ack
  says `conflict`, the edge starts a new outbox epoch and every new event is stored once.
- The fleet database goes back (replaced by an empty one, restored from an older backup): the
  edge's status says what a cloud acked before (`outbox_acked`); the store moves acked_seq up to
  it with one warning, so delivery resumes without an operator.

First the store's rules on SQLite and PostgreSQL, then the whole thing with real processes:
a broker, a controller and an edge daemon.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cloud.store import FleetStore, Incoming
from kgpu.lab.processes import TimedOut, wait_for
from shared.protocol import (
    AckBody,
    ActionOutcome,
    DecisionBody,
    Kind,
    StatusBody,
    make_envelope,
)
from shared.wire import WireModel
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import BUSY_POLICY, EdgeProcess, edge_seqs
from tests.helpers.postgres import create_database, drop_database, pg_url  # noqa: F401

NODE = "edge-a"
T0 = 1_700_000_000.0
CONFLICT_LINE = "with other envelope ids than the events stored under them"
FLOOR_LINE = "restored or replaced fleet database"

# ---- the store's rules ----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetStore]:
    if request.param == "sqlite":
        opened = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
        yield opened
        opened.close()
        return
    url = create_database(request.getfixturevalue("pg_url"))  # skips without PostgreSQL
    opened = FleetStore(url)
    yield opened
    opened.close()
    drop_database(url)


def incoming(body: WireModel, kind: Kind, *, seq: int | None = None, msg_id: str | None = None,
             ts: float = T0) -> Incoming:
    envelope = make_envelope(NODE, body, kind, seq)
    envelope = envelope.model_copy(update={"ts": ts, **({"id": msg_id} if msg_id else {})})
    return Incoming(envelope=envelope, body=envelope.parsed_body(), received_at=ts)


def status(epoch: str = "e1", acked: int | None = None, ts: float = T0) -> Incoming:
    return incoming(StatusBody(state="online", outbox_epoch=epoch, outbox_acked=acked), Kind.STATUS, ts=ts)


def event(seq: int, history: str = "a") -> Incoming:
    """Event `seq` of one history of the edge: the same history re-sends the same envelope id;
    a database that went back writes another history under the same seqs."""
    body = DecisionBody(rule="test", action="record", outcome=ActionOutcome.RECORDED, reason=f"{history}{seq}")
    return incoming(body, Kind.DECISION, seq=seq, msg_id=f"{history}-{seq}", ts=T0 + seq)


def stored(store: FleetStore) -> list[tuple[str, int, str]]:
    """(epoch, seq, envelope id) of every stored event of NODE."""
    with store.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(
            "SELECT epoch, seq, msg_id FROM events WHERE node = :n ORDER BY epoch, seq"), {"n": NODE})]


def records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_a_reused_seq_with_another_envelope_id_is_a_conflict_until_the_edge_starts_a_new_epoch(
    store: FleetStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.ingest([status(), *(event(seq) for seq in range(1, 6))])  # history a: 1..5 stored, acked
    # The edge's backup held 1..3: its new history b numbers 4.. again, in the same epoch.
    with caplog.at_level(logging.WARNING, logger="cloud.store"):
        first = store.ingest([event(3), event(4, "b"), event(5, "b"), event(6, "b"), event(7, "b")])
        again = store.ingest([event(4, "b"), event(5, "b"), event(6, "b"), event(7, "b")])
    assert (first.stored, first.duplicates, first.conflicts) == (0, 1, 4)  # 3 is the same event
    assert first.conflicted == {NODE} and first.acks == {NODE: (3, "e1")}  # nothing from 4 on
    assert (again.stored, again.conflicts, again.conflicted) == (0, 4, {NODE})
    assert again.acks == {NODE: (3, "e1")}
    [line] = records(caplog, CONFLICT_LINE)  # once per node and epoch
    assert line.levelno == logging.ERROR and line.node == NODE and line.conflicts == "4-5"  # type: ignore[attr-defined]
    assert stored(store) == [("e1", seq, f"a-{seq}") for seq in range(1, 6)]  # 6, 7 taken out again

    # The edge starts epoch e2 with its pending events renumbered 1..4, announced first.
    renumbered = [incoming(event(seq, "b").body, Kind.DECISION, seq=seq - 3, msg_id=f"b-{seq}")
                  for seq in range(4, 8)]
    after = store.ingest([status("e2", acked=0, ts=T0 + 60), *renumbered])
    assert (after.stored, after.conflicts, after.conflicted) == (4, 0, set())
    assert after.acks == {NODE: (4, "e2")}
    ids = [msg_id for _, _, msg_id in stored(store)]
    assert sorted(ids) == sorted({*ids}) and {f"b-{seq}" for seq in range(4, 8)} <= {*ids}


def test_a_conflict_beyond_a_hole_acks_only_what_comes_before_it(store: FleetStore) -> None:
    store.ingest([status(), event(1), event(2), event(4)])  # 3 missing: acked 2, 4 beyond the hole
    result = store.ingest([event(3, "b"), event(4, "b"), event(5, "b")])
    # 3 filled the hole (the cloud never had another 3); 4 is held under another id; 5 follows it.
    assert (result.stored, result.conflicts) == (1, 2)
    assert result.conflicted == {NODE} and result.acks == {NODE: (3, "e1")}
    assert [(seq, msg_id) for _, seq, msg_id in stored(store)] == [(1, "a-1"), (2, "a-2"), (3, "b-3"), (4, "a-4")]


def test_the_same_envelope_sent_again_is_still_a_duplicate(store: FleetStore) -> None:
    store.ingest([status(), event(1), event(2)])
    result = store.ingest([event(1), event(2), event(3)])
    assert (result.stored, result.duplicates, result.conflicts, result.conflicted) == (1, 2, 0, set())
    assert result.acks == {NODE: (3, "e1")}


def test_a_replaced_fleet_database_resumes_from_what_the_edge_says_was_acked(
    store: FleetStore, caplog: pytest.LogCaptureFixture
) -> None:
    # Before any status: the edge re-sends 101..108 to an empty database, which waits at the hole.
    stuck = store.ingest([event(seq) for seq in range(101, 109)])
    assert stuck.acks == {NODE: (0, None)} and stuck.gaps == {NODE: 8}
    with caplog.at_level(logging.WARNING, logger="cloud.store"):
        result = store.ingest([status(acked=100)])  # a status alone: the ack goes out all the same
    assert result.restored == {NODE: (0, 100)}
    assert result.acks == {NODE: (108, "e1")}
    [line] = records(caplog, FLOOR_LINE)
    assert line.node == NODE and "1-100" in line.getMessage()  # type: ignore[attr-defined]
    node = store.node(NODE)
    assert node is not None and node["acked_seq"] == 108
    # Later events go on as before; a status that says no more than we have changes nothing.
    later = store.ingest([status(acked=108, ts=T0 + 1), event(109)])
    assert later.restored == {} and later.acks == {NODE: (109, "e1")}
    assert len(records(caplog, FLOOR_LINE)) == 1


def test_an_older_fleet_database_names_the_seqs_it_lost(
    store: FleetStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.ingest([status(acked=0), *(event(seq) for seq in range(1, 21)), event(30)])  # as backed up
    with caplog.at_level(logging.WARNING, logger="cloud.store"):
        result = store.ingest([status(acked=50, ts=T0 + 100), event(51)])
    assert result.restored == {NODE: (20, 50)} and result.acks == {NODE: (51, "e1")}
    [line] = records(caplog, FLOOR_LINE)
    assert "21-29,31-50" in line.getMessage()


def test_the_floor_belongs_to_the_epoch_the_status_names(store: FleetStore) -> None:
    store.ingest([status(), *(event(seq) for seq in range(1, 4))])
    result = store.ingest([status("e2", acked=7, ts=T0 + 10), event(8)])
    assert result.restored == {NODE: (0, 7)} and result.acks == {NODE: (8, "e2")}


def test_new_fields_stay_out_of_the_wire_when_unset() -> None:
    """An edge older than `conflict` refuses unknown fields: only a conflict ack carries it."""
    plain = make_envelope(NODE, AckBody(upto=3, epoch="e1"), Kind.ACK).to_json()
    assert b"conflict" not in plain
    assert b'"conflict":true' in make_envelope(NODE, AckBody(upto=3, conflict=True), Kind.ACK).to_json()
    assert b"outbox_acked" not in make_envelope(NODE, StatusBody(state="offline"), Kind.STATUS).to_json()
    assert AckBody.model_validate({"upto": 1, "epoch": "e"}).conflict is False
    assert StatusBody.model_validate({"state": "online"}).outbox_acked is None


def test_an_empty_fleet_database_file_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    empty, fresh = tmp_path / "empty.db", tmp_path / "fresh.db"
    empty.touch()
    with caplog.at_level(logging.INFO, logger="cloud.store"):
        FleetStore(f"sqlite:///{empty}").close()
        FleetStore(f"sqlite:///{fresh}").close()
        FleetStore(f"sqlite:///{empty}").close()  # now a fleet database: nothing to say
    [line] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(empty) in line.getMessage() and "is empty" in line.getMessage()
    assert "restore the backup" in line.getMessage()


# ---- end to end: broker, controller and edge daemon as real processes ------------------------


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read a database another process is writing (WAL: readers never block it); read-only, so
    that a look before the process made the file does not make an empty one."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def fleet_db(cloud: CloudProcess) -> Path:
    return cloud.workdir / "fleet.db"


def acked_seq(cloud: CloudProcess, node: str = NODE) -> int:
    """The node's acked_seq in the fleet database; -1 before the node (or the schema) is there."""
    try:
        rows = query(fleet_db(cloud), "SELECT acked_seq FROM nodes WHERE name = ?", node)
    except sqlite3.OperationalError:
        return -1
    return int(rows[0][0]) if rows else -1


def cloud_events(cloud: CloudProcess, node: str = NODE) -> list[tuple[str, int, str, str]]:
    """(epoch, seq, envelope id, kind) of every event of the node in the fleet database."""
    return [tuple(r) for r in query(fleet_db(cloud), "SELECT epoch, seq, msg_id, kind FROM events WHERE node = ?"
                                    " ORDER BY epoch, seq", node)]


def edge_event_ids(db: Path) -> set[str]:
    """The envelope id of every event the edge recorded (its local decision and event logs)."""
    return {r[0] for r in query(db, "SELECT id FROM decisions UNION SELECT id FROM events_log")}


def record_events(edge: EdgeProcess, count: int) -> int:
    """Make the edge record at least `count` more decisions (both GPUs' load flips across the
    power-saving threshold: a decision each once sampled); returns its last seq."""
    target = edge_seqs(edge) + count
    load = 100.0
    while edge_seqs(edge) < target:
        for gpu in (0, 1):
            edge.inject(gpu, utilization=load)

        def sampled(load: float = load) -> bool:
            return all((edge.gpu(i)["sample"] or {}).get("utilization_pct") == load for i in (0, 1))

        wait_for(sampled, timeout=30, what=f"the daemon sampling {load} % load")
        load = 100.0 - load
    return edge_seqs(edge)


def log_lines(process: EdgeProcess, text: str) -> list[str]:
    return [line for line in process.log_path.read_text(errors="replace").splitlines() if text in line]


def copy_database(db: Path, to: Path) -> None:
    """The database's files as a stopped process left them (with its sidecar files)."""
    to.mkdir(parents=True, exist_ok=True)
    for path in db.parent.glob(db.name + "*"):
        shutil.copy2(path, to / path.name)


def restore_database(backup: Path, db: Path) -> None:
    for path in db.parent.glob(db.name + "*"):
        path.unlink()
    for path in backup.iterdir():
        shutil.copy2(path, db.parent / path.name)


@pytest.fixture
def processes(tmp_path: Path, broker: Any) -> Iterator[Callable[[Any], Any]]:
    """Start processes; whatever is still running at the end is killed."""
    started: list[EdgeProcess] = []

    def start(process: Any) -> Any:
        started.append(process)
        return process.start()

    yield start
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


@pytest.mark.slow
def test_an_edge_database_restored_from_a_backup_loses_no_new_event(
    tmp_path: Path, broker: Any, processes: Callable[[Any], Any]
) -> None:
    cloud: CloudProcess = processes(CloudProcess(tmp_path / "cloud", broker.url))
    edge: EdgeProcess = processes(EdgeProcess(tmp_path / "edge", node=NODE, mqtt=broker.url, config=BUSY_POLICY))
    first = record_events(edge, 3)
    wait_for(lambda: acked_seq(cloud) >= first, timeout=60, what="first events acked")
    edge.stop()
    backup = tmp_path / "edge-backup"
    copy_database(edge.db, backup)  # the database and its generation sidecar, as a backup holds them
    backed_up = edge_event_ids(backup / edge.db.name)
    edge.start()
    edge.wait_healthy()
    after_backup = record_events(edge, 5)
    wait_for(lambda: acked_seq(cloud) >= after_backup, timeout=60, what="events after the backup acked")
    edge.stop()
    [(old_epoch,)] = query(fleet_db(cloud), "SELECT outbox_epoch FROM nodes WHERE name = ?", NODE)
    held_before = {msg_id for _, _, msg_id, _ in cloud_events(cloud)}

    restore_database(backup, edge.db)  # back in time: the next seqs are ones the cloud holds
    edge.start()
    record_events(edge, 4)
    edge.inject(0, xid=79)  # a migration request on each GPU among the new events
    edge.inject(1, xid=79)
    wait_for(lambda: query(edge.db, "SELECT count(*) FROM events_log WHERE kind = 'migration_request'")[0][0] == 2,
             timeout=30, what="two migration requests recorded")
    new = edge_event_ids(edge.db) - backed_up
    try:
        wait_for(lambda: new <= {msg_id for _, _, msg_id, _ in cloud_events(cloud)}, timeout=60,
                 what="every event recorded after the restore stored in the cloud")
    except TimedOut as exc:  # name the missing events and what both sides said about epochs
        missing = new - {msg_id for _, _, msg_id, _ in cloud_events(cloud)}
        rows = query(edge.db, "SELECT id, seq, kind FROM events_log UNION ALL SELECT id, seq, 'decision' FROM decisions")
        outbox = query(edge.db, "SELECT seq FROM outbox ORDER BY seq")
        said = [line for process in (cloud, edge) for line in log_lines(process, "epoch")][-12:]
        raise AssertionError(f"{exc}; missing (id, edge seq, kind): {[r for r in rows if r[0] in missing]}; "
                             f"edge outbox seqs {[r[0] for r in outbox][:20]}; cloud acked_seq {acked_seq(cloud)}; "
                             f"logs: {said}") from exc

    events = cloud_events(cloud)
    ids = [msg_id for _, _, msg_id, _ in events]
    assert len(ids) == len(set(ids)), "an event stored twice"
    assert held_before <= set(ids)  # what was stored before stays
    assert len(new) >= 6 and sum(1 for _, _, i, kind in events if i in new and kind == "migration_request") == 2
    [(new_epoch,)] = query(fleet_db(cloud), "SELECT outbox_epoch FROM nodes WHERE name = ?", NODE)
    assert new_epoch != old_epoch and {epoch for epoch, _, i, _ in events if i in new} == {new_epoch}
    assert len(log_lines(cloud, CONFLICT_LINE)) == 1  # said once, as an error
    assert '"level": "error"' in log_lines(cloud, CONFLICT_LINE)[0]
    assert len(log_lines(edge, "started epoch")) == 1


def fleet_backup(db: Path, to: Path) -> None:
    """docs/operations.md: `sqlite3 DB ".backup FILE"` on a running controller (or VACUUM INTO)."""
    if shutil.which("sqlite3"):
        subprocess.run(["sqlite3", str(db), f".backup {to}"], check=True, timeout=60)
    else:
        conn = sqlite3.connect(db, timeout=30)
        try:
            conn.execute("VACUUM INTO ?", (str(to),))
        finally:
            conn.close()


@pytest.mark.slow
def test_a_restored_or_replaced_fleet_database_resumes_delivery_by_itself(
    tmp_path: Path, broker: Any, processes: Callable[[Any], Any]
) -> None:
    cloud: CloudProcess = processes(CloudProcess(tmp_path / "cloud", broker.url))
    edge: EdgeProcess = processes(EdgeProcess(tmp_path / "edge", node=NODE, mqtt=broker.url, config=BUSY_POLICY))
    db = fleet_db(cloud)
    first = record_events(edge, 3)
    wait_for(lambda: acked_seq(cloud) >= first, timeout=60, what="first events acked")
    backup = tmp_path / "fleet-backup.db"
    fleet_backup(db, backup)
    [(backed_up,)] = query(backup, "SELECT acked_seq FROM nodes WHERE name = ?", NODE)
    after_backup = record_events(edge, 5)
    wait_for(lambda: not query(edge.db, "SELECT seq FROM outbox WHERE seq <= ?", after_backup), timeout=60,
             what="events after the backup acked and deleted at the edge")

    def stop_and_let_events_wait() -> tuple[int, int]:
        """(acked_seq in the fleet database, the edge's last seq) once events wait at the edge."""
        cloud.stop()
        return acked_seq(cloud), record_events(edge, 3)

    def resumes(waiting_up_to: int) -> None:
        cloud.start()
        wait_for(lambda: acked_seq(cloud) >= waiting_up_to, timeout=60,
                 what="the events that waited at the edge acked, with no operator")

    # Restored from the older backup: what was acked after it is gone from the fleet database.
    last_acked, waiting = stop_and_let_events_wait()
    for path in db.parent.glob(db.name + "*"):
        path.unlink()
    shutil.copy2(backup, db)
    resumes(waiting)
    seqs = [seq for _, seq, _, _ in cloud_events(cloud)]
    assert len(seqs) == len(set(seqs))
    assert set(range(1, backed_up + 1)) <= set(seqs)  # from the backup
    gone = set(range(backed_up + 1, last_acked + 1)) - set(seqs)
    assert gone, "events acked after the backup are not in a restored database"
    assert set(range(last_acked + 1, waiting + 1)) <= set(seqs)  # nothing that waited is lost
    assert len(log_lines(cloud, FLOOR_LINE)) >= 1

    # Replaced by an empty (0-byte) file: warned at start, and delivery resumes all the same.
    floors = len(log_lines(cloud, FLOOR_LINE))
    last_acked, waiting = stop_and_let_events_wait()
    for path in db.parent.glob(db.name + "*"):
        path.unlink()
    db.touch()
    resumes(waiting)
    assert len(log_lines(cloud, "is empty (0 bytes): starting a new fleet database")) == 1
    assert len(log_lines(cloud, FLOOR_LINE)) > floors
    seqs = [seq for _, seq, _, _ in cloud_events(cloud)]
    assert len(seqs) == len(set(seqs)) and set(range(last_acked + 1, waiting + 1)) <= set(seqs)
