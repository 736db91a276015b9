"""Issue 12's ingest bounds: per-node budgets (cloud/budget.py), the bounded ingest queue, the
ingest's own writer thread, the bounded shutdown drain, rate-limited rejection logs (shared/logs.py)
and the retention of events and decisions (cloud/store/retention.py); and, end to end over a real
mosquitto, a real controller with one node flooding it: the flood is cut and flagged, drops are
counted, an honest node's event is stored and acked, and the controller's memory stays bounded.

The budget tests drive their own clock (the module is pure); nothing here asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bench.flood import flood
from cloud.budget import EVENT_RESUME, RECOVER_AFTER_S, Budget, BudgetLimits, NodeBudgets
from cloud.ingest import DROP_REASONS, Ingestor
from cloud.ingest_queue import IngestQueue, Queued
from cloud.store import FleetStore, Incoming, RetentionPolicy
from kgpu.lab.broker import Mosquitto, mosquitto_binary
from kgpu.lab.processes import wait_for
from shared.gpu import GpuSample, Health
from shared.logs import ThrottledLog
from shared.mqtt import MqttLink, Received, parse_broker_url
from shared.protocol import (
    ActionOutcome,
    DecisionBody,
    GpuSummary,
    Kind,
    StatusBody,
    TelemetryBody,
    XidBody,
    make_envelope,
)
from shared.topics import cloud_topic, edge_topic
from tests.helpers.cloud_process import CloudProcess

T0 = 1_700_000_000.0


# ---- the budget (pure) ------------------------------------------------------------------------


def test_a_flooding_node_is_cut_and_flagged_while_the_others_pass() -> None:
    budgets = NodeBudgets(BudgetLimits(messages_per_second=10, bytes_per_second=0, burst_s=2))
    went_over, refused, honest_refused = 0, 0, 0
    for tick in range(1000):  # 10 s at 100 messages a second from the flooder
        now = tick / 100
        verdict = budgets.admit("flood", 100, event=False, status=False, now=now)
        refused += verdict.refused is not None
        went_over += verdict.went_over
        if tick % 20 == 0:  # 5 a second: within budget
            honest_refused += budgets.admit("honest", 100, event=False, status=False, now=now).refused is not None
    assert honest_refused == 0
    assert 1000 - refused == pytest.approx(10 * 10 + 20, abs=2)  # the rate, plus one burst
    assert went_over == 1  # one log line, not one per message
    assert budgets.flags == {"flood": "messages_per_second"}
    # statuses have their own small allowance: the flooder's last will still gets through
    assert budgets.admit("flood", 100, event=False, status=True, now=10.0).refused is None
    assert budgets.sweep(10.0 + RECOVER_AFTER_S / 2) == [] and "flood" in budgets.flags
    assert budgets.sweep(10.0 + RECOVER_AFTER_S) == ["flood"] and budgets.flags == {}


def test_the_gpu_budget_drops_new_uuids_never_the_known_gpus() -> None:
    budgets = NodeBudgets(BudgetLimits(gpus=4))
    known = [f"GPU-{i}" for i in range(4)]
    kept, verdict = budgets.admit_gpus("n", known, 0.0)
    assert kept == set(known) and verdict.refused is None
    kept, verdict = budgets.admit_gpus("n", [*known, "GPU-new-1", "GPU-new-2"], 1.0)
    assert kept == set(known) and verdict.refused is Budget.GPUS and verdict.went_over
    assert budgets.flags == {"n": "gpus"}
    # a status names the node's GPUs (as the store keeps them): a replaced GPU takes the place
    kept, verdict = budgets.admit_gpus("n", ["GPU-0", "GPU-1", "GPU-2", "GPU-9"], 2.0, inventory=True)
    assert kept == {"GPU-0", "GPU-1", "GPU-2", "GPU-9"} and verdict.refused is None
    assert budgets.admit_gpus("n", ["GPU-3"], 3.0)[0] == set()


def test_a_node_with_a_backlog_is_refused_until_it_is_written_and_the_others_pass() -> None:
    budgets = NodeBudgets(BudgetLimits(backlog=3, messages_per_second=0, bytes_per_second=0, events_per_minute=0))
    assert [budgets.admit("flood", 100, event=True, status=False, now=0.0).refused for _ in range(4)] == [
        None, None, None, Budget.BACKLOG]
    assert budgets.flags == {"flood": "backlog"} and budgets.backlog_of("flood") == 3
    assert budgets.admit("flood", 100, event=False, status=False, now=0.1).refused is Budget.BACKLOG  # telemetry too
    assert budgets.admit("flood", 100, event=False, status=True, now=0.2).refused is None  # never its status
    assert budgets.admit("honest", 100, event=True, status=False, now=0.3).refused is None
    budgets.release("flood", 2)  # written
    assert budgets.backlog_of("flood") == 2  # 3 events + 1 status admitted, 2 written
    # refused until half of the backlog is written (a flood is refused in runs)
    assert budgets.admit("flood", 100, event=True, status=False, now=0.35).refused is Budget.BACKLOG
    budgets.release("flood", 1)
    assert budgets.admit("flood", 100, event=True, status=False, now=0.4).refused is None
    budgets.release("flood", 10)
    assert budgets.backlog_of("flood") == 0  # never below zero
    assert budgets.sweep(0.4 + RECOVER_AFTER_S) == ["flood"]


def catch_up(backlog: int, limits: BudgetLimits, window: int = 100, ack_timeout: float = 15.0,
             round_trip: float = 0.05) -> tuple[float, int, bool]:
    """An edge sending its outbox as edge/sync.py does (at most `window` unacked; after
    `ack_timeout` without an ack, again from the first unacked seq) to a cloud that stores what
    the budget admits and acks the consecutive seqs. Returns (simulated seconds to deliver all,
    refusals, whether the node was ever flagged)."""
    budgets = NodeBudgets(limits)
    now, acked, refusals, flagged = 0.0, 0, 0, False
    stored: set[int] = set()
    while acked < backlog:
        highest = min(backlog, acked + window)
        for seq in range(acked + 1, highest + 1):
            if seq in stored:
                continue
            if budgets.admit("edge", 400, event=True, status=False, now=now).refused is None:
                stored.add(seq)
                budgets.release("edge")  # written at once here
            else:
                refusals += 1
        flagged = flagged or bool(budgets.flags)
        while acked + 1 in stored:
            acked += 1
        now += round_trip if acked == highest else ack_timeout
    return now, refusals, flagged


def test_an_edge_catching_up_is_paced_by_the_event_budget_and_loses_nothing() -> None:
    limits = BudgetLimits(events_per_minute=1200, event_burst=20_000)
    # a day offline at ten events a minute: within the burst, never flagged
    seconds, refusals, flagged = catch_up(14_400, limits)
    assert refusals == 0 and not flagged
    # a backlog beyond the burst: delivered in full, paced by the rate (20 events a second)
    seconds, refusals, flagged = catch_up(50_000, limits)
    assert flagged and refusals > 0
    assert seconds >= (50_000 - 20_000) / 20 * 0.9  # not faster than the rate allows
    assert seconds <= (50_000 - 20_000) / 20 * 1.5  # and not much slower: runs of EVENT_RESUME
    assert EVENT_RESUME <= 100


# ---- rate-limited logs --------------------------------------------------------------------------


def test_rejection_logs_are_one_line_per_reason_per_interval_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    throttled = ThrottledLog(logging.getLogger("test.throttled"), every_s=10.0)
    with caplog.at_level(logging.WARNING, logger="test.throttled"):
        for i in range(12_346):
            throttled.log("not_json", "rejected message: %s", "not_json", now=100.0 + i * 0.0001)
        throttled.log("schema", "rejected message: %s", "schema", now=101.0)
        throttled.log("not_json", "rejected message: %s", "not_json", now=111.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "rejected message: not_json"
    assert lines[1] == "rejected message: schema"
    assert re.fullmatch(r"rejected message: not_json \(and 12,345 more since \d\d:\d\d:\d\d\)", lines[2])
    assert caplog.records[2].suppressed == 12_345  # type: ignore[attr-defined]
    assert len(lines) == 3


# ---- the ingest queue, thread and shutdown -------------------------------------------------------


def _status(node: str, gpus: int = 2, epoch: str = "epoch-1") -> Received:
    body = StatusBody(state="online", version="0.1.0", outbox_epoch=epoch, outbox_depth=0,
                      gpus=[GpuSummary(index=i, uuid=f"GPU-{node}-{i}", name="H100", health=Health.HEALTHY) for i in range(gpus)])
    return Received(edge_topic(node, "status"), make_envelope(node, body, Kind.STATUS).to_json(), False)


def _telemetry(node: str, uuids: list[str]) -> Received:
    samples = [GpuSample(index=i, uuid=u, ts=time.time(), temperature_c=50.0, power_w=100.0, power_limit_w=300.0,
                         utilization_pct=10.0, memory_used_bytes=1) for i, u in enumerate(uuids)]
    return Received(edge_topic(node, "telemetry"),
                    make_envelope(node, TelemetryBody(samples=samples), Kind.TELEMETRY).to_json(), False)


def _event(node: str, seq: int) -> Received:
    body = XidBody(gpu_index=0, gpu_uuid=f"GPU-{node}-0", xid=48, action="record")
    return Received(edge_topic(node, "events"), make_envelope(node, body, Kind.XID, seq).to_json(), False)


def test_the_queue_is_bounded_by_bytes_and_put_waits_for_room() -> None:
    async def scenario() -> list[str]:
        queue = IngestQueue(max_messages=100, max_bytes=100)
        item = Queued(incoming=None, size=60, at=0.0, node="n")  # type: ignore[arg-type]
        await queue.put(item)
        await queue.put(item)  # let in: the queue held less than max_bytes
        happened: list[str] = []

        async def producer() -> None:
            await queue.put(item)
            happened.append("put")

        task = asyncio.create_task(producer())
        await asyncio.sleep(0.05)
        happened.append(f"waiting with {queue.bytes} bytes queued")
        queue.get_nowait()
        queue.get_nowait()
        await asyncio.wait_for(task, 5)
        return happened

    assert asyncio.run(scenario()) == ["waiting with 120 bytes queued", "put"]


def test_ingest_budgets_gpus_writes_on_its_own_thread_and_drains_within_a_bound(tmp_path: Path) -> None:
    store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    acks: list[tuple[str, int]] = []

    async def scenario() -> dict[str, Any]:
        ingestor = Ingestor(store, lambda node, upto, epoch: acks.append((node, upto)), batch_interval_s=0.01,
                            budget=BudgetLimits(gpus=2))
        out: dict[str, Any] = {"threads_before": {t.name for t in threading.enumerate()}}
        ingestor.offer(_status("n1"))
        ingestor.offer(_telemetry("n1", ["GPU-n1-0", "GPU-n1-1", "GPU-evil-1", "GPU-evil-2"]))
        ingestor.offer(_event("n1", 1))
        assert ingestor.backlog_age_s() >= 0.0 and ingestor.pending() == 3
        runner = asyncio.create_task(ingestor.run())
        out["abandoned"] = await ingestor.drain(30.0)
        out["threads"] = {t.name for t in threading.enumerate()}
        out["age_after"] = ingestor.backlog_age_s()
        out["dropped"] = dict(ingestor.dropped)
        out["flags"] = dict(ingestor.budget_flags)
        # the database goes away: the drain gives up after its bound and says how many are left
        store.close()
        ingestor.offer(_event("n1", 2))
        ingestor.offer(_event("n1", 3))
        out["abandoned_dead"] = await ingestor.drain(0.5)  # returns: it does not wait for a dead store
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return out

    out = asyncio.run(scenario())
    assert out["abandoned"] == 0 and out["age_after"] == 0.0
    assert any(name.startswith("kgpu-ingest") for name in out["threads"] - out["threads_before"])
    assert out["dropped"] == {"gpus": 2} and out["flags"] == {"n1": "gpus"}
    assert acks == [("n1", 1)]
    assert out["abandoned_dead"] == 2
    reopened = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    with reopened.engine.connect() as conn:
        gpus = sorted(conn.execute(sa.text("SELECT uuid FROM gpus WHERE node = 'n1'")).scalars())
    reopened.close()
    assert gpus == ["GPU-n1-0", "GPU-n1-1"]  # the extra UUIDs never became rows
    assert set(DROP_REASONS) == {b.value for b in Budget}


def test_the_ingest_backlog_of_a_node_is_bounded_and_released_once_written_or_refused(tmp_path: Path) -> None:
    store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    acks: list[tuple[str, int]] = []

    async def scenario() -> dict[str, Any]:
        ingestor = Ingestor(store, lambda node, upto, epoch: acks.append((node, upto)), batch_interval_s=0.01,
                            budget=BudgetLimits(backlog=3))
        out: dict[str, Any] = {}
        for seq in range(1, 6):  # five events before anything is written: the last two are dropped
            ingestor.offer(_event("flood", seq))
        ingestor.offer(_event("honest", 1))
        # an invalid message admitted by the budget gives its slot back at once
        ingestor.offer(Received(edge_topic("honest", "events"), b"{not json", False))
        out["queued"] = ingestor.pending()
        out["backlogs"] = {n: ingestor.budgets.backlog_of(n) for n in ("flood", "honest")}
        out["dropped"] = dict(ingestor.dropped)
        out["flags"] = dict(ingestor.budget_flags)
        runner = asyncio.create_task(ingestor.run())
        out["abandoned"] = await ingestor.drain(30.0)
        out["backlogs_after"] = {n: ingestor.budgets.backlog_of(n) for n in ("flood", "honest")}
        ingestor.offer(_event("flood", 4))  # written: room again, and the edge's re-sent events are taken
        ingestor.offer(_event("flood", 5))
        await ingestor.drain(30.0)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return out

    out = asyncio.run(scenario())
    store.close()
    assert out["queued"] == 4 and out["backlogs"] == {"flood": 3, "honest": 1}
    assert out["dropped"] == {"backlog": 2} and out["flags"] == {"flood": "backlog"}
    assert out["abandoned"] == 0 and out["backlogs_after"] == {"flood": 0, "honest": 0}
    assert ("honest", 1) in acks and ("flood", 3) in acks and acks[-1] == ("flood", 5)


# ---- retention -------------------------------------------------------------------------------------


def _incoming(node: str, kind: Kind, body: Any, seq: int | None, received_at: float) -> Incoming:
    envelope = make_envelope(node, body, kind, seq).model_copy(update={"ts": received_at})
    return Incoming(envelope=envelope, body=envelope.parsed_body(), received_at=received_at)


def _decision(node: str, seq: int, at: float) -> Incoming:
    body = DecisionBody(gpu_index=0, gpu_uuid="GPU-0", rule="thermal_step_down", action="set_power_limit",
                        value=250.0, outcome=ActionOutcome.APPLIED, reason=f"decision {seq}", policy_version=1)
    return _incoming(node, Kind.DECISION, body, seq, at)


def _seqs(store: FleetStore, table: str) -> list[int]:
    with store.engine.connect() as conn:
        return sorted(int(s) for s in conn.execute(sa.text(f"SELECT seq FROM {table} WHERE node = 'n1'")).scalars())


def test_retention_deletes_old_and_excess_rows_but_never_what_dedup_needs(tmp_path: Path) -> None:
    store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        status = StatusBody(state="online", version="0.1.0", outbox_epoch="epoch-1", outbox_depth=0, gpus=[])
        store.ingest([_incoming("n1", Kind.STATUS, status, None, T0)])
        # seqs 1..6 (acked), then 9 and 10 beyond a hole (stored, not acked: 7 and 8 missing)
        result = store.ingest([_decision("n1", seq, T0 + seq) for seq in (1, 2, 3, 4, 5, 6, 9, 10)])
        assert result.acks["n1"][0] == 6

        # by size: the oldest go first; at most 3 rows each
        cut = store.apply_retention(RetentionPolicy(max_age_s=10 * 365 * 86400, max_rows=3), now=T0 + 100,
                                    batch_rows=2)
        assert _seqs(store, "events") == _seqs(store, "decisions") == [6, 9, 10]
        assert (cut.events, cut.decisions) == (5, 5) and not cut.more
        # at most 1: the events above acked_seq stay all the same (the ingest reads them)
        store.apply_retention(RetentionPolicy(max_age_s=10 * 365 * 86400, max_rows=1), now=T0 + 100)
        assert _seqs(store, "events") == [9, 10] and _seqs(store, "decisions") == [10]

        # by age: everything is old; only the events above acked_seq stay
        store.apply_retention(RetentionPolicy(max_age_s=1.0, max_rows=1_000_000), now=T0 + 100, batch_rows=2)
        assert _seqs(store, "events") == [9, 10] and _seqs(store, "decisions") == []

        # a re-sent copy of a pruned event is still a duplicate; the hole closes as before
        result = store.ingest([_decision("n1", 3, T0 + 3)])
        assert result.stored == 0 and result.duplicates == 1 and _seqs(store, "events") == [9, 10]
        result = store.ingest([_decision("n1", 7, T0 + 7), _decision("n1", 8, T0 + 8)])
        assert result.acks["n1"][0] == 10

        # more than one call's worth: `more` and cursors carry the rest to the next call
        store.ingest([_decision("n1", seq, T0 + seq) for seq in range(11, 31)])
        first = store.apply_retention(RetentionPolicy(max_age_s=1.0, max_rows=1_000_000), now=T0 + 100,
                                      batch_rows=2, max_batches=3)
        assert first.more
        rest = store.apply_retention(RetentionPolicy(max_age_s=1.0, max_rows=1_000_000), now=T0 + 100,
                                     cursors=first.cursors, batch_rows=100)
        assert not rest.more and _seqs(store, "events") == [] and _seqs(store, "decisions") == []
    finally:
        store.close()


# ---- end to end: a flood at a real controller over a real mosquitto --------------------------------

needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None,
                                     reason="mosquitto not installed (scripts/test.sh installs it)")


def _metrics(cloud: CloudProcess) -> str:
    text: str = cloud.get("/metrics")
    return text


@pytest.mark.slow
@needs_mosquitto
def test_a_node_flooding_a_real_controller_is_cut_flagged_and_the_others_are_served(
        tmp_path: Path, broker: Mosquitto) -> None:
    cloud = CloudProcess(tmp_path / "cloud", broker.url,
                         env={"KGPU_NODE_MAX_MESSAGES_PER_SECOND": "50", "KGPU_NODE_BURST": "1"})
    acks: list[dict[str, Any]] = []
    honest = MqttLink(parse_broker_url(broker.url), "honest-1", subscriptions=[(cloud_topic("honest-1", "ack"), 1)],
                      on_message=lambda m: acks.append(json.loads(m.payload)), backoff_min_s=0.1, backoff_max_s=0.5)
    stop = threading.Event()
    flooded: list[int] = []
    flooder = threading.Thread(target=lambda: flooded.append(_flood_until(broker.url, stop)), daemon=True)
    try:
        cloud.start()
        assert cloud.proc is not None
        honest.start()
        wait_for(honest.connected.is_set, timeout=30, what="the honest node connected")
        flooder.start()
        wait_for(lambda: 'node="flood-00000"' in _metrics(cloud), timeout=60, what="the flooder flagged in /metrics")
        # while the flood goes on, the honest node's event is stored and acked
        assert honest.publish(edge_topic("honest-1", "status"), _status("honest-1").payload, qos=1, retain=True)
        assert honest.publish(edge_topic("honest-1", "events"), _event("honest-1", 1).payload, qos=1)
        wait_for(lambda: any(a.get("body", {}).get("upto", 0) >= 1 for a in acks), timeout=60,
                 what="the honest node's event acked")
        assert cloud.event_seqs("honest-1") == [1]
        text = _metrics(cloud)
        # over its message budget, and soon a runaway (refused thousands of times a second: then
        # everything of it is refused; without a broker admin it is not quarantined)
        assert re.search(r'kgpu_node_over_budget\{budget="(messages_per_second|runaway)",node="flood-00000"\} 1', text)
        dropped = re.search(r'kgpu_ingest_dropped_total\{reason="messages_per_second"\} (\S+)', text)
        assert dropped is not None and float(dropped.group(1)) > 0
        # a probe may ask for one sample name alone (what the benches poll at a fleet's scale)
        only: str = cloud.get("/metrics?name[]=kgpu_ingest_dropped_total")
        assert 'kgpu_ingest_dropped_total{reason="messages_per_second"}' in only
        assert "kgpu_node_over_budget" not in only and "kgpu_ingest_batches_total" not in only
        assert 'node="honest-1"' not in "".join(line for line in text.splitlines()
                                                 if line.startswith("kgpu_node_over_budget"))
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{cloud.proc.pid}/status").read_text()).group(1))  # type: ignore[union-attr]
        assert peak < 600 * 1024, f"controller peak RSS {peak / 1024:.0f} MiB"
    finally:
        stop.set()
        if flooder.is_alive():
            flooder.join(timeout=30)
        honest.stop()
        if cloud.proc is not None and cloud.proc.poll() is None:
            cloud.stop()
    assert flooded and flooded[0] > 0


def _flood_until(mqtt: str, stop: threading.Event) -> int:
    """bench/flood.py's raw flooder in slices of a second until `stop` (at most 60 s)."""
    sent = 0
    for _ in range(60):
        if stop.is_set():
            break
        sent += int(flood(mqtt, "flood-00000", "telemetry", 1.0)["sent"])
    return sent


