"""GET /metrics/fleet, the controller's fleet exporter (cloud/http/fleet_metrics.py).

In-process over a real fleet store (what is served, dropped by age and by offline, XIDs, labels
an old edge cannot give), and end to end: a real controller and two real simulated edges over a
real mosquitto, checked by the real `promtool check metrics`; a stopped edge (its offline status)
and a frozen one (SIGSTOP: still online, its sample ages) both drop out.
"""

from __future__ import annotations

import gzip
import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud.http.fleet_metrics import Shard, render
from cloud.store import FleetStore, Incoming
from kgpu.lab.broker import Mosquitto
from kgpu.lab.processes import wait_for
from shared.dcgm import FIELDS
from shared.gpu import GpuSample, Health
from shared.kepler import FAMILIES as KEPLER_FAMILIES
from shared.kepler import GPU_LABELS as KEPLER_GPU_LABELS
from shared.protocol import GpuSummary, Kind, StatusBody, TelemetryBody, XidBody, make_envelope
from shared.wire import WireModel
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess

T0 = 1_700_000_000.0
DCGM_LABELS = {"gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION"}
KEPLER_NODE = [name for name in KEPLER_FAMILIES if name.startswith("kepler_node_gpu_")]
KEPLER_LABELS = {*KEPLER_GPU_LABELS, "node_name"}  # Kepler's; the fleet adds Hostname
# the findings promtool has for dcgm-exporter's own names (tests/test_metrics.py keeps them on purpose)
INHERITED_FINDING = re.compile(
    r"^DCGM_FI_\w+ (label names should be written in 'snake_case' not 'camelCase'"
    r'|counter metrics should have "_total" suffix'
    r"|metric name should not include type 'counter')$"
)


# ---- in-process, over a real store ----------------------------------------------------------


def incoming(node: str, body: WireModel, kind: Kind, *, seq: int | None = None, ts: float = T0) -> Incoming:
    envelope = make_envelope(node, body, kind, seq).model_copy(update={"ts": ts})
    return Incoming(envelope=envelope, body=envelope.parsed_body(), received_at=ts)


def status(node: str, *, state: str = "online", ts: float = T0, inventory: bool = True) -> Incoming:
    gpus = [GpuSummary(index=i, uuid=f"GPU-{node}-{i}", name="NVIDIA H100 80GB HBM3", health=Health.HEALTHY,
                       pci_bus_id=f"00000000:{0x18 + i:02X}:00.0" if inventory else None,
                       driver_version="550.54.15" if inventory else None) for i in range(2)]
    body = StatusBody(state=state, version="0.1.0", gpus=gpus, outbox_epoch="epoch-1")  # type: ignore[arg-type]
    return incoming(node, body, Kind.STATUS, ts=ts)


def telemetry(node: str, ts: float, split: tuple[float, float] | None = None, **update: Any) -> Incoming:
    """Two GPUs' samples; with `split` = (idle, active) joules, the edge's Kepler split too (GPU i:
    i x 10 J more of each, idle power 120 W); `update` overrides figures of both."""
    kepler: dict[str, Any] = {}
    samples = []
    for i in range(2):
        if split is not None:
            kepler = {"idle_power_w": 120.0, "idle_joules": split[0] + 10 * i, "active_joules": split[1] + 10 * i}
        figures = {"temperature_c": 60.0 + i, "power_w": 300.0, "utilization_pct": 50.0,
                   "memory_used_bytes": 1 << 30, "memory_free_bytes": 79 << 30, "sm_clock_mhz": 1980,
                   "energy_mj": 123_456_789}
        samples.append(GpuSample(index=i, uuid=f"GPU-{node}-{i}", ts=ts, **(figures | kepler | update)))
    return incoming(node, TelemetryBody(samples=samples), Kind.TELEMETRY, ts=ts)


def by_node(text: str, name: str, host: str = "Hostname") -> dict[str, dict[str, float]]:
    """Hostname (or label `host`) -> gpu -> value of the series `name` in the exposition `text`
    (a counter by its family's or its sample's name)."""
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if name in (family.name, s.name):
                found.setdefault(s.labels[host], {})[s.labels["gpu"]] = s.value
    return found


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FleetStore]:
    opened = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield opened
    opened.close()


