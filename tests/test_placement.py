"""cloud/migration/placement.py: the pure target scorer, table-driven, plus a property test."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.migration.placement import (
    CandidateGpu,
    NodeCandidate,
    PodNeeds,
    Requirement,
    Taint,
    Toleration,
    assign,
    best,
    compatible,
    gpu_model,
    gpu_requests,
    order_pods,
    score,
    selector_terms,
    workload_class,
)

H100 = gpu_model("NVIDIA H100 80GB HBM3")
H200 = gpu_model("NVIDIA H200 141GB")
A100_40 = gpu_model("NVIDIA A100-PCIE-40GB")
A100_80 = gpu_model("NVIDIA A100-SXM4-80GB")
T4 = gpu_model("Tesla T4")


def gpus(n: int, model: Any = H100, *, healthy: bool = True, temp: float | None = 50.0,
         power: float | None = 200.0, limit: float | None = 700.0) -> tuple[CandidateGpu, ...]:
    return tuple(CandidateGpu(f"GPU-{model.token}-{i}", model, healthy, temp, power, limit) for i in range(n))


def node(name: str, *, online: bool = True, zone: str = "z1", n: int = 2, model: Any = H100,
         requested: int = 0, labels: dict[str, str] | None = None, **kw: Any) -> NodeCandidate:
    return NodeCandidate(name=name, online=online,
                         labels={"topology.kubernetes.io/zone": zone, "kubernetes.io/hostname": name, **(labels or {})},
                         gpus=kw.pop("gpu_list", None) or gpus(n, model), gpus_requested=requested, **kw)


def pod(name: str = "p", *, gpus_: int = 1, **kw: Any) -> PodNeeds:
    defaults: dict[str, Any] = {"namespace": "default", "name": name, "source_node": "bad", "gpus": gpus_,
                                "source_zone": "z1", "source_gpu": H100}
    return PodNeeds(**{**defaults, **kw})


# ---- GPU models -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "token", "family", "memory"), [
    ("NVIDIA H100 80GB HBM3", "H100", "hopper", 80),
    ("NVIDIA-H100-80GB-HBM3", "H100", "hopper", 80),  # GPU Feature Discovery label
    ("NVIDIA A100-SXM4-40GB", "A100", "a100", 40),
    ("NVIDIA A10G", "A10G", "a10", 24),
    ("Tesla T4", "T4", "T4", 16),
    ("NVIDIA L40S", "L40S", "l40", 48),
])
def test_gpu_models_parse(name: str, token: str, family: str, memory: float) -> None:
    model = gpu_model(name)
    assert (model.token, model.family, model.memory_gib) == (token, family, memory)


@pytest.mark.parametrize(("source", "target", "ok"), [
    (H100, H100, True),
    (H100, H200, True),  # same family, more memory
    (H200, H100, False),  # less memory
    (A100_40, A100_80, True),
    (A100_80, A100_40, False),
    (H100, A100_80, False),  # another family
    (None, T4, True),  # source unknown: anything goes
])
def test_compatibility(source: Any, target: Any, ok: bool) -> None:
    assert compatible(source, target)[0] is ok


# ---- constraints ----------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "values", "labels", "ok"), [
    ("In", ("a", "b"), {"k": "a"}, True),
    ("In", ("a",), {}, False),
    ("NotIn", ("a",), {"k": "b"}, True),
    ("NotIn", ("a",), {}, True),
    ("NotIn", ("a",), {"k": "a"}, False),
    ("Exists", (), {"k": ""}, True),
    ("Exists", (), {}, False),
    ("DoesNotExist", (), {}, True),
    ("DoesNotExist", (), {"k": "x"}, False),
    ("Gt", ("3",), {"k": "4"}, True),
    ("Lt", ("3",), {"k": "4"}, False),
    ("Bogus", ("3",), {"k": "3"}, False),
])
def test_requirements(op: str, values: tuple[str, ...], labels: dict[str, str], ok: bool) -> None:
    assert Requirement("k", op, values).matches(labels) is ok


def test_gpu_requests_count_requests_or_limits_and_mig() -> None:
    spec = {"containers": [
        {"resources": {"limits": {"nvidia.com/gpu": "2"}}},
        {"resources": {"requests": {"nvidia.com/gpu": 1, "cpu": "2"}}},
        {"resources": {"limits": {"nvidia.com/mig-1g.10gb": "1"}}},
    ], "initContainers": [{"resources": {"limits": {"nvidia.com/gpu": "5"}}}]}
    assert gpu_requests(spec) == (5, {"nvidia.com/mig-1g.10gb": 1})
    assert gpu_requests({"containers": [{"name": "x"}]}) == (0, {})


# ---- the scorer, table-driven ---------------------------------------------------------------

AFFINITY_POOL_A = selector_terms({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
    "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}]}}})

CASES: list[tuple[str, PodNeeds, list[NodeCandidate], str | None, dict[str, str]]] = [
    # (what, pod, candidates, expected best, {node: expected substring of a rejection reason})
    ("the failing node is never a target", pod(), [node("bad"), node("ok")], "ok", {"bad": "the failing node"}),
    ("offline nodes are rejected", pod(), [node("off", online=False), node("on")], "on", {"off": "offline"}),
    ("unhealthy GPUs do not count", pod(),
     [node("sick", gpu_list=gpus(2, healthy=False)), node("fine")], "fine", {"sick": "0 free"}),
    ("GPUs requested by bound pods are taken", pod(gpus_=2),
     [node("busy", requested=1), node("free", zone="z2")], "free", {"busy": "1 free"}),
    ("an incompatible model is rejected", pod(), [node("t4", model=T4), node("h200", model=H200, zone="z2")],
     "h200", {"t4": "not in the H100 family"}),
    ("less memory than the source is rejected", pod(source_gpu=A100_80),
     [node("small", model=A100_40), node("big", model=A100_80)], "big", {"small": "40 GiB < 80 GiB"}),
    ("nodeSelector must hold", pod(node_selector={"pool": "a"}),
     [node("nolabel"), node("pool-a", labels={"pool": "a"}, zone="z9")], "pool-a", {"nolabel": "nodeSelector pool=a"}),
    ("required affinity must hold", pod(affinity=AFFINITY_POOL_A),
     [node("b", labels={"pool": "b"}), node("a", labels={"pool": "a"})], "a", {"b": "required node affinity"}),
    ("an untolerated NoSchedule taint rejects", pod(),
     [node("tainted", taints=(Taint("dedicated", "NoSchedule", "x"),)), node("clean", zone="z2")], "clean",
     {"tainted": "taint dedicated=x:NoSchedule"}),
    ("a tolerated taint is fine", pod(tolerations=(Toleration("dedicated", "Exists"),)),
     [node("tainted", taints=(Taint("dedicated", "NoSchedule", "x"),))], "tainted", {}),
    ("a PreferNoSchedule taint does not reject", pod(),
     [node("soft", taints=(Taint("x", "PreferNoSchedule"),))], "soft", {}),
    ("cordoned nodes are rejected", pod(), [node("cordoned", unschedulable=True)], None, {"cordoned": "cordoned"}),
    ("same zone wins", pod(), [node("far", zone="z2"), node("near", zone="z1")], "near", {}),
    ("cooler GPUs win within a zone", pod(),
     [node("hot", gpu_list=gpus(2, temp=80)), node("cool", gpu_list=gpus(2, temp=40))], "cool", {}),
    ("power headroom wins when temperatures are equal", pod(),
     [node("loaded", gpu_list=gpus(2, power=650)), node("idle", gpu_list=gpus(2, power=100))], "idle", {}),
    ("the exact model beats a compatible bigger one", pod(),
     [node("h200", model=H200), node("h100", model=H100)], "h100", {}),
    ("MIG slices need free MIG capacity", pod(gpus_=0, mig={"nvidia.com/mig-1g.10gb": 2}),
     [node("few", mig_free={"nvidia.com/mig-1g.10gb": 1}), node("many", mig_free={"nvidia.com/mig-1g.10gb": 3})],
     "many", {"few": "needs 2 nvidia.com/mig-1g.10gb"}),
    ("no candidate at all", pod(), [], None, {}),
]


@pytest.mark.parametrize(("what", "needs", "cands", "expected", "rejected"), CASES, ids=[c[0] for c in CASES])
def test_score_table(what: str, needs: PodNeeds, cands: list[NodeCandidate], expected: str | None,
                     rejected: dict[str, str]) -> None:
    ranked = score(needs, cands)
    assert sorted(t.node for t in ranked) == sorted(c.name for c in cands)  # every candidate is judged
    chosen = best(needs, cands)
    assert (chosen.node if chosen else None) == expected, ranked
    by_node = {t.node: t for t in ranked}
    for name, why in rejected.items():
        assert not by_node[name].accepted
        assert any(why in reason for reason in by_node[name].reasons), by_node[name].reasons
    # accepted ones come first, best first
    flags = [t.accepted for t in ranked]
    assert flags == sorted(flags, reverse=True)
    accepted = [t.score for t in ranked if t.accepted]
    assert accepted == sorted(accepted, reverse=True)
    if chosen is not None:
        assert chosen.reasons  # an accepted target says why


def test_ties_are_broken_by_name() -> None:
    assert [t.node for t in score(pod(), [node("b"), node("a"), node("c")])] == ["a", "b", "c"]


# ---- ordering and assignment ----------------------------------------------------------------


@pytest.mark.parametrize(("labels", "priority_class", "expected"), [
    ({"kgpu.io/workload-class": "training"}, None, "training"),
    ({"kgpu.io/workload-class": "Inference"}, "batch-training", "inference"),  # the label wins
    ({}, "llm-training-high", "training"),
    ({}, "online-inference", "inference"),
    ({}, "system-cluster-critical", None),
    ({"kgpu.io/workload-class": "other"}, None, None),
])
def test_workload_class(labels: dict[str, str], priority_class: str | None, expected: str | None) -> None:
    assert workload_class(labels, priority_class) == expected


def test_order_pods_priority_then_training_then_size() -> None:
    pods = [
        pod("infer", workload_class="inference"),
        pod("plain"),
        pod("train-small", workload_class="training", gpus_=1),
        pod("train-big", workload_class="training", gpus_=4),
        pod("urgent-infer", workload_class="inference", priority=1000),
    ]
    assert [p.name for p in order_pods(pods)] == ["urgent-infer", "train-big", "train-small", "plain", "infer"]


def test_assign_takes_capacity_away_from_later_pods() -> None:
    cands = [node("near", zone="z1", n=2), node("far", zone="z2", n=2)]
    pods = [pod("infer", workload_class="inference", gpus_=1), pod("train", workload_class="training", gpus_=2)]
    placed = {a.pod.name: a.target.node if a.target else None for a in assign(pods, cands)}
    assert placed == {"train": "near", "infer": "far"}  # training moves first and takes the near node
    tight = [node("only", n=1)]
    placed = {a.pod.name: a.target.node if a.target else None for a in assign(pods, tight)}
    assert placed == {"train": None, "infer": "only"}


# ---- property: never a bad node, always the same answer -------------------------------------

names = st.sampled_from(["n0", "n1", "n2", "n3", "n4", "bad"])
models = st.sampled_from([H100, H200, A100_40, A100_80, T4])


@st.composite
def candidate(draw: st.DrawFn) -> NodeCandidate:
    name = draw(names)
    gpu_list = tuple(
        CandidateGpu(f"{name}-{i}", draw(models), draw(st.booleans()),
                     draw(st.none() | st.floats(20, 100)), draw(st.none() | st.floats(0, 700)), 700.0)
        for i in range(draw(st.integers(0, 4)))
    )
    labels = {"topology.kubernetes.io/zone": draw(st.sampled_from(["z1", "z2"]))}
    if draw(st.booleans()):
        labels["pool"] = draw(st.sampled_from(["a", "b"]))
    return NodeCandidate(name=name, online=draw(st.booleans()), labels=labels, gpus=gpu_list,
                         gpus_requested=draw(st.integers(0, 3)), unschedulable=draw(st.booleans()))


@st.composite
def needs(draw: st.DrawFn) -> PodNeeds:
    selector = draw(st.sampled_from([{}, {"pool": "a"}, {"pool": "b"}]))
    return pod(gpus_=draw(st.integers(1, 3)), node_selector=selector, source_gpu=draw(st.none() | models),
               source_zone=draw(st.sampled_from(["z1", "z2", None])))


@settings(max_examples=300, deadline=None)
@given(needs(), st.lists(candidate(), max_size=6, unique_by=lambda c: c.name))
def test_never_picks_a_bad_node_and_is_deterministic(p: PodNeeds, cands: list[NodeCandidate]) -> None:
    ranked = score(p, cands)
    assert ranked == score(p, list(reversed(cands)))  # same input, any order: same answer
    by_name = {c.name: c for c in cands}
    for target in ranked:
        if not target.accepted:
            assert target.reasons
            continue
        c = by_name[target.node]
        assert c.online and not c.unschedulable and c.name != p.source_node
        assert all(c.labels.get(k) == v for k, v in p.node_selector.items())
        usable = [g for g in c.gpus if g.healthy and compatible(p.source_gpu, g.model)[0]]
        assert len(usable) >= p.gpus
        assert len([g for g in c.gpus if g.healthy]) - c.gpus_requested >= p.gpus
    placed = [a.target.node for a in assign([p, replace(p, name="q")], cands) if a.target]
    for name in set(placed):  # two pods on one node only if it has room for both
        c = by_name[name]
        assert len([g for g in c.gpus if g.healthy]) - c.gpus_requested >= p.gpus * placed.count(name)
