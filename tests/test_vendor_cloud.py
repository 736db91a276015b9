"""The cloud across GPU vendors (issue 16): statuses and telemetry from an NVIDIA edge older than the
device layer, a Jetson, an AMD and an Intel edge, fed through the real ingest into a real fleet
store, then read back by each part: the API and the client's tables (vendor, platform,
capabilities), placement (a pod goes only where its vendor's resource is), the node labels (each
vendor's own labelling tool's names and formats: docs/node-labels.md), written on the Nodes of an
emulated API server, and the fleet exporter (DCGM's series only for NVIDIA, Kepler's and kgpu's
for every vendor, each with a `vendor` label)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from cloud.app import ControllerApp
from cloud.config import CloudSettings
from cloud.http.fleet_metrics import render
from cloud.kube import Kube
from cloud.labels import OWNED_ANNOTATION, NodeLabeler, labels_for, node_labels
from cloud.migration import placement
from cloud.migration.manifests import candidates, pod_needs
from cloud.migration.repository import MigrationRepository
from cloud.services import BatchBus
from cloud.store import FleetStore, Incoming
from kgpu.client.describe import describe_node
from kgpu.client.render import table
from kgpu.client.resources import GPU_COLUMNS, POLICY_COLUMNS
from kgpu.lab.demo_nodes import MIXED, node_specs
from kgpu.lab.demo_nodes import node_labels as demo_node_labels
from kgpu.lab.kube import KubeEmulator
from kgpu.lab.manifests import gpu_pod_manifest, node_manifest
from shared.gpu import GpuSample, Health
from shared.protocol import ActionOutcome, DecisionBody, GpuSummary, Kind, StatusBody, TelemetryBody, make_envelope
from shared.wire import WireModel
from tests.helpers.postgres import create_database, drop_database, pg_url  # noqa: F401

T0 = 1_700_000_000.0
GIB = 1024**3
H100 = "NVIDIA H100 80GB HBM3"
ORIN = "Orin"  # CUDA's name of Orin's GPU, what GFD's Tegra path labels with
MI210 = "AMD Instinct MI210"
FLEX = "Intel(R) Data Center GPU Flex 170"

# node -> (its GPUs' common fields, how many); "nv-old" is an edge older than the device layer
FLEET: dict[str, tuple[dict[str, Any], int]] = {
    "nv-old": ({"name": H100, "memory_total_bytes": 80 * GIB, "driver_version": "550.54.15", "cuda_version": "12.4",
                "architecture": "hopper", "mig_mode": None}, 2),
    "jetson": ({"name": ORIN, "memory_total_bytes": 16 * GIB, "driver_version": "540.4.0", "cuda_version": "12.6",
                "vendor": "nvidia", "backend": "jetson", "platform": "jetson-orin", "resource_name": "nvidia.com/gpu",
                "capabilities": ["clock_limit", "power_mode", "energy_counter"]}, 1),
    "amd": ({"name": MI210, "memory_total_bytes": 64 * GIB, "driver_version": "6.8.5", "vendor": "amd",
             "backend": "amd", "platform": "instinct", "resource_name": "amd.com/gpu",
             "capabilities": ["power_limit", "clock_limit", "reset", "energy_counter", "ecc"]}, 2),
    "intel": ({"name": FLEX, "memory_total_bytes": 16 * GIB, "driver_version": "1.3.29735", "vendor": "intel",
               "backend": "intel", "platform": "flex", "resource_name": "gpu.intel.com/i915",
               "capabilities": ["power_limit", "clock_limit", "energy_counter"]}, 2),
}


def summaries(node: str, **override: Any) -> list[GpuSummary]:
    fields, count = FLEET[node]
    return [GpuSummary(index=i, uuid=f"{node.upper()}-{i}", health=Health.HEALTHY, **{**fields, **override})
            for i in range(count)]


def incoming(node: str, body: WireModel, kind: Kind, ts: float = T0) -> Incoming:
    envelope = make_envelope(node, body, kind).model_copy(update={"ts": ts})
    return Incoming(envelope=envelope, body=envelope.parsed_body(), received_at=ts)


def status(node: str, gpus: list[GpuSummary] | None = None, ts: float = T0) -> Incoming:
    body = StatusBody(state="online", version="0.2.0", gpus=summaries(node) if gpus is None else gpus,
                      outbox_epoch=f"epoch-{node}")
    return incoming(node, body, Kind.STATUS, ts)


def telemetry(node: str, ts: float) -> Incoming:
    """Every GPU's sample, with the Kepler split; the AMD and Intel ones without the NVML-only figures."""
    _, count = FLEET[node]
    samples = [GpuSample(index=i, uuid=f"{node.upper()}-{i}", ts=ts, temperature_c=50.0 + i, power_w=100.0 + i,
                         power_limit_w=300.0, utilization_pct=40.0, memory_used_bytes=GIB, sm_clock_mhz=1200,
                         energy_mj=5_000_000, idle_power_w=30.0, idle_joules=10.0, active_joules=20.0 + i)
               for i in range(count)]
    return incoming(node, TelemetryBody(samples=samples), Kind.TELEMETRY, ts)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetStore]:
    """The fleet above through the real ingest, on SQLite and PostgreSQL (skipped where it is not installed)."""
    db = (f"sqlite:///{tmp_path / 'fleet.db'}" if request.param == "sqlite"
          else create_database(request.getfixturevalue("pg_url")))
    opened = FleetStore(db)
    try:
        opened.ingest([m for node in FLEET for m in (status(node), telemetry(node, T0 + 5))])
        yield opened
    finally:
        opened.close()
        if request.param == "postgresql":
            drop_database(db)


