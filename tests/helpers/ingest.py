"""Drive the controller's real Ingestor over a real fleet store, in-process (for the fuzz tests)."""

from __future__ import annotations

import asyncio

from cloud.ingest import Ingestor
from cloud.store import FleetStore
from shared.mqtt import Received


def ingest_all(store: FleetStore, messages: list[tuple[str, bytes]]) -> tuple[Ingestor, list[tuple[str, int]]]:
    """Offer every (topic, payload) as if MQTT had delivered it, let the ingest write them all,
    stop it; return the ingestor (its counters) and the acks it published as (node, upto)."""
    acks: list[tuple[str, int]] = []

    async def scenario() -> Ingestor:
        ingestor = Ingestor(store, lambda node, upto, epoch: acks.append((node, upto)), batch_interval_s=0.01)
        runner = asyncio.create_task(ingestor.run())
        for topic, payload in messages:
            ingestor.offer(Received(topic, payload, False))
        for _ in range(300):
            if ingestor.queue.empty():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return ingestor

    return asyncio.run(scenario()), acks


def counted(ingestor: Ingestor) -> int:
    """Messages the ingestor accounted for: accepted or rejected (a batch the store refused was
    counted as accepted first)."""
    return sum(ingestor.accepted.values()) + sum(ingestor.rejected.values()) - ingestor.rejected["refused_by_store"]
