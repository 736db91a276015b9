"""A GPU's latest sample written at most once per `latest_sample_every` (cloud/store/latest.py):
the choice itself, the fleet store writing what it chooses (SQLite and PostgreSQL), and the
controller's ingest writing what waited while no batch comes and at shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from cloud.ingest import Ingestor
from cloud.store import FleetStore
from cloud.store.latest import LatestSample, LatestSamples
from kgpu.lab.fleetsim.node import SimNode, envelope_json
from shared.mqtt import Received
from shared.protocol import Kind, TelemetryBody
from tests.helpers.clock import FakeClock
from tests.test_fleet_store import NODE, T0, db_url, gpu, open_store, sample, status, telemetry  # noqa: F401 (fixtures)

GPU0, GPU1 = (NODE, "GPU-0"), (NODE, "GPU-1")


def latest(ts: float, power_limit_w: float | None = 300.0) -> LatestSample:
    return LatestSample(ts, sample(0, ts), power_limit_w, ts)


# ---- the choice ----------------------------------------------------------------------------------


def test_every_zero_writes_every_sample_at_once() -> None:
    choice = LatestSamples(0.0, clock=FakeClock())
    for step in range(3):
        assert set(choice.choose({GPU0: latest(T0 + step), GPU1: latest(T0 + step)})) == {GPU0, GPU1}
    assert choice.waiting == 0 and choice.due_in() is None


def test_a_sample_sooner_than_every_waits_is_replaced_and_is_written_when_due() -> None:
    clock = FakeClock()
    choice = LatestSamples(2.0, clock=clock)
    assert list(choice.choose({GPU0: latest(T0)})) == [GPU0]  # the first one: at once
    assert choice.choose({GPU0: latest(T0 + 1)}) == {}  # 1 s of sample time later: waits
    assert choice.waiting == 1 and choice.due_in() == 2.0
    clock.advance(1.5)
    assert choice.choose({GPU0: latest(T0 + 1.5, power_limit_w=None)}) == {}  # replaces it, keeps its place
    assert choice.due_in() == pytest.approx(0.5)
    assert choice.flush() == {}  # not due yet
    clock.advance(0.5)
    written = choice.choose({GPU1: latest(T0 + 2)})  # another GPU's batch takes what is due with it
    assert set(written) == {GPU0, GPU1}
    assert written[GPU0].ts == T0 + 1.5 and written[GPU0].power_limit_w == 300.0  # the limit it left out kept
    assert choice.waiting == 0 and choice.due_in() is None


def test_a_sample_every_seconds_after_the_last_written_goes_at_once_and_drops_the_waiting_one() -> None:
    clock = FakeClock()
    choice = LatestSamples(2.0, clock=clock)
    choice.choose({GPU0: latest(T0)})
    choice.choose({GPU0: latest(T0 + 1)})
    assert list(choice.choose({GPU0: latest(T0 + 2)})) == [GPU0]  # a fleet sampling every 2 s never waits
    assert choice.waiting == 0
    assert choice.choose({GPU0: latest(T0 + 0.5)}) == {}  # older than the one written: not kept at all
    assert choice.waiting == 0


def test_flush_everything_and_forget() -> None:
    clock = FakeClock()
    choice = LatestSamples(5.0, clock=clock)
    choice.choose({GPU0: latest(T0), GPU1: latest(T0)})
    choice.choose({GPU0: latest(T0 + 1), GPU1: latest(T0 + 1)})
    choice.forget([GPU1])  # the node's status no longer lists it
    assert set(choice.flush(everything=True)) == {GPU0}  # at shutdown, whether due or not
    assert list(choice.choose({GPU1: latest(T0 + 2)})) == [GPU1]  # forgotten: as if new, at once
    with pytest.raises(ValueError, match="negative"):
        LatestSamples(-1.0)


# ---- the fleet store --------------------------------------------------------------------------


def gpu_sample_ts(store: FleetStore) -> dict[str, float | None]:
    node = store.node(NODE)
    assert node is not None
    return {g["uuid"]: g["sample_ts"] for g in node["gpus"]}


def test_the_store_writes_what_waited_when_it_is_due_and_the_history_keeps_everything(
    open_store: Callable[..., FleetStore],  # noqa: F811 - the fixture imported above
) -> None:
    store = open_store(latest_sample_every=2.0)
    clock = FakeClock()
    store.latest = LatestSamples(2.0, clock=clock)  # the same choice on a clock the test moves
    store.ingest([status()])
    store.ingest([telemetry(NODE, [sample(0, T0), sample(1, T0)])])
    store.ingest([telemetry(NODE, [sample(0, T0 + 1, temperature_c=71.0), sample(1, T0 + 1)], ts=T0 + 1)])
    assert gpu_sample_ts(store) == {"GPU-0": T0, "GPU-1": T0}  # waiting
    assert len(store.samples(NODE)) == 4  # the history has them all at once
    assert store.latest_due_in() == 2.0
    assert store.flush_latest() == 0
    clock.advance(2.0)
    assert store.flush_latest() == 2
    assert gpu_sample_ts(store) == {"GPU-0": T0 + 1, "GPU-1": T0 + 1}
    node = store.node(NODE)
    assert node is not None and node["gpus"][0]["sample"]["temperature_c"] == 71.0
    assert store.latest_due_in() is None

    # A GPU the node's status leaves out is deleted, and what of it waited is not written back.
    store.ingest([telemetry(NODE, [sample(0, T0 + 3), sample(1, T0 + 3)], ts=T0 + 3)])  # 2 s after: at once
    assert gpu_sample_ts(store) == {"GPU-0": T0 + 3, "GPU-1": T0 + 3}
    store.ingest([telemetry(NODE, [sample(1, T0 + 4)], ts=T0 + 4)])  # waits
    store.ingest([status(ts=T0 + 4, gpus=[gpu(0)])])
    clock.advance(5.0)
    assert store.flush_latest(everything=True) == 0
    assert gpu_sample_ts(store) == {"GPU-0": T0 + 3}


# ---- the controller's ingest ---------------------------------------------------------------------


def payload(node: SimNode, ts: float) -> bytes:
    body = TelemetryBody(samples=[sample(0, ts)])
    return envelope_json(node.name, Kind.TELEMETRY, body, ts=ts)


def test_the_ingest_writes_what_waited_while_no_batch_comes_and_at_shutdown(tmp_path: Any) -> None:
    import random

    node = SimNode(0, NODE, 1, random.Random(1))
    store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}", latest_sample_every=0.5)
    now = time.time()

    async def scenario() -> tuple[float | None, float | None, float | None]:
        ingestor = Ingestor(store, lambda *_a, **_k: None, batch_interval_s=0.01)
        runner = asyncio.create_task(ingestor.run())
        try:
            ingestor.offer(Received(node.topics["telemetry"], payload(node, now), False))
            await asyncio.sleep(0.1)
            ingestor.offer(Received(node.topics["telemetry"], payload(node, now + 0.2), False))  # waits
            await asyncio.sleep(0.1)
            waiting = gpu_sample_ts(store)["GPU-0"]
            deadline = time.monotonic() + 5
            while gpu_sample_ts(store)["GPU-0"] != now + 0.2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # no message comes: the ingest's own flush writes it
            idle = gpu_sample_ts(store)["GPU-0"]
            ingestor.offer(Received(node.topics["telemetry"], payload(node, now + 0.3), False))  # waits
            await asyncio.sleep(0.1)
            assert await ingestor.drain(2.0) == 0  # shutdown: written, due or not
            return waiting, idle, gpu_sample_ts(store)["GPU-0"]
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    try:
        waiting, idle, at_shutdown = asyncio.run(scenario())
    finally:
        store.close()
    assert waiting == now
    assert idle == now + 0.2
    assert at_shutdown == now + 0.3
