"""Kepler's GPU metric families: the pure builder against Kepler's own list (kept in
deploy/reference/kepler/), then through the real daemon (real pynvml over the simulated driver),
checked by the real `promtool check metrics`."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from kgpu.lab.processes import wait_for
from shared.kepler import (
    FAMILIES,
    NODE_FAMILIES,
    KeplerContainer,
    KeplerGpu,
    KeplerPod,
    KeplerProcess,
    kepler_families,
)
from tests.helpers.edge_process import EdgeProcess
from tests.helpers.pod_list import PodListServer

REFERENCE = json.loads(
    (Path(__file__).resolve().parent.parent / "deploy/reference/kepler/gpu-metrics.json").read_text()
)
REF = {f["name"]: f for f in REFERENCE["families"]}


def scrape_text(families: list[Any]) -> str:
    class _Fixed:
        def collect(self) -> Iterator[Any]:
            yield from families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed())
    return generate_latest(registry).decode()


def samples_of(text: str) -> dict[str, list[Sample]]:
    """Series by their exposed name (`..._total` for counters), as Prometheus stores them."""
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("kepler_"):
                out.setdefault(s.name, []).append(s)
    return out


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/test.sh installs Debian's prometheus package)")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the builder against the reference ------------------------------------------------------------


def test_reference_names_its_source() -> None:
    src = REFERENCE["source"]
    assert src["repository"] == "https://github.com/sustainable-computing-io/kepler"
    assert len(src["commit"]) == 40 and src["tag"] and "Apache-2.0" in src["licence"]


def test_builder_has_exactly_keplers_families_types_helps_and_labels() -> None:
    assert set(FAMILIES) == set(REF)
    for name, (kind, doc, labels) in FAMILIES.items():
        assert (kind, doc, list(labels)) == (REF[name]["type"], REF[name]["help"], REF[name]["labels"]), name
    families = {f.name if f.type != "counter" else f"{f.name}_total": f for f in kepler_families("n1", [])}
    assert set(families) == set(REF)
    for name, family in families.items():
        assert family.type == REF[name]["type"] and family.documentation == REF[name]["help"]


def test_builder_series_labels_and_keplers_positive_rule() -> None:
    gpus = [KeplerGpu(index=1, uuid="GPU-b", name="NVIDIA H100 80GB HBM3", joules=30.0, idle_joules=10.0,
                      active_joules=20.0, watts=300.0, idle_watts=70.0, active_watts=230.0),
            KeplerGpu(index=0, uuid="GPU-a", name="NVIDIA H100 80GB HBM3", joules=5.0, idle_joules=5.0,
                      active_joules=0.0)]  # no reading: no watts series for it
    pods = [KeplerPod(uid="uid-1", name="infer", namespace="vision", joules=12.0, watts=100.0),
            KeplerPod(uid="uid-2", name="done", namespace="vision", joules=3.0, watts=0.0)]
    containers = [KeplerContainer(container_id="c" * 64, name="worker", pod_uid="uid-1", joules=12.0, watts=100.0)]
    processes = [KeplerProcess(pid=42, comm="python", exe="/usr/bin/python3", joules=12.0, watts=100.0,
                               container_id="c" * 64, type="container"),
                 KeplerProcess(pid=7, comm="", exe="", joules=0.0, watts=0.0)]
    text = scrape_text(kepler_families("edge-1", gpus, pods, containers, processes))
    series = samples_of(text)
    for name, found in series.items():
        for s in found:
            assert set(s.labels) == {*REF[name]["labels"], "node_name"}, (name, s.labels)
            assert s.labels["node_name"] == "edge-1"
    assert [s.labels["gpu"] for s in series["kepler_node_gpu_info"]] == ["0", "1"]
    assert [s.labels["gpu"] for s in series["kepler_node_gpu_watts"]] == ["1"]
    idle = {s.labels["gpu_uuid"]: s.value for s in series["kepler_node_gpu_idle_joules_total"]}
    assert idle == {"GPU-a": 5.0, "GPU-b": 10.0}
    assert {s.labels["vendor"] for s in series["kepler_node_gpu_joules_total"]} == {"nvidia"}
    assert [s.labels["pod_name"] for s in series["kepler_pod_gpu_joules_total"]] == ["done", "infer"]
    assert [s.labels["pod_name"] for s in series["kepler_pod_gpu_watts"]] == ["infer"]  # 0 W: no series
    (container,) = series["kepler_container_gpu_joules_total"]
    assert container.labels == {"container_id": "c" * 64, "container_name": "worker", "runtime": "unknown",
                                "state": "running", "pod_id": "uid-1", "node_name": "edge-1"}
    (process,) = series["kepler_process_gpu_joules_total"]  # pid 7 has 0 J: no series, as in Kepler
    assert process.labels["pid"] == "42" and process.labels["type"] == "container"
    assert process.labels["vm_id"] == "" and process.labels["state"] == "running"
    promtool_check(text)


def test_builder_node_families_with_hostname_for_the_fleet_exporter() -> None:
    """What the controller's fleet exporter asks for: the node families only, in Kepler's order,
    every series with `Hostname` = the node beside Kepler's labels (promtool lints it clean)."""
    gpu = KeplerGpu(index=0, uuid="GPU-a", name="NVIDIA H100 80GB HBM3", joules=30.0, idle_joules=10.0,
                    active_joules=20.0, watts=300.0, idle_watts=70.0, active_watts=230.0)
    pod = KeplerPod(uid="uid-1", name="infer", namespace="vision", joules=12.0, watts=100.0)
    families = kepler_families("edge-1", [gpu], [pod], hostname=True, only=NODE_FAMILIES)
    names = [f.name if f.type != "counter" else f"{f.name}_total" for f in families]
    assert names == [name for name in FAMILIES if name.startswith("kepler_node_gpu_")] == list(NODE_FAMILIES)
    text = scrape_text(families)
    for name, found in samples_of(text).items():
        assert len(found) == 1 and found[0].labels == {"gpu": "0", "gpu_uuid": "GPU-a", "gpu_name":
                                                       "NVIDIA H100 80GB HBM3", "vendor": "nvidia",
                                                       "node_name": "edge-1", "Hostname": "edge-1"}, name
    assert "kepler_pod_" not in text
    promtool_check(text)


