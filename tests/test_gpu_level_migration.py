"""A GPU fault moves only that GPU's pods and fences only that GPU (issue 14): the pure rules of
cloud/migration/ (which pods, whether the node is tainted, a HOLDING migration that gains a
subject, recovery waiting for the remediation ladder), then the whole path with real processes:
a 4-GPU simulated edge that maps its GPU processes to pods, mosquitto, the controller, kmock."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from cloud.migration.manifests import TAINT_KEY, candidates
from cloud.migration.model import (
    NODE_SUBJECT,
    OFFLINE_SUBJECT,
    GpuView,
    Migration,
    RequestEvent,
    Rules,
    World,
    node_level,
)
from cloud.migration.placement import gpu_model
from cloud.migration.planner import plan_pods, pod_scope, taint_reason
from cloud.migration.triggers import find_triggers, reconcile, to_recover
from kgpu.lab.broker import mosquitto_binary
from kgpu.lab.manifests import gpu_pod_manifest
from kgpu.lab.processes import wait_for
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess
from tests.helpers.pod_list import PodListServer

if TYPE_CHECKING:
    from kgpu.lab.broker import Mosquitto
    from kgpu.lab.kube import KubeEmulator

NOW = 1_800_000_000.0
RULES = Rules(grace_s=60, offline_threshold_s=300, max_concurrent=2, cooldown_s=600, has_kube=True)
H100 = "NVIDIA H100 80GB HBM3"


# ---- builders -------------------------------------------------------------------------------


def gpu(index: int, health: str = "healthy", pods: tuple[str, ...] = (), *, node: str = "bad",
        remediation: str | None = None) -> GpuView:
    return GpuView(node=node, uuid=f"GPU-{index}", index=index, name=H100, health=health,
                   sample={"temperature_c": 50.0, "power_w": 200.0, "power_limit_w": 700.0},
                   last_event=(NOW - 5, health), pods=pods, remediation=remediation)


# GPU 1 fails; its pod "a" also spans GPU 3 (a 2-GPU pod); "b" is on GPU 2, "idle" on no GPU
# (it has not started GPU work: NVML lists no process of it)
FOUR = (gpu(0), gpu(1, "unhealthy", ("default/a",)), gpu(2, pods=("default/b",)), gpu(3, pods=("default/a",)))


def four_gpus(source: str | None = "pod-resources", *gpus: GpuView) -> World:
    gpus = gpus or FOUR
    return World(nodes={"bad": (True, NOW), "near": (True, NOW)},
                 gpus={"bad": gpus, "near": (gpu(0, node="near"), gpu(1, node="near"))},
                 pod_sources={"bad": source} if source else {})


def migration(subjects: tuple[str, ...] = ("GPU-1",), state: str = "in-progress", **kw: Any) -> Migration:
    return Migration(id=1, node="bad", gpu_uuid=next((s for s in subjects if s.startswith("GPU")), None),
                     subjects=subjects, trigger="edge-request", reason="xid 79", state=state,
                     created_at=NOW - 100, updated_at=NOW - 100, started_at=NOW - 100, **kw)


def kpod(name: str, node: str = "bad", gpus: int = 1) -> dict[str, Any]:
    return gpu_pod_manifest(name, node, gpus=gpus, owner=("ReplicaSet", f"{name}-rs", f"uid-{name}-rs"))


def knode(name: str, taints: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "z1", "kubernetes.io/hostname": name}},
            "spec": {"taints": taints} if taints else {}}


PODS = [kpod("a", gpus=2), kpod("b"), kpod("idle"), kpod("web", gpus=0)]
NODES = [knode("bad"), knode("near")]


def plan(m: Migration, w: World, nodes: list[dict[str, Any]] = NODES) -> list[Any]:
    cands = candidates(nodes, PODS, w)
    return plan_pods(m, nodes[0], PODS, cands, "z1", gpu_model(H100), NOW, gpus=w.gpus.get("bad", ()),
                     pod_map_source=w.pod_sources.get("bad"))


def step(steps: list[Any], kind: str) -> Any:
    return next(s for s in steps if s.kind == kind)


def evicted(steps: list[Any]) -> list[str]:
    return sorted(s.pod for s in steps if s.kind == "evict")


# ---- which pods move --------------------------------------------------------------------------


def test_pod_resources_moves_only_the_failing_gpus_pods() -> None:
    steps = plan(migration(), four_gpus("pod-resources"))
    assert evicted(steps) == ["default/a"]  # on the failing GPU (and a healthy one): it moves
    found = step(steps, "find-pods")
    assert found.body == {"pods": ["default/a"], "subjects": ["GPU-1"]}
    assert "1 GPU pod(s) on GPU 1 (GPU-1) per pod-resources: default/a;" in found.detail
    assert "default/b (on healthy GPU 2)" in found.detail  # never moved, and the record says why
    # pod-resources lists every allocated device: a GPU pod it lists nowhere holds none of ours
    assert "default/idle (holds no failing GPU per pod-resources)" in found.detail
    assert "default/web" not in found.detail  # no GPU request: not GPU work at all


def test_processes_moves_the_failing_gpus_pods_and_those_seen_on_no_gpu() -> None:
    """NVML's processes show only pods running GPU work now: a GPU pod seen on no GPU may hold the
    failing one, so it moves; a pod seen on another GPU never does."""
    steps = plan(migration(), four_gpus("processes"))
    assert evicted(steps) == ["default/a", "default/idle"]
    found = step(steps, "find-pods")
    assert "2 GPU pod(s) on GPU 1 (GPU-1) per processes: default/a, default/idle" in found.detail
    assert "not seen on any GPU per processes (they may hold a failing one): default/idle" in found.detail
    assert "default/b (on healthy GPU 2)" in found.detail


def test_an_edge_without_a_pod_list_names_pods_by_uid_and_they_are_matched() -> None:
    """Without a pod list the edge names a pod "unknown/<pod uid>" (edge/pods.py): matched by uid."""
    pods = [{**p, "metadata": {**p["metadata"], "uid": f"{p['metadata']['name']}-0000-uid"}} for p in PODS]
    w = four_gpus("processes", gpu(0), gpu(1, "unhealthy", ("unknown/a-0000-uid",)), gpu(2, pods=("unknown/b-0000-uid",)),
                  gpu(3))
    steps = plan_pods(migration(), NODES[0], pods, candidates(NODES, pods, w), "z1", gpu_model(H100), NOW,
                      gpus=w.gpus["bad"], pod_map_source="processes")
    assert "default/a" in evicted(steps) and "default/b" not in evicted(steps)
    assert "default/b (on healthy GPU 2)" in step(steps, "find-pods").detail


def test_a_pod_on_a_gpu_outside_the_migration_is_not_called_healthy() -> None:
    w = four_gpus("pod-resources", *FOUR[:2], gpu(2, "unhealthy", ("default/b",)), FOUR[3])
    found = step(plan(migration(), w), "find-pods")
    assert "default/b (on GPU 2 (not a subject of this migration))" in found.detail
    assert evicted(plan(migration(), w)) == ["default/a"]  # its own migration subject, once past the grace


def test_an_unknown_pod_map_moves_every_gpu_pod_of_the_node_and_says_why() -> None:
    for w in (four_gpus(None), four_gpus("something-new")):
        steps = plan(migration(), w)
        assert evicted(steps) == ["default/a", "default/b", "default/idle"]
        assert "every GPU pod of the node" in step(steps, "find-pods").detail
        assert "pod_map_source unknown" in step(steps, "find-pods").detail


def test_a_subject_gpu_missing_from_the_status_moves_every_gpu_pod() -> None:
    steps = plan(migration(("GPU-9",)), four_gpus())
    assert evicted(steps) == ["default/a", "default/b", "default/idle"]
    assert "GPU GPU-9 is not in its newest status" in step(steps, "find-pods").detail


def test_a_pod_already_being_moved_stays_in_the_migration() -> None:
    m = migration(pods={"default/b": {"state": "waiting", "attempts": 1, "next_at": NOW - 1}})
    assert evicted(plan(m, four_gpus())) == ["default/a", "default/b"]  # begun before the listing came


def test_node_level_triggers_move_everything_and_taint() -> None:
    for subjects in ((), (OFFLINE_SUBJECT,), ("GPU-1", NODE_SUBJECT)):
        assert node_level(subjects)
        scope = pod_scope(migration(subjects), FOUR, "pod-resources")
        assert scope.pods is None and "node-level" in scope.where
        assert taint_reason(migration(subjects), FOUR)[0] == "a node-level trigger"
    steps = plan(migration(("GPU-1", NODE_SUBJECT)), four_gpus())
    assert evicted(steps) == ["default/a", "default/b", "default/idle"]
    assert step(steps, "taint").body is not None and "node-level" in step(steps, "taint").detail


# ---- the node taint ---------------------------------------------------------------------------


def test_the_node_is_not_tainted_while_a_healthy_gpu_is_left() -> None:
    steps = plan(migration(), four_gpus())
    taint = step(steps, "taint")
    assert taint.body is None  # recorded as skipped by the manager
    assert "3 of 4 GPU(s) still healthy (0, 2, 3)" in taint.detail and "device plugin fences GPU-1" in taint.detail
    recorded = migration(steps=({"step": "taint", "outcome": "skipped", "detail": taint.detail},))
    assert not any(s.kind == "taint" for s in plan(recorded, four_gpus()))  # once, not on every scan


@pytest.mark.parametrize("others", [
    (gpu(0, "unhealthy"), gpu(2, "lost"), gpu(3, "unhealthy")),
    (gpu(0, remediation="resetting"), gpu(2, "unhealthy"), gpu(3, remediation="held: 2 resets failed")),
])
def test_the_node_is_tainted_when_no_healthy_gpu_is_left(others: tuple[GpuView, ...]) -> None:
    w = four_gpus("pod-resources", FOUR[1], *others)
    taint = step(plan(migration(), w), "taint")
    assert taint.body == [{"key": TAINT_KEY, "value": "GPU-1", "effect": "NoSchedule"}]
    assert "no healthy GPU left on the node" in taint.detail
    # a skipped taint recorded earlier does not stop it: the node has no healthy GPU now
    recorded = migration(steps=({"step": "taint", "outcome": "skipped", "detail": "3 of 4 ..."},))
    assert step(plan(recorded, w), "taint").body is not None


def test_a_tainted_node_is_not_tainted_twice() -> None:
    w = four_gpus("pod-resources", FOUR[1], gpu(0, "lost"), gpu(2, "lost"), gpu(3, "lost"))
    ours = [{"key": TAINT_KEY, "value": "GPU-1", "effect": "NoSchedule"}]
    assert not any(s.kind == "taint" for s in plan(migration(), w, [knode("bad", ours), NODES[1]]))


# ---- merged triggers ----------------------------------------------------------------------------


def test_a_finished_migration_gaining_a_subject_acts_again() -> None:
    done = migration(state="completed", steps=(
        {"step": "taint", "outcome": "skipped", "detail": "3 of 4 ..."},
        {"step": "notify-edge", "outcome": "sent", "detail": "", "gpus": ["GPU-1"]},
        {"step": "find-pods", "outcome": "found", "detail": "", "subjects": ["GPU-1"]}),
        pods={"default/a": {"state": "evicted"}})
    # GPU 2 fails too, past the grace; GPU 0 and 3 are being remediated: no GPU left in service
    gpus = (FOUR[1], replace(gpu(2, "unhealthy", ("default/b",)), unhealthy_since=NOW - 100),
            gpu(0, remediation="validating"), gpu(3, "unhealthy", ("default/a",)))
    w = four_gpus("pod-resources", *gpus)
    new, changed = reconcile(w, [done], {}, find_triggers(w, RULES, NOW), RULES, NOW)
    assert new == []
    [m] = changed
    assert m.state == "in-progress" and m.subjects == ("GPU-1", "GPU-2")
    assert [(s["step"], s["outcome"]) for s in m.steps[-2:]] == [("trigger", "merged"), ("reopen", "in-progress")]
    steps = plan(m, w)
    assert step(steps, "taint").body is not None  # no healthy GPU left now
    assert step(steps, "notify-edge").body == ["GPU-2"]  # the edge hears of the new GPU only
    assert step(steps, "find-pods").body == {"pods": ["default/a", "default/b"], "subjects": ["GPU-1", "GPU-2"]}
    assert evicted(steps) == ["default/b"]  # "a" was evicted already: never twice


def test_a_node_level_request_makes_a_gpu_migration_node_level_and_a_gpu_keeps_a_node_one() -> None:
    w = four_gpus()
    node_request = RequestEvent(7, "bad", NOW - 1, NOW - 1, None, "driver", "the driver stopped answering")
    _, [m] = reconcile(replace(w, requests=(node_request,)), [migration()], {},
                       find_triggers(replace(w, requests=(node_request,)), RULES, NOW), RULES, NOW)
    assert m.subjects == ("GPU-1", NODE_SUBJECT) and node_level(m.subjects) and m.consumed == (7,)
    node_wide = migration(subjects=(), state="pending")
    gpu_request = RequestEvent(8, "bad", NOW - 1, NOW - 1, "GPU-1", "xid", "xid 79")
    _, changed = reconcile(replace(w, requests=(gpu_request,)), [node_wide], {},
                           find_triggers(replace(w, requests=(gpu_request,)), RULES, NOW), RULES, NOW)
    assert changed[0].subjects == (NODE_SUBJECT, "GPU-1") and node_level(changed[0].subjects)


# ---- recovery -----------------------------------------------------------------------------------


def test_recovery_waits_until_the_remediation_ladder_is_done() -> None:
    done = migration(state="completed")
    for stage in ("fenced", "resetting", "validating"):
        back = four_gpus("pod-resources", FOUR[0], replace(FOUR[1], health="healthy", last_event=(NOW, "healthy"),
                                                           remediation=stage))
        assert to_recover(back, [done]) == [], stage
        assert not next(g for c in candidates(NODES, PODS, back) if c.name == "bad"
                        for g in c.gpus if g.uuid == "GPU-1").healthy  # no placement onto it either
    back = four_gpus("pod-resources", FOUR[0], replace(FOUR[1], health="healthy", last_event=(NOW, "healthy")))
    assert to_recover(back, [done]) == [done]
    # a node-level subject waits for every GPU of the node
    node_wide = migration(subjects=("GPU-1", NODE_SUBJECT), state="completed")
    assert to_recover(four_gpus("pod-resources", back.gpus["bad"][1], gpu(0, remediation="draining")),
                      [node_wide]) == []
    assert to_recover(back, [node_wide]) == [node_wide]


# ---- the whole path: a 4-GPU edge maps its processes to pods ------------------------------------

needs_broker = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (scripts/test.sh)")
LABELS = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "topology.kubernetes.io/zone": "z1"}
# pod name -> (its uid, a container id, the pid of its GPU process, the GPU it runs on)
WORK = {"infer-1": ("11111111-aaaa-bbbb-cccc-000000000001", "a" * 64, 4101, 1),
        "train-2": ("22222222-aaaa-bbbb-cccc-000000000002", "b" * 64, 4202, 2),
        "serve-3": ("33333333-aaaa-bbbb-cccc-000000000003", "c" * 64, 4303, 3)}


def fake_proc(root: Path) -> None:
    """A /proc where each pod's GPU process sits in its pod's cgroup (cgroup v2, systemd, containerd)."""
    for uid, cid, pid, _gpu in WORK.values():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cgroup").write_text(
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice/"
            f"cri-containerd-{cid}.scope\n")


def pod_list_body() -> bytes:
    """The node's pod list (what edgecore's MetaServer answers): names for the uids and containers."""
    return json.dumps({"kind": "PodList", "items": [
        {"metadata": {"name": name, "namespace": "ml", "uid": uid},
         "status": {"phase": "Running", "containerStatuses": [{"name": "main", "containerID": f"containerd://{cid}"}]}}
        for name, (uid, cid, _pid, _gpu) in WORK.items()]}).encode()


def cloud_pods(cloud: CloudProcess, node: str, index: int) -> list[str]:
    """The pods the controller's store holds for one GPU (from the newest status)."""
    path = cloud.db_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        row = conn.execute('SELECT pods FROM gpus WHERE node = ? AND "index" = ?', (node, index)).fetchone()
    return json.loads(row[0]) if row and row[0] else []


