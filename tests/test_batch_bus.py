"""cloud/services.py BatchBus: each listener gets the batches holding a kind it reads, and a
failing listener does not keep the batch from the others."""

from __future__ import annotations

import asyncio
import time

import pytest

from cloud.services import BatchBus
from cloud.store import Incoming
from shared.protocol import Kind, StatusBody, TelemetryBody, make_envelope


def _item(kind: Kind) -> Incoming:
    body = (StatusBody(state="online", version="0.1.0", gpus=[]) if kind is Kind.STATUS
            else TelemetryBody(samples=[]))
    return Incoming(envelope=make_envelope("edge-a", body, kind), body=body, received_at=time.time())


def test_listeners_get_only_batches_holding_a_kind_they_read(caplog: pytest.LogCaptureFixture) -> None:
    got: dict[str, list[list[Kind]]] = {"status": [], "telemetry": [], "all": []}

    def listener(name: str, fail: bool = False):  # type: ignore[no-untyped-def]
        async def listen(batch: list[Incoming]) -> None:
            got[name].append([i.envelope.kind for i in batch])
            if fail:
                raise RuntimeError("a broken listener")
        return listen

    async def scenario() -> None:
        bus = BatchBus()
        bus.subscribe(listener("status", fail=True), kinds=[Kind.STATUS])
        bus.subscribe(listener("telemetry"), kinds=[Kind.TELEMETRY, Kind.HEALTH])
        bus.subscribe(listener("all"))
        await bus.deliver([_item(Kind.TELEMETRY), _item(Kind.TELEMETRY)])
        await bus.deliver([_item(Kind.STATUS)])
        await bus.deliver([_item(Kind.TELEMETRY), _item(Kind.STATUS)])
        await bus.deliver([_item(Kind.TELEMETRY)], kinds=[Kind.TELEMETRY])  # the caller says what it holds
        await bus.deliver([])

    asyncio.run(scenario())
    telemetry, status = Kind.TELEMETRY, Kind.STATUS
    assert got["status"] == [[status], [telemetry, status]]
    assert got["telemetry"] == [[telemetry, telemetry], [telemetry, status], [telemetry]]
    assert got["all"] == [[telemetry, telemetry], [status], [telemetry, status], [telemetry]]
    assert [r.getMessage().startswith("batch listener") for r in caplog.records] == [True, True]
