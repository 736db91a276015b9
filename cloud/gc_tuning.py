"""Python's cyclic garbage collector made cheap for a process whose hot loop is the ingest: the
controller (cloud/ingest.py) and its sample writer process (cloud/sample_writer.py)."""

from __future__ import annotations

import gc

from shared.logs import get_logger

log = get_logger(__name__)

GC_GEN0_THRESHOLD = 20_000


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