def evictions(kube: KubeEmulator, pod: str) -> int:
    requests = kube.on_loop(lambda: list(kube.emulator))
    return sum(1 for r in requests if r.method == "POST" and r.url.path.endswith(f"/pods/{pod}/eviction"))


@needs_broker
@pytest.mark.slow
def test_an_xid_on_one_gpu_of_four_moves_only_its_pod(tmp_path: Path, broker: Mosquitto, kube: KubeEmulator) -> None:
    for name in ("edge-a", "edge-b"):
        kube.add_node(name, {**LABELS, "kubernetes.io/hostname": name})
    for name, (uid, _cid, _pid, _gpu) in WORK.items():
        kube.core.create_namespaced_pod("ml", gpu_pod_manifest(
            name, "edge-a", namespace="ml", uid=uid, owner=("ReplicaSet", f"{name}-rs", f"uid-{name}-rs")))
    kube.add_pod("idle-0", "edge-a", namespace="ml")  # a GPU pod with no GPU process (yet): on which GPU?
    fake_proc(tmp_path / "proc")
    with PodListServer() as pod_list:
        pod_list.body = pod_list_body()
        edge_a = EdgeProcess(tmp_path / "edge-a", node="edge-a", gpus=4, mqtt=broker.url, config={
            "status_interval": 2, "proc_root": str(tmp_path / "proc"), "pod_list_url": pod_list.url})
        edge_b = EdgeProcess(tmp_path / "edge-b", node="edge-b", gpus=2, mqtt=broker.url, config={"status_interval": 2})
        cloud = CloudProcess(tmp_path / "cloud", broker.url, kubeconfig=kube.kubeconfig,
                             env={"KGPU_MIGRATION_GRACE": "1"})
        try:
            for process in (edge_a, edge_b, cloud):
                process.start()
            for _name, (_uid, _cid, pid, index) in WORK.items():
                edge_a.inject(index, processes=[{"pid": pid, "used_memory_mib": 1000, "sm_util": 60}])
            # the controller knows which pod is on which GPU before the fault
            wait_for(lambda: [cloud_pods(cloud, "edge-a", i) for i in range(4)]
                     == [[], ["ml/infer-1"], ["ml/train-2"], ["ml/serve-3"]], timeout=30,
                     what="the pods of GPUs 1 to 3 in the controller's store")
            assert (cloud.node_state("edge-a") or {}).get("pod_map_source") == "processes"
            wait_for(lambda: (n := cloud.node_state("edge-b")) and n["online"], timeout=30, what="edge-b online")
            bad = edge_a.gpu(1)["inventory"]["uuid"]

            edge_a.inject(1, xid=79)

            m = wait_for(lambda: (b := cloud.get("/api/v1/migrations?node=edge-a")["migrations"])
                         and b[0]["state"] == "completed" and b[0], timeout=60, what="the migration completed")
            assert m["subjects"] == [bad]
            found = next(s for s in m["steps"] if s["step"] == "find-pods")
            assert f"2 GPU pod(s) on GPU 1 ({bad}) per processes: ml/idle-0, ml/infer-1" in found["detail"]
            assert "not seen on any GPU per processes (they may hold a failing one): ml/idle-0" in found["detail"]
            assert "ml/serve-3 (on healthy GPU 3), ml/train-2 (on healthy GPU 2)" in found["detail"]
            taint = next(s for s in m["steps"] if s["step"] == "taint")
            assert taint["outcome"] == "skipped" and "3 of 4 GPU(s) still healthy" in taint["detail"]
            node = kube.core.read_node("edge-a")
            assert not any(t.key == TAINT_KEY for t in (node.spec.taints if node.spec else None) or [])
            assert evictions(kube, "infer-1") == 1 and evictions(kube, "idle-0") == 1
            assert evictions(kube, "train-2") == 0 and evictions(kube, "serve-3") == 0  # on healthy GPUs: stay
            assert any(s["step"] == "notify-edge" and s["outcome"] == "sent" for s in m["steps"])
        finally:
            for process in (edge_a, edge_b, cloud):
                if process.proc is not None and process.proc.poll() is None:
                    process.proc.kill()
                    process.proc.wait()
