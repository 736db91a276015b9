"""`RolloutManager`: creating a rollout (checked against the cluster) and the leader's loop that
carries out the active one a tick at a time (observe, plan with `cloud.rollout.plan`, act, store)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from cloud.config import CloudSettings
from cloud.kube import Kube, KubeError, KubeUnavailable
from cloud.rollout.http import add_routes
from cloud.rollout.kubernetes import DaemonPod, EdgeDaemonSet
from cloud.rollout.plan import (
    Action,
    DeletePod,
    NodeState,
    NodeView,
    OpenWave,
    RolloutSpec,
    RolloutState,
    SetRolloutState,
    Transition,
    apply_merge_patch,
    assign_waves,
    plan,
    resolve_amount,
    with_image,
)
from cloud.rollout.repository import ActiveRolloutExists, RolloutRepository
from cloud.rollout.request import RolloutRequest
from cloud.rollout.views import RolloutRefused, rollout_out
from cloud.services import BatchBus, Periodic, require_kube
from cloud.store import FleetStore, FleetStoreError, Incoming
from shared.logs import get_logger
from shared.protocol import Kind

log = get_logger(__name__)

TICK_S = 1.0  # the leader's loop period when nothing wakes it earlier
MIN_TICK_S = 0.2  # status reports wake the loop, but not more often than this


class RolloutManager:
    """Rollouts: HTTP API on every replica; the planner loop only on the leader."""

    name = "rollouts"

    def __init__(self, *, settings: CloudSettings, store: FleetStore, kube: Kube | None, batches: BatchBus) -> None:
        self.kube = kube
        self.repo = RolloutRepository(store)
        self.daemonset = EdgeDaemonSet(settings.namespace, settings.daemonset)
        self._wake = asyncio.Event()
        batches.subscribe(self._on_batch, kinds=[Kind.STATUS])

    async def _on_batch(self, batch: list[Incoming]) -> None:
        """A status may finish a validation: look again soon instead of a tick later."""
        if any(item.envelope.kind == Kind.STATUS for item in batch):
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def add_routes(self, app: web.Application) -> None:
        add_routes(app, self)

    # -- creating a rollout -------------------------------------------------------------------

    async def create(self, req: RolloutRequest) -> dict[str, Any]:
        """Validate against the cluster and store a new rollout; the leader's loop carries it out."""
        try:
            kube = require_kube(self.kube, "rollouts")
        except KubeUnavailable as exc:
            raise RolloutRefused(409, "rollouts need a cluster", str(exc)) from None
        active = await asyncio.to_thread(self.repo.active)
        if active is not None:
            raise RolloutRefused(409, "another rollout is active", {"id": active["id"], "state": active["state"]})
        try:
            ds = await self.daemonset.read(kube)
            pods = await self.daemonset.pods(kube, ds)
        except KubeError as exc:
            if exc.not_found:
                raise RolloutRefused(409, f"no DaemonSet {self.daemonset}", str(exc)) from None
            raise RolloutRefused(502, "the Kubernetes API failed", str(exc)) from None
        strategy = (ds.get("spec", {}).get("updateStrategy") or {}).get("type", "RollingUpdate")
        if strategy != "OnDelete":
            raise RolloutRefused(409, "the DaemonSet must use updateStrategy OnDelete",
                                 f"{self.daemonset} uses {strategy}: a RollingUpdate would "
                                 "restart pods itself and stall on NotReady edge nodes")
        previous = ds["spec"]["template"]
        try:
            new = (with_image(previous, req.image, req.container) if req.image is not None
                   else apply_merge_patch(previous, req.template_patch))
        except ValueError as exc:
            raise RolloutRefused(400, "cannot apply the change to the pod template", str(exc)) from None
        members = sorted(pods)
        missing = [n for n in req.waves.canary if n not in pods]
        if missing:
            raise RolloutRefused(400, "canary nodes without a daemon pod", missing)
        waves = assign_waves(members, req.waves.canary, req.waves.percentages)
        now = time.time()
        assert req.version is not None
        row = {
            "state": RolloutState.RUNNING.value, "active": 1, "target_version": req.version,
            "image": req.image, "container": req.container, "template_patch": req.template_patch,
            "request": req.model_dump(mode="json", by_alias=True),
            "max_unavailable": resolve_amount(req.max_unavailable, len(members), at_least=1),
            "failure_threshold": resolve_amount(req.failure_threshold, len(members)),
            "health_timeout": req.health_timeout, "wave": 0, "wave_count": len(req.waves.percentages) + 1,
            "previous_template": previous, "new_template": new, "template_applied": None,
            "rollback_requested": False, "reason": None, "created_at": now, "updated_at": now, "finished_at": None,
        }
        nodes = [{"node": name, "wave": waves[name], "canary": waves[name] == 0 and name in req.waves.canary,
                  "state": NodeState.UPGRADE_REQUIRED.value, "since": now, "marked_pod": None, "deleted": False,
                  "reverting": False, "from_version": None, "reason": "waiting for its wave"} for name in members]
        try:
            rollout_id = await asyncio.to_thread(self.repo.create, row, nodes)
        except ActiveRolloutExists as exc:
            raise RolloutRefused(409, "another rollout is active", {"id": exc.rollout_id}) from None
        log.info("rollout created", extra={"rollout": rollout_id, "version": req.version, "nodes": len(members),
                                           "max_unavailable": row["max_unavailable"]})
        self._wake.set()
        stored = await asyncio.to_thread(self.repo.get, rollout_id)
        assert stored is not None
        return rollout_out(stored, {NodeState.UPGRADE_REQUIRED.value: len(members)} if members else {})

    # -- leading ------------------------------------------------------------------------------

    def periodic(self) -> Sequence[Periodic]:
        """Drive the active rollout, a tick at a time (none with --no-kube: no rollouts)."""
        if self.kube is None:
            return []
        return [Periodic("rollout step", self.tick, TICK_S, wake=self._wake, min_gap_s=MIN_TICK_S,
                         expected=(KubeError, SQLAlchemyError, FleetStoreError))]

    async def tick(self) -> bool:
        """One round: observe, plan, act, store. True when it should run again right away."""
        kube = require_kube(self.kube, "rollouts")
        row = await asyncio.to_thread(self.repo.active)
        if row is None:
            return False
        rollout_id, state = int(row["id"]), RolloutState(row["state"])
        ds = await self.daemonset.read(kube)
        await self._ensure_template(kube, row, ds)
        pods = await self.daemonset.pods(kube, ds)
        stored, fleet = await asyncio.gather(asyncio.to_thread(self.repo.nodes_of, rollout_id),
                                             asyncio.to_thread(self.repo.fleet))
        views = {n["node"]: _view(n, fleet.get(n["node"]), pods.get(n["node"])) for n in stored}
        spec = RolloutSpec(
            target_version=row["target_version"], max_unavailable=row["max_unavailable"],
            failure_threshold=row["failure_threshold"], health_timeout=row["health_timeout"],
            wave_count=row["wave_count"], wave=row["wave"], state=state,
            rollback_requested=bool(row["rollback_requested"]),
        )
        now = time.time()
        actions = plan(spec, views, now)
        if not actions:
            return False
        deletes = [a for a in actions if isinstance(a, DeletePod)]
        decided = [a for a in actions if not isinstance(a, DeletePod)]
        if decided and not await asyncio.to_thread(self.repo.apply, rollout_id, state.value, decided, now):
            log.info("rollout changed meanwhile: decisions dropped", extra={"rollout": rollout_id})
            return True
        for action in decided:
            _log_action(rollout_id, action)
        if deletes:
            results = await asyncio.gather(*(self.daemonset.delete(kube, pods[d.node], d.node) for d in deletes))
            done = [d for d, ok in zip(deletes, results, strict=True) if ok]
            if done:
                await asyncio.to_thread(self.repo.store_deleted, rollout_id, done, time.time())
                for d in done:
                    _log_action(rollout_id, d.then)
        return any(isinstance(a, SetRolloutState) for a in decided)

    async def _ensure_template(self, kube: Kube, row: dict[str, Any], ds: dict[str, Any]) -> None:
        """Write the template the rollout's state calls for, once (recorded in `template_applied`)."""
        which = "new" if row["state"] == RolloutState.RUNNING.value else "previous"
        if row["template_applied"] == which:
            return
        template = row["new_template"] if which == "new" else row["previous_template"]
        await self.daemonset.write_template(kube, ds, template)
        await asyncio.to_thread(self.repo.update, int(row["id"]), {row["state"]}, template_applied=which)
        row["template_applied"] = which
        log.info("DaemonSet template written", extra={"rollout": row["id"], "template": which,
                                                      "daemonset": str(self.daemonset)})


def _view(stored: dict[str, Any], fleet: dict[str, Any] | None, pod: DaemonPod | None) -> NodeView:
    return NodeView(
        state=NodeState(stored["state"]), since=float(stored["since"]), wave=int(stored["wave"]),
        canary=bool(stored["canary"]),
        online=bool(fleet and fleet["online"]),  # a node that never reported counts as offline
        daemon_version=fleet["daemon_version"] if fleet else None,
        degraded=bool(fleet and fleet["degraded"]),
        pod=pod.identity if pod else None, marked_pod=stored["marked_pod"],
        deleted=bool(stored["deleted"]), reverting=bool(stored["reverting"]),
    )


def _log_action(rollout_id: int, action: Action) -> None:
    if isinstance(action, Transition):
        log.info("rollout node %s: %s", action.to.value, action.reason,
                 extra={"rollout": rollout_id, "node": action.node})
    elif isinstance(action, OpenWave):
        log.info("rollout wave %d open", action.wave, extra={"rollout": rollout_id})
    elif isinstance(action, SetRolloutState):
        log.info("rollout %s: %s", action.state.value, action.reason, extra={"rollout": rollout_id})
