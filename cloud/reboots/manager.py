"""The reboot part's I/O shell: the leader's scan over the edges' reboot requests.

One scan (`tick`) loads the new and open requests, the grants of the window and the nodes' state
(repository), follows each granted reboot (down, back, refused, timed out) and decides every open
request (breaker.py, pure), saves what changed, logs each new verdict once, then sends the
`reboot` command of each grant through the command outbox (sent again until the edge answers).
A new request wakes the scan at once (BatchBus); so does a node going offline, which every
replica's ingest also notes on the grants of that node (the reboot has begun).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cloud.config import CloudSettings
from cloud.kube import Kube, KubeError
from cloud.reboots import http
from cloud.reboots.breaker import (
    ZONE_LABEL,
    Decision,
    Ended,
    Grant,
    Limits,
    Request,
    Verdict,
    command_id,
    decide,
    in_progress,
    open_sites,
    track,
)
from cloud.reboots.repository import RebootRepository, RequestRow
from cloud.services import BatchBus, CommandSender, Periodic
from cloud.store import FleetStore, FleetStoreError, Incoming
from shared.logs import get_logger
from shared.protocol import CommandBody, Kind, StatusBody

log = get_logger(__name__)

SCAN_INTERVAL_S = 5.0  # a node back from its reboot is noticed within this
SETTLE_S = 0.2  # after a wake-up: let the rest of a burst land in the store
ZONES_MAX_AGE_S = 60.0  # the cluster's zone labels are read again after this (only with requests open)


class RebootManager:
    """The controller's reboot part (see cloud/reboots/__init__.py)."""

    name = "reboots"

    def __init__(self, *, settings: CloudSettings, store: FleetStore, kube: Kube | None,
                 commands: CommandSender, batches: BatchBus, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.kube = kube
        self.commands = commands
        self.repo = RebootRepository(store)
        self._clock = clock  # wall clock (the store's last_seen is wall time); a test moves it
        self._wake = asyncio.Event()
        self._zones: dict[str, str] = {}  # node -> zone label, from the cluster
        self._zones_read_at = float("-inf")
        self._sent: set[str] = set()  # grant commands handed to the outbox by this process
        self.verdicts: Counter[str] = Counter()  # verdicts given (a request counts once per change)
        self._grants: list[Grant] = []  # as of the last scan: the breaker's gauge
        self._sites: set[str] = set()  # sites with a request decided in the last scan
        self.ticks = 0
        batches.subscribe(self._on_batch, kinds=[Kind.REBOOT_REQUEST, Kind.STATUS])

    @property
    def limits(self) -> Limits:
        s = self.settings
        return Limits(max_per_site=s.reboot_max_per_site, window_s=s.reboot_window, timeout_s=s.reboot_timeout)

    # -- wiring --------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The breaker's figures for /metrics (the leader's: other replicas decide nothing)."""
        total = CounterMetricFamily("kgpu_reboots", "Verdicts on node reboot requests, by verdict (each request "
                                    "counts once per verdict it is given; each from 0).", labels=["verdict"])
        for verdict in Verdict:
            total.add_metric([str(verdict)], self.verdicts.get(str(verdict), 0))
        yield total
        gauge = GaugeMetricFamily("kgpu_reboot_breaker_open", "1 while a site's reboot budget "
                                  "(reboot_max_per_site per reboot_window) is spent.", labels=["site"])
        for site, is_open in open_sites(self._grants, self._sites, self._clock(), self.limits).items():
            gauge.add_metric([site], 1.0 if is_open else 0.0)
        yield gauge

    def add_routes(self, app: web.Application) -> None:
        http.add_routes(app, self.repo)

    def periodic(self) -> Sequence[Periodic]:
        return [Periodic("reboot scan", self.tick, SCAN_INTERVAL_S, wake=self._wake, settle_s=SETTLE_S,
                         expected=(FleetStoreError, KubeError))]

    async def _on_batch(self, batch: list[Incoming]) -> None:
        """Wake the scan for a request; note a node that went offline on its granted reboots
        (on every replica: the status may have reached any of them)."""
        offline: dict[str, float] = {}
        for i in batch:
            if i.envelope.kind is Kind.REBOOT_REQUEST:
                self._wake.set()
            elif (i.envelope.kind is Kind.STATUS and isinstance(i.body, StatusBody)
                  and i.body.state == "offline"):
                offline[i.envelope.node] = i.received_at
        if offline:
            seen_down: int = await asyncio.to_thread(self.repo.mark_down, offline)
            if seen_down:
                self._wake.set()

    # -- one scan ------------------------------------------------------------------------------

    async def tick(self) -> None:
        now = self._clock()
        limits = self.limits
        snap = await asyncio.to_thread(self.repo.load, now, max(limits.window_s, limits.timeout_s))
        pending = snap.new + snap.open
        zones = await self._read_zones(now) if pending else self._zones
        grants = track(snap.grants, snap.nodes, now, limits)
        progressed = [g for g, before in zip(grants, snap.grants, strict=True) if g != before]
        decisions = decide([Request(r.event_id, r.node, r.received_at) for r in pending], grants,
                           snap.nodes, zones, limits, now)
        stored = {r.event_id: r for r in pending}
        changed = {d.request_id: d for d in decisions
                   if (stored[d.request_id].verdict, stored[d.request_id].why) != (str(d.verdict), d.why)}
        if changed or progressed or snap.new:
            # a verdict, its record and its command go together: losing leadership does not cut them
            await asyncio.shield(self._record(snap.new, changed, progressed, stored, now))
        granted = [Grant(d.primary, d.node, d.site, now) for d in changed.values()
                   if d.verdict is Verdict.GRANT and d.request_id == d.primary]
        self._grants = grants + granted
        self._sites = {d.site for d in decisions}
        for g in grants:  # a grant recorded by a process that stopped before its command was stored
            if in_progress(g, now, limits) and g.request_id in snap.granted:
                await self._send(snap.granted[g.request_id])
        self.ticks += 1

    async def _record(self, new: Sequence[RequestRow], changed: Mapping[int, Decision], progressed: Sequence[Grant],
                      requests: Mapping[int, RequestRow], now: float) -> None:
        await asyncio.to_thread(self.repo.save, new, changed, progressed, now)
        for g in progressed:
            self._log_progress(g, now)
        by_node: dict[str, list[Decision]] = defaultdict(list)
        for d in changed.values():
            by_node[d.node].append(d)
            self.verdicts[str(d.verdict)] += 1
        for node, ds in by_node.items():
            d = ds[0]
            ids = ", ".join(str(x.request_id) for x in ds)
            level = log.info if d.verdict is Verdict.GRANT else log.warning
            level("reboot of %s (request %s): %s: %s", node, ids, d.verdict, d.why,
                  extra={"node": node, "request": d.primary, "verdict": str(d.verdict), "site": d.site})
            if d.verdict is Verdict.GRANT:
                await self._send(requests[d.primary])

    async def _send(self, request: RequestRow) -> None:
        """The grant's `reboot` command, through the outbox (stored once by its id; sent again
        until the edge answers)."""
        command = command_id(request.event_id)
        if command in self._sent:
            return
        body = CommandBody(command="reboot", gpu_uuid=request.gpu_uuid,
                           args={"request": request.event_id, "seq": request.seq})
        if not await self.commands.send(request.node, body, command):
            log.warning("reboot command %s stored; the MQTT link is down, it is sent when it is back", command,
                        extra={"node": request.node, "msg_id": command})
        self._sent.add(command)

    def _log_progress(self, g: Grant, now: float) -> None:
        if g.ended is Ended.BACK:
            log.info("%s is back online %.0f s after its reboot was granted", g.node, now - g.granted_at,
                     extra={"node": g.node, "request": g.request_id})
        elif g.ended is Ended.REFUSED:
            log.warning("%s refused its reboot: %s", g.node, g.refusal, extra={"node": g.node, "request": g.request_id})
        elif g.ended is Ended.TIMED_OUT:
            log.warning("%s was not seen back within reboot_timeout (%.0f s) of its reboot: the site's next "
                        "reboot may go", g.node, self.settings.reboot_timeout,
                        extra={"node": g.node, "request": g.request_id})
        elif g.down_at is not None:
            log.info("%s went offline for its reboot", g.node, extra={"node": g.node, "request": g.request_id})

    async def _read_zones(self, now: float) -> dict[str, str]:
        """node -> zone label from the cluster (none without one), read at most every
        ZONES_MAX_AGE_S while there are requests to decide."""
        if self.kube is None or now - self._zones_read_at < ZONES_MAX_AGE_S:
            return self._zones
        nodes = await self.kube.call(self.kube.core.list_node)
        self._zones = {str(n.metadata.name): (n.metadata.labels or {}).get(ZONE_LABEL) or ""
                       for n in nodes.items if n.metadata is not None}
        self._zones_read_at = now
        return self._zones

    def reboots(self, node: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Rows for the API, newest first (blocking)."""
        return self.repo.reboots(node, None, limit)

