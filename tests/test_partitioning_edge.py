"""Issue 13, the edge's side of partitioning: the pure plan (edge/partitioning/plan.py), memory
shares of time-sliced GPUs (edge/partitioning/sharing.py) and the partitioning kept in the edge
store for a restart with no cloud. The end-to-end run (a real daemon over the simulated driver, a
real broker, the kubelet stand-in) is in tests/test_partitioning_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.deviceplugin.devices import replica_id
from edge.partitioning.plan import GpuMigFacts, Step, plan_gpu, sharing_for, wanted_layout
from edge.partitioning.sharing import PodUse, ShareState, check_shares
from edge.store import open_edge_store
from shared.partitioning import MigLayout, NodePartitioning

A100 = "NVIDIA A100-SXM4-40GB"
H100 = "NVIDIA H100 80GB HBM3"
GIB = 2**30


def _partitioning(models: dict, name: str = "edge-mig", version: int = 1) -> NodePartitioning:
    return NodePartitioning.model_validate({"name": name, "version": version, "models": models})


def test_the_plan_fences_waits_for_the_drain_then_applies_and_stops_when_in_place() -> None:
    layout = MigLayout.model_validate("all-1g.5gb")
    busy = GpuMigFacts(name=A100, supported=True, enabled=False, profiles=(), processes=2)
    plan = plan_gpu(busy, layout)
    assert plan.step is Step.WAIT_DRAIN and "2 compute process" in plan.reason
    idle = GpuMigFacts(name=A100, supported=True, enabled=False, profiles=(), processes=0)
    assert plan_gpu(idle, layout).step is Step.APPLY
    done = GpuMigFacts(name=A100, supported=True, enabled=True, profiles=("1g.5gb",) * 7, processes=3)
    assert plan_gpu(done, layout).step is Step.NONE  # in place: work may run, nothing to do
    # the same profiles, fewer of them: not in place
    partial = GpuMigFacts(name=A100, supported=True, enabled=True, profiles=("1g.5gb",) * 3, processes=0)
    assert plan_gpu(partial, layout).step is Step.APPLY
    assert plan_gpu(done, MigLayout.model_validate("disabled")).step is Step.WAIT_DRAIN  # work runs on it
    idle_mig = GpuMigFacts(name=A100, supported=True, enabled=True, profiles=("1g.5gb",) * 7, processes=0)
    assert plan_gpu(idle_mig, MigLayout.model_validate("disabled")).step is Step.APPLY
    assert plan_gpu(idle, MigLayout.model_validate("disabled")).step is Step.NONE
    assert plan_gpu(idle, None).step is Step.NONE


def test_impossible_layouts_are_refused_with_the_reason_and_nothing_is_touched() -> None:
    idle = GpuMigFacts(name=A100, supported=True, enabled=False, profiles=(), processes=0)
    too_many = plan_gpu(idle, MigLayout.model_validate({"mixed": {"3g.20gb": 2, "2g.10gb": 2}}))
    assert too_many.step is Step.REFUSE and "3g.20gb" in too_many.reason
    wrong_model = plan_gpu(idle, MigLayout.model_validate("all-1g.20gb"))  # an 80 GB profile on a 40 GB A100
    assert wrong_model.step is Step.REFUSE and "1g.20gb" in wrong_model.reason
    unknown = plan_gpu(idle, MigLayout.model_validate("all-2g.99gb"))
    assert unknown.step is Step.REFUSE and "2g.99gb" in unknown.reason
    no_mig = GpuMigFacts(name="Tesla T4", supported=False, enabled=False, profiles=(), processes=0)
    refused = plan_gpu(no_mig, MigLayout.model_validate("all-1g.5gb"))
    assert refused.step is Step.REFUSE and "does not support MIG" in refused.reason
    assert plan_gpu(no_mig, MigLayout.model_validate("disabled")).step is Step.NONE


def test_each_model_gets_its_entry_or_the_wildcard_and_time_slicing_replicas() -> None:
    partitioning = _partitioning({A100: {"mig": "all-1g.5gb"},
                                  "*": {"timeSlicing": {"replicas": 4, "resourceName": "nvidia.com/gpu.shared",
                                                        "memoryEnforcement": "evict"}}})
    assert wanted_layout(partitioning, A100) == MigLayout.model_validate("all-1g.5gb")
    assert wanted_layout(partitioning, H100) is None
    sharing = sharing_for(partitioning, H100, "nvidia.com/gpu")
    assert (sharing.replicas, sharing.resource, sharing.memory_enforcement) == (4, "nvidia.com/gpu.shared", "evict")
    assert sharing_for(partitioning, A100, "nvidia.com/gpu").replicas == 1
    assert sharing_for(None, H100, "example.com/gpu").resource == "example.com/gpu"
    assert replica_id("GPU-1234", 3) == "GPU-1234::3"


def test_a_pod_over_its_memory_share_is_reported_once_per_crossing() -> None:
    total, replicas = 80 * GIB, 4  # a share is 20 GiB
    state, over, back = check_shares(ShareState(), total, replicas,
                                     [PodUse("ml", "a", 10 * GIB), PodUse("ml", "b", 25 * GIB)])
    assert [(o.pod, o.share_bytes) for o in over] == [("b", 20 * GIB)] and back == []
    state, over, back = check_shares(state, total, replicas, [PodUse("ml", "b", 26 * GIB)])
    assert over == []  # still over: not again
    state, over, back = check_shares(state, total, replicas,
                                     [PodUse("ml", "b", 5 * GIB), PodUse("ml", "c", 30 * GIB, replicas=2)])
    assert back == [("ml", "b")] and over == []  # c holds two replicas: 40 GiB share
    state, over, back = check_shares(state, total, replicas, [PodUse("ml", "b", 21 * GIB)])
    assert [o.pod for o in over] == ["b"]  # over again after coming back: reported again
    assert check_shares(state, total, 1, [PodUse("ml", "b", 79 * GIB)])[1] == []  # no sharing, no share


def test_the_partitioning_is_kept_for_a_restart_and_never_rolled_back(tmp_path: Path) -> None:
    store, _ = open_edge_store(tmp_path / "edge.db", "n1")
    first = _partitioning({"*": {"timeSlicing": {"replicas": 2}}}, version=3)
    assert store.cache_partitioning(first)
    assert not store.cache_partitioning(_partitioning({}, version=2))  # older version of the same object
    assert not store.cache_partitioning(first)
    other = _partitioning({A100: {"mig": "disabled"}}, name="other", version=1)
    assert store.cache_partitioning(other)  # another object replaces it, whatever its version
    store.close()
    reopened, _ = open_edge_store(tmp_path / "edge.db", "n1")
    assert reopened.cached_partitioning() == other
    reopened.close()


@pytest.mark.parametrize("text", ["all-", "some-1g.5gb", "", "mixed"])
def test_bad_layout_text_is_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match="layout|profile"):
        MigLayout.model_validate(text)
