"""Telemetry written by a process of its own (cloud/sample_writer.py): the child started for real
(`python -m cloud.sample_writer`) over the test's database, SQLite and PostgreSQL; the samples it
writes read back through the fleet store; a child killed mid-flight replaced; a database it cannot
open reported; what waited written at stop; and the controller's ingest splitting a batch between
the child (telemetry) and its own writer (events and statuses, acked)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.common import children
from cloud.budget import BudgetLimits
from cloud.ingest import Ingestor
from cloud.sample_writer import RawTelemetry, SampleWriterProcess, WriterProcessEnded, WriterSettings, decode_batch
from cloud.store import FleetStore, FleetStoreError
from kgpu.lab.fleetsim.node import envelope_json
from kgpu.lab.processes import wait_for
from shared.logs import ThrottledLog
from shared.mqtt import Received
from shared.protocol import Kind, StatusBody, TelemetryBody, XidBody
from shared.topics import edge_topic
from tests.test_fleet_store import NODE, db_url, gpu, open_store, sample  # noqa: F401 (fixtures)


def raw(node: str, ts: float, indexes: tuple[int, ...] = (0, 1), *, skew: float = 0.0,
        kept: tuple[str, ...] | None = None, **figures: Any) -> RawTelemetry:
    body = TelemetryBody(samples=[sample(i, ts, **figures) for i in indexes])
    return RawTelemetry(edge_topic(node, "telemetry"), envelope_json(node, Kind.TELEMETRY, body, ts=ts),
                        ts + 0.05, skew, kept)


def gpu_rows(store: FleetStore, node: str = NODE) -> dict[str, dict[str, Any]]:
    found = store.node(node)
    return {} if found is None else {g["uuid"]: g for g in found["gpus"]}


@pytest.fixture
def writer(db_url: str, open_store: Callable[..., FleetStore]) -> Any:  # noqa: F811 - fixtures imported above
    open_store().close()  # the controller migrates the schema before the child opens it
    started: list[SampleWriterProcess] = []

    def start(*, area_bytes: int | None = None, **settings: Any) -> SampleWriterProcess:
        process = SampleWriterProcess(WriterSettings(db=db_url, **settings),
                                      **({} if area_bytes is None else {"area_bytes": area_bytes}))
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def test_the_child_writes_samples_the_store_reads_back(
    writer: Callable[..., SampleWriterProcess], open_store: Callable[..., FleetStore],  # noqa: F811
) -> None:
    process = writer()
    now = time.time()
    assert process.write([raw(NODE, now - 1), raw(NODE, now, temperature_c=71.0)]).samples == 4
    assert process.write([raw("other", now, (0,), skew=10.0)]).samples == 1  # the node's clock 10 s ahead of ours
    store = open_store()
    rows = gpu_rows(store)
    assert set(rows) == {"GPU-0", "GPU-1"}
    assert rows["GPU-0"]["sample"]["temperature_c"] == 71.0 and rows["GPU-0"]["sample_ts"] == now
    assert len(store.samples(NODE)) == 4  # the history: every sample
    assert gpu_rows(store, "other")["GPU-0"]["sample_ts"] == pytest.approx(now - 10.0)  # onto our clock
    node = store.node(NODE)
    assert node is not None and node["last_seen"] == pytest.approx(now + 0.05)
    assert process.write([raw(NODE, now)]).samples == 2  # the same samples again: no-ops, no error
    assert len(store.samples(NODE)) == 4


def test_a_batch_goes_in_frames_of_at_most_frame_messages(writer: Callable[..., SampleWriterProcess],
                                                          open_store: Callable[..., FleetStore]) -> None:  # noqa: F811
    process = writer()
    process.frame_messages = 2
    now = time.time()
    assert process.write([raw(f"node-{i}", now, (0,)) for i in range(5)]).samples == 5  # three frames
    store = open_store()
    assert all(gpu_rows(store, f"node-{i}")["GPU-0"]["sample_ts"] == now for i in range(5))


def test_only_the_gpus_the_budget_kept_are_written(writer: Callable[..., SampleWriterProcess],
                                                   open_store: Callable[..., FleetStore]) -> None:  # noqa: F811
    process = writer()
    assert process.write([raw(NODE, time.time(), (0, 1, 2), kept=("GPU-1",))]).samples == 1
    assert set(gpu_rows(open_store())) == {"GPU-1"}


def _a_child_that_wrote(writer: Callable[..., SampleWriterProcess]) -> tuple[SampleWriterProcess, int, float]:
    """A running child that has written one batch (a sample 1 s old); its pid, and now."""
    process = writer()
    now = time.time()
    process.write([raw(NODE, now - 1)])
    pid = process.pid
    assert pid is not None
    return process, pid, now


def _bytes_waiting_in_stdin(pid: int) -> int:
    """Bytes written to the child's stdin pipe that it has not read (FIONREAD on the pipe)."""
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    finally:
        os.close(fd)


