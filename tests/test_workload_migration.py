"""cloud/migration/: the pure decisions (table-driven), then the whole path with real
processes: edges and a controller over a real mosquitto, Kubernetes emulated by kmock over HTTP."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from cloud.migration import MigrationManager
from cloud.migration.manifests import (
    TAINT_KEY,
    candidates,
    recreate_manifest,
    recreated_name,
    with_our_taint,
    without_our_taint,
)
from cloud.migration.model import (
    OFFLINE_SUBJECT,
    GpuView,
    Migration,
    RequestEvent,
    Rules,
    Step,
    World,
)
from cloud.migration.placement import PodNeeds, gpu_model
from cloud.migration.planner import MAX_POD_ERRORS, plan_pods, record_error
from cloud.migration.triggers import find_triggers, reconcile, to_recover, unhealthy_since
from cloud.store import Incoming
from kgpu.lab.broker import mosquitto_binary
from kgpu.lab.processes import wait_for
from shared.gpu import Health
from shared.protocol import (
    GpuSummary,
    HealthBody,
    Kind,
    MigrationRequestBody,
    StatusBody,
    make_envelope,
)
from shared.wire import WireModel
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess
from tests.helpers.fault_report import Tally, record
from tests.helpers.postgres import create_database, drop_database, pg_url  # noqa: F401  (pg_url: fixture)

if TYPE_CHECKING:
    from kgpu.lab.broker import Mosquitto
    from kgpu.lab.kube import KubeEmulator

NOW = 1_800_000_000.0
RULES = Rules(grace_s=60, offline_threshold_s=300, max_concurrent=2, cooldown_s=600, has_kube=True)
H100 = "NVIDIA H100 80GB HBM3"


# ---- builders -------------------------------------------------------------------------------


def gpu(node: str, uuid: str, health: str = "healthy", *, since: float | None = None,
        last: tuple[float, str] | None = None, healthy_ts: float | None = None, temp: float = 50.0) -> GpuView:
    return GpuView(node=node, uuid=uuid, index=int(uuid[-1]) if uuid[-1].isdigit() else 0, name=H100, health=health,
                   sample={"temperature_c": temp, "power_w": 200.0, "power_limit_w": 700.0},
                   unhealthy_since=since, last_event=last, healthy_event_ts=healthy_ts)


def world(*gpus: GpuView, offline: dict[str, float] | None = None, requests: tuple[RequestEvent, ...] = (),
          gpu_pods: dict[str, int] | None = None, offline_ready: dict[str, int] | None = None) -> World:
    nodes: dict[str, tuple[bool, float]] = {g.node: (True, NOW) for g in gpus}
    for name, last_seen in (offline or {}).items():
        nodes[name] = (False, last_seen)
    by_node: dict[str, list[GpuView]] = {}
    for g in gpus:
        by_node.setdefault(g.node, []).append(g)
    return World(nodes=nodes, gpus={k: tuple(v) for k, v in by_node.items()}, requests=requests, gpu_pods=gpu_pods,
                 offline_ready=offline_ready)


def migration(mid: int, node: str = "bad", state: str = "in-progress", subjects: tuple[str, ...] = ("GPU-0",),
              created: float = NOW - 100, **kw: Any) -> Migration:
    return Migration(id=mid, node=node, gpu_uuid=subjects[0] if subjects else None, subjects=subjects,
                     trigger="edge-request", reason="xid 79", state=state, created_at=created, updated_at=created,
                     started_at=kw.pop("started_at", created if state not in ("pending", "deferred") else None), **kw)


def request(event_id: int, node: str = "bad", uuid: str | None = "GPU-0", ts: float = NOW - 1) -> RequestEvent:
    return RequestEvent(event_id, node, ts, ts, uuid, "xid", "xid 79 on GPU 0 (policy: request_migration)")


def kpod(name: str, node: str = "bad", *, gpus: int = 1, owned: bool = True, cls: str | None = None,
         selector: dict[str, str] | None = None, uid: str | None = None, phase: str = "Running") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default", "labels": {"kgpu.io/workload-class": cls} if cls else {}}
    if uid:
        meta["uid"] = uid
    if owned:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u",
                                    "controller": True}]
    spec: dict[str, Any] = {"nodeName": node, "containers": [
        {"name": "main", "image": "x", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}}]}
    if selector:
        spec["nodeSelector"] = selector
    return {"metadata": meta, "spec": spec, "status": {"phase": phase}}


def knode(name: str, zone: str = "z1", labels: dict[str, str] | None = None,
          taints: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone, "kubernetes.io/hostname": name,
                                                  **(labels or {})}},
            "spec": {"taints": taints} if taints else {}}


# ---- health and triggers --------------------------------------------------------------------


@pytest.mark.parametrize(("events", "expected"), [
    ([], None),
    ([(5.0, 50.0, "unhealthy")], 50.0),
    ([(7.0, 70.0, "lost"), (5.0, 50.0, "unhealthy"), (3.0, 30.0, "healthy"), (1.0, 10.0, "unhealthy")], 50.0),
    ([(7.0, 70.0, "healthy"), (5.0, 50.0, "unhealthy")], None),
])
def test_unhealthy_since_is_the_start_of_the_current_run(events: list[tuple[float, float, str]],
                                                         expected: float | None) -> None:
    assert unhealthy_since(events) == expected


TRIGGER_CASES: list[tuple[str, World, list[tuple[str, str, str | None]]]] = [
    ("an edge request", world(gpu("bad", "GPU-0"), requests=(request(7),)), [("bad", "edge-request", "GPU-0")]),
    ("unhealthy within the grace: nothing",
     world(gpu("bad", "GPU-0", "unhealthy", since=NOW - 30, last=(0, "unhealthy"))), []),
    ("unhealthy past the grace", world(gpu("bad", "GPU-0", "unhealthy", since=NOW - 61, last=(0, "unhealthy"))),
     [("bad", "gpu-unhealthy", "GPU-0")]),
    ("lost past the grace", world(gpu("bad", "GPU-1", "lost", since=NOW - 500, last=(0, "lost"))),
     [("bad", "gpu-unhealthy", "GPU-1")]),
    # offline: only pods that opted in move (`offline_ready`; tests/test_offline_nodes.py has the rest)
    ("offline past the threshold with GPU pods that opted in",
     world(gpu("ok", "GPU-0"), offline={"gone": NOW - 301}, gpu_pods={"gone": 2}, offline_ready={"gone": 2}),
     [("gone", "node-offline", OFFLINE_SUBJECT)]),
    ("offline past the threshold, GPU pods that did not opt in",
     world(gpu("ok", "GPU-0"), offline={"gone": NOW - 301}, gpu_pods={"gone": 2}, offline_ready={}), []),
    ("offline past the threshold, no GPU pods", world(offline={"gone": NOW - 301}, gpu_pods={}, offline_ready={}), []),
    ("offline, not long enough", world(offline={"gone": NOW - 100}, gpu_pods={"gone": 1}, offline_ready={"gone": 1}),
     []),
    ("offline, no cluster to ask about pods", world(offline={"gone": NOW - 1000}, gpu_pods=None), []),
]


@pytest.mark.parametrize(("what", "w", "expected"), TRIGGER_CASES, ids=[c[0] for c in TRIGGER_CASES])
def test_find_triggers(what: str, w: World, expected: list[tuple[str, str, str | None]]) -> None:
    assert [(t.node, t.kind, t.subject) for t in find_triggers(w, RULES, NOW)] == expected


def test_an_unhealthy_gpu_without_events_is_timed_from_first_sight() -> None:
    w = world(gpu("bad", "GPU-0", "unhealthy"))
    assert find_triggers(w, RULES, NOW, {("bad", "GPU-0"): NOW - 10}) == []
    assert [t.kind for t in find_triggers(w, RULES, NOW, {("bad", "GPU-0"): NOW - 61})] == ["gpu-unhealthy"]


# ---- reconcile ------------------------------------------------------------------------------


def run(w: World, ms: list[Migration], last_started: dict[str, float] | None = None, rules: Rules = RULES,
        now: float = NOW) -> tuple[list[Migration], list[Migration]]:
    return reconcile(w, ms, last_started or {}, find_triggers(w, rules, now), rules, now)


SICK = gpu("bad", "GPU-0", "unhealthy", since=NOW - 5, last=(NOW - 5, "unhealthy"))


def test_a_request_becomes_a_pending_migration_and_consumes_the_event() -> None:
    new, changed = run(world(SICK, requests=(request(7),)), [])
    assert changed == []
    [m] = new
    assert (m.node, m.state, m.trigger, m.subjects, m.consumed) == ("bad", "pending", "edge-request", ("GPU-0",), (7,))
    assert m.steps[0]["step"] == "trigger" and m.steps[0]["outcome"] == "recorded"


def test_a_second_trigger_for_the_node_merges_and_a_repeat_is_silent() -> None:
    open_ = migration(1, state="in-progress")
    other = gpu("bad", "GPU-1", "unhealthy", since=NOW - 100, last=(NOW - 100, "unhealthy"))
    new, changed = run(world(SICK, other), [open_])
    assert new == []
    [m] = changed
    assert m.subjects == ("GPU-0", "GPU-1") and m.steps[-1]["outcome"] == "merged"
    new, changed = run(world(SICK, other), [m])  # the same condition again: no new step
    assert new == [] and changed == []
    new, changed = run(world(SICK, requests=(request(8),)), [m])  # a new request event is recorded, consumed
    assert new == [] and changed[0].consumed == (8,) and changed[0].steps[-1]["outcome"] == "merged"


def test_two_requests_in_one_scan_make_one_migration() -> None:
    other = gpu("bad", "GPU-1", "unhealthy", last=(NOW, "unhealthy"))
    new, _ = run(world(SICK, other, requests=(request(7), request(8, uuid="GPU-1"))), [])
    [m] = new
    assert m.subjects == ("GPU-0", "GPU-1") and m.consumed == (7, 8)
    assert [s["outcome"] for s in m.steps] == ["recorded", "merged"]


def test_a_trigger_in_the_node_cool_down_is_deferred_then_goes_on() -> None:
    new, _ = run(world(SICK, requests=(request(7),)), [], last_started={"bad": NOW - 100})
    [m] = new
    assert m.state == "deferred" and m.steps[0]["outcome"] == "deferred (cool-down)"
    assert m.next_attempt_at == NOW + 500
    m = replace(m, id=5)
    _, changed = run(world(SICK), [m], last_started={"bad": NOW - 100}, now=NOW + 499)
    assert changed == []
    _, changed = run(world(SICK), [m], last_started={"bad": NOW - 100}, now=NOW + 501)
    assert changed[0].state == "in-progress"  # the cool-down ended, and a slot was free


def test_at_most_max_concurrent_run_oldest_first() -> None:
    ms = [migration(1, "a", "in-progress"), migration(2, "b", "pending", created=NOW - 10),
          migration(3, "c", "pending", created=NOW - 50), migration(4, "d", "pending", created=NOW - 5)]
    sick = [gpu(n, "GPU-0", "unhealthy", last=(0, "unhealthy")) for n in "abcd"]
    _, changed = run(world(*sick), ms)
    assert [(m.id, m.state) for m in changed] == [(3, "in-progress")]  # one slot of two was free
    assert changed[0].started_at == NOW


def test_without_a_cluster_triggers_are_recorded_as_needs_cluster() -> None:
    no_kube = replace(RULES, has_kube=False)
    new, _ = run(world(SICK, requests=(request(7),)), [], rules=no_kube)
    assert new[0].state == "needs-cluster" and "--no-kube" in new[0].steps[0]["detail"]
    _, changed = run(world(SICK), [replace(new[0], id=1)])  # a controller with a cluster leads
    assert changed[0].state == "in-progress"  # pending, and a slot was free
    assert [s["step"] for s in changed[0].steps] == ["trigger", "cluster", "start"]


def test_not_started_ones_are_cancelled_when_the_gpu_recovers() -> None:
    fine = gpu("bad", "GPU-0", "healthy", last=(NOW, "healthy"))
    for state in ("pending", "deferred", "needs-cluster"):
        _, changed = run(world(fine), [migration(1, state=state, next_attempt_at=NOW + 100)])
        assert changed[0].state == "cancelled", state
    _, changed = run(world(fine), [migration(1, state="in-progress")])
    assert changed == []  # a started migration finishes


def test_a_replayed_request_already_taken_back_is_not_acted_on() -> None:
    fine = gpu("bad", "GPU-0", "healthy", last=(NOW - 10, "healthy"), healthy_ts=NOW - 10)
    new, _ = run(world(fine, requests=(request(7, ts=NOW - 100),)), [])
    assert new[0].state == "cancelled" and new[0].consumed == (7,)


def test_a_request_before_the_status_says_unhealthy_is_not_cancelled() -> None:
    racing = gpu("bad", "GPU-0", "healthy", last=(NOW - 1, "unhealthy"))  # the event is newer than the status
    new, changed = run(world(racing, requests=(request(7),)), [])
    assert new[0].state == "pending"
    _, changed = run(world(racing), [replace(new[0], id=1)])
    assert changed[0].state == "in-progress"


def test_recovery_waits_for_every_subject() -> None:
    done = migration(1, state="completed", subjects=("GPU-0", "GPU-1"))
    half = world(gpu("bad", "GPU-0", last=(0, "healthy")), gpu("bad", "GPU-1", "unhealthy", last=(0, "unhealthy")))
    assert to_recover(half, [done]) == []
    both = world(gpu("bad", "GPU-0", last=(0, "healthy")), gpu("bad", "GPU-1", last=(0, "healthy")))
    assert to_recover(both, [done]) == [done]
    assert to_recover(both, [replace(done, state="in-progress")]) == []  # finishes first
    offline = migration(2, "gone", "completed", subjects=(OFFLINE_SUBJECT,))
    assert to_recover(world(offline={"gone": NOW}), [offline]) == []
    assert to_recover(World(nodes={"gone": (True, NOW)}), [offline]) == [offline]


# ---- taints and manifests -------------------------------------------------------------------


def test_our_taint_is_added_to_the_full_list_once_and_removed_alone() -> None:
    others = [{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}, {"key": "x", "effect": "NoExecute"}]
    full = with_our_taint(others, "GPU-0")
    assert full == [*others, {"key": TAINT_KEY, "value": "GPU-0", "effect": "NoSchedule"}]
    assert with_our_taint(full, "GPU-1") is None  # one per key and effect: already there
    assert without_our_taint(full) == others
    assert without_our_taint(others) is None


def test_recreate_manifest_strips_binding_and_pins_the_target() -> None:
    pod = kpod("notebook", owned=False, uid="u-1")
    pod["metadata"].update(resourceVersion="42", creationTimestamp="2026-01-01T00:00:00Z")
    pod["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]},
                              {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["b"]}]}]}}}
    out = recreate_manifest(pod, "good", "good-host", 7, "bad")
    assert out["metadata"]["name"] == "notebook-m7"
    assert {"uid", "resourceVersion", "creationTimestamp"}.isdisjoint(out["metadata"])
    assert "nodeName" not in out["spec"] and "status" not in out
    assert out["metadata"]["annotations"]["kgpu.io/migrated-from"] == "bad/notebook"
    terms = out["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    for term in terms:  # ANDed into every ORed term
        assert {"key": "kubernetes.io/hostname", "operator": "In", "values": ["good-host"]} in term["matchExpressions"]
    assert pod["spec"]["nodeName"] == "bad"  # the input is untouched
    assert recreated_name("notebook-m7", 9) == "notebook-m9"
    assert len(recreated_name("x" * 300, 12)) == 253


# ---- the step planner -----------------------------------------------------------------------

CLUSTER_NODES = [knode("bad", taints=[{"key": "other", "effect": "NoSchedule"}]), knode("near"),
                 knode("far", zone="z2"), knode("west", zone="z2", labels={"pool": "west"})]
FLEET = world(gpu("bad", "GPU-0", "unhealthy", last=(0, "unhealthy")), gpu("bad", "GPU-1"),
              gpu("near", "GPU-n0"), gpu("near", "GPU-n1"), gpu("far", "GPU-f0"), gpu("west", "GPU-w0"))
PODS = [kpod("trainer", cls="training"), kpod("notebook", owned=False, cls="inference", selector={"pool": "west"}),
        kpod("cpu-only", gpus=0), kpod("elsewhere", node="far")]


def plan(m: Migration, pods: list[dict[str, Any]] = PODS, nodes: list[dict[str, Any]] = CLUSTER_NODES,
         now: float = NOW) -> list[Any]:
    cands = candidates(nodes, pods, FLEET)
    return plan_pods(m, nodes[0], pods, cands, "z1", gpu_model(H100), now)


def kinds(steps: list[Any]) -> list[tuple[str, str | None, str | None]]:
    return [(s.kind, s.pod, s.target.node if s.target else None) for s in steps]


def test_first_plan_taints_finds_targets_evicts_and_recreates() -> None:
    steps = plan(migration(1))
    assert kinds(steps) == [
        ("taint", None, None), ("notify-edge", None, None), ("find-pods", None, None),
        ("target", "default/trainer", "near"), ("evict", "default/trainer", "near"),  # training first, same zone
        ("target", "default/notebook", "west"), ("recreate", "default/notebook", "west"),
        ("delete-original", "default/notebook", None),
    ]
    assert steps[0].body == [{"key": "other", "effect": "NoSchedule"},
                             {"key": TAINT_KEY, "value": "GPU-0", "effect": "NoSchedule"}]
    assert "default/cpu-only" not in steps[2].detail and "2 GPU pod(s)" in steps[2].detail
    manifest = steps[6].body
    assert manifest["metadata"]["name"] == "notebook-m1" and "nodeName" not in manifest["spec"]


def test_a_recorded_eviction_is_never_repeated_and_the_migration_completes() -> None:
    m = migration(1, steps=({"step": "taint"}, {"step": "notify-edge"}, {"step": "find-pods"}),
                  pods={"default/trainer": {"state": "evicted", "target": "near"},
                        "default/notebook": {"state": "deleted", "target": "west"}})
    tainted = [knode("bad", taints=[{"key": TAINT_KEY, "value": "GPU-0", "effect": "NoSchedule"}]), *CLUSTER_NODES[1:]]
    pods = [p for p in PODS if p["metadata"]["name"] != "notebook"]  # the evicted trainer is still there
    assert kinds(plan(m, pods, tainted)) == [("complete", None, None)]


def test_a_pod_in_backoff_waits_and_holds_completion() -> None:
    m = migration(1, steps=({"step": "taint"}, {"step": "notify-edge"}, {"step": "find-pods"}),
                  pods={"default/trainer": {"state": "waiting", "attempts": 1, "next_at": NOW + 2, "target": "near"},
                        "default/notebook": {"state": "deleted"}})
    tainted = [knode("bad", taints=[{"key": TAINT_KEY, "value": "GPU-0", "effect": "NoSchedule"}]), *CLUSTER_NODES[1:]]
    pods = [p for p in PODS if p["metadata"]["name"] != "notebook"]
    assert kinds(plan(m, pods, tainted)) == []
    assert kinds(plan(m, pods, tainted, now=NOW + 3)) == [("evict", "default/trainer", "near")]


def test_a_bare_pod_without_a_target_waits_for_one() -> None:
    nodes = [n for n in CLUSTER_NODES if n["metadata"]["name"] != "west"]
    steps = plan(migration(1), nodes=nodes)
    assert ("no-target", "default/notebook", None) in kinds(steps)
    assert "nodeSelector pool=west not met" in next(s for s in steps if s.kind == "target" and s.pod == "default/notebook").detail
    assert not any(s.kind == "complete" for s in steps)


def test_a_recreated_bare_pod_only_has_its_original_deleted() -> None:
    m = migration(1, steps=({"step": "taint"}, {"step": "notify-edge"}, {"step": "find-pods"}),
                  pods={"default/trainer": {"state": "evicted"},
                        "default/notebook": {"state": "recreated", "new_name": "notebook-m1", "target": "west"}})
    assert kinds(plan(m)[1:]) == [("delete-original", "default/notebook", None)]


def test_a_new_pod_with_the_same_name_is_a_different_pod() -> None:
    m = migration(1, steps=({"step": "taint"}, {"step": "notify-edge"}, {"step": "find-pods"}),
                  pods={"default/trainer": {"state": "evicted", "uid": "old"}, "default/notebook": {"state": "deleted"}})
    pods = [kpod("trainer", cls="training", uid="new")]  # e.g. a StatefulSet pod recreated on the node
    assert ("evict", "default/trainer", "near") in kinds(plan(m, pods))
    assert ("evict", "default/trainer", "near") not in kinds(plan(m, [kpod("trainer", uid="old")]))


def test_api_errors_back_off_then_give_the_pod_up_and_fail_the_migration() -> None:
    m = migration(1, steps=({"step": "taint"}, {"step": "notify-edge"}, {"step": "find-pods"}),
                  pods={"default/notebook": {"state": "deleted"}})
    evict = Step("evict", pod="default/trainer")
    for attempt in range(1, MAX_POD_ERRORS):
        m = record_error(m, evict, "500 Internal Server Error", NOW)
        assert m.pods["default/trainer"]["state"] == "waiting" and m.steps[-1]["outcome"] == "error"
        assert m.pods["default/trainer"]["next_at"] == NOW + min(60, 2 * 2 ** (attempt - 1))
    m = record_error(m, evict, "500 Internal Server Error", NOW)
    assert m.pods["default/trainer"]["state"] == "failed" and m.steps[-1]["outcome"] == "failed"
    tainted = [knode("bad", taints=[{"key": TAINT_KEY, "value": "GPU-0", "effect": "NoSchedule"}]), *CLUSTER_NODES[1:]]
    [complete] = plan(m, [kpod("trainer", cls="training")], tainted)
    assert complete.kind == "complete" and complete.body == ["default/trainer"]  # -> state failed


def test_a_repeated_step_is_recorded_once() -> None:
    m = migration(1)
    for _ in range(3):
        m = m.step("recreate", "retry", "no node fits", NOW, pod="default/x")
    assert len(m.steps) == 1
    m = m.step("recreate", "retry", "no node fits", NOW, pod="default/y")
    assert len(m.steps) == 2


def test_finished_terminating_and_daemonset_pods_are_left_alone() -> None:
    finished = kpod("done", phase="Succeeded")
    ds = kpod("plugin")
    ds["metadata"]["ownerReferences"][0]["kind"] = "DaemonSet"
    going = kpod("going")
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    steps = plan(migration(1), [finished, ds, going])
    assert [s.kind for s in steps] == ["taint", "notify-edge", "find-pods", "complete"]
    assert "DaemonSet" in steps[2].detail


def test_candidates_count_gpus_of_bound_pods_and_mark_offline_nodes() -> None:
    w = replace(FLEET, nodes={**FLEET.nodes, "far": (False, NOW - 10)})
    by_name = {c.name: c for c in candidates(CLUSTER_NODES, [*PODS, kpod("big", node="near", gpus=2)], w)}
    assert by_name["near"].gpus_requested == 2 and by_name["bad"].gpus_requested == 2
    assert not by_name["far"].online
    assert by_name["bad"].gpus[0].healthy is False
    assert PodNeeds  # the scorer's input type, built by pod_needs in the planner


# ---- the manager on a real fleet store, SQLite and PostgreSQL (no cluster) ------------------


def edge_message(body: WireModel, kind: Kind, seq: int | None, ts: float) -> Incoming:
    envelope = make_envelope("edge-a", body, kind, seq).model_copy(update={"ts": ts})
    return Incoming(envelope=envelope, body=envelope.parsed_body(), received_at=ts)


def edge_status(health: Health, ts: float) -> Incoming:
    gpus = [GpuSummary(index=i, uuid=f"GPU-{i}", name=H100, health=health if i == 0 else Health.HEALTHY)
            for i in range(2)]
    return edge_message(StatusBody(state="online", gpus=gpus, outbox_epoch="e1"), Kind.STATUS, None, ts)


def test_the_manager_records_consumes_and_cancels_on_a_real_store(db_url: str) -> None:
    from cloud.commands import EdgeCommands
    from cloud.config import CloudSettings
    from cloud.services import BatchBus
    from cloud.store import FleetStore

    def link_down(topic: str, payload: bytes, *, retain: bool = False) -> bool:
        return False  # no broker in this test: the outbox keeps commands for later

    async def scenario() -> list[dict[str, Any]]:
        settings = CloudSettings(db=db_url, no_kube=True, migration_grace=1)
        store = FleetStore(settings.db, history_resolution_s=settings.history_resolution)
        batches = BatchBus()
        commands = EdgeCommands(settings=settings, store=store, publish=link_down, batches=batches)
        manager = MigrationManager(settings=settings, store=store, kube=None, commands=commands,
                                   batches=batches)
        t0 = time.time()
        try:
            store.ingest([
                edge_status(Health.UNHEALTHY, t0),
                edge_message(HealthBody(level="gpu", gpu_index=0, gpu_uuid="GPU-0", previous=Health.HEALTHY,
                                        current=Health.UNHEALTHY, reasons=["xid 79"]), Kind.HEALTH, 1, t0),
                edge_message(MigrationRequestBody(gpu_index=0, gpu_uuid="GPU-0", trigger="xid", reason="xid 79"),
                             Kind.MIGRATION_REQUEST, 2, t0),
            ])
            await manager.tick()
            await manager.tick()  # the consumed request is not taken again
            [m] = manager.migrations()
            assert (m["state"], m["trigger"], m["subjects"]) == ("needs-cluster", "edge-request", ["GPU-0"])
            assert len(m["steps"]) == 1
            store.ingest([
                edge_message(HealthBody(level="gpu", gpu_index=0, gpu_uuid="GPU-0", previous=Health.UNHEALTHY,
                                        current=Health.HEALTHY), Kind.HEALTH, 3, t0 + 1),
                edge_status(Health.HEALTHY, t0 + 1),
            ])
            await manager.tick()
            assert manager.migration(m["id"])["state"] == "cancelled"  # healthy before anything moved
            return manager.migrations(state="cancelled")
        finally:
            store.close()

    assert len(asyncio.run(scenario())) == 1


# ---- the whole path: real edges, broker, controller; Kubernetes emulated --------------------

needs_broker = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (scripts/test.sh)")
GPU_LABELS = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "2"}


def evictions(kube: KubeEmulator, pod: str) -> int:
    requests = kube.on_loop(lambda: list(kube.emulator))  # every request the emulator served
    return sum(1 for r in requests if r.method == "POST" and r.url.path.endswith(f"/pods/{pod}/eviction"))


def node_taints(kube: KubeEmulator, name: str) -> list[dict[str, Any]]:
    node = kube.core.read_node(name)
    return [kube.api.sanitize_for_serialization(t) for t in (node.spec.taints if node.spec else None) or []]


def pod_names(kube: KubeEmulator) -> set[str]:
    return {p.metadata.name for p in kube.core.list_namespaced_pod("default").items}


def the_migration(cloud: CloudProcess, node: str) -> dict[str, Any] | None:
    rows = [m for m in cloud.get(f"/api/v1/migrations?node={node}")["migrations"]]
    return rows[0] if rows else None


def wait_state(cloud: CloudProcess, node: str, state: str, timeout: float) -> dict[str, Any]:
    """The node's newest migration once it reaches `state`; on timeout, fail showing its steps."""
    seen: list[Any] = [None]

    def check() -> dict[str, Any] | None:
        seen[0] = the_migration(cloud, node)
        return seen[0] if seen[0] and seen[0]["state"] == state else None

    try:
        return wait_for(check, timeout=timeout, what=f"migration of {node} {state}")
    except AssertionError:
        m = seen[0] or {}
        steps = "\n".join(f"  {s['step']} {s['outcome']} {s.get('pod', '')}: {s['detail'][:300]}"
                          for s in m.get("steps", []))
        raise AssertionError(f"migration of {node} not {state} after {timeout} s: state {m.get('state')}, "
                             f"pods {m.get('pods')}\n{steps}\n--- controller log:\n{cloud.log()[-3000:]}") from None