def test_an_event_far_past_its_nodes_last_ack_is_dropped_with_a_hint_and_the_edge_sends_it_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The events_ahead budget through the real ingest: judged from the first ack on, against the
    ack published; an event within the margin is stored, one past it is dropped, counted, out of
    the node's backlog, and logged once with what to change if the edge's window is large."""
    store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    acks: list[tuple[str, int]] = []

    async def scenario() -> Ingestor:
        ingestor = Ingestor(store, lambda node, upto, epoch: acks.append((node, upto)), batch_interval_s=0.01,
                            budget=BudgetLimits(events_ahead=50))
        runner = asyncio.create_task(ingestor.run())
        ingestor.offer(_status("n1"))
        ingestor.offer(_event("n1", 1))
        assert await ingestor.drain(30.0) == 0  # acked up to 1: from now on the node is judged
        ingestor.offer(_event("n1", 51))  # 50 past the ack: what an edge with a window of 50 may send
        ingestor.offer(_event("n1", 52))  # beyond: dropped
        assert await ingestor.drain(30.0) == 0
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return ingestor

    with caplog.at_level(logging.WARNING, logger="cloud.ingest"):
        ingestor = asyncio.run(scenario())
    assert ingestor.dropped == {"events_ahead": 1} and ingestor.budget_flags == {"n1": "events_ahead"}
    assert ingestor.budgets.backlog_of("n1") == 0
    assert acks == [("n1", 1), ("n1", 1)]  # 51 stored beyond the hole at 2..50: nothing more acked
    assert _seqs(store, "events") == [1, 51]
    hints = [r.getMessage() for r in caplog.records if "events_ahead" in r.getMessage()]
    assert len(hints) == 1 and "raise node_max_events_ahead" in hints[0]
    store.close()
