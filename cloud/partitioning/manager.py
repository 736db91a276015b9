"""`PartitioningManager`: the leader's reconcile loop for `GPUPartitioning` (list the objects and
the nodes, resolve with the pure rules of `cloud.partitioning.resolution`, publish each node's
`NodePartitioning` RETAINED with QoS 1 on `kgpu/v1/cloud/<node>/partitioning`, patch the objects'
status) and the read of each node's resolved partitioning for the API.

Retained means an edge that is offline, or has never connected, gets its partitioning from the
broker the moment it (re)subscribes. What was published is remembered in memory only (a payload
hash per node): a new leader publishes every node once on its first pass, which changes nothing
on an edge (it applies each name+version once). A node that leaves the cluster has its retained
message cleared. An online node still reporting another name/version after `resend_after` gets the
message again (covers a broker that lost its retained store), each time after twice the wait
before, at most hourly (a node waiting for a drain or refusing a layout reports another version
for long)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from cloud.kube import Kube
from cloud.partitioning import sources
from cloud.partitioning.http import add_routes
from cloud.partitioning.resolution import NodeView, PartitioningSource, Resolution, resolve, statuses
from cloud.services import BatchBus, Periodic, Publish
from cloud.store import DecodedLabels, FleetStore, FleetStoreError, Incoming
from shared.logs import get_logger
from shared.protocol import Kind, PartitioningBody, StatusBody, make_envelope
from shared.topics import cloud_topic

log = get_logger(__name__)

POLL_INTERVAL_S = 2.0  # list objects and nodes this often (and reconcile at least this often)
MIN_GAP_S = 0.2  # between two reconciles, however often something wakes the loop
RESEND_PENDING_S = 30.0  # publish again to an online node still reporting another version
MAX_RESEND_GAP_S = 3600.0
VIEW_MAX_AGE_S = 10.0  # a replica that does not lead resolves afresh for the API after this
WARN_EVERY_S = 60.0
TOPIC_KIND: Final = "partitioning"


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Reported:
    """What a node's edge last said about its partitioning (its status)."""

    name: str | None
    version: int | None
    state: str | None
    online: bool


