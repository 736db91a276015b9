"""The migration scan's view of the fleet's GPUs, kept between scans and re-read only where it
changed (issue 17: re-reading 40,000 GPU rows every 5 s cost a tenth of the controller's CPU).

A GPU's health, pods and remediation stage change only with a status, and every status applied
moves its node's `status_ts`; so each scan reads every node's liveness and `status_ts` (one
narrow query, no JSON) and re-reads the GPU rows of the nodes whose `status_ts` moved, that
appeared, or that the ingest's batches marked (`mark`: a telemetry sample naming a GPU the view
does not hold, which creates or renumbers a row without a status). That read is the store's, so
it sees what every replica ingested. A full re-read still happens on the first scan of each
leadership (`forget`) and every `FULL_READ_EVERY_S`, as a safety net. Blocking: called in the
scan's thread, inside the repository's read transaction.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection

from cloud.migration.model import GpuView
from cloud.store import FleetStore
from cloud.store.queries import GpuViewRow
from shared.gpu import Health

FULL_READ_EVERY_S = 60.0  # the safety net: every GPU row re-read at least this often


@dataclass
class ScanCounts:
    """How the view was read so far (the bench and the tests look)."""

    full: int = 0
    incremental: int = 0
    nodes_reread: int = 0  # by incremental reads


@dataclass
class FleetRead:
    """One scan's read: every node's liveness and pod map source, every GPU (no health-event
    fields: the repository adds them for the nodes it watches), the nodes with a GPU the status
    says is not healthy."""

    nodes: dict[str, tuple[bool, float]]
    pod_sources: dict[str, str]
    gpus: dict[str, tuple[GpuView, ...]]
    not_healthy: set[str] = field(default_factory=set)


class FleetView:
    """The GPU rows of the last scan, by node, and what to re-read next time."""

    def __init__(self, full_every_s: float = FULL_READ_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.full_every_s = full_every_s
        self._clock = clock
        self._gpus: dict[str, tuple[GpuView, ...]] = {}
        self._held: dict[str, frozenset[tuple[str, int]]] = {}  # node -> (uuid, index) of its GPUs
        self._rows: dict[str, tuple[list[GpuViewRow], tuple[GpuView, ...]]] = {}  # node -> rows read, views
        self._status_ts: dict[str, float | None] = {}
        self._not_healthy: set[str] = set()
        self._marked: set[str] = set()  # marked on the loop, taken in the scan's thread
        # node -> (status_ts, the GPUs held) of a status this replica stored that changed nothing
        self._expected: dict[str, tuple[float, tuple[GpuView, ...]]] = {}
        self._lock = threading.Lock()
        self._full_at: float | None = None
        self.counts = ScanCounts()

    def forget(self) -> None:
        """Read everything on the next scan (a new leadership: another leader may have been
        scanning meanwhile, and nothing of this view is trusted)."""
        self._full_at = None

    def mark(self, nodes: Iterable[str]) -> None:
        """Re-read these nodes' GPU rows on the next scan."""
        with self._lock:
            self._marked.update(nodes)

    def expect(self, node: str, status_ts: float, gpus: Iterable[GpuKey]) -> None:
        """A status this replica ingested (stored with `status_ts`) lists these GPUs: if they are
        what the view holds, the next scan need not re-read them for it; otherwise it must."""
        listed = sorted(gpus, key=_order)
        held = self._gpus.get(node)
        with self._lock:
            if held is not None and listed == sorted((_key(g) for g in held), key=_order):
                self._expected[node] = (status_ts, held)
            else:
                self._marked.add(node)

    def knows(self, node: str, samples: Iterable[Any]) -> bool:
        """Whether the view holds the GPUs of these samples (`uuid`, `index`) among the node's
        (per telemetry message, on the event loop: one set lookup per GPU)."""
        held = self._held.get(node)
        if held is None:
            return False
        for sample in samples:
            if (sample.uuid, sample.index) not in held:
                return False
        return True

    def read(self, store: FleetStore, conn: Connection) -> FleetRead:
        """This scan's view: the nodes read whole, the GPUs re-read where they changed. A read
        that fails (the database away) leaves the next one to read everything."""
        try:
            return self._read(store, conn)
        except BaseException:
            self.forget()
            raise

    def _read(self, store: FleetStore, conn: Connection) -> FleetRead:
        scan = store.node_scan(conn)  # first: a status committed after it is seen next scan
        now = self._clock()
        full = self._full_at is None or now - self._full_at >= self.full_every_s
        with self._lock:
            marked, self._marked = self._marked, set()
            expected, self._expected = self._expected, {}
        previous = self._rows if full else dict(self._rows)  # what `_drop` below leaves out too
        if full:
            self._full_at = now
            self.counts.full += 1
            self._gpus, self._held, self._rows, self._not_healthy = {}, {}, {}, set()
            changed = set(scan)
            rows = store.gpu_views(None, conn)
        else:
            self.counts.incremental += 1
            changed = {name for name, state in scan.items()
                       if name in marked or (self._status_ts.get(name, -1.0) != state[2]
                                             and not _as_expected(expected.get(name), state[2], self._gpus.get(name)))}
            for gone in self._gpus.keys() - scan.keys():
                self._drop(gone)
            rows = store.gpu_views(changed, conn) if changed else []
            self.counts.nodes_reread += len(changed)
        self._status_ts = {name: state[2] for name, state in scan.items()}
        for name in changed:
            self._drop(name)
        by_node: dict[str, list[GpuViewRow]] = {}
        for row in rows:
            by_node.setdefault(row[0], []).append(row)
        for name, node_rows in by_node.items():
            same = previous.get(name)  # the rows as read last time: keep their views
            views = same[1] if same is not None and same[0] == node_rows else tuple(_view(r) for r in node_rows)
            self._rows[name] = (node_rows, views)
            self._gpus[name] = views
            self._held[name] = frozenset((g.uuid, g.index) for g in views)
            if any(g.health not in (None, Health.HEALTHY) for g in views):
                self._not_healthy.add(name)
        return FleetRead(nodes={name: (state[0], state[1]) for name, state in scan.items()},
                         pod_sources={name: str(state[3]) for name, state in scan.items() if state[3] is not None},
                         gpus=dict(self._gpus), not_healthy=set(self._not_healthy))

    def _drop(self, node: str) -> None:
        self._gpus.pop(node, None)
        self._rows.pop(node, None)
        self._held.pop(node, None)
        self._not_healthy.discard(node)


GpuKey = tuple[str, int, str | None, str | None, tuple[str, ...], str | None, str | None]
"""What a status says of a GPU: (uuid, index, name, health, pods, remediation, resource_name)."""


def _key(g: GpuView) -> GpuKey:
    return (g.uuid, g.index, g.name, g.health, g.pods, g.remediation, g.resource_name)


def _order(key: GpuKey) -> tuple[str, int]:
    return key[0], key[1]


def _as_expected(expected: tuple[float, tuple[GpuView, ...]] | None, status_ts: float | None,
                 held: tuple[GpuView, ...] | None) -> bool:
    """Whether the node's newest status is one this replica saw change nothing of what is held."""
    return expected is not None and expected[0] == status_ts and held is not None and expected[1] is held


def _view(row: GpuViewRow) -> GpuView:
    node, uuid, index, name, health, pods, remediation, resource_name = row
    return GpuView(node=node, uuid=uuid, index=int(index), name=name, health=health, pods=tuple(pods or ()),
                   remediation=remediation, resource_name=resource_name)
