"""edge/store/: the edge's durable store (outbox, decision log, caches, telemetry history)."""

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import event

from edge.store import STORE_SCHEMA_VERSION, EdgeStore, StoreError, StoreSchemaError
from shared.gpu import GpuInventory, GpuSample, Health
from shared.policy import PowerPolicy
from shared.protocol import (
    MAX_PAYLOAD_BYTES,
    ActionOutcome,
    CommandResultBody,
    DecisionBody,
    Envelope,
    HealthBody,
    Kind,
    MigrationRequestBody,
    StatusBody,
    XidBody,
    decode,
)

NODE = "edge-node-1"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "edge.db"  # the parent does not exist yet: the store makes it


@pytest.fixture
def store(db_path: Path):
    s = EdgeStore(db_path, NODE)
    yield s
    s.close()


def decision(i: int = 0, *, uuid: str = "GPU-0", rule: str = "thermal_step_down") -> DecisionBody:
    return DecisionBody(
        gpu_index=0,
        gpu_uuid=uuid,
        rule=rule,
        action="set_power_limit",
        value=250.0 - i,
        outcome=ActionOutcome.APPLIED,
        reason=f"decision {i}",
        inputs={"temperature_c": 85 + i, "nested": {"a": [1, 2]}},
        policy_version=3,
    )


def xid(n: int = 48) -> XidBody:
    return XidBody(gpu_index=0, gpu_uuid="GPU-0", xid=n, action="request_migration")


def health() -> HealthBody:
    return HealthBody(
        level="gpu", gpu_index=0, gpu_uuid="GPU-0", previous=Health.HEALTHY,
        current=Health.UNHEALTHY, reasons=["xid 48"],
    )


def inventory(index: int) -> GpuInventory:
    return GpuInventory(
        index=index, uuid=f"GPU-{index}", name="NVIDIA A2", pci_bus_id=f"0000:0{index}:00.0",
        memory_total_bytes=16 * 2**30, driver_version="550.54", cuda_version="12.4",
        power_limit_min_w=20, power_limit_max_w=60, power_limit_default_w=60,
        supported_sm_clocks_mhz=[1770, 1500], missing=["mig_mode"],
    )


def sample(ts: float, index: int = 0) -> GpuSample:
    return GpuSample(index=index, uuid=f"GPU-{index}", ts=ts, temperature_c=50 + ts % 10,
                     power_w=40.0, utilization_pct=12.5)


# ---- the connection -------------------------------------------------------------------------


def test_pragmas_are_set_on_every_connection(store: EdgeStore) -> None:
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_creates_parent_directory_and_schema_version(db_path: Path) -> None:
    assert not db_path.parent.exists()
    EdgeStore(db_path, NODE).close()
    with sqlite3.connect(db_path) as raw:
        rows = dict(raw.execute("SELECT key, value FROM meta"))
    assert rows["schema_version"] == str(STORE_SCHEMA_VERSION)
    assert rows["last_seq"] == "0"


def test_refuses_newer_schema(db_path: Path) -> None:
    EdgeStore(db_path, NODE).close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                    (str(STORE_SCHEMA_VERSION + 1),))
    with pytest.raises(StoreSchemaError, match="newer than this kgpu supports"):
        EdgeStore(db_path, NODE)


def test_bad_node_name_is_refused(db_path: Path) -> None:
    with pytest.raises(ValueError):
        EdgeStore(db_path, "Bad/Node#")


# ---- outbox ---------------------------------------------------------------------------------


def test_seq_is_consecutive_and_survives_ack_and_reopen(db_path: Path) -> None:
    s = EdgeStore(db_path, NODE)
    first = s.record([(Kind.DECISION, decision(0)), (Kind.XID, xid())])
    second = s.record([(Kind.HEALTH, health())])
    assert [e.seq for e in first + second] == [1, 2, 3]
    assert all(e.node == NODE for e in first + second)
    assert s.ack(3) == 3
    assert s.outbox_depth() == 0
    assert s.last_seq() == 3
    s.close()

    s = EdgeStore(db_path, NODE)
    assert s.last_seq() == 3
    (env,) = s.record([(Kind.DECISION, decision(1))])
    assert env.seq == 4
    assert [e.seq for e in s.outbox_pending()] == [4]
    s.close()