def test_a_child_killed_mid_write_fails_its_batch_and_the_next_write_starts_another(
    writer: Callable[..., SampleWriterProcess], open_store: Callable[..., FleetStore],  # noqa: F811
) -> None:
    process, pid, now = _a_child_that_wrote(writer)
    os.kill(pid, signal.SIGSTOP)  # it cannot read the batch: the write waits for its answer

    def kill_once_the_batch_is_in_its_pipe() -> None:
        wait_for(lambda: _bytes_waiting_in_stdin(pid) > 0, what="the batch in the child's pipe", interval=0.01)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_the_batch_is_in_its_pipe)
    killer.start()
    try:
        with pytest.raises(WriterProcessEnded, match="exit code -9"):
            process.write([raw(NODE, now)])
    finally:
        killer.join()
    assert gpu_rows(open_store())["GPU-0"]["sample_ts"] == now - 1  # the failed batch is not half-written
    assert process.write([raw(NODE, now)]).samples == 2  # the ingest writes the batch again: a new child
    assert process.starts == 2 and process.pid not in (None, pid)
    assert gpu_rows(open_store())["GPU-0"]["sample_ts"] == now


def test_a_child_found_dead_before_a_write_is_started_again_for_it(
    writer: Callable[..., SampleWriterProcess], open_store: Callable[..., FleetStore],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    process, pid, now = _a_child_that_wrote(writer)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: process.pid is None, what="the killed child seen as ended")
    assert process.write([raw(NODE, now)]).samples == 2  # no batch was in flight: nothing to fail
    assert process.starts == 2 and process.pid not in (None, pid)
    assert "sample writer process ended (exit code -9): starting it again" in caplog.text
    assert gpu_rows(open_store())["GPU-0"]["sample_ts"] == now


def test_a_database_the_child_cannot_open_is_a_store_error_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "fleet.db").write_bytes(b"not a database, " * 64)
    process = SampleWriterProcess(WriterSettings(db=f"sqlite:///{tmp_path / 'fleet.db'}"))
    try:
        with pytest.raises(FleetStoreError, match="not a database"):
            process.start()
        assert process.pid is None  # it said why and left
    finally:
        process.kill()


def test_stop_writes_the_latest_samples_that_waited(writer: Callable[..., SampleWriterProcess],
                                                    open_store: Callable[..., FleetStore]) -> None:  # noqa: F811
    process = writer(latest_sample_every=30.0)
    now = time.time()
    process.write([raw(NODE, now)])
    process.write([raw(NODE, now + 1, temperature_c=80.0)])  # 1 s later: waits in the child
    store = open_store()
    assert gpu_rows(store)["GPU-0"]["sample_ts"] == now
    assert process.stop(10.0) == 2
    assert gpu_rows(store)["GPU-0"]["sample"]["temperature_c"] == 80.0
    assert process.pid is None