def test_every_fresh_gpu_of_every_online_node_is_served(store: FleetStore) -> None:
    store.ingest([status("edge-a"), status("edge-b", inventory=False), telemetry("edge-a", T0 + 5),
                  telemetry("edge-b", T0 + 5),
                  incoming("edge-a", XidBody(gpu_index=1, gpu_uuid="GPU-edge-a-1", xid=79, action="mark_unhealthy"),
                           Kind.XID, seq=1, ts=T0 + 4)])
    out = render(store, max_age=30, now=lambda: T0 + 10)
    assert (out.nodes, out.gpus) == (2, 4)
    text = out.body.decode()
    for spec in FIELDS:  # every family, in dcgm-exporter's order, once
        assert text.count(f"# TYPE {spec.name} {spec.type}\n") == 1, spec.name
    assert by_node(text, "DCGM_FI_DEV_GPU_TEMP") == {"edge-a": {"0": 60.0, "1": 61.0},
                                                     "edge-b": {"0": 60.0, "1": 61.0}}
    assert by_node(text, "DCGM_FI_DEV_XID_ERRORS") == {"edge-a": {"0": 0.0, "1": 79.0},
                                                       "edge-b": {"0": 0.0, "1": 0.0}}
    assert by_node(text, "DCGM_FI_DEV_FB_USED")["edge-a"]["0"] == 1024.0
    assert by_node(text, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")["edge-b"]["1"] == 123_456_789
    assert "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION_total" not in text
    assert "DCGM_FI_DEV_MEMORY_TEMP{" not in text  # a figure the sample lacks is left out, not 0
    labels = {s.labels["Hostname"] + "/" + s.labels["gpu"]: s.labels
              for family in text_string_to_metric_families(text) if family.name == "DCGM_FI_DEV_POWER_USAGE"
              for s in family.samples}
    assert set(labels["edge-a/1"]) == DCGM_LABELS
    assert labels["edge-a/1"] == {"gpu": "1", "UUID": "GPU-edge-a-1", "pci_bus_id": "00000000:19:00.0",
                                       "device": "nvidia1", "modelName": "NVIDIA H100 80GB HBM3",
                                       "Hostname": "edge-a", "DCGM_FI_DRIVER_VERSION": "550.54.15"}
    # kgpu_gpu_health as the edge serves it, from the health of the last status
    health = {(s.labels["Hostname"], s.labels["gpu"], s.labels["state"]): s.value
              for family in text_string_to_metric_families(text) if family.name == "kgpu_gpu_health"
              for s in family.samples}
    assert len(health) == 4 * len(Health) and sum(health.values()) == 4
    assert health[("edge-a", "1", "healthy")] == 1 and health[("edge-a", "1", "unhealthy")] == 0
    assert {s.labels["uuid"] for family in text_string_to_metric_families(text) if family.name == "kgpu_gpu_health"
            for s in family.samples if s.labels["Hostname"] == "edge-b"} == {"GPU-edge-b-0", "GPU-edge-b-1"}
    # an edge older than the exporter sends no PCI bus id or driver version: the labels are empty
    assert labels["edge-b/0"]["pci_bus_id"] == "" and labels["edge-b/0"]["DCGM_FI_DRIVER_VERSION"] == ""


def test_kepler_node_families_from_the_edges_split(store: FleetStore) -> None:
    """Kepler's node-level GPU families per GPU, with Kepler's labels (and Hostname), from the
    split the sample carries; none for an older edge's sample; watts left out for a lost GPU."""
    lost = {"lost": True, "power_w": None, "idle_power_w": None}
    store.ingest([status("edge-a"), status("edge-b"), status("edge-c"), telemetry("edge-a", T0 + 5, (100.0, 50.0)),
                  telemetry("edge-b", T0 + 5), telemetry("edge-c", T0 + 5, (7.0, 0.0), **lost)])
    text = render(store, max_age=30, now=lambda: T0 + 10).body.decode()
    for name in KEPLER_FAMILIES:  # the node families, in Kepler's order, with Kepler's type; no others
        kind, doc, _ = KEPLER_FAMILIES[name]
        assert (f"# TYPE {name} {kind}\n" in text) == (name in KEPLER_NODE), name
        assert (f"# HELP {name} {doc}\n" in text) == (name in KEPLER_NODE), name
    assert [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE kepler_")] == KEPLER_NODE
    assert "kepler_pod_" not in text and "kepler_container_" not in text and "kepler_process_" not in text
    info = [s.labels for f in text_string_to_metric_families(text) if f.name == "kepler_node_gpu_info"
            for s in f.samples]
    assert len(info) == 4 and all(set(labels) == KEPLER_LABELS | {"Hostname"} for labels in info)
    assert {(i["node_name"], i["gpu"]) for i in info} == {("edge-a", "0"), ("edge-a", "1"), ("edge-c", "0"),
                                                           ("edge-c", "1")}  # edge-b: an older edge, no split
    a1 = next(i for i in info if i["Hostname"] == "edge-a" and i["gpu"] == "1")
    assert a1 == {"gpu": "1", "gpu_uuid": "GPU-edge-a-1", "gpu_name": "NVIDIA H100 80GB HBM3", "vendor": "nvidia",
                  "node_name": "edge-a", "Hostname": "edge-a"}
    assert by_node(text, "kepler_node_gpu_watts") == {"edge-a": {"0": 300.0, "1": 300.0}}  # lost: no watts
    assert by_node(text, "kepler_node_gpu_watts", "node_name") == by_node(text, "kepler_node_gpu_watts")
    assert by_node(text, "kepler_node_gpu_idle_watts")["edge-a"] == {"0": 120.0, "1": 120.0}
    assert by_node(text, "kepler_node_gpu_active_watts")["edge-a"] == {"0": 180.0, "1": 180.0}
    assert by_node(text, "DCGM_FI_DEV_POWER_USAGE")["edge-a"] == by_node(text, "kepler_node_gpu_watts")["edge-a"]
    idle = by_node(text, "kepler_node_gpu_idle_joules_total")
    active = by_node(text, "kepler_node_gpu_active_joules_total")
    total = by_node(text, "kepler_node_gpu_joules_total")
    assert idle == {"edge-a": {"0": 100.0, "1": 110.0}, "edge-c": {"0": 7.0, "1": 17.0}}
    assert active == {"edge-a": {"0": 50.0, "1": 60.0}, "edge-c": {"0": 0.0, "1": 10.0}}
    assert total == {node: {gpu: idle[node][gpu] + active[node][gpu] for gpu in gpus} for node, gpus in idle.items()}
    # the edge's counters grow, and so do the fleet's
    store.ingest([telemetry("edge-a", T0 + 15, (104.0, 80.0))])
    later = render(store, max_age=30, now=lambda: T0 + 20).body.decode()
    assert by_node(later, "kepler_node_gpu_joules_total")["edge-a"] == {"0": 184.0, "1": 204.0}
    assert all(by_node(later, name)["edge-a"][gpu] > by_node(text, name)["edge-a"][gpu] for gpu in ("0", "1")
               for name in ("kepler_node_gpu_idle_joules_total", "kepler_node_gpu_active_joules_total"))
    # dropped with the node's DCGM series
    store.ingest([status("edge-a", state="offline", ts=T0 + 16)])
    assert "edge-a" not in by_node(render(store, max_age=30, now=lambda: T0 + 20).body.decode(),
                                   "kepler_node_gpu_joules_total")


def test_old_samples_and_offline_nodes_are_dropped(store: FleetStore) -> None:
    store.ingest([status("edge-a"), status("edge-b"), telemetry("edge-a", T0 + 5), telemetry("edge-b", T0 + 50)])
    out = render(store, max_age=30, now=lambda: T0 + 60)  # edge-a's sample is 55 s old
    assert set(by_node(out.body.decode(), "DCGM_FI_DEV_GPU_TEMP")) == {"edge-b"}
    assert render(store, max_age=60, now=lambda: T0 + 60).nodes == 2  # the age is the setting's
    store.ingest([status("edge-b", state="offline", ts=T0 + 55)])
    out = render(store, max_age=60, now=lambda: T0 + 60)
    assert set(by_node(out.body.decode(), "DCGM_FI_DEV_GPU_TEMP")) == {"edge-a"}
    store.ingest([status("edge-a", state="offline", ts=T0 + 56)])
    empty = render(store, max_age=60, now=lambda: T0 + 60)
    assert (empty.nodes, empty.gpus, empty.series) == (0, 0, 0)
    assert empty.body.decode().count("# TYPE DCGM_FI_") == len(FIELDS)  # every family, no series
    assert empty.body.decode().count("# TYPE kepler_node_gpu_") == len(KEPLER_NODE)
    assert "# TYPE kgpu_gpu_health gauge" in empty.body.decode()


def test_the_max_age_setting_has_a_flag_env_and_default() -> None:
    from cloud.config import CloudSettings

    assert CloudSettings().fleet_metrics_max_age == 30.0
    assert CloudSettings(fleet_metrics_max_age="2m").fleet_metrics_max_age == 120.0  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CloudSettings(fleet_metrics_max_age=0)


# ---- end to end: a real controller, two real edges, a real broker -------------------------------



def fleet(cloud: CloudProcess, query: str = "") -> str:
    with urllib.request.urlopen(f"{cloud.base}/metrics/fleet{query}", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


def hostnames(text: str) -> set[str]:
    return set(by_node(text, "DCGM_FI_DEV_GPU_TEMP"))


KEPLER_COUNTERS = ("kepler_node_gpu_idle_joules_total", "kepler_node_gpu_active_joules_total",
                   "kepler_node_gpu_joules_total")


def check_kepler_against_the_edge(cloud: CloudProcess, edge: EdgeProcess, before: str) -> None:
    """Kepler's node families in /metrics/fleet for `edge`'s GPUs (GPU 0 idle, GPU 1 busy with no
    process listed): Kepler's labels as the edge serves them, plus Hostname; counters that grow,
    idle + active = total, and the edge's own counters bracketing the fleet's (the edge's before
    the fleet scrape <= the fleet's <= the edge's after)."""
    node = edge.node
    for index in (0, 1):
        edge.inject(index, utilization=0)
    wait_for(lambda: len(edge.get("/api/v1/energy")["idle_power_w"]) == 2, what="idle power learned on both GPUs")
    edge.inject(1, utilization=80)
    wait_for(lambda: by_node(fleet(cloud), "kepler_node_gpu_active_joules_total")[node]["1"] > 0, timeout=20,
             what="GPU 1's active energy in /metrics/fleet")
    edge_before = edge.get("/metrics")

    def caught_up() -> str | None:
        text = fleet(cloud)
        return text if all(by_node(text, name)[node][gpu] >= by_node(edge_before, name, "node_name")[node][gpu]
                           for name in KEPLER_COUNTERS[:2] for gpu in ("0", "1")) else None

    text = wait_for(caught_up, timeout=20, what="the fleet's Kepler counters at the edge's")
    edge_after = edge.get("/metrics")
    assert isinstance(edge_before, str) and isinstance(edge_after, str)
    info = {s.labels["gpu"]: s.labels for f in text_string_to_metric_families(text) if f.name == "kepler_node_gpu_info"
            for s in f.samples if s.labels["Hostname"] == node}
    edge_info = {s.labels["gpu"]: s.labels for f in text_string_to_metric_families(edge_after)
                 if f.name == "kepler_node_gpu_info" for s in f.samples}
    assert set(info) == {"0", "1"} and set(edge_info) == {"0", "1"}
    for gpu in ("0", "1"):
        assert set(edge_info[gpu]) == KEPLER_LABELS and info[gpu] == edge_info[gpu] | {"Hostname": node}
    served = {name: by_node(text, name)[node] for name in KEPLER_COUNTERS}
    for gpu in ("0", "1"):
        assert served["kepler_node_gpu_joules_total"][gpu] > by_node(before, "kepler_node_gpu_joules_total")[node][gpu]
        assert served[KEPLER_COUNTERS[0]][gpu] + served[KEPLER_COUNTERS[1]][gpu] == pytest.approx(
            served["kepler_node_gpu_joules_total"][gpu], rel=1e-12)
        for name in KEPLER_COUNTERS:
            low = by_node(edge_before, name, "node_name")[node][gpu]
            high = by_node(edge_after, name, "node_name")[node][gpu]
            assert low * (1 - 1e-12) <= served[name][gpu] <= high * (1 + 1e-12), (name, gpu, low, high)
    assert served["kepler_node_gpu_active_joules_total"]["0"] == 0  # idle: all its energy is idle
    assert served["kepler_node_gpu_active_joules_total"]["1"] > 0
    # watts: the sample's power, the idle power in force at it (GPU 1: the edge's learned one)
    watts, power = by_node(text, "kepler_node_gpu_watts")[node], by_node(text, "DCGM_FI_DEV_POWER_USAGE")[node]
    idle_w, active_w = (by_node(text, f"kepler_node_gpu_{k}_watts")[node] for k in ("idle", "active"))
    learned = edge.get("/api/v1/energy")["idle_power_w"]
    assert idle_w["1"] == pytest.approx(learned[info["1"]["gpu_uuid"]]) and active_w["1"] > 0
    assert idle_w["0"] == watts["0"] and active_w["0"] == 0
    for gpu in ("0", "1"):
        assert watts[gpu] == power[gpu] and idle_w[gpu] + active_w[gpu] == pytest.approx(watts[gpu])


@pytest.mark.slow
def test_two_edges_through_a_real_controller(tmp_path: Path, broker: Mosquitto, promtool: str) -> None:
    cloud = CloudProcess(tmp_path / "cloud", broker.url, env={"KGPU_FLEET_METRICS_MAX_AGE": "4"}).start()
    edges = [EdgeProcess(tmp_path / node, node=node, mqtt=broker.url, gpus=2, model="H100").start()
             for node in ("edge-a", "edge-b")]
    try:
        # GPM figures come with a board's second sample: wait for them too
        text = wait_for(lambda: (t := fleet(cloud)) and hostnames(t) == {"edge-a", "edge-b"} and all(
                            gpus.keys() == {"0", "1"} for gpus in by_node(t, "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE").values())
                        and len(by_node(t, "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE")) == 2 and t,
                        timeout=30, what="both edges' GPUs in /metrics/fleet")
        result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                                timeout=30)
        findings = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        assert result.returncode in (0, 3), findings  # 1 would be a parse error
        assert [f for f in findings if not INHERITED_FINDING.match(f)] == []
        # the same series and labels as the edge's own /metrics serves for the same GPU
        edge_text = edges[0].get("/metrics")
        assert isinstance(edge_text, str)
        edge_labels = {s.labels["gpu"]: s.labels for f in text_string_to_metric_families(edge_text)
                       if f.name == "DCGM_FI_DEV_POWER_USAGE" for s in f.samples}
        cloud_labels = {s.labels["gpu"]: s.labels for f in text_string_to_metric_families(text)
                        if f.name == "DCGM_FI_DEV_POWER_USAGE" for s in f.samples
                        if s.labels["Hostname"] == "edge-a"}
        for gpu in ("0", "1"):
            assert cloud_labels[gpu] == {k: v for k, v in edge_labels[gpu].items() if k in DCGM_LABELS}
        edge_families = {f.name for f in text_string_to_metric_families(edge_text)
                         if f.name.startswith("DCGM_") or f.name == "kgpu_gpu_health"}
        cloud_families = {f.name for f in text_string_to_metric_families(text) if f.samples}
        assert edge_families <= cloud_families | {"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"}, \
            edge_families - cloud_families
        healthy = {s.labels["Hostname"] + "/" + s.labels["gpu"] for f in text_string_to_metric_families(text)
                     if f.name == "kgpu_gpu_health" for s in f.samples if s.labels["state"] == "healthy" and s.value}
        assert healthy == {"edge-a/0", "edge-a/1", "edge-b/0", "edge-b/1"}
        check_kepler_against_the_edge(cloud, edges[0], text)
        # a part of the fleet, and a part that does not exist
        parts = [hostnames(fleet(cloud, f"?shard={i}&shards=2")) for i in range(2)]
        assert parts[0] | parts[1] == {"edge-a", "edge-b"} and not parts[0] & parts[1]
        assert cloud.request("GET", "/metrics/fleet?shard=2&shards=2")[0] == 400
        assert cloud.request("GET", "/metrics/fleet?shards=0")[0] == 400
        # gzip for a Prometheus that asks for it
        request = urllib.request.Request(f"{cloud.base}/metrics/fleet", headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert "DCGM_FI_DEV_GPU_TEMP{" in gzip.decompress(response.read()).decode()

        # frozen edge: still online for the broker (keepalive) but its sample ages past 4 s
        frozen = edges[1]
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: hostnames(fleet(cloud)) == {"edge-a"}, timeout=20, what="edge-b's old sample dropped")
            node: dict[str, Any] | None = cloud.node_state("edge-b")
            assert node is not None and node["online"] is True  # dropped by age, not by offline
        finally:
            frozen.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: hostnames(fleet(cloud)) == {"edge-a", "edge-b"}, timeout=20, what="edge-b back")

        # stopped edge: its offline status drops its series at once, whatever their age
        edges[0].stop()
        wait_for(lambda: (n := cloud.node_state("edge-a")) is not None and n["online"] is False, timeout=20,
                 what="edge-a offline")
        assert hostnames(fleet(cloud)) == {"edge-b"}
    finally:
        for process in [*edges, cloud]:
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait(timeout=10)


def test_the_fleet_text_is_byte_for_byte_the_shared_exposition(store: FleetStore) -> None:
    """The exporter writes its text itself (faster), but exactly as shared.dcgm.exposition does
    for the same families merged: label escaping included."""
    from cloud.http.fleet_metrics import fleet_families
    from shared.dcgm import exposition

    odd = 'NVIDIA "H100"\\ \n80GB'
    store.ingest([status("edge-a"), status("edge-b"), telemetry("edge-a", T0 + 5, (1.5, 0.1)),
                  telemetry("edge-b", T0 + 5, (2.0, 1e-9))])
    store.ingest([incoming("edge-b", StatusBody(state="online", gpus=[GpuSummary(
        index=i, uuid=f"GPU-edge-b-{i}", name=odd, health=Health.HEALTHY, pci_bus_id="0:0", driver_version="1")
        for i in range(2)], outbox_epoch="epoch-1"), Kind.STATUS, ts=T0 + 6)])
    merged: list[Any] = []
    for _, families, _ in fleet_families(store.fleet_latest_samples(T0)):
        if not merged:
            merged = families
        else:
            for into, family in zip(merged, families, strict=True):
                into.samples.extend(family.samples)
    out = render(store, max_age=30, now=lambda: T0 + 10)
    assert out.body == exposition(merged)
    assert out.series == sum(len(f.samples) for f in merged) > 0
    assert 'modelName="NVIDIA \\"H100\\"\\\\ \\n80GB"' in out.body.decode()
    assert 'gpu="1",gpu_name="NVIDIA \\"H100\\"\\\\ \\n80GB",gpu_uuid="GPU-edge-b-1",node_name="edge-b"' \
        in out.body.decode().split("# TYPE kepler_node_gpu_joules_total counter\n")[1]


def test_shards_split_the_fleet_without_overlap(store: FleetStore) -> None:
    nodes = [f"edge-{n}" for n in range(12)]
    store.ingest([m for node in nodes for m in (status(node), telemetry(node, T0 + 5))])
    whole = render(store, max_age=30, now=lambda: T0 + 10)
    parts = [render(store, max_age=30, now=lambda: T0 + 10, shard=Shard(i, 3)) for i in range(3)]
    served = [set(by_node(p.body.decode(), "DCGM_FI_DEV_GPU_TEMP")) for p in parts]
    assert set.union(*served) == set(nodes) and sum(len(s) for s in served) == len(nodes)
    assert all(served) and sum(p.series for p in parts) == whole.series
    again = render(store, max_age=30, now=lambda: T0 + 10, shard=Shard(1, 3))
    assert set(by_node(again.body.decode(), "DCGM_FI_DEV_GPU_TEMP")) == served[1]  # stable