def test_record_empty_is_a_no_op(store: EdgeStore) -> None:
    assert store.record([]) == []
    assert store.last_seq() == 0


def test_record_is_all_or_nothing(store: EdgeStore) -> None:
    status = StatusBody(state="online")
    with pytest.raises(ValueError, match="not an event kind"):
        store.record([(Kind.DECISION, decision()), (Kind.STATUS, status)])
    with pytest.raises(TypeError):
        store.record([(Kind.XID, xid()), (Kind.DECISION, xid())])  # body of the wrong kind
    assert store.last_seq() == 0
    assert store.outbox_depth() == 0
    assert store.decisions() == []
    assert store.events() == []


def test_record_routes_decisions_and_events(store: EdgeStore) -> None:
    migration = MigrationRequestBody(gpu_uuid="GPU-0", trigger="xid", reason="xid 79")
    envs = store.record([
        (Kind.DECISION, decision()),
        (Kind.XID, xid()),
        (Kind.MIGRATION_REQUEST, migration),
    ])
    (d,) = store.decisions()
    assert d["seq"] == 1 and d["id"] == envs[0].id and d["ts"] == envs[0].ts
    assert d["rule"] == "thermal_step_down" and d["outcome"] == "applied"
    assert d["inputs"] == {"temperature_c": 85, "nested": {"a": [1, 2]}}
    assert d["policy_version"] == 3 and d["value"] == 250.0
    events = store.events()
    assert [(e["seq"], e["kind"]) for e in events] == [(3, "migration_request"), (2, "xid")]
    assert events[1]["body"] == xid().model_dump(mode="json")
    assert store.events(kind="xid")[0]["id"] == envs[1].id


def test_outbox_pending_round_trips_envelopes(store: EdgeStore) -> None:
    envs = store.record([(Kind.DECISION, decision(i)) for i in range(5)])
    pending = store.outbox_pending()
    assert pending == envs
    assert all(isinstance(e, Envelope) for e in pending)
    assert pending[0].parsed_body() == decision(0)
    assert [e.seq for e in store.outbox_pending(limit=2)] == [1, 2]
    assert [e.seq for e in store.outbox_pending(limit=2, after_seq=2)] == [3, 4]
    assert store.outbox_pending(after_seq=5) == []


def test_an_event_too_big_for_the_broker_is_cut_to_fit(store: EdgeStore, caplog) -> None:
    """The broker drops a message over its limit, and the cloud would never ack past it."""
    huge = decision(1).model_copy(update={"reason": "r" * (MAX_PAYLOAD_BYTES + 1)})
    big_detail = CommandResultBody(command_id="c1", command="drain", ok=False, detail="d" * MAX_PAYLOAD_BYTES)
    with caplog.at_level("WARNING"):
        envs = store.record([(Kind.DECISION, decision(0)), (Kind.DECISION, huge)])
        (result,) = [store.record_command_result("c1", "drain", big_detail)]
    assert store.events_truncated == 2
    assert "cut to fit" in caplog.text
    pending = store.outbox_pending()
    assert [e.seq for e in pending] == [1, 2, 3] and pending[:2] == envs and pending[2] == result
    for envelope in pending:
        assert len(envelope.to_json()) <= MAX_PAYLOAD_BYTES
        assert decode(envelope.to_json())[0] == envelope  # the cloud takes each one
    assert pending[0].parsed_body() == decision(0)  # a body that fits is not touched
    cut = pending[1].parsed_body()
    assert cut.reason.startswith("r" * 1000) and cut.reason.endswith("characters cut]")
    assert cut.model_copy(update={"reason": huge.reason}) == huge  # only the long text changed
    # the decision log keeps what was sent
    assert store.decisions()[0]["reason"] == cut.reason
    assert pending[2].parsed_body().detail.endswith("characters cut]")