def test_decode_batch_refuses_what_the_full_validation_refuses_by_its_place_and_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    good = raw(NODE, time.time())
    wrong_node = raw("someone-else", time.time())
    rows = [tuple(good), (good.topic, b"{not json", 1.0, 0.0, None), (good.topic, *tuple(wrong_node)[1:])]
    batch, refused = decode_batch(rows, 10, ThrottledLog(logging.getLogger("test"), 60.0))
    assert [i.envelope.node for i in batch] == [NODE]
    assert refused == {11: "not_json", 12: "node_mismatch"}  # their places in the whole batch
    assert "rejected message: not_json" in caplog.text and "rejected message: node_mismatch" in caplog.text


def test_the_ingest_writes_telemetry_in_the_child_and_acks_events_itself(
    writer: Callable[..., SampleWriterProcess], open_store: Callable[..., FleetStore],  # noqa: F811
) -> None:
    store = open_store()
    process = writer()
    acks: list[tuple[str, int]] = []
    delivered: list[Kind] = []
    ingestor_counts: list[dict[str, int]] = []  # accepted, rejected: by kind, by reason
    now = time.time()

    async def scenario() -> int:
        ingestor = Ingestor(store, lambda node, upto, _epoch, **_k: acks.append((node, upto)),
                            batch_interval_s=0.05, sample_writer=process)

        async def listen(batch: list[Any]) -> None:
            for item in batch:
                if item.envelope.kind is Kind.TELEMETRY:  # delivered after the child wrote it
                    assert item.envelope.ts in {s["ts"] for s in store.samples(NODE)}
                delivered.append(item.envelope.kind)

        ingestor.bus.subscribe(listen)
        runner = asyncio.create_task(ingestor.run())
        try:
            status = StatusBody(state="online", version="0.1.0", gpus=[gpu(0), gpu(1)], outbox_epoch="e1")
            ingestor.offer(Received(edge_topic(NODE, "status"), envelope_json(NODE, Kind.STATUS, status, ts=now), False))
            for step in range(3):
                ingestor.offer(Received(*raw(NODE, now + step)[:2], False))
            # what the controller's peek reads is fine, a figure is not: refused by the child
            topic, payload = raw(NODE, now + 3)[:2]
            bad = json.loads(payload)
            bad["body"]["samples"][0]["temperature_c"] = "hot"
            ingestor.offer(Received(topic, json.dumps(bad).encode(), False))
            xid = XidBody(gpu_index=0, gpu_uuid="GPU-0", xid=48, action="request_migration")
            ingestor.offer(Received(edge_topic(NODE, "events"), envelope_json(NODE, Kind.XID, xid, seq=1, ts=now), False))
            deadline = time.monotonic() + 20
            while (ingestor.pending() or not acks) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            left = await ingestor.drain(10.0)
            ingestor_counts.extend([dict(ingestor.accepted), dict(ingestor.rejected)])
            return left
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    assert asyncio.run(scenario()) == 0
    assert acks == [(NODE, 1)]
    assert tuple(ingestor_counts) == ({"status": 1, "xid": 1, "telemetry": 3}, {"schema": 1})
    assert sorted(delivered) == sorted([Kind.STATUS, Kind.XID, *[Kind.TELEMETRY] * 3])
    rows = gpu_rows(store)
    assert {u: r["sample_ts"] for u, r in rows.items()} == {"GPU-0": now + 2, "GPU-1": now + 2}
    assert rows["GPU-0"]["name"] == "NVIDIA H100"  # the status, written here
    assert len(store.samples(NODE)) == 6
    assert process.pid is None  # drained: the child stopped