def has_step(m: dict[str, Any] | None, step: str, outcome: str, pod: str | None = None) -> bool:
    return bool(m) and any(s["step"] == step and s["outcome"] == outcome and (pod is None or s.get("pod") == pod)
                           for s in m["steps"])


@needs_broker
@pytest.mark.slow
def test_xid_moves_gpu_work_off_the_node_across_a_controller_restart(
    tmp_path: Path, broker: Mosquitto, kube: KubeEmulator
) -> None:
    for name, zone in (("edge-a", "z1"), ("edge-b", "z1"), ("edge-c", "z2")):
        kube.add_node(name, {**GPU_LABELS, "topology.kubernetes.io/zone": zone, "kubernetes.io/hostname": name})
    kube.add_pod("trainer", "edge-a", labels={"kgpu.io/workload-class": "training"})  # owned by a ReplicaSet
    kube.add_pod("notebook", "edge-a", owner_kind=None, labels={"kgpu.io/workload-class": "inference"},
                 node_selector={"pool": "west"})  # bare; no node has the label yet
    kube.add_pod("web", "edge-a", gpus=0)  # no GPU: stays
    kube.add_pod("full", "edge-c", gpus=2)  # edge-c has no GPU free
    eviction = "post /api/v1/namespaces/default/pods/trainer/eviction"
    kube.on_loop(lambda: kube.emulator[eviction][:1] << 429 << {"kind": "Status", "reason": "TooManyRequests",
                                                                  "message": "Cannot evict pod as it would violate "
                                                                             "the pod's disruption budget."})
    kube.react(eviction, 201, {"kind": "Status", "status": "Success"})

    edges = {name: EdgeProcess(tmp_path / name, node=name, mqtt=broker.url,
                               config={"health_quiet_period": 25 if name == "edge-a" else 300, "status_interval": 2})
             for name in ("edge-a", "edge-b", "edge-c")}
    cloud = CloudProcess(tmp_path / "cloud", broker.url, kubeconfig=kube.kubeconfig,
                         env={"KGPU_MIGRATION_GRACE": "1", "KGPU_LEASE_DURATION": "4", "KGPU_LEASE_RENEW_INTERVAL": "1"})
    try:
        for edge in edges.values():
            edge.start()
        cloud.start()
        wait_for(lambda: all((n := cloud.node_state(name)) and n["online"] and len(n["gpus"]) == 2
                             and all(g["sample"] for g in n["gpus"]) for name in edges),
                 timeout=30, what="three nodes online with GPU samples")
        bad = edges["edge-a"].gpu(0)["inventory"]
        assert bad["name"].startswith("NVIDIA H100")

        edges["edge-a"].inject(0, xid=79)

        # 1) no node taint (GPU 1 is still healthy: the edge fences GPU 0 alone), 2) both GPU pods
        # found (no pod map, or NVML shows no process of them on any GPU: either may hold GPU 0;
        # tests/test_gpu_level_migration.py has the pods per GPU), 3) targets, 4) the eviction
        # refused by the PDB, then accepted
        m = wait_for(lambda: (x := the_migration(cloud, "edge-a")) and has_step(x, "evict", "evicted") and x,
                     timeout=30, what="the trainer evicted after a PDB refusal")
        assert not any(t["key"] == "kgpu.io/gpu-unhealthy" for t in node_taints(kube, "edge-a"))
        skipped = next(s for s in m["steps"] if s["step"] == "taint")
        assert skipped["outcome"] == "skipped" and "1 of 2 GPU(s) still healthy" in skipped["detail"]
        found = next(s for s in m["steps"] if s["step"] == "find-pods")
        assert "2 GPU pod(s)" in found["detail"] and "default/notebook, default/trainer" in found["detail"]
        assert "pod_map_source unknown" in found["detail"] or "not seen on any GPU per processes" in found["detail"]
        assert m["trigger"] == "edge-request" and m["state"] == "in-progress" and m["gpu_uuid"] == bad["uuid"]
        assert has_step(m, "evict", "retry", "default/trainer")  # the 429 was a retry, not a failure
        target = next(s for s in m["steps"] if s["step"] == "target" and s["pod"] == "default/trainer")
        assert target["target"] == "edge-b"  # same zone; edge-c is full
        assert "hottest GPU" in target["detail"] and "power headroom" in target["detail"]  # scored on its samples
        assert has_step(m, "recreate", "retry", "default/notebook")  # nothing fits pool=west yet
        assert has_step(m, "notify-edge", "sent")
        assert evictions(kube, "trainer") == 2

        # restart in the middle: kill -9, then start again on the same database
        cloud.kill9()
        cloud.start()
        restarted_at = time.time()
        wait_for(lambda: the_migration(cloud, "edge-a")["updated_at"] > restarted_at, timeout=20,
                 what="the restarted controller to go on with the migration")

        # 5) a node gets the label: the bare pod is recreated there with node affinity
        kube.core.patch_node("edge-b", {"metadata": {"labels": {"pool": "west"}}})
        m = wait_state(cloud, "edge-a", "completed", timeout=30)
        moved = {s["pod"] for s in m["steps"] if (s["step"], s["outcome"]) in {("evict", "evicted"), ("recreate", "created")}}
        record("controller kill -9 mid-migration", 1,  # the summary table of tests/test_faults.py
               Tally(written=2, received=len(moved), lost=2 - len(moved), duplicated=evictions(kube, "trainer") - 2),
               "units: pods to move; duplicated: evictions beyond the refused one and the accepted one")
        names = pod_names(kube)
        assert "notebook" not in names and f"notebook-m{m['id']}" in names and "web" in names
        copy = kube.api.sanitize_for_serialization(kube.core.read_namespaced_pod(f"notebook-m{m['id']}", "default"))
        assert "nodeName" not in copy["spec"]
        terms = copy["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"][0]["matchExpressions"] == [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": ["edge-b"]}]
        assert evictions(kube, "trainer") == 2  # never evicted twice, restart or not
        steps = [(s["step"], s["outcome"]) for s in m["steps"]]
        for expected in [("trigger", "recorded"), ("start", "started"), ("taint", "skipped"), ("find-pods", "found"),
                         ("target", "chosen"), ("evict", "retry"), ("evict", "evicted"), ("recreate", "created"),
                         ("delete-original", "deleted"), ("complete", "completed")]:
            assert expected in steps, expected
        assert cloud.get(f"/api/v1/migrations/{m['id']}")["steps"] == m["steps"]
        kube.core.delete_namespaced_pod("trainer", "default")  # its ReplicaSet would, after the eviction

        # 6) the GPU is healthy again after its quiet period: recovered (no taint to remove)
        m = wait_state(cloud, "edge-a", "recovered", timeout=40)  # the GPU healthy again
        assert not any(t["key"] == "kgpu.io/gpu-unhealthy" for t in node_taints(kube, "edge-a"))
        assert has_step(m, "untaint", "absent")
        status, body = cloud.request("GET", "/api/v1/migrations/99999")
        assert status == 404 and body["error"] == "no such migration"
    finally:
        for process in [*edges.values(), cloud]:
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()


@needs_broker
@pytest.mark.slow
def test_without_a_cluster_a_trigger_is_recorded_as_needs_cluster(tmp_path: Path, broker: Mosquitto) -> None:
    edge = EdgeProcess(tmp_path / "edge", node="edge-a", mqtt=broker.url, config={"status_interval": 2})
    cloud = CloudProcess(tmp_path / "cloud", broker.url, env={"KGPU_MIGRATION_GRACE": "1"})
    try:
        edge.start()
        cloud.start()
        wait_for(lambda: (n := cloud.node_state("edge-a")) and n["online"], timeout=20, what="node online")
        edge.inject(1, xid=79)
        body = wait_for(lambda: (b := cloud.get("/api/v1/migrations")) and b["migrations"] and b, timeout=20,
                        what="a migration recorded")
        assert body["cluster"] is False and "--no-kube" in body["detail"]
        [m] = body["migrations"]
        assert (m["state"], m["node"], m["gpu_uuid"]) == ("needs-cluster", "edge-a", edge.gpu(1)["inventory"]["uuid"])
        assert m["steps"][0]["outcome"] == "needs-cluster"
        time.sleep(2)  # the grace trigger for the same GPU joins it silently
        assert len(cloud.get("/api/v1/migrations")["migrations"]) == 1
        one = cloud.get(f"/api/v1/migrations/{m['id']}")
        assert one["state"] == "needs-cluster" and one["cluster"] is False
    finally:
        for process in (edge, cloud):
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()