# ---- the store, the API and the client ------------------------------------------------------


async def test_the_api_and_the_client_show_each_gpus_vendor(tmp_path: Path) -> None:
    settings = CloudSettings(db=f"sqlite:///{tmp_path / 'fleet.db'}", no_kube=True)
    store = FleetStore(settings.db)
    store.ingest([m for node in FLEET for m in (status(node), telemetry(node, T0 + 5))])
    controller = ControllerApp(settings, kube=None, store=store)
    client = TestClient(TestServer(controller.http_app()))
    await client.start_server()
    try:
        listed = await (await client.get("/api/v1/nodes")).json()
        assert sorted(n["name"] for n in listed["nodes"]) == sorted(FLEET)
        detail = {node: await (await client.get(f"/api/v1/nodes/{node}")).json() for node in FLEET}
        amd = detail["amd"]["gpus"][0]
        assert (amd["vendor"], amd["backend"], amd["platform"], amd["resource_name"]) == (
            "amd", "amd", "instinct", "amd.com/gpu")
        assert sorted(amd["capabilities"]) == sorted(FLEET["amd"][0]["capabilities"])
        old = detail["nv-old"]["gpus"][0]  # an older edge says nothing: stored as nothing, not guessed
        assert (old["vendor"], old["backend"], old["resource_name"], old["capabilities"]) == (None, None, None, None)
        fleet = await (await client.get("/api/v1/dashboard/fleet?gpu_limit=8")).json()
        assert {n["name"]: n["gpus"][0]["vendor"] for n in fleet["nodes"]} == {
            "nv-old": None, "jetson": "nvidia", "amd": "amd", "intel": "intel"}

        rows = [{**g, "node": node} for node in sorted(FLEET) for g in detail[node]["gpus"]]
        wide = table(rows, GPU_COLUMNS, wide=True, width=None)
        at = wide[0].index("VENDOR")
        assert [line[at:].split()[0] for line in wide[1:]] == [
            "amd/instinct", "amd/instinct", "intel/flex", "intel/flex", "nvidia/jetson-orin", "nvidia", "nvidia"]
        assert "VENDOR" not in table(rows, GPU_COLUMNS, wide=False, width=None)[0]
        described = "\n".join(describe_node({"node": detail["jetson"]}, GPU_COLUMNS, None))
        assert "nvidia (backend jetson, platform jetson-orin)" in described
        assert "Capabilities:" in described and "clock_limit, energy_counter, power_mode" in described
        assert "nvidia (backend nvml)" in "\n".join(describe_node({"node": detail["nv-old"]}, GPU_COLUMNS, None))

        # a newer status of the same GPUs replaces what the older one said
        store.ingest([status("amd", summaries("amd", platform="radeon", capabilities=[]), ts=T0 + 10)])
        again = await (await client.get("/api/v1/nodes/amd")).json()
        assert again["gpus"][0]["platform"] == "radeon" and again["gpus"][0]["capabilities"] == []
    finally:
        await client.close()
        store.close()


# ---- placement ------------------------------------------------------------------------------