def test_the_child_ignores_signals_to_the_group_and_leaves_when_its_controller_is_gone(
    db_url: str, open_store: Callable[..., FleetStore],  # noqa: F811
) -> None:
    """A controller killed with SIGKILL: its child reads the end of its input, writes the latest
    samples it held back, and leaves. Ctrl-C or SIGTERM to the group are the controller's to handle."""
    open_store().close()
    now = time.time()
    script = (
        "import os, sys, time\n"
        "from cloud.sample_writer import SampleWriterProcess, WriterSettings\n"
        "from tests.test_sample_writer import raw\n"
        f"p = SampleWriterProcess(WriterSettings(db={db_url!r}, latest_sample_every=30.0))\n"
        f"p.write([raw('node-a', {now!r})])\n"
        f"p.write([raw('node-a', {now + 1!r}, temperature_c=80.0)])\n"
        "print(p.pid, flush=True)\n"
        "sys.stdin.readline()\n"  # until the test has signalled the child
    )
    controller = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  cwd=Path(__file__).resolve().parent.parent)
    try:
        assert controller.stdout is not None and controller.stdin is not None
        child = int(controller.stdout.readline())
        os.kill(child, signal.SIGTERM)
        os.kill(child, signal.SIGINT)
        time.sleep(0.3)
        os.kill(child, 0)  # still there
        store = open_store()
        assert gpu_rows(store, "node-a")["GPU-0"]["sample_ts"] == now  # the newer one held back
        controller.kill()
        controller.wait(10)
        wait_for(lambda: not _alive(child), 20, 0.05, "the child gone once its controller is")
        assert gpu_rows(store, "node-a")["GPU-0"]["sample"]["temperature_c"] == 80.0
    finally:
        controller.kill()


