"""Ingest: every message from the edges validated, batched into the fleet store, then acked.

`validate()` is a pure function (fuzzed in tests): topic and payload in, an `Incoming` out, or a
`RejectedMessage` with a short reason that is counted in `kgpu_ingest_rejected_total{reason}`.
A node may only speak for itself: the node in the topic must be the node in the payload (the
broker's ACL additionally ties the topic to the MQTT user).

Batches are written in one transaction (by count or by time, whichever comes first); only after
the commit does the cloud publish each node's cumulative ack, so a crash between the two replays
as duplicates, which the store turns into no-ops.

Bounded (docs/robustness.md): each node's messages are weighed against its budget
(cloud/budget.py) before they are queued, and its excess is dropped and counted there (`accept`,
called on the MQTT link's network threads, so that a flood's excess never wakes the event loop;
the budget state is shared with the loop under `_budget_lock`); the queue
holds at most `queue_max` messages and `queue_max_bytes` of payload, and `put` waits for room, so
a store that falls behind slows the MQTT link down (back-pressure to the broker) instead of
growing memory. The writes run on the ingest's own thread, never on the pool that HTTP reads use;
with a `SampleWriterProcess` (cloud/sample_writer.py, the controller's default) telemetry is only
peeked at here (cloud/telemetry_peek.py) and validated and written by a child process, on another
core, while the next batch is gathered.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Protocol

from cloud.budget import BUDGETS, BudgetLimits
from cloud.clock_skew import ClockSkewEstimator
from cloud.gc_tuning import tune_gc_for_ingest
from cloud.ingest_budgets import SWEEP_EVERY_S, IngestBudgets
from cloud.ingest_queue import IngestQueue, Queued, WriterThread
from cloud.sample_handover import SampleHandOver
from cloud.sample_writer import RawTelemetry, SamplesWritten, SampleWriterProcess
from cloud.services import BatchBus
from cloud.store import FleetStore, Incoming, IngestResult
from cloud.telemetry_peek import peek_telemetry
from shared.logs import ThrottledLog, get_logger
from shared.mqtt import Received
from shared.protocol import (
    Direction,
    Kind,
    Reason,
    RejectedMessage,
    StatusBody,
    decode_and_check,
    envelope_of,
)

log = get_logger(__name__)


def validate(topic: str, payload: bytes, received_at: float) -> Incoming:
    """Check one edge message end to end (shared.protocol.decode_and_check: the one wire
    contract); raise RejectedMessage(reason, detail) if it is bad. The cloud reads only the typed
    body (`Incoming.body`): a telemetry envelope's `body` dict is not built (left `{}`)."""
    checked = decode_and_check(topic, payload, direction=Direction.EDGE_TO_CLOUD, typed_body_only=True)
    return Incoming(envelope=checked.envelope, body=checked.body, received_at=received_at)


# Every reason a message can be refused for: decode_and_check's, and a batch the store refuses.
# kgpu_ingest_rejected_total exposes each from 0, so a rate over it reads 0, not nothing, before
# the first rejection (dashboards and rules read it).
REFUSED_BY_STORE = "refused_by_store"
REJECTION_REASONS: tuple[str, ...] = (*(reason.value for reason in Reason), REFUSED_BY_STORE)

# kgpu_ingest_dropped_total{reason}: a node's excess over its budget (cloud/budget.py), each from 0
DROP_REASONS: tuple[str, ...] = BUDGETS

DEFAULT_QUEUE_MAX = 10_000
DEFAULT_QUEUE_MAX_BYTES = 32 * 1024 * 1024
_TELEMETRY_ONLY = (Kind.TELEMETRY,)  # what the sample writer process writes (BatchBus.deliver)


def _raws(samples: list[Queued]) -> list[RawTelemetry]:
    """What the sample writer process takes of these messages (every one of them telemetry for it)."""
    return [q.raw for q in samples if q.raw is not None]