def test_a_pod_goes_only_where_its_vendors_resource_is(store: FleetStore) -> None:
    world, _, _ = MigrationRepository(store).load(T0 + 6)
    kube_nodes = [node_manifest(node, {"kubernetes.io/hostname": node}, gpus=FLEET[node][1],
                                resource=FLEET[node][0].get("resource_name") or "nvidia.com/gpu")
                  for node in FLEET]
    pods: list[dict[str, Any]] = []
    cands = candidates(kube_nodes, pods, world)

    def accepted(resource: str, count: int = 1) -> list[str]:
        pod = gpu_pod_manifest("work", "failing", gpus=0)
        pod["spec"]["containers"][0]["resources"] = {"limits": {resource: str(count)}}
        needs = pod_needs(pod, None, None)
        assert (needs.resource, needs.gpus) == (resource, count)
        ranked = placement.score(needs, cands)
        for t in ranked:
            if not t.accepted and t.node in FLEET:
                assert any("needs" in r for r in t.reasons), t
        return sorted(t.node for t in ranked if t.accepted)

    assert accepted("amd.com/gpu") == ["amd"]
    assert accepted("amd.com/gpu", 2) == ["amd"] and accepted("amd.com/gpu", 3) == []
    assert accepted("gpu.intel.com/i915") == ["intel"]
    assert accepted("gpu.intel.com/xe") == []  # the Flex node's plugin advertises i915
    assert accepted("nvidia.com/gpu") == ["jetson", "nv-old"]  # Jetson's device plugin is NVIDIA's
    assert accepted("nvidia.com/gpu", 2) == ["nv-old"]
    rejected = next(t for t in placement.score(pod_needs(_pod("amd.com/gpu"), None, None), cands) if t.node == "nv-old")
    assert "needs 1 amd.com/gpu, 0 free" in rejected.reasons[0] and "another vendor's resource" in rejected.reasons[0]

    # the AMD pods already bound there count against the AMD GPUs only
    bound = [_pod("amd.com/gpu", node="amd"), _pod("nvidia.com/gpu", node="nv-old")]
    after = {c.name: c for c in candidates(kube_nodes, bound, world)}
    assert after["amd"].requested_of("amd.com/gpu") == 1 and after["nv-old"].gpus_requested == 1
    placed = placement.assign([pod_needs(_pod("amd.com/gpu", name=f"a{i}"), None, None) for i in range(2)],
                              list(after.values()))
    assert [a.target.node if a.target else None for a in placed] == ["amd", None]


def _pod(resource: str, node: str = "failing", name: str = "work") -> dict[str, Any]:
    pod = gpu_pod_manifest(name, node, gpus=0)
    pod["spec"]["containers"][0]["resources"] = {"limits": {resource: "1"}}
    return pod


# ---- labels ---------------------------------------------------------------------------------


