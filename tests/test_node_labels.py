"""GPU Feature Discovery-style node labels: the pure rules (cloud/labels/gfd.py) against GFD's
names and formats (deploy/reference/gpu-feature-discovery/), the controller writing them on the
Nodes of a Kubernetes API server (kmock, the real kubernetes client over HTTP) from the edges'
statuses, and placement counting time-sliced and MIG devices as the scheduler does."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cloud.kube import Kube
from cloud.labels import GFD_MARKER, OWNED_ANNOTATION, NodeLabeler, label_patch, labels_for
from cloud.migration.placement import CandidateGpu, NodeCandidate, PodNeeds, assign, gpu_model, score
from cloud.services import BatchBus
from cloud.store import Incoming
from kgpu.lab.kube import KubeEmulator
from shared.protocol import GpuSummary, Health, Kind, MigDeviceSummary, StatusBody, make_envelope

A100 = "NVIDIA A100-SXM4-40GB"
GIB = 1024**3


def gpu(index: int, name: str = A100, **kw: Any) -> GpuSummary:
    defaults: dict[str, Any] = {"memory_total_bytes": 40 * GIB, "driver_version": "550.107.02", "cuda_version": "12.5",
                                "architecture": "ampere", "mig_mode": False}
    return GpuSummary(index=index, uuid=f"GPU-{index}", name=name, health=Health.HEALTHY, **{**defaults, **kw})


def mig(profile: str, gi: int, memory_mib: int) -> MigDeviceSummary:
    return MigDeviceSummary(uuid=f"MIG-{profile}-{gi}", profile=profile, gi_id=gi, memory_total_bytes=memory_mib * 2**20)


# ---- the pure rules -------------------------------------------------------------------------


def test_labels_of_plain_time_sliced_and_mig_nodes() -> None:
    assert labels_for([]) == {}
    assert labels_for([gpu(0), gpu(1)]) == {
        "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB",
        "nvidia.com/gpu.count": "2", "nvidia.com/gpu.replicas": "1", "nvidia.com/gpu.sharing-strategy": "none",
        "nvidia.com/gpu.memory": "40960", "nvidia.com/gpu.family": "ampere",
        "nvidia.com/cuda.driver-version.major": "550", "nvidia.com/cuda.driver-version.minor": "107",
        "nvidia.com/cuda.driver-version.revision": "02", "nvidia.com/cuda.driver-version.full": "550.107.02",
        "nvidia.com/cuda.driver.major": "550", "nvidia.com/cuda.driver.minor": "107", "nvidia.com/cuda.driver.rev": "02",
        "nvidia.com/cuda.runtime-version.major": "12", "nvidia.com/cuda.runtime-version.minor": "5",
        "nvidia.com/cuda.runtime-version.full": "12.5", "nvidia.com/cuda.runtime.major": "12",
        "nvidia.com/cuda.runtime.minor": "5", "nvidia.com/mig.capable": "true", "nvidia.com/mig.strategy": "none",
    }
    sliced = labels_for([gpu(0, "NVIDIA H100 80GB HBM3", replicas=4, architecture="hopper", mig_mode=None)])
    assert (sliced["nvidia.com/gpu.product"], sliced["nvidia.com/gpu.replicas"], sliced["nvidia.com/gpu.family"],
            sliced["nvidia.com/gpu.sharing-strategy"], sliced["nvidia.com/mig.capable"]) == (
        "NVIDIA-H100-80GB-HBM3-SHARED", "4", "hopper", "time-slicing", "false")

    mixed = labels_for([gpu(0, mig_mode=True, mig_devices=[mig("1g.5gb", 7, 4864), mig("1g.5gb", 8, 4864),
                                                          mig("3g.20gb", 1, 19968), mig("1g.10gb+me", 9, 9856)]),
                        gpu(1)])
    assert mixed["nvidia.com/mig.strategy"] == "mixed" and mixed["nvidia.com/gpu.count"] == "2"
    assert {k: v for k, v in mixed.items() if k.startswith("nvidia.com/mig-1g.5gb")} == {
        "nvidia.com/mig-1g.5gb.count": "2", "nvidia.com/mig-1g.5gb.memory": "4864",
        "nvidia.com/mig-1g.5gb.slices.gi": "1", "nvidia.com/mig-1g.5gb.slices.ci": "1",
        "nvidia.com/mig-1g.5gb.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", "nvidia.com/mig-1g.5gb.replicas": "1",
        "nvidia.com/mig-1g.5gb.sharing-strategy": "none", "nvidia.com/mig-1g.5gb.multiprocessors": "14"}
    assert mixed["nvidia.com/mig-3g.20gb.slices.gi"] == "3"
    assert not [k for k in mixed if "+me" in k]  # '+' cannot be in a label key: left out

    # an edge older than the inventory fields: no memory, versions or MIG claims invented
    old = labels_for([GpuSummary(index=0, uuid="GPU-0", name="Tesla T4", health=Health.HEALTHY)])
    assert old == {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "Tesla-T4", "nvidia.com/gpu.count": "1",
                   "nvidia.com/gpu.replicas": "1", "nvidia.com/gpu.sharing-strategy": "none",
                   "nvidia.com/mig.strategy": "none"}


def test_label_patch_removes_only_what_kgpu_wrote() -> None:
    current = {"nvidia.com/gpu.count": "2", "nvidia.com/mig-1g.5gb.count": "7", "nvidia.com/custom": "mine",
               "team": "a"}
    owned = {OWNED_ANNOTATION: "nvidia.com/gpu.count,nvidia.com/mig-1g.5gb.count"}
    patch = label_patch(current, owned, {"nvidia.com/gpu.count": "2", "nvidia.com/gpu.product": "X"})
    assert patch == {"metadata": {"labels": {"nvidia.com/gpu.product": "X", "nvidia.com/mig-1g.5gb.count": None},
                                  "annotations": {OWNED_ANNOTATION: "nvidia.com/gpu.count,nvidia.com/gpu.product"}}}
    done = {"nvidia.com/gpu.count": "2", "nvidia.com/gpu.product": "X"}
    assert label_patch(done, {OWNED_ANNOTATION: "nvidia.com/gpu.count,nvidia.com/gpu.product"}, done) is None


# ---- the controller writing them (kmock) ----------------------------------------------------


def _status(node: str, gpus: list[GpuSummary], state: str = "online") -> Incoming:
    body = StatusBody(state=state, gpus=gpus, outbox_epoch="e1")  # type: ignore[arg-type]
    return Incoming(envelope=make_envelope(node, body, Kind.STATUS), body=body, received_at=time.time())


def _labels(kube: KubeEmulator, node: str) -> dict[str, str]:
    return dict(kube.core.read_node(node).metadata.labels or {})


def test_the_controller_labels_nodes_from_their_status(kube: KubeEmulator) -> None:
    kube.add_node("edge-a", {"team": "a", "nvidia.com/custom": "not ours"})
    kube.add_node("edge-gfd", {GFD_MARKER: "1724632719", "nvidia.com/gpu.product": "Tesla-T4"})
    client = Kube.connect(kube.kubeconfig, False)

    async def scenario() -> None:
        bus = BatchBus()
        labeler = NodeLabeler(kube=client, batches=bus)
        [loop] = labeler.periodic()  # as a new leader: every node known is checked once
        assert loop.wake is not None
        await bus.deliver([_status("edge-a", [gpu(0, mig_mode=True, mig_devices=[mig("1g.5gb", 7, 4864)]), gpu(1)]),
                           _status("edge-gfd", [gpu(0)]), _status("not-in-kube", [gpu(0)])])
        assert loop.wake.is_set()
        await labeler.step()
        labels = _labels(kube, "edge-a")
        assert labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
        assert labels["nvidia.com/mig.strategy"] == "mixed" and labels["nvidia.com/mig-1g.5gb.count"] == "1"
        assert (labels["team"], labels["nvidia.com/custom"]) == ("a", "not ours")
        assert _labels(kube, "edge-gfd") == {GFD_MARKER: "1724632719", "nvidia.com/gpu.product": "Tesla-T4"}
        assert labeler.patched == 1

        # the same status again, or the node going offline: nothing written
        await bus.deliver([_status("edge-a", [gpu(0, mig_mode=True, mig_devices=[mig("1g.5gb", 7, 4864)]), gpu(1)]),
                           _status("edge-a", [], state="offline")])
        await labeler.step()
        assert labeler.patched == 1

        # MIG turned off on GPU 0: the MIG labels kgpu wrote go, every other label stays
        await bus.deliver([_status("edge-a", [gpu(0), gpu(1)])])
        await labeler.step()
        labels = _labels(kube, "edge-a")
        assert not [k for k in labels if k.startswith("nvidia.com/mig-")]
        assert labels["nvidia.com/mig.strategy"] == "none" and labels["nvidia.com/custom"] == "not ours"
        owned = kube.core.read_node("edge-a").metadata.annotations[OWNED_ANNOTATION].split(",")
        assert sorted(owned) == sorted(k for k in labels if k.startswith("nvidia.com/") and k != "nvidia.com/custom")
        assert labeler.patched == 2

    try:
        asyncio.run(scenario())
    finally:
        client.close()


# ---- placement counts time-sliced and MIG devices -------------------------------------------


A100_MODEL = gpu_model(A100)


def _pod(name: str, gpus: int = 0, mig_: dict[str, int] | None = None) -> PodNeeds:
    return PodNeeds(namespace="default", name=name, source_node="bad", gpus=gpus, mig=mig_ or {}, source_gpu=A100_MODEL)


def test_placement_counts_replicas_and_mig_devices_as_the_scheduler() -> None:
    one = (CandidateGpu("GPU-0", A100_MODEL),)
    plain = NodeCandidate("plain", True, gpus=one, gpus_requested=1)
    # replicas from the GPU's own figure, or from the GFD labels kgpu writes
    sliced = NodeCandidate("sliced", True, gpus=(CandidateGpu("GPU-0", A100_MODEL, replicas=4),), gpus_requested=3)
    labelled = NodeCandidate("labelled", True, labels=labels_for([gpu(0, replicas=2)]), gpus=one, gpus_requested=1)
    ranked = {t.node: t for t in score(_pod("p", gpus=1), [plain, sliced, labelled])}
    assert not ranked["plain"].accepted and "1 requested by pods bound there" in ranked["plain"].reasons[0]
    assert ranked["sliced"].accepted and ranked["sliced"].free_gpus == 1
    assert ranked["labelled"].accepted and ranked["labelled"].free_gpus == 1
    # the kubelet's allocatable caps it (a replica advertised unhealthy, say)
    capped = NodeCandidate("capped", True, gpus=(CandidateGpu("GPU-0", A100_MODEL, replicas=4),), gpu_allocatable=2,
                           gpus_requested=2)
    assert not score(_pod("p", gpus=1), [capped])[0].accepted

    # MIG: a GPU in MIG mode is no nvidia.com/gpu; its devices are nvidia.com/mig-<profile>
    in_mig = CandidateGpu("GPU-1", A100_MODEL, mig_enabled=True, mig_devices={"1g.5gb": 2, "3g.20gb": 1})
    mig_node = NodeCandidate("mig", True, gpus=(in_mig,), mig_requested={"nvidia.com/mig-1g.5gb": 1})
    whole = score(_pod("w", gpus=1), [mig_node])[0]
    assert not whole.accepted and "in MIG mode" in whole.reasons[0]
    assert score(_pod("m", mig_={"nvidia.com/mig-1g.5gb": 1}), [mig_node])[0].accepted
    assert not score(_pod("m", mig_={"nvidia.com/mig-1g.5gb": 2}), [mig_node])[0].accepted
    assert not score(_pod("m", mig_={"nvidia.com/mig-2g.10gb": 1}), [mig_node])[0].accepted
    # without per-GPU figures, the node's GFD labels say how many MIG devices it has
    by_label = NodeCandidate("by-label", True, gpus=one, labels=labels_for(
        [gpu(0, mig_mode=True, mig_devices=[mig("1g.5gb", 7, 4864), mig("1g.5gb", 8, 4864)])]))
    # ... and two pods placed one after the other use them up
    placed = assign([_pod("a", mig_={"nvidia.com/mig-1g.5gb": 1}), _pod("b", mig_={"nvidia.com/mig-1g.5gb": 1}),
                     _pod("c", mig_={"nvidia.com/mig-1g.5gb": 1})], [by_label])
    assert [(a.pod.name, a.target.node if a.target else None) for a in placed] == [
        ("a", "by-label"), ("b", "by-label"), ("c", None)]
    # an allocatable listed by the kubelet is the scheduler's truth
    allocatable = NodeCandidate("alloc", True, gpus=(in_mig,), mig_free={"nvidia.com/mig-1g.5gb": 0})
    assert not score(_pod("m", mig_={"nvidia.com/mig-1g.5gb": 1}), [allocatable])[0].accepted
