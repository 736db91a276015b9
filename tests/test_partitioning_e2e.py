"""Issue 13 end to end on the edge: a real `kgpu edge run --backend sim --device-plugin` process,
a real mosquitto and the kubelet stand-in (kgpu/lab/kubelet.py) serving the real `Registration`
service of the upstream proto.

- the GPUs registered; one goes unhealthy on an XID and healthy again after the quiet period,
  with nothing restarted (the NVIDIA plugin's most repeated complaint);
- a MIG layout set in a GPUPartitioning object (a real controller, the real kubernetes client
  against kmock) while the node is offline reaches it when it starts, waits for the
  GPU's processes to leave (fenced meanwhile), is applied, survives a daemon restart and is
  advertised as `nvidia.com/mig-<profile>` devices; an impossible one is refused with its reason;
- time-slicing replicas are advertised as `<UUID>::<n>` and a pod over its memory share is reported.
The controller's side (the GPUPartitioning CRD, GFD labels) is tests/test_partitioning_cloud.py
and tests/test_node_labels.py."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kgpu.lab.broker import Mosquitto
from kgpu.lab.kube import KubeEmulator
from kgpu.lab.kubelet import KubeletThread
from kgpu.lab.processes import wait_for
from shared.mqtt import MqttLink, parse_broker_url
from shared.partitioning import NodePartitioning
from shared.protocol import Kind, PartitioningBody, make_envelope
from shared.topics import cloud_topic
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess

pytestmark = pytest.mark.slow

GPU = "nvidia.com/gpu"
NODE = "edge-part"


@pytest.fixture
def plugins() -> Iterator[Path]:
    """The device-plugin directory: short, as the kubelet's is (a unix socket path holds at most
    107 bytes, and pytest's tmp_path alone can be longer)."""
    directory = Path(tempfile.mkdtemp(prefix="kgpu-dp-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _publisher(broker: Mosquitto) -> MqttLink:
    link = MqttLink(parse_broker_url(broker.url), "kgpu-controller-test", backoff_min_s=0.1, backoff_max_s=0.5)
    link.start()
    wait_for(link.connected.is_set, what="publisher connected")
    return link


def _send(link: MqttLink, models: dict[str, Any], *, name: str = "site-mig", version: int = 1) -> None:
    body = PartitioningBody(partitioning=NodePartitioning.model_validate(
        {"name": name, "version": version, "models": models}))
    assert link.publish(cloud_topic(NODE, "partitioning"), make_envelope(NODE, body, Kind.PARTITIONING).to_json(),
                        retain=True)
    assert link.flush(10)


def _edge(tmp_path: Path, broker: Mosquitto, plugins: Path, model: str, **config: Any) -> EdgeProcess:
    return EdgeProcess(tmp_path / "edge", node=NODE, gpus=2, model=model, mqtt=broker.url,
                       config={"device_plugin": True, "kubelet_dir": str(plugins), **config})


def _decisions(edge: EdgeProcess, rule: str) -> list[dict[str, Any]]:
    return [d for d in edge.decisions(limit=500) if d.get("rule") == rule]


def test_the_kubelet_sees_a_gpu_go_unhealthy_on_an_xid_and_healthy_again_without_a_restart(
        tmp_path: Path, broker: Mosquitto, plugins: Path) -> None:
    with KubeletThread(plugins) as kubelet:
        edge = _edge(tmp_path, broker, plugins, "H100", health_quiet_period=3).start()
        try:
            uuids = [edge.gpu(i)["inventory"]["uuid"] for i in range(2)]
            wait_for(lambda: kubelet.health(GPU) == {u: "Healthy" for u in uuids}, timeout=30,
                     what="both GPUs registered healthy")
            registration = kubelet.registration(GPU)
            assert registration is not None and registration.version == "v1beta1"
            assert (plugins / registration.endpoint).is_socket()
            edge.inject(0, xid=94)  # contained ECC error: marks the GPU unhealthy
            wait_for(lambda: kubelet.health(GPU).get(uuids[0]) == "Unhealthy", timeout=30, what="GPU 0 unhealthy")
            assert kubelet.health(GPU)[uuids[1]] == "Healthy"
            wait_for(lambda: kubelet.health(GPU).get(uuids[0]) == "Healthy", timeout=60,
                     what="GPU 0 healthy again after the quiet period")
            pid_before = edge.proc.pid if edge.proc else 0
            assert edge.proc is not None and edge.proc.poll() is None and edge.proc.pid == pid_before
            allocated = kubelet.allocate(GPU, [uuids[1]])
            assert allocated.envs["NVIDIA_VISIBLE_DEVICES"] == uuids[1]
            # the kubelet restarts: it deletes every socket; the plugin serves and registers again
            kubelet.restart()
            wait_for(lambda: kubelet.registration(GPU) is not None and len(kubelet.health(GPU)) == 2, timeout=30,
                     what="registered again after the kubelet restarted")
        finally:
            assert edge.stop() == 0
        wait_for(lambda: not list(plugins.glob("kgpu-*.sock")), timeout=10, what="its socket removed on stop")


def _partitioning_object(kube: KubeEmulator, mig: Any, generation: int) -> None:
    body = {"apiVersion": "kgpu.io/v1alpha1", "kind": "GPUPartitioning",
            "metadata": {"name": "site-mig", "generation": generation},
            "spec": {"nodeSelector": {"site": "factory-3"}, "models": {"NVIDIA A100-SXM4-40GB": {"mig": mig}}}}
    if generation == 1:
        kube.custom.create_cluster_custom_object("kgpu.io", "v1alpha1", "gpupartitionings", body)
    else:
        kube.custom.patch_cluster_custom_object("kgpu.io", "v1alpha1", "gpupartitionings", "site-mig", body)


def test_a_mig_layout_set_in_the_crd_reaches_an_offline_node_waits_for_the_drain_survives_a_restart(
        tmp_path: Path, broker: Mosquitto, plugins: Path, kube: KubeEmulator) -> None:
    kube.add_node(NODE, {"site": "factory-3"})
    cloud = CloudProcess(tmp_path / "cloud", broker.url, kubeconfig=kube.kubeconfig).start()
    # the layout is set while the node's edge is not running: the controller publishes it retained
    _partitioning_object(kube, {"mixed": {"3g.20gb": 1, "2g.10gb": 1, "1g.5gb": 2}}, generation=1)
    wait_for(lambda: cloud.get(f"/api/v1/nodes/{NODE}/partitioning")["published_at"], timeout=30,
             what="the controller published the node's partitioning")
    with KubeletThread(plugins) as kubelet:
        edge = _edge(tmp_path, broker, plugins, "A100-40GB")
        try:
            edge.start()
            edge.inject(0, processes=[{"pid": 4242, "used_memory_mib": 1000, "sm_util": 30}])  # work on GPU 0
            wait_for(lambda: any(d["action"] == "wait_for_drain" and d["gpu_index"] == 0
                                 for d in _decisions(edge, "mig_layout")), timeout=30, what="GPU 0 waits for its drain")
            uuid0 = edge.gpu(0)["inventory"]["uuid"]
            wait_for(lambda: kubelet.health(GPU).get(uuid0) == "Unhealthy", timeout=30,
                     what="GPU 0 fenced: advertised unhealthy while it drains")
            mig_resources = {"nvidia.com/mig-3g.20gb", "nvidia.com/mig-2g.10gb", "nvidia.com/mig-1g.5gb"}
            wait_for(lambda: mig_resources <= set(kubelet.kubelet.resources()), timeout=60,
                     what="GPU 1 (idle) partitioned and its MIG devices advertised")
            edge.inject(0, processes=[])  # the work left
            wait_for(lambda: len(kubelet.health("nvidia.com/mig-1g.5gb")) == 4, timeout=60,
                     what="GPU 0 partitioned after its drain: two 1g.5gb each")
            applied = [d for d in _decisions(edge, "mig_layout") if d["action"] == "apply_mig_layout"]
            assert {d["gpu_index"] for d in applied if d["outcome"] == "applied"} == {0, 1}
            # whole GPUs are no longer allocatable: both are split into MIG devices (an empty list was sent)
            wait_for(lambda: kubelet.health(GPU) == {}, timeout=30, what="nvidia.com/gpu emptied at the kubelet")
            # dcgm-exporter's per-instance series, and the energy shared by compute slices
            assert edge.metric("DCGM_FI_DEV_FB_FREE", GPU_I_PROFILE="3g.20gb", gpu="0") > 0
            wait_for(lambda: edge.metric("kgpu_mig_device_joules_total", GPU_I_PROFILE="3g.20gb", gpu="0") > 0,
                     timeout=30, what="energy attributed to a MIG device")
            assert edge.metric("kgpu_gpu_devices_advertised", gpu="0", resource="nvidia.com/mig-1g.5gb") == 2
            # a daemon restart: the layout kept in the store is checked again and stays advertised
            assert edge.stop() == 0
            edge.start()
            wait_for(lambda: len(kubelet.health("nvidia.com/mig-1g.5gb")) == 4 and
                     all(h == "Healthy" for h in kubelet.health("nvidia.com/mig-1g.5gb").values()), timeout=60,
                     what="the MIG devices advertised again after the restart")
            wait_for(lambda: cloud.get(f"/api/v1/nodes/{NODE}/partitioning")["applied"], timeout=30,
                     what="the controller sees the layout applied (the edge's status)")
            # an impossible layout is refused with its reason, nothing touched
            _partitioning_object(kube, {"mixed": {"4g.20gb": 1, "3g.20gb": 2}}, generation=2)
            wait_for(lambda: any(d["action"] == "refuse_mig_layout" for d in _decisions(edge, "mig_layout")),
                     timeout=30, what="the impossible layout refused")
            assert len(kubelet.health("nvidia.com/mig-1g.5gb")) == 4
        finally:
            edge.stop()
            cloud.stop()


def test_time_slicing_replicas_are_advertised_and_a_pod_over_its_share_is_reported(
        tmp_path: Path, broker: Mosquitto, plugins: Path) -> None:
    proc = tmp_path / "proc"
    pod_uid = "0f2d5c3e-1111-2222-3333-444455556666"
    cgroup = proc / "4343" / "cgroup"
    cgroup.parent.mkdir(parents=True)
    cgroup.write_text(f"0::/kubepods.slice/kubepods-pod{pod_uid.replace('-', '_')}.slice/"
                      "cri-containerd-abcdef0123456789.scope\n")
    publisher = _publisher(broker)
    _send(publisher, {"*": {"timeSlicing": {"replicas": 4, "resourceName": "nvidia.com/gpu.shared"}}},
          name="share", version=1)
    with KubeletThread(plugins) as kubelet:
        edge = _edge(tmp_path, broker, plugins, "H100", proc_root=str(proc))
        try:
            edge.start()
            uuid0 = edge.gpu(0)["inventory"]["uuid"]
            wait_for(lambda: len(kubelet.health("nvidia.com/gpu.shared")) == 8, timeout=30,
                     what="2 GPUs x 4 replicas advertised")
            assert f"{uuid0}::3" in kubelet.health("nvidia.com/gpu.shared")
            allocated = kubelet.allocate("nvidia.com/gpu.shared", [f"{uuid0}::1", f"{uuid0}::2"])
            assert allocated.envs["NVIDIA_VISIBLE_DEVICES"] == uuid0  # replicas map back to their GPU
            # an H100 has 80 GB: a share is 20 GB; this pod's process uses 30 GB
            edge.inject(0, processes=[{"pid": 4343, "used_memory_mib": 30 * 1024, "sm_util": 40}])
            wait_for(lambda: _decisions(edge, "memory_share"), timeout=30, what="the pod over its share reported")
            over = _decisions(edge, "memory_share")[0]
            assert over["action"] == "record" and over["inputs"]["share_bytes"] < over["inputs"]["used_bytes"]
        finally:
            edge.stop()
            publisher.stop()
