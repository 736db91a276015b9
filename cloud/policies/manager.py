"""`PolicyManager`: the leader's reconcile loop (read the sources, resolve with the pure rules of
`cloud.policies.resolution`, store, publish retained, write statuses) and the part's wiring."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from cloud.kube import Kube
from cloud.policies import sources
from cloud.policies.http import add_routes
from cloud.policies.repository import PolicyRepository, Snapshot
from cloud.policies.resolution import Resolution, policy_statuses, resolve
from cloud.services import BatchBus, Periodic, Publish
from cloud.store import FleetStore, FleetStoreError, Incoming
from shared.logs import get_logger
from shared.protocol import Kind, PolicyBody, StatusBody, make_envelope
from shared.topics import cloud_topic

log = get_logger(__name__)

POLL_INTERVAL_S = 2.0  # list policies and nodes this often (and reconcile at least this often)
MIN_GAP_S = 0.2  # between two reconciles, however often something wakes the loop
RESEND_PENDING_S = 30.0  # publish again to an online node still reporting another version
WARN_EVERY_S = 60.0  # the same failure is logged at most this often
FULL_EVERY_S = 60.0  # unchanged fleet or not, adopt and mirror its nodes' labels at least this often


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PolicyManager:
    """Resolves and publishes per-node power policies (leader only); serves /api/v1/policies."""

    name = "policies"

    def __init__(self, *, store: FleetStore, kube: Kube | None, publish: Publish, batches: BatchBus,
                 poll_interval: float = POLL_INTERVAL_S, resend_after: float = RESEND_PENDING_S) -> None:
        self.tables = PolicyRepository(store)
        self.kube = kube
        self.publish = publish
        self.poll_interval = poll_interval
        self.resend_after = resend_after
        self._wake = asyncio.Event()
        self._reported: dict[str, tuple[str | None, int | None]] = {}  # as of the last reconcile
        self._warned: dict[str, float] = {}
        self.full_every_s = FULL_EVERY_S
        self._full_at = time.monotonic()
        batches.subscribe(self._on_batch, kinds=[Kind.STATUS])

    @property
    def source(self) -> str:
        return sources.source(self.kube)

    # -- leader loop ---------------------------------------------------------------------------

    def periodic(self) -> Sequence[Periodic]:
        """Called as this replica starts leading: the first reconcile re-reads everything."""
        self.tables.forget()
        self._full_at = time.monotonic()
        return [Periodic("policy reconcile", self._step, self.poll_interval, wake=self._wake, min_gap_s=MIN_GAP_S,
                         expected=(FleetStoreError,))]

    async def _step(self) -> None:
        await self.reconcile()

    def wake(self) -> None:
        self._wake.set()

    async def _on_batch(self, batch: list[Incoming]) -> None:
        """A node reporting a policy other than when we last looked: reconcile now (applied
        counts move, a new node gets its policy) rather than at the next poll."""
        for item in batch:
            body = item.body
            if not isinstance(body, StatusBody) or body.state != "online":
                continue
            reported = (body.policy_name, body.policy_version)
            if self._reported.get(item.envelope.node) != reported:
                self._reported[item.envelope.node] = reported  # wake once per change, not per status
                self._wake.set()

    async def reconcile(self) -> Resolution:
        """One pass: read the sources, resolve, store, publish, write statuses."""
        now = time.time()
        kube = self.kube
        if time.monotonic() - self._full_at >= self.full_every_s:  # the safety net: adopt against the whole fleet
            self._full_at = time.monotonic()
            self.tables.forget()
        if kube is not None:
            await self._pull_from_kubernetes(kube, now)
        else:
            await asyncio.to_thread(self.tables.adopt_fleet_nodes, now)
        snap = await asyncio.to_thread(self.tables.snapshot)
        resolution = resolve(snap.policies, snap.nodes, snap.records)
        changed = [r for r in resolution.nodes.values() if r.changed]
        if changed or snap.absent_published:
            await asyncio.to_thread(self.tables.save_resolution, changed, snap.absent_published, now)
            for r in changed:
                if r.policy is not None:
                    log.info("node policy resolved",
                             extra={"node": r.node, "policy": r.policy_name, "version": r.version})
                else:
                    log.info("no policy selects the node any more; its edge keeps the policy it has",
                             extra={"node": r.node})
        await self._publish(resolution, snap, now)
        statuses = policy_statuses(resolution, snap.statuses, _rfc3339(now))
        await self._write_statuses(statuses, snap.statuses)
        self._reported.update({n.name: (n.reported_name, n.reported_version) for n in snap.nodes})
        return resolution

    async def _pull_from_kubernetes(self, kube: Kube, now: float) -> None:
        """List the GPUPowerPolicy objects and the nodes; on an API failure keep the stored state."""
        policies = await sources.list_policies(kube, self._warn)
        if policies is None:
            return
        labels = await sources.list_node_labels(kube, self._warn)
        await asyncio.to_thread(self.tables.sync_policies, policies, sources.SOURCE_KUBERNETES, now)
        if labels is not None:
            await asyncio.to_thread(self.tables.sync_nodes, labels, now)

    async def _publish(self, resolution: Resolution, snap: Snapshot, now: float) -> None:
        """Publish (retained) what the broker does not hold yet; clear what no longer applies."""
        done: dict[str, int | None] = {}
        failed = 0  # once one is refused (the link down or its outgoing queue full), the rest wait too
        for r in resolution.nodes.values():
            published_version, published_at = snap.published.get(r.node, (None, None))
            if r.policy is not None:
                resend = (published_version == r.version and not r.applied and snap.online.get(r.node, False)
                          and now - (published_at or 0.0) >= self.resend_after)
                if published_version == r.version and not resend:
                    continue
                if failed:
                    failed += 1
                    continue
                payload = make_envelope(r.node, PolicyBody(policy=r.policy), Kind.POLICY).to_json()
                if self.publish(cloud_topic(r.node, "policy"), payload, retain=True):
                    done[r.node] = r.version
                    log.info("policy published" if not resend else "policy published again (node still pending)",
                             extra={"node": r.node, "policy": r.policy_name, "version": r.version})
                else:
                    failed += 1
            elif published_version is not None:
                if not failed and self._clear(r.node):
                    done[r.node] = None
                else:
                    failed += 1
        for node in snap.absent_published:
            if snap.published.get(node, (None, None))[0] is not None:
                if not failed and self._clear(node):
                    done[node] = None
                else:
                    failed += 1
        if done:
            await asyncio.to_thread(self.tables.mark_published, done, now)
        if failed:
            self._warn("publish", f"MQTT link down or its outgoing queue full: {failed} policy message(s) not "
                       "published; the next pass publishes them")

    def _clear(self, node: str) -> bool:
        """Remove the retained policy (zero-length retained payload); the edge keeps its own."""
        if self.publish(cloud_topic(node, "policy"), b"", retain=True):
            log.info("retained policy cleared: no policy selects the node", extra={"node": node})
            return True
        return False

    async def _write_statuses(self, statuses: dict[str, dict[str, Any]], before: Mapping[str, Any]) -> None:
        changed = {name: s for name, s in statuses.items() if before.get(name) != s}
        if not changed:
            return
        kube = self.kube
        saved: dict[str, dict[str, Any]] = {}
        for name, status in changed.items():
            if kube is not None and not await sources.write_status(kube, name, status, self._warn):
                continue
            saved[name] = status
        if saved:
            await asyncio.to_thread(self.tables.save_statuses, saved)

    def _warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[key] = now
            log.warning(message)

    # -- HTTP ----------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        add_routes(app, self)


__all__ = ["MIN_GAP_S", "POLL_INTERVAL_S", "RESEND_PENDING_S", "PolicyManager"]