class PartitioningManager:
    """Resolves and publishes per-node partitioning (leader only); serves its read API."""

    name = "partitioning"

    def __init__(self, *, store: FleetStore, kube: Kube | None, publish: Publish, batches: BatchBus,
                 poll_interval: float = POLL_INTERVAL_S, resend_after: float = RESEND_PENDING_S) -> None:
        self.store = store
        self.kube = kube
        self.publish = publish
        self.poll_interval = poll_interval
        self._labels_of = DecodedLabels()  # labels JSON text -> labels, once per distinct text
        self.resend_after = resend_after
        self._wake = asyncio.Event()
        self._objects: list[PartitioningSource] = []  # as last listed
        self._labels: dict[str, dict[str, str]] = {}  # as last listed
        self._reported: dict[str, Reported] = {}  # from the status messages, on every replica
        # node -> its GPU models: read from the fleet store once, then kept from the statuses
        self._models: dict[str, tuple[str, ...]] | None = None
        self._published: dict[str, tuple[str, float, int]] = {}  # node -> (payload hash, when, resends)
        self._last: tuple[float, Resolution] | None = None
        self._warned: dict[str, float] = {}
        self.published_count = 0
        batches.subscribe(self._on_batch, kinds=[Kind.STATUS])

    @property
    def source(self) -> str:
        return "kubernetes" if self.kube is not None else "none"

    # -- leader loop ---------------------------------------------------------------------------

    def periodic(self) -> Sequence[Periodic]:
        return [Periodic("partitioning reconcile", self._step, self.poll_interval, wake=self._wake,
                         min_gap_s=MIN_GAP_S, expected=(FleetStoreError,))]

    def wake(self) -> None:
        self._wake.set()

    async def _step(self) -> None:
        await self.reconcile()

    async def _on_batch(self, batch: list[Incoming]) -> None:
        """A node reporting another partitioning (applied, refused, a new node): reconcile now."""
        for item in batch:
            body = item.body
            if not isinstance(body, StatusBody):
                continue
            reported = Reported(body.partitioning_name, body.partitioning_version, body.partitioning_state,
                                body.state == "online")
            node = item.envelope.node
            if self._reported.get(node) != reported:
                self._reported[node] = reported
                self._wake.set()
            models = tuple(sorted({g.name for g in body.gpus if g.name}))
            if self._models is not None and models and self._models.get(node) != models:
                self._models[node] = models  # the fit check changes with them
                self._wake.set()

    async def reconcile(self) -> Resolution:
        """One pass: read, resolve, publish what the broker does not hold yet, write statuses."""
        now = time.time()
        resolution = await self._resolve(now)
        await self._publish(resolution, now)
        await self._write_statuses(resolution, now)
        return resolution

    async def _resolve(self, now: float) -> Resolution:
        kube = self.kube
        if kube is not None:
            objects = await sources.list_objects(kube, self._warn)
            if objects is not None:
                self._objects = objects
            labels = await sources.list_node_labels(kube, self._warn)
            if labels is not None:
                self._labels = labels
            node_labels: Mapping[str, Mapping[str, str]] = self._labels
        else:  # no cluster: no objects; every node the fleet store knows gets an empty partitioning
            texts = await asyncio.to_thread(self.store.node_label_texts)  # narrow: no node rows decoded
            node_labels = {name: self._labels_of(text) for name, text in texts.items()}
        models = self._models
        if models is None:  # the first pass: what the fleet store knows; statuses keep it current
            found: dict[str, set[str]] = {}
            for gpu in await asyncio.to_thread(self.store.gpu_states):
                if gpu.get("name"):
                    found.setdefault(gpu["node"], set()).add(gpu["name"])
            models = {node: tuple(sorted(names)) for node, names in found.items()}
            self._models = dict(models)
        views = []
        for node, node_label_map in node_labels.items():
            reported = self._reported.get(node)
            views.append(NodeView(node, node_label_map, models.get(node, ()),
                                  reported.name if reported else None, reported.version if reported else None,
                                  reported.state if reported else None))
        resolution = resolve(self._objects, views)
        self._last = (now, resolution)
        return resolution

    async def _publish(self, resolution: Resolution, now: float) -> None:
        failed = 0
        for node, r in resolution.nodes.items():
            digest = r.payload_hash()
            published = self._published.get(node)
            reported = self._reported.get(node)
            # a node waiting for a drain or refusing the layout reports another version for long:
            # each resend waits twice as long as the one before (at most MAX_RESEND_GAP_S)
            resend = (published is not None and published[0] == digest and r.partitioning.name != ""
                      and reported is not None and reported.online and not resolution.applied(node)
                      and now - published[1] >= min(MAX_RESEND_GAP_S, self.resend_after * 2 ** published[2]))
            if published is not None and published[0] == digest and not resend:
                continue
            if failed:  # one was refused (the link down or its outgoing queue full): the rest wait too
                failed += 1
                continue
            payload = make_envelope(node, PartitioningBody(partitioning=r.partitioning), Kind.PARTITIONING).to_json()
            if not self.publish(cloud_topic(node, TOPIC_KIND), payload, retain=True):
                failed += 1
                continue
            self._published[node] = (digest, now, published[2] + 1 if resend and published else 0)
            self.published_count += 1
            log.info("partitioning published" + (" again (node still pending)" if resend else ""),
                     extra={"node": node, "partitioning": r.partitioning.name or None,
                            "version": r.partitioning.version})
            for problem in r.problems:
                log.warning("MIG layout cannot be made on this node: %s", problem.reason,
                            extra={"node": node, "partitioning": r.partitioning.name, "gpu_model": problem.model})
        for node in sorted(set(self._published) - set(resolution.nodes)):
            if not failed and self.publish(cloud_topic(node, TOPIC_KIND), b"", retain=True):  # the node left
                del self._published[node]
                log.info("retained partitioning cleared: the node is gone", extra={"node": node})
            else:
                failed += 1
        if failed:
            self._warn("publish", f"MQTT link down or its outgoing queue full: {failed} partitioning message(s) "
                       "not published; the next pass publishes them")

    async def _write_statuses(self, resolution: Resolution, now: float) -> None:
        kube = self.kube
        if kube is None:
            return
        previous = {o.name: dict(o.status) for o in self._objects}
        for name, status in statuses(resolution, previous, _rfc3339(now)).items():
            if previous.get(name) != status:
                await sources.write_status(kube, name, status, self._warn)

    # -- the read side -------------------------------------------------------------------------

    async def view(self) -> Resolution:
        """The latest resolution; a replica that does not lead (or has not yet) resolves afresh."""
        last = self._last
        now = time.time()
        if last is None or now - last[0] > VIEW_MAX_AGE_S:
            return await self._resolve(now)
        return last[1]

    def node_out(self, resolution: Resolution, node: str) -> dict[str, Any]:
        r = resolution.nodes[node]
        reported = self._reported.get(node)
        published = self._published.get(node)
        return {
            "node": node, "partitioning": r.partitioning.dump(), "shadowed": list(r.shadowed),
            "problems": [p.as_dict() for p in r.problems],
            "reported_name": reported.name if reported else None,
            "reported_version": reported.version if reported else None,
            "reported_state": reported.state if reported else None,
            "online": reported.online if reported else None, "applied": resolution.applied(node),
            "published_at": published[1] if published and published[0] == r.payload_hash() else None,
        }

    def add_routes(self, app: web.Application) -> None:
        add_routes(app, self)

    def _warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[key] = now
            log.warning(message)


__all__ = ["MIN_GAP_S", "POLL_INTERVAL_S", "RESEND_PENDING_S", "PartitioningManager", "Reported"]