# --- through the real daemon ---------------------------------------------------------------------


def one(series: dict[str, list[Sample]], name: str, **labels: str) -> float:
    found = [s for s in series.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0].value


def dcgm_power(text: str, gpu: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "DCGM_FI_DEV_POWER_USAGE" and s.labels["gpu"] == gpu:
                return s.value
    raise AssertionError(f"no DCGM_FI_DEV_POWER_USAGE for GPU {gpu}")


@pytest.mark.slow
def test_kepler_families_from_the_real_daemon(edge_factory: Callable[..., EdgeProcess], tmp_path: Path,
                                              pod_list_server: PodListServer) -> None:
    proc = tmp_path / "proc"
    uid, cid = "aaaaaaaa-1111-2222-3333-444444444444", "a" * 64
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope\n")
    (proc / "4242" / "comm").write_text("python3\n")
    pod_list_server.body = json.dumps({"items": [{
        "metadata": {"name": "infer", "namespace": "vision", "uid": uid},
        "status": {"containerStatuses": [{"name": "worker", "containerID": f"containerd://{cid}"}]},
    }]}).encode()
    edge = edge_factory(gpus=2, config={"proc_root": str(proc), "pod_list_url": pod_list_server.url})
    for index in (0, 1):
        edge.inject(index, utilization=0)
    wait_for(lambda: len(edge.get("/api/v1/energy")["idle_power_w"]) == 2, what="idle power learned on both GPUs")
    # GPU 1: a pod's process and a host process (5151: no /proc entry, so no pod); GPU 0 idles
    edge.inject(1, processes=[{"pid": 4242, "used_memory_mib": 1000, "sm_util": 60},
                              {"pid": 5151, "used_memory_mib": 500, "sm_util": 20}])

    def scrape() -> tuple[str, dict[str, list[Sample]]]:
        text = edge.get("/metrics")
        return text, samples_of(text)

    def ready() -> tuple[str, dict[str, list[Sample]]] | None:
        text, series = scrape()
        names = {s.labels.get("pid") for s in series.get("kepler_process_gpu_joules_total", [])}
        return (text, series) if {"4242", "5151"} <= names else None

    text, first = wait_for(ready, what="Kepler process series for both processes")

    # every Kepler GPU family of the reference, with exactly Kepler's labels
    assert set(first) == set(REF), set(REF) ^ set(first)
    for name, found in first.items():
        for s in found:
            assert set(s.labels) == {*REF[name]["labels"], "node_name"}, (name, s.labels)
            assert s.labels["node_name"] == "edge-test"
    kepler_text = "".join(line + "\n" for line in text.splitlines() if "kepler_" in line)
    promtool_check(kepler_text)

    # per GPU: identity, watts as sampled, idle + active = total
    for gpu in ("0", "1"):
        info = [s for s in first["kepler_node_gpu_info"] if s.labels["gpu"] == gpu][0].labels
        assert info["gpu_uuid"].startswith("GPU-") and info["gpu_name"].startswith("NVIDIA H100")
        assert info["vendor"] == "nvidia"
        assert one(first, "kepler_node_gpu_watts", gpu=gpu) == pytest.approx(dcgm_power(text, gpu))
        watts = one(first, "kepler_node_gpu_watts", gpu=gpu)
        idle_w, active_w = one(first, "kepler_node_gpu_idle_watts", gpu=gpu), one(
            first, "kepler_node_gpu_active_watts", gpu=gpu)
        assert idle_w + active_w == pytest.approx(watts) and idle_w >= 0 and active_w >= 0
        total = one(first, "kepler_node_gpu_joules_total", gpu=gpu)
        assert one(first, "kepler_node_gpu_idle_joules_total", gpu=gpu) + one(
            first, "kepler_node_gpu_active_joules_total", gpu=gpu) == pytest.approx(total)
    # GPU 0 idles: all its energy is idle, its idle power is what it draws
    assert one(first, "kepler_node_gpu_active_joules_total", gpu="0") == 0.0
    assert one(first, "kepler_node_gpu_idle_joules_total", gpu="0") > 0
    assert one(first, "kepler_node_gpu_idle_watts", gpu="0") == one(first, "kepler_node_gpu_watts", gpu="0")
    # GPU 1 works: its idle power is the learned one, below what it draws
    learned = edge.get("/api/v1/energy")["idle_power_w"]
    uuid1 = one_label(first, "kepler_node_gpu_info", "gpu_uuid", gpu="1")
    assert one(first, "kepler_node_gpu_idle_watts", gpu="1") == pytest.approx(learned[uuid1])
    assert one(first, "kepler_node_gpu_active_watts", gpu="1") > 0

    # the pod, its container and both processes, with Kepler's labels
    assert one(first, "kepler_pod_gpu_joules_total", pod_id=uid, pod_name="infer", pod_namespace="vision",
               state="running") > 0
    assert one(first, "kepler_container_gpu_joules_total", container_id=cid, container_name="worker",
               pod_id=uid, state="running") > 0
    assert one(first, "kepler_process_gpu_joules_total", pid="4242", comm="python3", type="container",
               container_id=cid) > 0
    assert one(first, "kepler_process_gpu_joules_total", pid="5151", type="regular", container_id="") > 0

    # the pod's own share of GPU 1 (NVML's per-process figures): its process only, not the host's
    per_pod = {f.name: f.samples for f in text_string_to_metric_families(text)
               if f.name in ("kgpu_pod_gpu_utilization_percent", "kgpu_pod_gpu_memory_used_bytes")}
    for name, expected in (("kgpu_pod_gpu_utilization_percent", 60.0),
                           ("kgpu_pod_gpu_memory_used_bytes", 1000.0 * 1024 * 1024)):
        (s,) = per_pod[name]
        assert s.labels == {"gpu": "1", "uuid": uuid1, "Hostname": "edge-test", "pod": "infer",
                            "namespace": "vision", "container": "worker"}, s.labels
        assert s.value == pytest.approx(expected), (name, s.value)

    # counters grow; then GPU 0 busy with no process NVML lists: active, not idle
    edge.inject(0, utilization=80)

    def busy0() -> dict[str, list[Sample]] | None:
        _, series = scrape()
        grown = one(series, "kepler_node_gpu_joules_total", gpu="1") > one(first, "kepler_node_gpu_joules_total",
                                                                             gpu="1")
        return series if grown and one(series, "kepler_node_gpu_active_joules_total", gpu="0") > 0 else None

    later = wait_for(busy0, what="GPU 0's busy energy booked as active")
    for name in ("kepler_node_gpu_joules_total", "kepler_node_gpu_idle_joules_total",
                 "kepler_node_gpu_active_joules_total"):
        for gpu in ("0", "1"):
            assert one(later, name, gpu=gpu) >= one(first, name, gpu=gpu), (name, gpu)
    assert one(later, "kepler_pod_gpu_joules_total", pod_id=uid) > one(first, "kepler_pod_gpu_joules_total",
                                                                       pod_id=uid)
    uuid0 = one_label(later, "kepler_node_gpu_info", "gpu_uuid", gpu="0")
    idle0 = one(later, "kepler_node_gpu_idle_watts", gpu="0")
    assert idle0 == pytest.approx(edge.get("/api/v1/energy")["idle_power_w"][uuid0])
    assert idle0 < one(later, "kepler_node_gpu_watts", gpu="0")


def one_label(series: dict[str, list[Sample]], name: str, label: str, **labels: str) -> str:
    found = [s for s in series.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0].labels[label]
