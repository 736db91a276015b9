"""Which GPUs' latest samples a batch writes now, and which wait: `gpus.sample` at most once per
`every` seconds of sample time per GPU.

The latest sample is the widest row the ingest writes (the whole sample as JSON, about 1 kB a
GPU, rewritten for every message): in a fleet sampling every second it was about 40 % of the
store's time (docs/benchmarks.md, issue 17). The history (`sample_messages`) keeps every sample whatever
this decides; only the API's, the dashboard's and the fleet exporter's "latest" figures may be
up to `every` seconds older than the newest one received. A sample that comes sooner than
`every` after the one written last waits (a newer one replaces it meanwhile) and is written
when it is due: `every` seconds (monotonic) after it began to wait, by the next batch or by the
ingest's flush while no batch comes (`cloud/ingest.py`). A fleet sampling every `every` seconds
or slower never waits. What waits is lost with the process: the history holds it.

Off by default (`latest_sample_every` 0): `bench/store_steady.py` measures 18 % less store time a
message with it at 2 s, but a saturated controller (`bench/fleet_scale.py`, 2,500 nodes @ 1 s)
ingested about 1,680 messages a second with it against 2,010-2,230 without, for a reason not found
yet (docs/benchmarks.md).

Pure bookkeeping, no I/O: the store asks `choose` inside its write and writes what it returns.
Changed only on the ingest's writer thread (`due_in` is read from its loop too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from shared.wire_structs import SampleFigures

GpuKey = tuple[str, str]  # (node, uuid)


class LatestSample(NamedTuple):
    """A GPU's newest sample of a batch, as `gpus` stores it (a tuple: eight are made a message)."""

    ts: float  # on the cloud's clock (Incoming.clock_skew)
    sample: SampleFigures
    power_limit_w: float | None  # the batch's last known limit (a sample may leave it out)
    updated_at: float  # when the node was last heard from (cloud clock)


class LatestSamples:
    """The samples waiting to be written and the sample time last written, per GPU."""

    def __init__(self, every: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if every < 0:
            raise ValueError("latest_sample_every must not be negative")
        self.every = every
        self._clock = clock
        self._written: dict[GpuKey, float] = {}  # ts of the sample written last
        # waiting since (clock), the sample; in the order they began to wait (a newer sample of a
        # waiting GPU keeps its place: it is due when the first one was)
        self._waiting: dict[GpuKey, tuple[float, LatestSample]] = {}

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def due_in(self) -> float | None:
        """Seconds until the first waiting sample is due (0 when it is), None when none waits.
        The ingest's loop asks between writes; should the writer thread be changing what waits
        meanwhile (a flush at shutdown), the answer is "now", and that flush runs after it."""
        try:
            since, _sample = next(iter(self._waiting.values()))
        except StopIteration:
            return None
        except RuntimeError:  # changed while read (see above)
            return 0.0
        return max(0.0, since + self.every - self._clock())

    def choose(self, newest: dict[GpuKey, LatestSample]) -> dict[GpuKey, LatestSample]:
        """What to write now: those of `newest` (a batch's newest sample per GPU) due by sample
        time, and every waiting sample due by the clock. The rest of `newest` waits. The caller
        writes what this returns (`written` is noted here). Off (`every` 0): `newest` itself, and
        nothing is kept."""
        if self.every <= 0:
            return newest
        now = self._clock()
        out: dict[GpuKey, LatestSample] = {}
        for key, latest in newest.items():
            last = self._written.get(key)
            if last is None or latest.ts - last >= self.every:
                self._waiting.pop(key, None)
                out[key] = latest
            elif latest.ts > last:
                held = self._waiting.get(key)
                if held is None:
                    self._waiting[key] = (now, latest)
                elif latest.ts >= held[1].ts:
                    self._waiting[key] = (held[0], _merge(held[1], latest))
            # else: older than the one written (a late delivery): the store would refuse it anyway
        out.update(self._take(now, everything=False))
        return self._noted(out)

    def flush(self, *, everything: bool = False) -> dict[GpuKey, LatestSample]:
        """The waiting samples due now (all of them with `everything`: at shutdown), taken out."""
        return self._noted(self._take(self._clock(), everything=everything))

    def forget(self, keys: Iterable[GpuKey]) -> None:
        """GPUs the node no longer has (its status left them out): nothing of theirs is written."""
        for key in keys:
            self._waiting.pop(key, None)
            self._written.pop(key, None)

    def _noted(self, out: dict[GpuKey, LatestSample]) -> dict[GpuKey, LatestSample]:
        """`out`, about to be written: its sample times noted as the ones written last."""
        for key, latest in out.items():
            self._written[key] = latest.ts
        return out

    def _take(self, now: float, *, everything: bool) -> dict[GpuKey, LatestSample]:
        out: dict[GpuKey, LatestSample] = {}
        for key, (since, latest) in self._waiting.items():
            if not everything and since + self.every > now:
                break  # in the order they began to wait: the rest are later still
            out[key] = latest
        for key in out:
            del self._waiting[key]
        return out


def _merge(older: LatestSample, newer: LatestSample) -> LatestSample:
    """The newer sample, keeping the older one's power limit where the newer leaves it out."""
    if newer.power_limit_w is None and older.power_limit_w is not None:
        return LatestSample(newer.ts, newer.sample, older.power_limit_w, newer.updated_at)
    return newer
