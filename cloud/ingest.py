"""Ingest: every message from the edges validated, batched into the fleet store, then acked.

`validate()` is a pure function (fuzzed in tests): topic and payload in, an `Incoming` out, or a
`RejectedMessage` with a short reason that is counted in `kgpu_ingest_rejected_total{reason}`.
A node may only speak for itself: the node in the topic must be the node in the payload (the
broker's ACL additionally ties the topic to the MQTT user).

Batches are written in one transaction (by count or by time, whichever comes first); only after
the commit does the cloud publish each node's cumulative ack, so a crash between the two replays
as duplicates, which the store turns into no-ops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections import Counter
from collections.abc import Callable

from cloud.clock_skew import ClockSkewEstimator
from cloud.services import BatchBus
from cloud.store import FleetStore, Incoming, IngestResult
from shared.logs import get_logger
from shared.mqtt import Received
from shared.protocol import Direction, Kind, Reason, RejectedMessage, decode_and_check

log = get_logger(__name__)


def validate(topic: str, payload: bytes, received_at: float) -> Incoming:
    """Check one edge message end to end (shared.protocol.decode_and_check: the one wire
    contract); raise RejectedMessage(reason, detail) if it is bad."""
    checked = decode_and_check(topic, payload, direction=Direction.EDGE_TO_CLOUD)
    return Incoming(envelope=checked.envelope, body=checked.body, received_at=received_at)


# Every reason a message can be refused for: decode_and_check's, and a batch the store refuses.
# kgpu_ingest_rejected_total exposes each from 0, so a rate over it reads 0, not nothing, before
# the first rejection (dashboards and rules read it).
REFUSED_BY_STORE = "refused_by_store"
REJECTION_REASONS: tuple[str, ...] = (*(reason.value for reason in Reason), REFUSED_BY_STORE)

GC_GEN0_THRESHOLD = 20_000


def tune_gc_for_ingest() -> None:
    """Make Python's cyclic garbage collector cheap for a process whose hot loop is the ingest.

    Every message allocates hundreds of short-lived objects (JSON, pydantic models, rows). With
    the default threshold (700 allocations) the collector runs every few messages, and the
    queued batches it finds alive are promoted until full collections walk every object of the
    process: measured as about half the ingest CPU (bench/fleet_scale.py, docs/benchmarks.md).
    Objects alive at start-up are frozen out of its walks, and it runs less often. Process-wide,
    so only the controller turns it on (Ingestor(tune_gc=True))."""
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)
    log.info("garbage collector tuned for the ingest", extra={"threshold": gc.get_threshold(),
                                                              "frozen": gc.get_freeze_count()})


class Ingestor:
    def __init__(self, store: FleetStore, publish_ack: Callable[[str, int, str | None], None], *,
                 batches: BatchBus | None = None, batch_size: int = 500, batch_interval_s: float = 0.1,
                 tune_gc: bool = False) -> None:
        self.store = store
        self.tune_gc = tune_gc  # the controller's ingest is its hot loop: see tune_gc_for_ingest()
        self.publish_ack = publish_ack
        self.batch_size = batch_size
        self.batch_interval_s = batch_interval_s
        self.queue: asyncio.Queue[Incoming] = asyncio.Queue()
        self.accepted: Counter[str] = Counter()  # by envelope kind
        self.rejected: Counter[str] = Counter()  # by reason
        self.stored = 0
        self.duplicates = 0
        self.gaps = 0
        self.stale = 0
        self.deferred = 0  # messages put back because another replica held their node's row
        self.batches = 0
        self.store_errors = 0
        self.failing = False  # the last write failed and is being retried
        # Every batch goes here after it is committed (decisions that follow from fleet state,
        # e.g. migrations on a migration_request event, subscribe). A failing listener is logged.
        self.bus = batches if batches is not None else BatchBus()
        # node -> arrival minus the edge's ts of its last message, less the node's clock skew
        self.lag_seconds: dict[str, float] = {}
        self.clock = ClockSkewEstimator()  # .skew: node -> its clock minus ours (cloud/clock_skew.py)
        self.last_seen: dict[str, float] = {}  # node -> arrival time (cloud clock) of its last message
        self.online: dict[str, bool] = {}  # node -> from its last status (online, or the last will)
        self.last_batch_seconds = 0.0

    def offer(self, message: Received) -> None:
        """Called on the event loop for every message from the broker."""
        received_at = time.time()
        try:
            incoming = validate(message.topic, message.payload, received_at)
        except RejectedMessage as exc:
            self.rejected[exc.reason] += 1
            log.warning("rejected message: %s: %s", exc.reason, exc.detail[:300], extra={"topic": message.topic[:200]})
            return
        envelope = incoming.envelope
        self.accepted[envelope.kind.value] += 1
        skew = self.clock.observe(envelope.node, envelope.ts, received_at,
                                  telemetry=envelope.kind is Kind.TELEMETRY)
        if skew:
            incoming = dataclasses.replace(incoming, clock_skew=skew)
        self.lag_seconds[envelope.node] = received_at - envelope.ts + skew
        self.last_seen[envelope.node] = received_at
        if envelope.kind is Kind.STATUS:
            self.online[envelope.node] = incoming.body.state == "online"  # type: ignore[attr-defined]
        self.queue.put_nowait(incoming)

    async def run(self) -> None:
        """Write batches until cancelled; a failing batch is retried, never dropped."""
        if self.tune_gc:
            tune_gc_for_ingest()
        queue = self.queue
        carried: list[Incoming] = []  # deferred by the last write: they go first, in order
        while True:
            batch = carried or [await queue.get()]
            deadline = time.monotonic() + self.batch_interval_s
            while len(batch) < self.batch_size:
                # what is already queued is taken at once: no timer per message
                while not queue.empty() and len(batch) < self.batch_size:
                    batch.append(queue.get_nowait())
                remaining = deadline - time.monotonic()
                if remaining <= 0 or len(batch) >= self.batch_size:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), timeout=remaining))
                except TimeoutError:
                    break
            carried = await self._write(batch)
            if carried and len(carried) == len(batch):
                await asyncio.sleep(0.02)  # every node was held by another replica: let it commit

    async def _write(self, batch: list[Incoming]) -> list[Incoming]:
        """Store a batch (retrying while the database is down); returns the messages deferred
        because another replica held their node (offered again first in the next batch)."""
        delay = 0.5
        while True:
            started = time.perf_counter()
            try:
                result: IngestResult = await asyncio.to_thread(self.store.ingest, batch, skip_locked=True)
                self.failing = False
                break
            except ValueError as exc:  # a batch the store refuses will never succeed: say so, go on
                self.rejected[REFUSED_BY_STORE] += len(batch)
                log.error("fleet store refused a batch of %d messages: %s", len(batch), exc)
                return []
            except Exception as exc:  # noqa: BLE001 - the database is down: keep the batch, retry with backoff
                self.store_errors += 1
                self.failing = True
                log.error("fleet store write failed, retrying in %.1f s: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.last_batch_seconds = time.perf_counter() - started
        self.batches += 1
        self.stored += result.stored
        self.duplicates += result.duplicates
        self.stale += result.stale
        self.gaps += sum(result.gaps.values())
        self.deferred += len(result.deferred)
        for node, (upto, epoch) in result.acks.items():
            self.publish_ack(node, upto, epoch)
        if result.deferred:
            waiting = {id(item) for item in result.deferred}
            batch = [item for item in batch if id(item) not in waiting]
        await self.bus.deliver(batch)
        return result.deferred
