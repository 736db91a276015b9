"""What one ingest batch carries in and out: the messages (`Incoming`), the result with the acks
to publish (`IngestResult`), and each node's working state while the batch is applied."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.protocol import Envelope, GpuSummary
from shared.wire import WireModel
from shared.wire_structs import SampleFigures, TelemetryRecord

CHUNK_ROWS = 500  # names per `IN (...)`: far below SQLite's and PostgreSQL's bind limits


@dataclass(frozen=True)
class Incoming:
    """One validated message from the edge, with the cloud time it was received."""

    envelope: Envelope
    body: WireModel | TelemetryRecord  # already validated for envelope.kind (telemetry: a Struct)
    received_at: float
    # The node's clock minus ours as the ingest estimates it (cloud/clock_skew.py); 0 when in
    # step. Status and sample times are kept as `ts - clock_skew`, so "a late one cannot win"
    # still holds after the edge's clock jumped back by hours.
    clock_skew: float = 0.0


@dataclass
class IngestResult:
    """What one `ingest` did, and the acks the controller must publish because of it."""

    # node -> (acked_seq, epoch): the cumulative ack for every node that sent events in the
    # batch, duplicates included (a duplicate means the edge missed our previous ack), or whose
    # acked_seq a restored floor moved. For a node in `conflicted`: only up to before its first
    # conflicting seq.
    acks: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    stored: int = 0
    duplicates: int = 0
    gaps: dict[str, int] = field(default_factory=dict)  # node -> events stored beyond a hole
    stale: int = 0  # events sent before a status that changed the node's epoch: dropped
    # With skip_locked: the messages of nodes another replica had locked, not applied (the
    # caller offers them again in its next batch, before anything newer).
    deferred: list[Incoming] = field(default_factory=list)
    # The nodes whose ack must say `conflict=True`: we hold other events under seqs they sent in
    # this epoch (their database went back in time); they start a new epoch on it.
    conflicted: set[str] = field(default_factory=set)
    conflicts: int = 0  # events refused as conflicts (and events after one, in the same epoch)
    # node -> (acked_seq before, after): a status said a controller had acked more than this
    # database holds (a restored or replaced fleet database), so acked_seq moved up to it.
    restored: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class NodeWork:
    """One node's row while a batch is applied to it (written back once at the end)."""

    row: dict[str, Any]
    epoch_before: str | None
    loaded: dict[str, Any]  # the row as read: only what changed is written back
    adopted_epoch: bool = False  # a status named the epoch of a node that had none
    epoch_changed: bool = False  # a status named a different epoch: acked_seq restarts
    # acked_seq before a status's outbox_acked raised it in this batch (IngestResult.restored)
    floor_from: int | None = None
    gpu_summaries: list[GpuSummary] | None = None  # from the newest status applied
    # one list per telemetry message (the raw history stores a message as one row): (ts on our
    # clock, the sample as it arrived), copied with that ts only where it is stored whole
    messages: list[list[tuple[float, SampleFigures]]] = field(default_factory=list)
    # (epoch in effect when the event arrived, the event); the epoch decides stale or not
    events: list[tuple[str | None, Incoming]] = field(default_factory=list)
    sent_events: bool = False

    @property
    def name(self) -> str:
        return str(self.row["name"])


def chunks(rows: Sequence[Any], size: int = CHUNK_ROWS) -> Iterator[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]