def test_each_vendor_gets_its_own_tools_labels() -> None:
    nvidia = node_labels(summaries("nv-old"))
    assert nvidia == labels_for(summaries("nv-old"))  # GFD's, unchanged
    jetson = node_labels(summaries("jetson"))
    assert (jetson["nvidia.com/gpu.product"], jetson["nvidia.com/gpu.family"], jetson["nvidia.com/gpu.memory"],
            jetson["nvidia.com/mig.capable"]) == ("Orin", "ampere", "16384", "false")
    assert node_labels(summaries("jetson", architecture=None))["nvidia.com/gpu.family"] == "ampere"  # from the platform
    assert not [k for k in jetson if not k.startswith("nvidia.com/")]
    # AMD's node labeller (ROCm/k8s-device-plugin cmd/k8s-node-labeller, createLabels): all GPUs agree
    assert node_labels(summaries("amd")) == {
        "amd.com/gpu.cu-count": "104", "amd.com/gpu.device-id": "740f", "amd.com/gpu.driver-version": "6.8.5",
        "amd.com/gpu.family": "AI", "amd.com/gpu.product-name": "AMD_Instinct_MI210", "amd.com/gpu.simd-count": "416",
        "amd.com/gpu.vram": "64G",
        "beta.amd.com/gpu.cu-count": "104", "beta.amd.com/gpu.cu-count.104": "2",
        "beta.amd.com/gpu.device-id": "740f", "beta.amd.com/gpu.device-id.740f": "2",
        "beta.amd.com/gpu.family": "AI", "beta.amd.com/gpu.family.AI": "2",
        "beta.amd.com/gpu.product-name": "AMD_Instinct_MI210",
        "beta.amd.com/gpu.product-name.AMD_Instinct_MI210": "2",
        "beta.amd.com/gpu.simd-count": "416", "beta.amd.com/gpu.simd-count.416": "2",
        "beta.amd.com/gpu.vram": "64G", "beta.amd.com/gpu.vram.64G": "2",
    }
    # two models on one node: the stable names count per value instead
    mixed = node_labels([*summaries("amd")[:1], GpuSummary(index=1, uuid="X", name="AMD Instinct MI300X",
                                                            health=Health.HEALTHY, vendor="amd",
                                                            memory_total_bytes=192 * GIB)])
    assert (mixed["amd.com/gpu.device-id.740f"], mixed["amd.com/gpu.device-id.74a1"]) == ("1", "1")
    assert "amd.com/gpu.device-id" not in mixed and mixed["amd.com/gpu.family"] == "AI"
    assert mixed["amd.com/gpu.vram.192G"] == "1"
    # Intel's NFD rules (intel-device-plugins-for-kubernetes deployments/nfd/overlays/node-feature-rules)
    assert node_labels(summaries("intel")) == {
        "gpu.intel.com/device-id.0380-56c0.count": "2", "gpu.intel.com/device-id.0380-56c0.present": "true",
        "gpu.intel.com/device.count": "2", "gpu.intel.com/family": "Flex_Series", "gpu.intel.com/product": "Flex_170",
        "intel.feature.node.kubernetes.io/gpu": "true",
    }
    assert node_labels(summaries("intel", name="Intel Arc A770")) == {
        "gpu.intel.com/device-id.0300-56a0.count": "2", "gpu.intel.com/device-id.0300-56a0.present": "true",
        "gpu.intel.com/family": "A_Series", "intel.feature.node.kubernetes.io/gpu": "true"}
    assert node_labels(summaries("intel", name="Intel GPU of no known model")) == {
        "intel.feature.node.kubernetes.io/gpu": "true"}