def test_ack_depth_and_oldest(store: EdgeStore) -> None:
    assert store.oldest_pending_ts() is None
    envs = store.record([(Kind.DECISION, decision(i)) for i in range(5)])
    assert store.outbox_depth() == 5
    assert store.oldest_pending_ts() == envs[0].ts
    assert store.ack(2) == 2
    assert store.outbox_depth() == 3
    assert store.oldest_pending_ts() == envs[2].ts
    assert [e.seq for e in store.outbox_pending()] == [3, 4, 5]
    # acks never touch the decision log
    assert len(store.decisions()) == 5


def test_acked_upto_never_counts_an_event_recorded_while_it_reads(store: EdgeStore) -> None:
    """The sync starts from `acked_upto()`: whatever it returns is never sent again. A writer
    records two events and acks them, over and over (the outbox empties and fills); `intended`
    is raised before each ack, so no snapshot can be acked beyond it. Read as two statements,
    the outbox found empty and then last_seq after the next record counted unsent events as
    acked (the fault campaign caught an edge that never sent two events)."""
    assert store.acked_upto() == 0
    intended = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal intended
        while not stop.is_set():
            last = store.record([(Kind.DECISION, decision(0)), (Kind.DECISION, decision(1))])[-1].seq
            assert last is not None
            intended = last
            store.ack(last)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        reads = 0
        while reads < 3000 and thread.is_alive():
            seen = store.acked_upto()
            assert seen <= intended, f"acked_upto() said {seen}, only {intended} were ever acked"
            reads += 1
    finally:
        stop.set()
        thread.join(10)
    assert reads == 3000 and intended > 0
    assert store.acked_upto() == store.last_seq()  # everything acked in the end


def test_ack_is_idempotent_and_clamped(store: EdgeStore, caplog) -> None:
    store.record([(Kind.DECISION, decision(i)) for i in range(3)])
    assert store.ack(2) == 2
    assert store.ack(2) == 0
    assert store.ack(1) == 0
    assert store.ack(0) == 0
    with caplog.at_level("WARNING"):
        assert store.ack(1000) == 1  # clamped to last_seq
    assert "clamped" in caplog.text
    assert store.outbox_depth() == 0
    (env,) = store.record([(Kind.XID, xid())])
    assert env.seq == 4  # a clamped ack never eats seqs recorded later
    assert store.outbox_depth() == 1


# ---- decision and event logs ----------------------------------------------------------------


def test_decisions_newest_first_with_filters(store: EdgeStore) -> None:
    store.record([(Kind.DECISION, decision(0, uuid="GPU-0", rule="thermal_step_down"))])
    store.record([(Kind.XID, xid())])  # not a decision: seq 2 is absent from the log
    store.record([
        (Kind.DECISION, decision(1, uuid="GPU-1", rule="power_saving")),
        (Kind.DECISION, decision(2, uuid="GPU-0", rule="power_saving")),
        (Kind.DECISION, decision(3, uuid="GPU-1", rule="thermal_step_down")),
    ])
    assert [d["seq"] for d in store.decisions()] == [5, 4, 3, 1]
    assert [d["seq"] for d in store.decisions(limit=2)] == [5, 4]
    assert [d["seq"] for d in store.decisions(before_seq=4)] == [3, 1]
    assert [d["seq"] for d in store.decisions(gpu_uuid="GPU-0")] == [4, 1]
    assert [d["seq"] for d in store.decisions(rule="power_saving")] == [4, 3]
    assert [d["seq"] for d in store.decisions(gpu_uuid="GPU-1", rule="power_saving")] == [3]
    assert store.decisions(gpu_uuid="GPU-9") == []


def test_decisions_are_json_ready(store: EdgeStore) -> None:
    import json

    store.record([(Kind.DECISION, decision())])
    json.dumps(store.decisions())
    json.dumps(store.events())


def test_events_retention_keeps_the_newest(db_path: Path) -> None:
    s = EdgeStore(db_path, NODE, events_retention=5)
    for n in range(8):
        s.record([(Kind.XID, xid(n)), (Kind.DECISION, decision(n))])
    events = s.events(limit=100)
    assert [e["body"]["xid"] for e in events] == [7, 6, 5, 4, 3]
    assert len(s.decisions(limit=100)) == 8  # decisions are never dropped
    assert s.outbox_depth() == 16  # nor is anything unacked
    s.close()