class PublishAck(Protocol):
    """The link's `publish_ack`: a node's cumulative ack; `conflict` as in shared.protocol.AckBody."""

    def __call__(self, node: str, upto: int, epoch: str | None, *, conflict: bool = False) -> None: ...


class Ingestor(IngestBudgets):
    def __init__(self, store: FleetStore, publish_ack: PublishAck, *,
                 batches: BatchBus | None = None, batch_size: int = 500, batch_interval_s: float = 0.1,
                 tune_gc: bool = False, budget: BudgetLimits | None = None,
                 queue_max: int = DEFAULT_QUEUE_MAX, queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES,
                 reject_log_every_s: float = 10.0, on_runaway: Callable[[str], None] | None = None,
                 sample_writer: SampleWriterProcess | None = None) -> None:
        self.store = store
        # telemetry written by a child process (cloud/sample_writer.py); None: by `store`, here
        self.sample_writer = sample_writer
        self.tune_gc = tune_gc  # the controller's ingest is its hot loop: see tune_gc_for_ingest()
        self.publish_ack = publish_ack
        self.batch_size = batch_size
        self.batch_interval_s = batch_interval_s
        self.queue = IngestQueue(queue_max, queue_max_bytes)
        self.accepted: Counter[str] = Counter()  # by envelope kind
        self.rejected: Counter[str] = Counter()  # by reason
        self._init_budgets(budget, on_runaway)  # cloud/ingest_budgets.py
        self._reject_log = ThrottledLog(log, reject_log_every_s)
        self.stored = 0
        self.duplicates = 0
        self.gaps = 0
        self.stale = 0
        self.conflicts = 0  # events refused: their seq holds another event (the edge went back in time)
        self.restored_floors = 0  # acked_seq moved up to what an edge says was acked (fleet DB went back)
        self.deferred = 0  # messages put back because another replica held their node's row
        self.batches = 0
        self.store_errors = 0
        self._failing: set[str] = set()  # the parts of the batch ("ingest", "samples") being retried
        # Every batch goes here after it is committed (decisions that follow from fleet state,
        # e.g. migrations on a migration_request event, subscribe). A failing listener is logged.
        self.bus = batches if batches is not None else BatchBus()
        # node -> arrival minus the edge's ts of its last message, less the node's clock skew
        self.lag_seconds: dict[str, float] = {}
        self.clock = ClockSkewEstimator()  # .skew: node -> its clock minus ours (cloud/clock_skew.py)
        self.last_seen: dict[str, float] = {}  # node -> arrival time (cloud clock) of its last message
        self.online: dict[str, bool] = {}  # node -> from its last status (online, or the last will)
        self.last_batch_seconds = 0.0
        self._writing: list[Queued] = []  # the batch being written (or retried) now
        # telemetry for the sample writer process: waiting for it, or being written by it
        self._samples = (SampleHandOver(self._write_samples, batch_size, batch_interval_s, queue_max_bytes)
                         if sample_writer is not None else None)
        self.taking = True  # `take_telemetry` hands telemetry over; cleared by `drain`
        self.telemetry_direct = 0  # telemetry messages `take_telemetry` handed over
        self._executor: WriterThread | None = None  # the ingest's own writer thread, while run() runs
        self._sample_executor: WriterThread | None = None  # talks to the sample writer process, while run() runs

    # -- reads for /metrics, /healthz and the API ------------------------------------------------

    def backlog_age_s(self) -> float:
        """Age in seconds of the oldest message waiting to be written (queued, or in the batch
        being filled or written), 0.0 when none."""
        oldest = [self.queue.oldest(), self._writing[0].at if self._writing else None]
        if self._samples is not None:
            oldest.append(self._samples.oldest())
        times = [t for t in oldest if t is not None]
        return max(0.0, time.monotonic() - min(times)) if times else 0.0

    def queued_bytes(self) -> int:
        """Payload bytes of the messages waiting to be written (queued, or waiting for the sample
        writer process), not those of the batches being written."""
        return self.queue.bytes + (self._samples.held_bytes() if self._samples is not None else 0)

    @property
    def telemetry_room_waits(self) -> int:
        """Times the telemetry connection's network thread found the sample writer process's
        hand-over full and stopped reading from the broker (cloud/sample_handover.py)."""
        return self._samples.room_waits if self._samples is not None else 0

    def pending(self) -> int:
        """Messages accepted and not yet written (queued, or in the batch being filled or written)."""
        return self.queue.qsize() + len(self._writing) + (self._samples.pending() if self._samples is not None else 0)

    # -- in ---------------------------------------------------------------------------------------

    def admit(self, message: Received, *, budgeted: bool = False) -> Queued | None:
        """Budget (unless `accept` did already: `budgeted`), validate and account one message from
        the broker; what to queue, or None when it was dropped (over its node's budget) or rejected
        (invalid)."""
        now = time.monotonic()
        if not budgeted:
            with self._budget_lock:
                if not self._within_budget(message, now):
                    return None
        if now - self._swept_at >= SWEEP_EVERY_S:
            self._sweep(now)
        received_at = time.time()
        # telemetry for the sample writer process: validated in full there, only peeked at here
        incoming = self._peeked(message, received_at) if self.sample_writer is not None else None
        if incoming is None:
            try:
                incoming = validate(message.topic, message.payload, received_at)
            except RejectedMessage as exc:
                self._release_topic(message.topic)
                self.rejected[exc.reason] += 1
                self._reject_log.log(exc.reason, "rejected message: %s: %s", exc.reason, exc.detail[:300],
                                     extra={"topic": message.topic[:200]})
                return None
        return self._accounted(message, incoming, now)

    def take_telemetry(self, message: Received) -> bool:
        """On the telemetry connection's network thread (`AsyncMqtt(divert=...)`), after `accept`:
        with a sample writer process, a telemetry message peeked at (cloud/telemetry_peek.py),
        weighed and accounted as `admit` does (`_accounted`: GPU budget, clock skew, lag, last
        seen) and handed to the child's hand-over here (cloud/sample_handover.py, waiting for room
        there: back-pressure to the broker), without crossing the event loop. True when it is
        dealt with (handed over, or nothing of it left within budget); False for the loop to
        handle as before: not telemetry, not readable by the peek (validated in full there and
        refused with its reason), or the ingest stopping."""
        samples = self._samples
        if samples is None or not self.taking:
            return False
        incoming = self._peeked(message, time.time())
        if incoming is None:
            return False
        queued = self._accounted(message, incoming, time.monotonic())
        if queued is None:
            return True
        if not samples.offer(queued):
            return False
        self.telemetry_direct += 1  # one network thread: no other writer
        return True

    def _accounted(self, message: Received, incoming: Incoming, now: float) -> Queued | None:
        """A valid (or, for the sample writer process, peeked) message weighed against its node's
        GPU and seq budgets and accounted (clock skew, lag, last seen, online): what to queue, or
        None when nothing of it is left within budget. On the loop (`admit`) and on the telemetry
        connection's network thread (`take_telemetry`): the budgets and the clock estimate under
        their lock."""
        received_at = incoming.received_at
        within = self._within_gpu_budget(incoming, now)
        if within is None:
            self._release_topic(message.topic)
            return None
        trimmed = within is not incoming  # the GPU budget left some of its samples out
        seq = within.envelope.seq
        if seq is not None and not self._within_seq_budget(within.envelope.node, seq, now):
            return None
        incoming = within
        envelope = incoming.envelope
        to_child = self.sample_writer is not None and envelope.kind is Kind.TELEMETRY
        if not to_child:  # the sample writer process's telemetry is counted once it has validated it
            self.accepted[envelope.kind.value] += 1
        with self._budget_lock:  # the network thread's telemetry and the loop's statuses
            skew = self.clock.observe(envelope.node, envelope.ts, received_at,
                                      telemetry=envelope.kind is Kind.TELEMETRY)
        if skew:  # (not dataclasses.replace: twice the cost, per message)
            incoming = Incoming(incoming.envelope, incoming.body, incoming.received_at, skew)
        self.lag_seconds[envelope.node] = received_at - envelope.ts + skew
        self.last_seen[envelope.node] = received_at
        if isinstance(incoming.body, StatusBody):
            self.online[envelope.node] = incoming.body.state == "online"
        raw = None
        if to_child:
            kept = tuple(s.uuid for s in getattr(incoming.body, "samples", ())) if trimmed else None
            raw = RawTelemetry(message.topic, message.payload, received_at, skew, kept)
        return Queued(incoming, len(message.payload), now, envelope.node, raw)

    def _peeked(self, message: Received, received_at: float) -> Incoming | None:
        """A telemetry message as the controller needs it when the sample writer process
        validates it (cloud/telemetry_peek.py): its envelope, and its body with each sample's uuid
        and index only; None for anything else, or anything the peek cannot read."""
        sender = self._sender(message.topic)
        if sender is None or sender[1] != "telemetry":
            return None
        peeked = peek_telemetry(message.payload, sender[0])
        if peeked is None:
            return None
        envelope = envelope_of(peeked.node, None, peeked.id, peeked.ts, Kind.TELEMETRY)
        # the body: each sample's uuid and index only, all that the budget and the batch's
        # listeners read of telemetry (the migration scan's view); the child stores the full one
        return Incoming(envelope=envelope, body=peeked.body, received_at=received_at)  # type: ignore[arg-type]

    async def put(self, message: Received, *, budgeted: bool = False) -> None:
        """The controller's receive loop: admit one message and wait for room in the queue (the
        MQTT link stops reading meanwhile: back-pressure to the broker, not memory). `budgeted`:
        the link's network thread has called `accept` for it already."""
        queued = self.admit(message, budgeted=budgeted)
        if queued is not None:
            await self.queue.put(queued)

    def offer(self, message: Received) -> None:
        """Admit and queue one message without waiting (in-process use and tests: the caller
        keeps within the queue's bound; raises asyncio.QueueFull otherwise)."""
        queued = self.admit(message)
        if queued is not None:
            self.queue.put_nowait(queued)

    # -- out --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Write batches until cancelled; a failing batch is retried, never dropped."""
        if self.tune_gc:
            tune_gc_for_ingest()
        queue = self.queue
        self._executor = WriterThread()
        if self.sample_writer is not None:
            self._sample_executor = WriterThread("kgpu-samples")
            self._sample_executor.submit(self._start_sample_writer)  # meanwhile: the first batch waits for it
        handing_over = asyncio.ensure_future(self._samples.run()) if self._samples is not None else None
        carried: list[Queued] = []  # deferred by the last write: they go first, in order
        try:
            while True:
                # room for its telemetry first, so that the batch takes what queued meanwhile
                size = await self._samples.room() if self._samples is not None else self.batch_size
                batch = carried or [await self._next()]
                self._writing = batch  # pending (and its age counted) while the batch fills, too
                deadline = time.monotonic() + self.batch_interval_s
                while len(batch) < size:
                    # what is already queued is taken at once: no timer per message
                    while not queue.empty() and len(batch) < size:
                        batch.append(queue.get_nowait())
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or len(batch) >= size:
                        break
                    try:
                        batch.append(await asyncio.wait_for(queue.get(), timeout=remaining))
                    except TimeoutError:
                        break
                carried = await self._write(batch)
                self._writing = []
                if carried and len(carried) == len(batch):
                    self._writing = carried
                    await asyncio.sleep(0.02)  # every node was held by another replica: let it commit
        finally:
            executor, self._executor = self._executor, None
            # a write in progress finishes on its own; nothing waits for it here (bounded shutdown)
            executor.shutdown(wait=False)
            if handing_over is not None:
                handing_over.cancel()
            sample_executor, self._sample_executor = self._sample_executor, None
            if sample_executor is not None:
                sample_executor.shutdown(wait=False)
            if self.sample_writer is not None:
                self.sample_writer.close()  # drain() has stopped it already, unless the ingest was just cancelled

    def _start_sample_writer(self) -> None:
        """On the sample thread: a child that cannot start is logged; the first write tries again."""
        assert self.sample_writer is not None
        try:
            self.sample_writer.start()
        except Exception as exc:  # noqa: BLE001 - retried, with backoff, by the writes
            log.error("sample writer process did not start: %s", exc)

    async def _next(self) -> Queued:
        """The next queued message. Meanwhile, while nodes are flagged, their flags are looked at
        every SWEEP_EVERY_S (a node that went quiet is cleared without new traffic), and latest
        samples that waited long enough are written (cloud/store/latest.py) while no message
        comes: a batch writes them itself, with any newer sample of theirs instead (a flush before
        it would write those GPUs twice)."""
        while True:
            if not self.queue.empty():  # the batch it starts takes what is due, newer samples first
                return self.queue.get_nowait()
            waits = [SWEEP_EVERY_S] if self.budgets.flags else []
            due = self.store.latest_due_in()  # no write runs now: this is between batches
            if due is not None:
                waits.append(due)
            if not waits:
                return await self.queue.get()
            try:
                return await asyncio.wait_for(self.queue.get(), min(waits))
            except TimeoutError:
                self._sweep(time.monotonic())
                if due is not None:
                    await self._flush_latest(everything=False)

    async def _flush_latest(self, *, everything: bool) -> None:
        """Write the latest samples due (all with `everything`) on the writer thread; a failure is
        logged: only the latest figures are late, the history has every sample."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, lambda: self.store.flush_latest(everything=everything))
        except Exception as exc:  # noqa: BLE001 - the database is down: the next batch writes newer ones
            log.error("fleet store: writing the latest samples that waited failed: %s", exc)

    async def drain(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for what was accepted to be written; returns how many messages
        were still unwritten at the end (0: all written). Those are lost from the controller only:
        events are not acked, so their edges send them again."""
        self.taking = False  # the network thread's telemetry goes the loop's way, which has stopped
        deadline = time.monotonic() + timeout_s
        while self.pending() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not self.pending():
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            if self.sample_writer is not None and self._sample_executor is not None:
                # the child writes the latest samples that wait in it, and leaves, within the same bound
                writer, left = self.sample_writer, max(0.1, deadline - time.monotonic())
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._sample_executor, lambda: writer.stop(left))
            if self.store.latest_due_in() is not None and self._executor is not None:
                try:  # the latest samples still waiting (cloud/store/latest.py), within the same bound
                    await asyncio.wait_for(self._flush_latest(everything=True),
                                           max(0.05, deadline - time.monotonic()))
                except TimeoutError:
                    log.warning("shutdown: the latest samples that waited were not written in time")
        return self.pending()

    async def _write(self, queued: list[Queued]) -> list[Queued]:
        """Store a batch (each part retried while the database is down); returns the messages
        deferred because another replica held their node (offered again first in the next batch).
        With a sample writer process, the batch's telemetry is handed to it and written there
        while the rest (the events and statuses, which carry the acks) is written here; the acks
        go out as soon as their part is written. The telemetry is not waited for: it waits with
        that of the batches before it until the child is free (cloud/sample_handover.py), while
        the next batches are gathered and written; the child's pace is the back-pressure."""
        samples = [q for q in queued if q.raw is not None]  # raw: set only with a sample writer process
        here = [q for q in queued if q.raw is None] if samples else queued
        started = time.perf_counter()
        if samples and self._samples is not None:  # run() waited for room for them before it gathered the batch
            await self._samples.hand(samples)
        if not here:
            return []
        carried = await self._write_here(here)
        self.last_batch_seconds = time.perf_counter() - started
        self.batches += 1
        return carried

    async def _write_samples(self, samples: list[Queued]) -> None:
        """Telemetry written by the sample writer process (retried while it fails), counted, out
        of the budgets' backlog, delivered (cloud/sample_handover.py calls it, one at a time)."""
        writer, handover, raws = self.sample_writer, self._samples, _raws(samples)
        assert writer is not None and handover is not None

        def ahead(sent: int) -> list[RawTelemetry]:  # the next batch's head, sent while the child writes
            return _raws(handover.take_ahead(sent, writer.frame_messages))

        written: SamplesWritten | None = await self._retrying(
            "samples", len(samples), lambda: writer.write(raws, ahead), self._sample_executor)
        self.release(q.node for q in samples)
        self.batches += 1  # one transaction of the child's
        if written is not None:
            await self.bus.deliver(self._validated_by_child(samples, written), kinds=_TELEMETRY_ONLY)

    def _validated_by_child(self, samples: list[Queued], written: SamplesWritten) -> list[Incoming]:
        """Count the telemetry the sample writer process wrote, and what it refused (it logged
        why); the messages it wrote, for the batch's listeners."""
        refused = written.refused
        for reason in refused.values():
            self.rejected[reason] += 1
        accepted = [q.incoming for at, q in enumerate(samples) if at not in refused]
        self.accepted[Kind.TELEMETRY.value] += len(accepted)
        return accepted

    async def _write_here(self, queued: list[Queued]) -> list[Queued]:
        """The batch's part written by this process (all of it without a sample writer process):
        stored, counted, acked, out of the budgets' backlog, delivered; returns what was deferred."""
        batch = [q.incoming for q in queued]
        result: IngestResult | None = await self._retrying(
            "ingest", len(batch), lambda: self.store.ingest(batch, skip_locked=True), self._executor)
        if result is None:  # refused: counted by _retrying
            self.release(q.node for q in queued)
            return []
        self.stored += result.stored
        self.duplicates += result.duplicates
        self.stale += result.stale
        self.gaps += sum(result.gaps.values())
        self.deferred += len(result.deferred)
        self.conflicts += result.conflicts
        self.restored_floors += len(result.restored)
        for node, (upto, epoch) in result.acks.items():
            if node in result.conflicted:  # the node's database went back in time: cloud/store/epochs.py
                self.publish_ack(node, upto, epoch, conflict=True)
            else:
                self.publish_ack(node, upto, epoch)
        if result.acks:
            with self._budget_lock:
                for node, (upto, _epoch) in result.acks.items():
                    self.budgets.note_ack(node, upto)
        if not result.deferred:
            self.release(q.node for q in queued)
            await self.bus.deliver(batch)
            return []
        waiting = {id(item) for item in result.deferred}
        self.release(q.node for q in queued if id(q.incoming) not in waiting)
        await self.bus.deliver([item for item in batch if id(item) not in waiting])
        return [q for q in queued if id(q.incoming) in waiting]

    async def _retrying(self, part: str, count: int, call: Callable[[], Any], executor: Executor | None) -> Any:
        """`call()` on `executor` until it succeeds (the database is down: backoff, the batch is
        kept); None when the store refuses it (a ValueError: it never would succeed), counted."""
        loop = asyncio.get_running_loop()
        delay = 0.5
        while True:
            try:
                answer = await loop.run_in_executor(executor, call)
                self._failing.discard(part)
                return answer
            except ValueError as exc:  # a batch the store refuses will never succeed: say so, go on
                self._failing.discard(part)
                self.rejected[REFUSED_BY_STORE] += count
                log.error("fleet store refused a batch of %d messages (%s): %s", count, part, exc)
                return None
            except Exception as exc:  # noqa: BLE001 - the database is down: keep the batch, retry with backoff
                self.store_errors += 1
                self._failing.add(part)
                log.error("fleet store write failed (%s), retrying in %.1f s: %s", part, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    @property
    def failing(self) -> bool:
        """The last write of a part of the batch failed and is being retried."""
        return bool(self._failing)
