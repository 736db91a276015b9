"""Python's cyclic garbage collector made cheap for a process whose hot loop is the ingest: the
controller (cloud/ingest.py) and its sample writer process (cloud/sample_writer.py)."""

from __future__ import annotations

import gc

from shared.logs import get_logger

log = get_logger(__name__)

# A backlog drain holds a batch or two of messages alive at once (some 4,500 of 7.5 kB each, a few
# dozen tracked objects apiece, in the controller and in its sample writer process): at 20,000 a
# young collection came several times a batch and found most of it alive, and promoted it; at
# 200,000 most of a batch is freed before one comes. Measured: 3.5 % of the drain's CPU (five
# drains in turns, docs/benchmarks.md). Cyclic garbage waits longer: at most this many objects.
GC_GEN0_THRESHOLD = 200_000


def tune_gc_for_ingest() -> None:
    """Make Python's cyclic garbage collector cheap for a process whose hot loop is the ingest.

    Every message allocates hundreds of short-lived objects (JSON, pydantic models, rows). With
    the default threshold (700 allocations) the collector runs every few messages, and the
    queued batches it finds alive are promoted until full collections walk every object of the
    process: measured as about half the ingest CPU (bench/fleet_scale.py, docs/benchmarks.md).
    Objects alive at start-up are frozen out of its walks, and it runs less often. Process-wide,
    so only the controller (Ingestor(tune_gc=True)) and its sample writer process turn it on."""
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)
    log.info("garbage collector tuned for the ingest", extra={"threshold": gc.get_threshold(),
                                                              "frozen": gc.get_freeze_count()})