# ---- policy ---------------------------------------------------------------------------------


def test_policy_cache_ignores_older_and_equal_versions(db_path: Path) -> None:
    s = EdgeStore(db_path, NODE)
    assert s.cached_policy() is None
    v2 = PowerPolicy(name="p", version=2, power_cap_watts=300)
    assert s.cache_policy(v2) is True
    assert s.cache_policy(PowerPolicy(name="p", version=1, power_cap_watts=100)) is False
    assert s.cache_policy(PowerPolicy(name="p", version=2, power_cap_watts=200)) is False
    assert s.cached_policy() == v2
    v3 = PowerPolicy(name="p", version=3, power_cap_watts=250)
    assert s.cache_policy(v3) is True
    s.close()
    s = EdgeStore(db_path, NODE)
    assert s.cached_policy() == v3
    s.close()


# ---- commands -------------------------------------------------------------------------------


def test_command_is_applied_at_most_once(store: EdgeStore) -> None:
    result = CommandResultBody(command_id="cmd-1", command="drain", ok=True, detail="drained")
    assert store.command_applied("cmd-1") is False
    env = store.record_command_result("cmd-1", "drain", result)
    assert env is not None and env.kind == Kind.COMMAND_RESULT and env.seq == 1
    assert env.parsed_body() == result
    assert store.command_applied("cmd-1") is True
    assert store.record_command_result("cmd-1", "drain", result) is None
    assert store.outbox_depth() == 1
    assert store.last_seq() == 1
    assert [e["kind"] for e in store.events()] == ["command_result"]


def test_draining_gpus_are_kept_with_the_command_that_set_them(db_path: Path) -> None:
    store = EdgeStore(db_path, NODE)
    assert store.draining() == set()
    drain = CommandResultBody(command_id="c1", command="drain", ok=True)
    store.record_command_result("c1", "drain", drain, {"GPU-1", "GPU-2"})
    assert store.record_command_result("c1", "drain", drain, set()) is None  # a repeat changes nothing
    store.close()
    store = EdgeStore(db_path, NODE)  # a restart
    assert store.draining() == {"GPU-1", "GPU-2"}
    undrain = CommandResultBody(command_id="c2", command="undrain", ok=True)
    store.record_command_result("c2", "undrain", undrain, {"GPU-2"})
    store.record_command_result("c3", "restart_check", CommandResultBody(command_id="c3", command="restart_check",
                                                                         ok=True))  # not given: kept
    assert store.draining() == {"GPU-2"}
    store.close()


def test_command_result_for_another_id_is_refused(store: EdgeStore) -> None:
    result = CommandResultBody(command_id="cmd-2", command="drain", ok=True)
    with pytest.raises(ValueError):
        store.record_command_result("cmd-1", "drain", result)
    assert store.command_applied("cmd-1") is False


# ---- inventory and samples ------------------------------------------------------------------


def test_inventory_round_trip_and_replace(store: EdgeStore) -> None:
    assert store.inventory() == []
    gpus = [inventory(1), inventory(0)]
    store.save_inventory(gpus)
    assert store.inventory() == [inventory(0), inventory(1)]
    store.save_inventory([inventory(0)])  # a GPU fell off the bus
    assert store.inventory() == [inventory(0)]


def test_samples_query_and_prune(store: EdgeStore) -> None:
    store.add_samples([sample(float(t), i) for t in range(100, 110) for i in (0, 1)])
    store.add_samples([])
    assert len(store.samples()) == 20
    gpu1 = store.samples(gpu_uuid="GPU-1")
    assert [s.ts for s in gpu1] == [float(t) for t in range(100, 110)]
    assert gpu1[0] == sample(100.0, 1)
    assert [s.ts for s in store.samples(gpu_uuid="GPU-0", since=107)] == [107.0, 108.0, 109.0]
    # past the limit: the newest ones, still in time order
    assert [s.ts for s in store.samples(gpu_uuid="GPU-0", limit=2)] == [108.0, 109.0]
    assert store.prune_samples(older_than=105) == 10
    assert min(s.ts for s in store.samples()) == 105.0
    assert store.prune_samples(older_than=105) == 0


