"""The migration part's I/O shell: the leader's scan, and the Kubernetes calls of each step.

One scan (`tick`) loads the fleet view and the open migrations (repository), finds triggers and
reconciles them (triggers.py, pure), saves what changed, then advances every in-progress
migration by the steps the planner gives (planner.py, pure) and untaints the recovered ones.
Each step kind has one method here, found through `_handlers`; each step is recorded right
after its API call, shielded from a loss of leadership.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cloud.config import CloudSettings
from cloud.kube import Kube, KubeError
from cloud.migration import http
from cloud.migration.manifests import (
    TAINT_KEY,
    candidates,
    eviction_body,
    gpu_pods_by_node,
    movable_reason,
    node_zones,
    offline_ready_by_node,
    offline_verdict,
    pod_key,
    source_gpu,
    taints_patch,
    without_our_taint,
)
from cloud.migration.model import (
    OFFLINE_SUBJECT,
    Lifecycle,
    Migration,
    MigrationState,
    OfflineView,
    PodState,
    Rules,
    Step,
    StepKind,
    World,
    gpu_healthy,
    gpu_subjects,
    with_samples,
)
from cloud.migration.placement import HOSTNAME_LABEL, ZONE_LABEL
from cloud.migration.planner import NO_TARGET_RETRY_S, backoff, plan_pods, record_error
from cloud.migration.repository import MigrationRepository
from cloud.migration.triggers import find_triggers, reconcile, to_recover, zone_guards
from cloud.services import BatchBus, CommandSender, Periodic
from cloud.store import FleetStore, FleetStoreError, Incoming
from shared.logs import get_logger
from shared.protocol import CommandBody, Kind, StatusBody

log = get_logger(__name__)

OFFLINE_CHECK_EVERY_S = 30.0  # how often offline nodes are checked for bound GPU pods
SETTLE_S = 0.2  # after a wake-up: let the rest of a burst land in the store

Handler = Callable[[Kube, Migration, Step, float], Awaitable[Migration]]


class MigrationManager:
    """The controller's migration part (see cloud/migration/__init__.py)."""

    name = "migration"

    def __init__(self, *, settings: CloudSettings, store: FleetStore, kube: Kube | None,
                 commands: CommandSender, batches: BatchBus, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock  # wall clock (the fleet store's last_seen is wall time); a test moves it
        self.store = store
        self.kube = kube
        self.commands = commands
        self.repo = MigrationRepository(store)
        self._wake = asyncio.Event()
        self._first_unhealthy: dict[tuple[str, str], float] = {}
        self._offline_checked_at = 0.0
        self._zones: dict[str, str] = {}  # node -> zone, from the last listing of the cluster
        self.zone_guards: dict[str, str] = {}  # zone -> why no offline migration there now
        self.offline_refusals: Counter[str] = Counter()  # opt-ins refused, by kind
        self._refused: set[tuple[str, str]] = set()  # (pod key, refusal) logged this offline spell
        self.ticks = 0
        self.scan_interval_s = max(0.5, min(5.0, settings.migration_grace / 2))
        self._handlers: dict[StepKind, Handler] = {
            StepKind.TAINT: self._taint,
            StepKind.NOTIFY_EDGE: self._notify_edge,
            StepKind.FIND_PODS: self._find_pods,
            StepKind.TARGET: self._target,
            StepKind.NO_TARGET: self._no_target,
            StepKind.EVICT: self._evict,
            StepKind.RECREATE: self._recreate,
            StepKind.DELETE_ORIGINAL: self._delete_original,
            StepKind.COMPLETE: self._complete,
            StepKind.HOLD: self._hold,
        }
        batches.subscribe(self._on_batch, kinds=[Kind.TELEMETRY, Kind.MIGRATION_REQUEST, Kind.HEALTH, Kind.STATUS])

    # -- wiring --------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The offline rules' figures for /metrics (cloud/http/api.py registers parts that have them)."""
        guard = GaugeMetricFamily("kgpu_migration_zone_guard", "1 while a zone has too many nodes offline for "
                                  "any offline migration there (offline_zone_max_share).", labels=["zone"])
        for zone in sorted(self.zone_guards):
            guard.add_metric([zone], 1.0)
        yield guard
        refusals = CounterMetricFamily("kgpu_migration_offline_refusals", "Opt-ins to leave an offline node "
                                       "refused, by reason (each from 0).", labels=["reason"])
        for reason in sorted({"bad-annotation", "tolerates-unreachable"} | set(self.offline_refusals)):
            refusals.add_metric([reason], self.offline_refusals.get(reason, 0))
        yield refusals

    def add_routes(self, app: web.Application) -> None:
        http.add_routes(app, self.repo, has_kube=self.kube is not None)

    def periodic(self) -> Sequence[Periodic]:
        """Called as this replica starts leading: the first scan re-reads the whole fleet."""
        self.repo.view.forget()
        return [Periodic("migration scan", self.tick, self.scan_interval_s, wake=self._wake,
                         settle_s=SETTLE_S, expected=(FleetStoreError,))]

    async def _on_batch(self, batch: list[Incoming]) -> None:
        """Wake the scan early for a request or a health change (statuses, which come all the
        time from every node, wait for the periodic scan). A sample naming a GPU the scan's view
        does not hold (a row made or renumbered without a status) marks its node for re-reading,
        and a status of ours that changes nothing the view holds spares its node the re-read."""
        view = self.repo.view
        for item in batch:
            envelope = item.envelope
            kind = envelope.kind
            if kind == Kind.TELEMETRY:
                if not view.knows(envelope.node, getattr(item.body, "samples", ())):
                    view.mark([envelope.node])
            elif kind in (Kind.MIGRATION_REQUEST, Kind.HEALTH):
                self._wake.set()
            elif kind == Kind.STATUS and isinstance(item.body, StatusBody) and item.body.gpus:
                view.expect(envelope.node, envelope.ts - item.clock_skew, (
                    (g.uuid, g.index, g.name, str(g.health), tuple(g.pods), g.remediation, g.resource_name)
                    for g in item.body.gpus))

    @property
    def rules(self) -> Rules:
        s = self.settings
        return Rules(grace_s=s.migration_grace, offline_threshold_s=s.offline_threshold,
                     max_concurrent=s.migration_max_concurrent,
                     cooldown_s=s.migration_node_cooldown, has_kube=self.kube is not None,
                     offline_zone_max_share=s.offline_zone_max_share, offline_selector=s.offline_selector)

    def migrations(self, node: str | None = None, state: str | None = None,
                   limit: int = 100) -> list[dict[str, Any]]:
        """Rows for the API, newest first."""
        return self.repo.migrations(node, state, limit)

    def migration(self, mid: int) -> dict[str, Any] | None:
        return self.repo.migration(mid)

    # -- one scan ------------------------------------------------------------------------------

    async def tick(self) -> None:
        now = self._clock()
        kube = self.kube
        world, migrations, last_started = await asyncio.to_thread(self.repo.load, now)
        self._remember_unhealthy(world, now)
        kube_nodes: list[dict[str, Any]] | None = None
        pods: list[dict[str, Any]] | None = None
        offline = [n for n, (online, _seen) in world.nodes.items() if not online]
        offline_long = [n for n in offline if now - world.nodes[n][1] > self.settings.offline_threshold]
        check_offline = now - self._offline_checked_at >= OFFLINE_CHECK_EVERY_S
        if kube is not None and offline and check_offline:
            # listing every pod is not free: not on every scan. Any node offline: the zone guard
            # needs the zones (labels of the cluster's nodes) before the threshold passes.
            self._offline_checked_at = now
            kube_nodes, pods = await self._read_cluster(kube)
            self._zones = node_zones(kube_nodes)
            offline_for = {n: now - world.nodes[n][1] for n in offline_long}
            self._note_refusals(pods, offline_for)
            world = replace(world, gpu_pods=gpu_pods_by_node(pods), offline_ready=offline_ready_by_node(
                pods, offline_for, self.settings.offline_threshold, self.settings.offline_selector))
        world = replace(world, zones=self._zones)
        if kube is not None and (offline or self.zone_guards):
            self._update_zone_guards(world)
        triggers = find_triggers(world, self.rules, now, self._first_unhealthy)
        new, changed = reconcile(world, migrations, last_started, triggers, self.rules, now)
        if new or changed:
            await asyncio.to_thread(self.repo.save, new, changed, now)
            if any(m.state == MigrationState.PENDING for m in new):
                self._wake.set()  # start it on the next scan, right away
            for m in new:
                log.info("migration %s for %s: %s (%s)", m.state, m.node, m.trigger, m.reason,
                         extra={"node": m.node})
            world, migrations, last_started = await asyncio.to_thread(self.repo.load, now)
        self.ticks += 1
        if kube is None:
            return
        work = [m for m in migrations if m.state == MigrationState.IN_PROGRESS]
        healing = to_recover(world, migrations)
        if not work and not healing:
            return
        if kube_nodes is None or pods is None:
            kube_nodes, pods = await self._read_cluster(kube)
        if work:
            world = with_samples(world, await asyncio.to_thread(self.repo.samples))
        for m in work:
            await self._advance(kube, m, world, kube_nodes, pods)
        for m in healing:
            await self._recover(kube, m)

    async def _read_cluster(self, kube: Kube) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        serialize = kube.api_client.sanitize_for_serialization
        nodes = await kube.call(kube.core.list_node)
        pods = await kube.call(kube.core.list_pod_for_all_namespaces)
        return [serialize(n) for n in nodes.items], [serialize(p) for p in pods.items]

    def _update_zone_guards(self, world: World) -> None:
        """The zone guard (triggers.zone_guards), logged when it starts and when it ends."""
        guards = zone_guards(world.nodes, world.zones, self.settings.offline_zone_max_share)
        for zone, why in guards.items():
            if zone not in self.zone_guards:
                log.warning("%s (a partition, not a failure: the pods run on, cut off)", why,
                            extra={"zone": zone})
        for zone in self.zone_guards.keys() - guards.keys():
            log.info("zone guard lifted for zone %r", zone, extra={"zone": zone})
        self.zone_guards = guards

    def _note_refusals(self, pods: Sequence[Mapping[str, Any]], offline_for: Mapping[str, float]) -> None:
        """Log and count, once per offline spell, each pod on an offline node whose opt-in is
        refused (a bad annotation; a toleration of the unreachable taint forever)."""
        seen: set[tuple[str, str]] = set()
        for pod in pods:
            node = str((pod.get("spec") or {}).get("nodeName") or "")
            if node not in offline_for or movable_reason(pod, node) is not None:
                continue
            verdict = offline_verdict(pod, self.settings.offline_threshold, self.settings.offline_selector)
            if verdict.refusal is None:
                continue
            key = (pod_key(pod), verdict.refusal)
            seen.add(key)
            if key not in self._refused:
                self.offline_refusals[verdict.refusal] += 1
                log.warning("%s stays on offline node %s: %s", key[0], node, verdict.reason,
                            extra={"node": node, "pod": key[0], "refusal": verdict.refusal})
        self._refused = seen

    def _remember_unhealthy(self, world: World, now: float) -> None:
        seen = set()
        for node, gpus in world.gpus.items():
            for g in gpus:
                if not gpu_healthy(g) and g.health is not None:
                    seen.add((node, g.uuid))
                    self._first_unhealthy.setdefault((node, g.uuid), now)
        for key in list(self._first_unhealthy):
            if key not in seen:
                del self._first_unhealthy[key]

    # -- one migration -------------------------------------------------------------------------

    async def _advance(self, kube: Kube, m: Migration, world: World,
                       kube_nodes: list[dict[str, Any]], pods: list[dict[str, Any]]) -> None:
        """Run the planned steps of one in-progress migration, recording each as it happens."""
        node = next((n for n in kube_nodes
                     if (n.get("metadata") or {}).get("name") == m.node), None)
        if node is not None:  # read it fresh: the taint list must not be stale when we patch it
            try:
                node = kube.api_client.sanitize_for_serialization(
                    await kube.call(kube.core.read_node, m.node))
            except KubeError as exc:
                if not exc.not_found:
                    raise
                node = None
        zone = (((node or {}).get("metadata") or {}).get("labels") or {}).get(ZONE_LABEL)
        cands = candidates(kube_nodes, pods, world)
        source = source_gpu(world, m.node, m.subjects, node)
        now = self._clock()
        plan = plan_pods(m, node, pods, cands, zone, source, now, edge_known=m.node in world.nodes,
                         offline=self._offline_view(m, world, now), gpus=world.gpus.get(m.node, ()),
                         pod_map_source=world.pod_sources.get(m.node))
        held: set[str] = set()  # pods whose step failed or must wait: their later steps wait too
        for step in plan:
            if step.pod in held:
                continue
            # A step and its record go together: losing leadership does not cut between them.
            m, ok, go_on = await asyncio.shield(self._step(kube, m, step))
            if not go_on:
                return
            waiting = (((m.pods.get(step.pod) or {}).get("next_at") or 0) > self._clock()
                       if step.pod else False)
            if step.pod and (not ok or waiting):
                held.add(step.pod)

    def _offline_view(self, m: Migration, world: World, now: float) -> OfflineView | None:
        """For a migration off an offline node (no GPU subject): the node's state for the planner."""
        if gpu_subjects(m.subjects) or OFFLINE_SUBJECT not in m.subjects:
            return None
        online, last_seen = world.nodes.get(m.node, (False, 0.0))
        return OfflineView(offline_for_s=None if online else now - last_seen,
                           threshold_s=self.settings.offline_threshold, selector=self.settings.offline_selector,
                           zone_guard=self.zone_guards.get(self._zones.get(m.node, "")))

    async def _step(self, kube: Kube, m: Migration, step: Step) -> tuple[Migration, bool, bool]:
        """Do one step and record it: (the migration, whether it worked, whether to go on)."""
        now = self._clock()
        ok = go_on = True
        try:
            m = await self._handlers[step.kind](kube, m, step, now)
        except KubeError as exc:
            ok = False
            if exc.status == 0:
                log.warning("API server unreachable during migration %s: %s", m.id, exc)
                go_on = False
            m = record_error(m, step, str(exc), now)
        await asyncio.to_thread(self.repo.update, m)
        return m, ok, go_on

    # -- the steps, one method per StepKind: each returns the migration with its outcome -------

    async def _taint(self, kube: Kube, m: Migration, step: Step, now: float) -> Migration:
        if step.body is None:  # not in the cluster, or a healthy GPU is left (the edge fences the bad one)
            return m.step(StepKind.TAINT, "skipped", step.detail, now)
        await kube.call(kube.core.patch_node, m.node, taints_patch(step.body))
        log.info("tainted %s with %s", m.node, step.detail, extra={"node": m.node})
        return m.step(StepKind.TAINT, "applied", step.detail, now)

    async def _notify_edge(self, kube: Kube, m: Migration, step: Step, now: float) -> Migration:
        sent = [uuid for uuid in step.body if await self._command(m, "migrate_away", uuid)]
        outcome = "sent" if len(sent) == len(step.body) else "not-sent"
        note = "" if outcome == "sent" else " (MQTT link down; the taint and evictions go on)"
        return m.step(StepKind.NOTIFY_EDGE, outcome,
                      f"migrate_away for {', '.join(step.body)}{note}", now, gpus=list(step.body))

    async def _find_pods(self, kube: Kube, m: Migration, step: Step, now: float) -> Migration:
        return m.step(StepKind.FIND_PODS, "found", step.detail, now, subjects=step.body["subjects"])

    async def _hold(self, kube: Kube, m: Migration, step: Step, now: float) -> Migration:
        return m.step(StepKind.HOLD, "waiting", step.detail, now)

    async def _complete(self, kube: Kube, m: Migration, step: Step, now: float) -> Migration:
        state = MigrationState.FAILED if step.body else MigrationState.COMPLETED
        log.info("migration %s %s on %s", m.id, state, m.node, extra={"node": m.node})
        return replace(m.step(StepKind.COMPLETE, state, step.detail, now), state=state,
                       next_attempt_at=None)

    async def _target(self, kube: Kube, m: Migration, step: Step, now: float) -> Migration:
        key, _, _, _ = _pod_ref(step)
        target = step.target.node if step.target else None
        m = m.with_pod(key, now, target=target)
        return m.step(StepKind.TARGET, "chosen" if step.target else "none", step.detail, now,
                      pod=key, target=target)

    async def _no_target(self, kube: Kube, m: Migration, step: Step, now: float) -> Migration:
        key, _, _, uid = _pod_ref(step)
        attempts = int((m.pods.get(key) or {}).get("attempts") or 0) + 1
        # Nothing to back off from (no API call failed): look again soon, capacity may appear.
        m = m.with_pod(key, now, state=PodState.WAITING, attempts=attempts,
                       next_at=now + NO_TARGET_RETRY_S, uid=uid, owned=False)
        m = replace(m, next_attempt_at=now + NO_TARGET_RETRY_S)
        return m.step(StepKind.RECREATE, "retry", f"no node fits the bare pod yet; looking again "
                                                  f"every {NO_TARGET_RETRY_S:g} s", now, pod=key)

    async def _evict(self, kube: Kube, m: Migration, step: Step, now: float) -> Migration:
        key, namespace, name, uid = _pod_ref(step)
        target = step.target.node if step.target else None
        try:
            await kube.call(kube.core.create_namespaced_pod_eviction, name, namespace,
                            eviction_body(name, namespace))
        except KubeError as exc:
            if exc.not_found:
                m = m.with_pod(key, now, state=PodState.GONE, uid=uid, owned=True, next_at=None)
                return m.step(StepKind.EVICT, "gone", "the pod was already gone", now, pod=key)
            if not exc.too_many_requests:
                raise
            attempts = int((m.pods.get(key) or {}).get("attempts") or 0) + 1
            wait = backoff(attempts)
            m = m.with_pod(key, now, state=PodState.WAITING, attempts=attempts, next_at=now + wait,
                           uid=uid, owned=True)
            m = replace(m, next_attempt_at=now + wait)
            return m.step(StepKind.EVICT, "retry", f"refused (429, a PodDisruptionBudget): "
                          f"retry in {wait:g} s (attempt {attempts})", now, pod=key)
        m = m.with_pod(key, now, state=PodState.EVICTED, uid=uid, owned=True, next_at=None,
                       target=target)
        log.info("evicted %s from %s", key, m.node, extra={"node": m.node})
        return m.step(StepKind.EVICT, "evicted", "eviction accepted; its controller recreates it"
                      + (f", expected on {target}" if target else ""), now, pod=key, target=target)

    async def _recreate(self, kube: Kube, m: Migration, step: Step, now: float) -> Migration:
        key, namespace, _, uid = _pod_ref(step)
        target = step.target.node if step.target else None
        new_name = step.body["metadata"]["name"]
        try:
            await kube.call(kube.core.create_namespaced_pod, namespace, step.body)
        except KubeError as exc:
            if not exc.conflict:
                raise
            # made by us before a restart: the same deterministic name
        m = m.with_pod(key, now, state=PodState.RECREATED, new_name=new_name, uid=uid, owned=False,
                       next_at=None, target=target)
        log.info("recreated %s as %s/%s on %s", key, namespace, new_name, target,
                 extra={"node": m.node})
        return m.step(StepKind.RECREATE, "created", f"{namespace}/{new_name} with required node "
                      f"affinity {HOSTNAME_LABEL} In [{target}]", now, pod=key, target=target)

    async def _delete_original(self, kube: Kube, m: Migration, step: Step, now: float) -> Migration:
        key, namespace, name, _ = _pod_ref(step)
        detail = "original deleted"
        if step.body is not None:
            # Never grace 0: on an unreachable node the pod runs on (edge autonomy); a normal delete
            # leaves it terminating, and the node's kubelet/edged ends it when the link returns.
            try:
                await kube.call(kube.core.delete_namespaced_pod, name, namespace)
            except KubeError as exc:
                if not exc.not_found:
                    raise
                detail = "the original was already gone"
        else:
            detail = step.detail or detail
        m = m.with_pod(key, now, state=PodState.DELETED, next_at=None)
        return m.step(StepKind.DELETE_ORIGINAL, "deleted", detail, now, pod=key)

    # -- recovery and the edge -----------------------------------------------------------------

    async def _recover(self, kube: Kube, m: Migration) -> None:
        """The GPUs are healthy again: remove our taint (only ours) and close the migration."""
        now = self._clock()
        try:
            node = await kube.call(kube.core.read_node, m.node)
            serialized = kube.api_client.sanitize_for_serialization(node)
            taints = serialized.get("spec", {}).get("taints") or []
            kept = without_our_taint(taints)
            if kept is not None:
                await kube.call(kube.core.patch_node, m.node, taints_patch(kept))
                m = m.step(Lifecycle.UNTAINT, "removed",
                           f"{TAINT_KEY} removed; other taints kept ({len(kept)})", now)
                log.info("untainted %s: GPUs healthy again", m.node, extra={"node": m.node})
            else:
                m = m.step(Lifecycle.UNTAINT, "absent", f"{TAINT_KEY} was not on the node", now)
        except KubeError as exc:
            if not exc.not_found:
                log.warning("untainting %s failed, retrying: %s", m.node, exc)
                return
            m = m.step(Lifecycle.UNTAINT, "skipped", "the node is not in the cluster", now)
        for uuid in gpu_subjects(m.subjects):
            await self._command(m, "undrain", uuid)
        m = replace(m, state=MigrationState.RECOVERED, next_attempt_at=None)
        await asyncio.to_thread(self.repo.update, m)

    async def _command(self, m: Migration, command: str, uuid: str) -> bool:
        """Tell the edge, through the command outbox (sent again until the edge answers; applied
        at most once: the id is derived from the migration and the GPU)."""
        digest = hashlib.sha1(uuid.encode()).hexdigest()[:12]
        body = CommandBody(command=command, gpu_uuid=uuid, args={"migration": m.id})
        return await self.commands.send(m.node, body, f"migration-{m.id}-{command}-{digest}")


def _pod_ref(step: Step) -> tuple[str, str, str, str | None]:
    """A pod step's (key, namespace, name, uid of the pod as listed)."""
    assert step.pod is not None
    namespace, name = step.pod.split("/", 1)
    uid = ((step.body.get("metadata") or {}).get("uid")
           if isinstance(step.body, Mapping) else None)
    return step.pod, namespace, name, uid