def _alive(pid: int) -> bool:
    """Running: not gone, and not a zombie (one has left: only its parent's wait is missing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_a_real_controller_writes_through_its_child_and_replaces_it_when_killed(
    tmp_path: Path, broker: Any,
) -> None:
    """`kgpu cloud run` as deployed: telemetry published to the broker is stored by its sample
    writer; the child killed with SIGKILL is started again and nothing published after is lost;
    SIGTERM to the controller stops both."""
    from shared.mqtt import MqttLink, parse_broker_url
    from tests.helpers.cloud_process import CloudProcess

    cloud = CloudProcess(tmp_path / "cloud", broker.url)
    edge = MqttLink(parse_broker_url(broker.url), "node-e2e", backoff_min_s=0.1, backoff_max_s=0.5)
    try:
        cloud.start()
        assert cloud.proc is not None
        edge.start()
        wait_for(edge.connected.is_set, 30, 0.05, "the edge connected")

        def publish_until_stored(ts: float) -> None:
            message = raw("node-e2e", ts, (0,))

            def stored() -> dict[str, Any] | None:  # QoS 0: published again until the controller has it
                edge.publish(message.topic, message.payload, qos=0)
                state = cloud.node_state("node-e2e")
                return state if state is not None and any(g.get("sample_ts") == ts for g in state["gpus"]) else None

            wait_for(stored, 60, 0.2, f"the sample of {ts} stored")

        now = time.time()
        publish_until_stored(now)
        assert cloud.metric("kgpu_ingest_sample_writer_starts_total") == 1
        # handed over by the telemetry connection's network thread, not through the event loop
        assert cloud.metric("kgpu_ingest_telemetry_direct_total") >= 1
        children = _live_children(cloud.proc.pid)
        assert len(children) == 1 and "cloud.sample_writer" in Path(f"/proc/{children[0]}/cmdline").read_text()
        os.kill(children[0], signal.SIGKILL)
        publish_until_stored(now + 1)  # the batch that found it dead is written again by a new one
        assert cloud.metric("kgpu_ingest_sample_writer_starts_total") == 2
        assert "sample writer process ended" in cloud.log()
        second = _live_children(cloud.proc.pid)
        assert len(second) == 1 and second != children
        assert cloud.stop() == 0
        assert not _alive(second[0])
    finally:
        edge.stop()
        cloud.stop()


def _live_children(pid: int) -> list[int]:
    return [child for child in children(pid) if _alive(child)]


def test_telemetry_taken_on_a_network_thread_goes_to_the_child_without_the_loops_queue(
    writer: Callable[..., SampleWriterProcess], open_store: Callable[..., FleetStore],  # noqa: F811
) -> None:
    """`Ingestor.take_telemetry`, as the telemetry connection's network thread calls it: telemetry
    peeked at, weighed against the GPU budget and handed to the child there; what it cannot read,
    and anything but telemetry, is left to the loop (False); nothing once the ingest drains."""
    store = open_store()
    process = writer()
    now = time.time()
    delivered: list[float] = []

    def message(ts: float, indexes: tuple[int, ...]) -> Received:
        item = raw(NODE, ts, indexes)
        return Received(item.topic, item.payload, False)

    async def scenario() -> tuple[list[bool], bool, int, dict[str, int], dict[str, int], int]:
        ingestor = Ingestor(store, lambda *_a, **_k: None, batch_interval_s=0.05, sample_writer=process,
                            budget=BudgetLimits(gpus=2))

        async def listen(batch: list[Any]) -> None:
            delivered.extend(item.envelope.ts for item in batch)

        ingestor.bus.subscribe(listen, kinds=[Kind.TELEMETRY])
        runner = asyncio.create_task(ingestor.run())
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(0.05)  # the hand-over runs
            status = StatusBody(state="online", version="0.1.0", gpus=[gpu(0)], outbox_epoch="e1")
            offered = [message(now, (0, 1, 2)), message(now + 1, (0, 1)),
                       Received(edge_topic(NODE, "status"), envelope_json(NODE, Kind.STATUS, status, ts=now), False),
                       Received(edge_topic(NODE, "telemetry"), b"not json", False)]
            taken = [await loop.run_in_executor(None, ingestor.take_telemetry, m) for m in offered]
            deadline = time.monotonic() + 20
            while ingestor.pending() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            queued_on_the_loop = ingestor.queue.qsize()
            assert await ingestor.drain(10.0) == 0
            after = await loop.run_in_executor(None, ingestor.take_telemetry, message(now + 2, (0,)))
            return (taken, after, queued_on_the_loop, dict(ingestor.dropped), dict(ingestor.accepted),
                    ingestor.telemetry_direct)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    taken, after, queued_on_the_loop, dropped, accepted, direct = asyncio.run(scenario())
    assert direct == 2
    assert taken == [True, True, False, False]
    assert not after and queued_on_the_loop == 0
    assert dropped.get("gpus") == 1 and accepted == {"telemetry": 2}  # GPU-2, over the budget of two
    assert {u: r["sample_ts"] for u, r in gpu_rows(store).items()} == {"GPU-0": now + 1, "GPU-1": now + 1}
    assert delivered == [now, now + 1]


def test_the_child_reads_frames_ahead_so_that_the_controllers_write_ends_before_they_are_taken() -> None:
    """`FrameReader`: frames written to the child's stdin are read in on a thread of their own, up
    to READ_AHEAD_FRAMES, so a write of frames larger than the pipe returns before the child takes
    any; they come out in order, then the end (None, every time after); a frame out of step is
    raised where it is taken; nothing waiting: queue.Empty after the timeout."""
    import queue as queue_module

    from cloud.sample_writer import READ_AHEAD_FRAMES, FrameReader, _send

    read_fd, write_fd = os.pipe()
    requests, controller = os.fdopen(read_fd, "rb", buffering=0), os.fdopen(write_fd, "wb", buffering=0)
    frames = FrameReader(requests)
    with pytest.raises(queue_module.Empty):
        frames.get(0.05)
    big = b"x" * (1 << 20)  # each frame 1 MiB: far more than a pipe holds
    sent = threading.Thread(target=lambda: [_send(controller, {"op": "add", "items": [[i, big]]})
                                            for i in range(READ_AHEAD_FRAMES)])
    sent.start()
    sent.join(20)
    assert not sent.is_alive()  # written whole although no frame was taken yet
    _send(controller, {"op": "write", "items": []})
    controller.close()
    got = [frames.get(10) for _ in range(READ_AHEAD_FRAMES + 1)]
    assert [f["items"][0][0] for f in got[:-1]] == list(range(READ_AHEAD_FRAMES)) and got[-1]["op"] == "write"
    assert frames.get(10) is None and frames.get(10) is None

    read_fd, write_fd = os.pipe()
    os.write(write_fd, struct.pack(">I", (1 << 30) + 1))  # a length past MAX_FRAME: out of step
    broken = FrameReader(os.fdopen(read_fd, "rb", buffering=0))
    with pytest.raises(ValueError, match="out of step"):
        broken.get(10)
    os.close(write_fd)


def _write_while_stopped(process: SampleWriterProcess, batch: list[Any], head: list[RawTelemetry]) -> Any:
    """`process.write(batch)` with the child stopped until its `ahead` has been asked for the next
    batch and has given `head` (so that they go ahead for sure); what the write returned or raised."""
    pid = process.pid
    assert pid is not None
    asked = threading.Event()

    def ahead(sent: int) -> list[RawTelemetry]:
        asked.set()
        return head[sent:]

    def resume_once_asked() -> None:
        asked.wait(20)
        os.kill(pid, signal.SIGCONT)

    os.kill(pid, signal.SIGSTOP)  # its answer cannot come before `ahead` is asked
    resumer = threading.Thread(target=resume_once_asked)
    resumer.start()
    try:
        return process.write(batch, ahead)
    except (ValueError, FleetStoreError) as exc:
        return exc
    finally:
        resumer.join()
        os.kill(pid, signal.SIGCONT)


def test_the_next_batchs_head_goes_ahead_while_the_child_writes_and_the_next_write_sends_the_rest(
    writer: Callable[..., SampleWriterProcess], open_store: Callable[..., FleetStore],  # noqa: F811
) -> None:
    """`write(..., ahead)`: while the child writes, the next batch's first messages go to it in
    "add" frames; the next `write` sends only the rest, and the child writes them as one batch."""
    process, _pid, now = _a_child_that_wrote(writer)
    process.frame_messages = 2
    following = [raw(f"node-{i}", now, (0,)) for i in range(5)]
    written = _write_while_stopped(process, [raw(NODE, now)], following[:4])
    assert written.samples == 2  # its own batch only
    assert process.sent_ahead == 4
    assert process.write(following).samples == 5  # 4 there already, 1 sent now: each written once
    assert process.sent_ahead == 0
    store = open_store()
    assert all(gpu_rows(store, f"node-{i}")["GPU-0"]["sample_ts"] == now for i in range(5))
    assert len(store.samples("node-0")) == 1


def test_a_failed_batch_takes_back_what_went_ahead_and_the_next_batch_goes_whole(
    writer: Callable[..., SampleWriterProcess], open_store: Callable[..., FleetStore],  # noqa: F811
) -> None:
    """The child refuses a batch after the next one's head went ahead: it is told to drop that
    head ("drop"), and the next `write` sends its batch whole: nothing written twice or lost."""
    process, _pid, now = _a_child_that_wrote(writer)
    following = [raw(f"node-{i}", now, (0, 1)) for i in range(3)]
    out_of_shape = raw(NODE, now)._replace(kept=7)  # type: ignore[arg-type]  # not a tuple of uuids
    refused = _write_while_stopped(process, [out_of_shape], following[:2])
    assert isinstance(refused, ValueError) and "out of shape" in str(refused)
    assert process.sent_ahead == 0
    assert process.write(following).samples == 6  # three messages of two GPUs, each once
    assert all(len(open_store().samples(f"node-{i}")) == 2 for i in range(3))