def test_samples_retention_bound(db_path: Path) -> None:
    s = EdgeStore(db_path, NODE, samples_retention=6)
    for t in range(10):
        s.add_samples([sample(float(t))])
    assert [x.ts for x in s.samples()] == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    s.close()


# ---- errors ---------------------------------------------------------------------------------


def _on_every_checkout(store: EdgeStore, pragma: str):
    """Run a PRAGMA whenever the store takes a connection from its pool (tests run as root, so
    chmod cannot make the file read-only; per-connection pragmas can)."""

    def listener(dbapi_conn, _record, _proxy) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(pragma)
        cur.close()

    event.listen(store.engine, "checkout", listener)
    return listener


def test_disk_full_is_a_store_error_and_the_store_recovers(store: EdgeStore) -> None:
    store.record([(Kind.DECISION, decision())])
    with store.engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
    full = _on_every_checkout(store, f"PRAGMA max_page_count={pages}")  # no room to grow
    long = "x" * 4000
    big = [(Kind.DECISION, decision(i).model_copy(update={"reason": long})) for i in range(20)]
    with pytest.raises(StoreError, match="database or disk is full") as info:
        store.record(big)
    assert info.value.reason == "database or disk is full"
    assert store.last_write_error == "database or disk is full"
    # nothing of the failed batch is visible, reads still work
    assert store.last_seq() == 1
    assert store.outbox_depth() == 1

    event.remove(store.engine, "checkout", full)
    room = _on_every_checkout(store, "PRAGMA max_page_count=1073741823")
    envs = store.record(big)
    assert envs[0].seq == 2 and envs[-1].seq == 21
    assert store.last_write_error is None
    assert store.check_writable() is None
    event.remove(store.engine, "checkout", room)


def test_read_only_database_is_a_store_error(store: EdgeStore) -> None:
    ro = _on_every_checkout(store, "PRAGMA query_only=1")
    with pytest.raises(StoreError, match="readonly"):
        store.record([(Kind.DECISION, decision())])
    with pytest.raises(StoreError, match="readonly"):
        store.ack(1)
    assert "readonly" in (store.check_writable() or "")
    event.remove(store.engine, "checkout", ro)
    _on_every_checkout(store, "PRAGMA query_only=0")
    assert store.check_writable() is None
    assert store.record([(Kind.DECISION, decision())])[0].seq == 1


def test_locked_database_is_a_store_error(db_path: Path) -> None:
    s = EdgeStore(db_path, NODE, busy_timeout_ms=100)
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked"):
            s.record([(Kind.DECISION, decision())])
        assert "locked" in (s.check_writable() or "")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert s.record([(Kind.DECISION, decision())])[0].seq == 1
    assert s.check_writable() is None
    s.close()


def test_closed_store_raises_store_error(db_path: Path) -> None:
    s = EdgeStore(db_path, NODE)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.last_seq()


# ---- threads --------------------------------------------------------------------------------


def test_concurrent_writers_get_unique_consecutive_seqs(store: EdgeStore) -> None:
    seqs: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        try:
            for i in range(25):
                envs = store.record([(Kind.DECISION, decision(i)), (Kind.XID, xid(n))])
                with lock:
                    seqs.extend(e.seq for e in envs)
                store.outbox_depth()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert sorted(seqs) == list(range(1, 6 * 25 * 2 + 1))
    assert store.last_seq() == 300
    assert [e.seq for e in store.outbox_pending(limit=1000)] == list(range(1, 301))


def test_outbox_epoch_is_made_once_and_kept(tmp_path) -> None:
    from edge.store import EdgeStore

    first = EdgeStore(tmp_path / "a.db", "n1")
    epoch = first.epoch
    first.close()
    again = EdgeStore(tmp_path / "a.db", "n1")
    assert again.epoch == epoch and len(epoch) == 16
    again.close()
    other = EdgeStore(tmp_path / "b.db", "n1")
    assert other.epoch != epoch  # a re-created database is a new epoch
    other.close()