def test_the_controller_writes_each_vendors_labels(kube: KubeEmulator) -> None:
    for node in FLEET:
        kube.add_node(node, {"team": "a", "amd.com/custom": "not ours"})
    client = Kube.connect(kube.kubeconfig, False)

    def labels(node: str) -> dict[str, str]:
        return dict(kube.core.read_node(node).metadata.labels or {})

    async def scenario() -> None:
        bus = BatchBus()
        labeler = NodeLabeler(kube=client, batches=bus)
        labeler.periodic()
        await bus.deliver([status(node, ts=time.time()) for node in FLEET])
        await labeler.step()
        assert labels("amd")["amd.com/gpu.product-name"] == "AMD_Instinct_MI210"
        assert labels("intel")["gpu.intel.com/product"] == "Flex_170"
        assert labels("jetson")["nvidia.com/gpu.family"] == "ampere"
        assert labels("nv-old")["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert not [k for k in labels("amd") if k.startswith(("nvidia.com/", "gpu.intel.com/"))]
        # the AMD node's GPUs change model: the per-value labels kgpu wrote go, others' stay
        mi300 = summaries("amd", name="AMD Instinct MI300X", memory_total_bytes=192 * GIB)
        await bus.deliver([status("amd", mi300, ts=time.time())])
        await labeler.step()
        now = labels("amd")
        assert now["amd.com/gpu.device-id"] == "74a1" and "beta.amd.com/gpu.device-id.740f" not in now
        assert (now["team"], now["amd.com/custom"]) == ("a", "not ours")
        owned = kube.core.read_node("amd").metadata.annotations[OWNED_ANNOTATION].split(",")
        assert sorted(owned) == sorted(k for k in now if k.startswith(("amd.com/gpu", "beta.amd.com/")))

    try:
        asyncio.run(scenario())
    finally:
        client.close()


# ---- the fleet exporter ---------------------------------------------------------------------


def test_dcgm_series_only_for_nvidia_kepler_and_kgpu_for_all(store: FleetStore) -> None:
    text = render(store, max_age=30, now=lambda: T0 + 10).body.decode()
    series: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            series.setdefault(s.name, []).append(s.labels)
    assert {s["Hostname"] for s in series["DCGM_FI_DEV_GPU_TEMP"]} == {"nv-old", "jetson"}
    assert not [name for name, found in series.items() if name.startswith("DCGM_FI_")
                and {s["Hostname"] for s in found} & {"amd", "intel"}]
    vendors = {(s["node_name"], s["vendor"]) for s in series["kepler_node_gpu_joules_total"]}
    assert vendors == {("nv-old", "nvidia"), ("jetson", "nvidia"), ("amd", "amd"), ("intel", "intel")}
    health = {(s["Hostname"], s["vendor"]) for s in series["kgpu_gpu_health"]}
    assert health == vendors
    power = {(s["Hostname"], s["gpu"]): s["vendor"] for s in series["kgpu_gpu_power_watts"]}
    assert power[("amd", "1")] == "amd" and power[("intel", "0")] == "intel" and len(power) == 7
    assert {s["vendor"] for s in series["kgpu_gpu_energy_joules_total"]} == {"nvidia", "amd", "intel"}


# ---- the demo's mixed fleet -----------------------------------------------------------------


def test_the_demo_mixes_vendors_after_its_story_nodes() -> None:
    notes: list[str] = []
    mixed = node_specs(7, installed=lambda _: True)
    assert [s.model for s in mixed] == ["H100", "H100", "H100", "A100", *MIXED]
    story = [(s.name, s.model, s.gpus) for s in node_specs(4, installed=lambda _: False)]
    assert story == [(s.name, s.model, s.gpus) for s in mixed[:4]]  # the story's nodes never change
    fallback = node_specs(7, notes.append, installed=lambda package: package != "amd")
    assert [s.model for s in fallback][4:] == ["ORIN-NX", "H100", "FLEX170"]
    assert len(notes) == 1 and "edge.sim.amd is not installed" in notes[0] and "MI210" in notes[0]
    amd = demo_node_labels(mixed[5])
    assert "nvidia.com/gpu.present" not in amd and amd["node-role.kubernetes.io/edge"] == ""
    assert node_manifest("x", amd, gpus=2, resource=mixed[5].spec.resource)["status"]["allocatable"] == {
        "amd.com/gpu": "2"}


# ---- the power policy across vendors --------------------------------------------------------

JETSON_NO_CAP = "Jetson: no power cap knob; the policy acts through the GPU's devfreq max frequency"


def decision(node: str, gpu: int, seq: int, outcome: ActionOutcome, rule: str = "power_cap",
             reason: str = "cap") -> Incoming:
    body = DecisionBody(gpu_index=gpu, gpu_uuid=f"{node.upper()}-{gpu}", rule=rule, action="set_power_limit",
                        value=250.0, outcome=outcome, reason=reason, policy_version=1)
    envelope = make_envelope(node, body, Kind.DECISION, seq).model_copy(update={"ts": T0 + seq})
    return Incoming(envelope=envelope, body=envelope.parsed_body(), received_at=T0 + seq)


def test_policy_outcomes_per_vendor(store: FleetStore) -> None:
    advisory, applied = ActionOutcome.ADVISORY, ActionOutcome.APPLIED
    store.ingest([decision("nv-old", 0, 1, applied), decision("nv-old", 1, 2, applied),
                  decision("jetson", 0, 1, advisory, reason=JETSON_NO_CAP),
                  decision("amd", 0, 1, advisory, reason="no permission"), decision("amd", 0, 2, applied),
                  decision("amd", 1, 3, applied, rule="xid"),  # not a policy rule: not counted
                  decision("intel", 1, 1, advisory, rule="thermal_step_down", reason="power1_max is read-only")])
    outcomes = store.policy_outcomes(list(FLEET))
    assert outcomes == {
        "amd": {"gpus": 2, "applied": 1, "advisory": 0, "reason": None},
        "intel": {"gpus": 2, "applied": 0, "advisory": 1, "reason": "power1_max is read-only"},
        "nvidia": {"gpus": 3, "applied": 2, "advisory": 1, "reason": JETSON_NO_CAP},
    }
    assert store.policy_outcomes(["amd"]) == {"amd": outcomes["amd"]} and store.policy_outcomes([]) == {}
    shown = table([{"name": "p", "vendors": outcomes}], POLICY_COLUMNS, wide=True, width=None)
    assert "amd 1/2 applied; intel 1/2 advisory; nvidia 2/3 applied, 1/3 advisory" in shown[1]
