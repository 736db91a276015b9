"""Fault to GPU back in service, per fault class, with nobody on hand (issue 14).

For each fault class, a fresh stack: a real mosquitto, kmock with the real kubernetes client, a
real `kgpu cloud run`, and two real `kgpu edge run --backend sim` nodes in one zone: `edge-a` with
4 GPUs serving the device-plugin API to the kubelet stand-in (kgpu/lab/kubelet.py), whose
pod-resources API tells the edge which pod holds which GPU, and `edge-b` with 2. Pods w0, w1, w2
(ReplicaSet-owned) run on edge-a's GPUs 0, 1, 2, each with a simulated process; GPU 3 is free.
The fault hits GPU 1. This script plays the kubelet and the ReplicaSet: an evicted pod's process
ends and its device is released, and its replacement is allocated a healthy free device of
edge-a (the stand-in's device list: a fenced GPU is advertised unhealthy) and starts a process
there.

Measured, per class: seconds from the fault to GPU 1 advertised healthy again (the ladder
validated it), to the evicted work running again, and the count of pods moved that were on
healthy GPUs (must be 0). Fault classes: an XID 79 that a GPU reset clears, an XID 79 that
needs a node reboot (resets fail; the reboot is asked of the controller and granted by its
circuit breaker), heat (a GPU at 96 °C under load), and a row remap pending (a double-bit ECC
error: the remap takes effect at the next reset).

    python -m bench.remediation [--classes xid-reset,heat]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Row
from kgpu.lab.broker import Mosquitto
from kgpu.lab.kube import KubeEmulator
from kgpu.lab.kubelet import KubeletThread
from kgpu.lab.processes import wait_for
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess

RESOURCE = "nvidia.com/gpu"
FAULTY = 1  # the GPU index every fault hits
GPU_LABELS = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "topology.kubernetes.io/zone": "site-1"}
FAULTS: dict[str, dict[str, Any]] = {
    "xid-reset": {"xid": 79, "lost": True},  # fallen off the bus; a reset brings it back
    "xid-reboot": {"xid": 79, "lost": True, "recovery": "reboot"},  # a reset does not
    "heat": {"temperature_c": 96.0},  # above criticalTempC 90 under load
    "row-remap-pending": {"ecc_dbe": 1},  # the row is remapped at the next reset
}
LIMIT_S = 240.0


@dataclass
class Outcome:
    """What one fault class measured."""

    fault: str
    back_s: float | None = None  # fault -> GPU 1 advertised healthy again
    placed_s: float | None = None  # fault -> the last evicted pod running again
    moved_from_healthy: int = 0  # pods evicted that held only healthy GPUs (must be 0)
    moved: list[str] = field(default_factory=list)
    reboots: list[dict[str, Any]] = field(default_factory=list)  # the controller's reboot rows
    ladder: list[str] = field(default_factory=list)  # the remediation decisions, in order

    @property
    def done_s(self) -> float | None:
        """Back in service with its work placed again."""
        if self.back_s is None or (self.moved and self.placed_s is None):
            return None
        return max(self.back_s, self.placed_s or 0.0)


class KubeletPlayer:
    """The kubelet and the ReplicaSet of edge-a, as far as this flow needs them."""

    def __init__(self, kube: KubeEmulator, kubelet: KubeletThread, edge: EdgeProcess, uuids: list[str]) -> None:
        self.kube, self.kubelet, self.edge, self.uuids = kube, kubelet, edge, uuids
        self.where: dict[str, int] = {}  # pod -> GPU index
        self.processes: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(uuids))}
        self.handled: set[str] = set()
        self.next_pid = 4000

    def start_pod(self, name: str, index: int) -> None:
        self.kube.react(f"post /api/v1/namespaces/default/pods/{name}/eviction", 201,
                        {"kind": "Status", "status": "Success"})
        self.kubelet.allocate(RESOURCE, [self.uuids[index]], pod=f"default/{name}")
        self.where[name] = index
        self.next_pid += 1
        self.processes[index].append({"pid": self.next_pid, "used_memory_mib": 2000, "sm_util": 60.0, "pod": name})
        self._inject(index)

    def _inject(self, index: int) -> None:
        procs = [{k: v for k, v in p.items() if k != "pod"} for p in self.processes[index]]
        self.edge.inject(index, processes=procs)

    def evicted(self) -> list[str]:
        return [name for name in self.where if name not in self.handled and any(
            r.method == "POST" and r.url.path.endswith(f"/pods/{name}/eviction") for r in self.kube.requests())]

    def end_pod(self, name: str) -> int:
        """The evicted pod's container ends: its process leaves the GPU, its device is freed."""
        self.handled.add(name)
        index = self.where[name]
        self.processes[index] = [p for p in self.processes[index] if p["pod"] != name]
        self._inject(index)
        self.kubelet.release(f"default/{name}")
        self.kube.core.delete_namespaced_pod(name, "default")
        return index

    def place(self, name: str) -> bool:
        """Its replacement on a healthy free device of edge-a, if there is one now."""
        health = self.kubelet.health(RESOURCE)
        taken = set(self.where.values())
        free = [i for i, uuid in enumerate(self.uuids) if health.get(uuid) == "Healthy" and i not in taken]
        if not free:
            return False
        self.kube.add_pod(name, "edge-a")
        self.start_pod(name, free[0])
        return True


def run(fault: str, work: Path) -> Outcome:
    """One fault class on a fresh stack."""
    outcome = Outcome(fault)
    broker = Mosquitto(work / "broker").start()
    kube = KubeEmulator(work / "kube")
    kubelet = KubeletThread(work / "dp", pod_resources_socket=work / "pr.sock").start()
    processes: list[Any] = []
    try:
        for name in ("edge-a", "edge-b"):
            kube.add_node(name, {**GPU_LABELS, "kubernetes.io/hostname": name})
        # only the ladder brings a GPU back early; the simulator's reboot keeps the daemon running
        common = {"status_interval": 1, "health_quiet_period": 600, "remediation_reboot_settle": 5}
        edge_a = EdgeProcess(work / "edge-a", node="edge-a", gpus=4, mqtt=broker.url,
                             config={**common, "device_plugin": True, "kubelet_dir": str(work / "dp"),
                                     "pod_resources_socket": str(work / "pr.sock")})
        edge_b = EdgeProcess(work / "edge-b", node="edge-b", gpus=2, mqtt=broker.url, config=common)
        cloud = CloudProcess(work / "cloud", broker.url, kubeconfig=kube.kubeconfig,
                             env={"KGPU_MIGRATION_GRACE": "1", "KGPU_LOG_LEVEL": "warning"})
        processes += [edge_a, edge_b, cloud]
        for process in processes:
            process.start()
        uuids = [edge_a.gpu(i)["inventory"]["uuid"] for i in range(4)]
        wait_for(lambda: len(kubelet.health(RESOURCE)) == 4, timeout=60, what="edge-a's GPUs at the kubelet")
        player = KubeletPlayer(kube, kubelet, edge_a, uuids)
        for index in range(3):
            kube.add_pod(f"w{index}", "edge-a")
            player.start_pod(f"w{index}", index)
        wait_for(lambda: (n := cloud.node_state("edge-a")) and n.get("pod_map_source") == "pod-resources"
                 and all(g.get("pods") == [f"default/w{g['index']}"] for g in n["gpus"] if g["index"] < 3),
                 timeout=60, what="edge-a's pods per GPU at the controller")
        wait_for(lambda: cloud.get("/metrics").count("kgpu_controller_leader 1.0"), timeout=30, what="a leader")

        started = time.monotonic()
        edge_a.inject(FAULTY, **FAULTS[fault])
        fenced = False
        waiting: list[str] = []  # evicted, their replacement not placed yet
        while time.monotonic() - started < LIMIT_S:
            for name in player.evicted():
                index = player.end_pod(name)
                outcome.moved.append(name)
                if index != FAULTY:
                    outcome.moved_from_healthy += 1
                waiting.append(name)
            for name in list(waiting):
                if player.place(f"{name}-r"):
                    waiting.remove(name)
                    if not waiting:
                        outcome.placed_s = time.monotonic() - started
            state = kubelet.health(RESOURCE).get(uuids[FAULTY])
            fenced = fenced or state == "Unhealthy"
            if fenced and state == "Healthy" and outcome.back_s is None:
                outcome.back_s = time.monotonic() - started
            if outcome.done_s is not None:
                break
            time.sleep(0.1)
        outcome.reboots = cloud.get("/api/v1/reboots").get("reboots", [])
        outcome.ladder = [f"{d['action']} {d['outcome']}" for d in reversed(edge_a.decisions(limit=500))
                          if d.get("rule") == "remediation"]
        return outcome
    finally:
        for process in processes:
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()
        kubelet.stop()
        kube.stop()
        broker.stop()


def measure(faults: list[str]) -> list[Outcome]:
    outcomes = []
    for fault in faults:
        work = Path(tempfile.mkdtemp(prefix="kgpu-rb-", dir="/tmp"))  # short: unix socket paths
        try:
            outcomes.append(run(fault, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return outcomes


def describe(outcomes: list[Outcome]) -> str:
    """One line per fault class, then the ladder's steps."""
    lines = ["fault class        back in service  work placed  done (s)  moved  from healthy GPUs  reboots granted"]
    for o in outcomes:
        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"
        granted = sum(1 for r in o.reboots if r.get("verdict") == "grant")
        lines.append(f"{o.fault:<18} {fmt(o.back_s):>15}  {fmt(o.placed_s):>11}  {fmt(o.done_s):>8}  "
                     f"{len(o.moved):>5}  {o.moved_from_healthy:>17}  {granted:>15}")
    for o in outcomes:
        lines.append(f"  {o.fault}: {' -> '.join(o.ladder) or 'no remediation step'}")
    return "\n".join(lines)


def table_rows(outcomes: list[Outcome], command: str) -> list[Row]:
    rows = []
    for o in outcomes:
        done = o.done_s
        rows.append(Row(f"remediation {o.fault}", "fault -> GPU back in service, its work placed again",
                        done if done is not None else float("nan"), "s",
                        "target < 90 s" + ("" if done is None else f": {'met' if done < 90 else 'NOT met'}"), command))
        rows.append(Row(f"remediation {o.fault}", "pods moved that were on healthy GPUs", o.moved_from_healthy,
                        "pods", "must be 0", command))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default=",".join(FAULTS), help=f"comma-separated, of: {', '.join(FAULTS)}")
    args = parser.parse_args(argv)
    faults = [f.strip() for f in args.classes.split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown fault class {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    outcomes = measure(faults)
    print(describe(outcomes))
    return 0 if all(o.done_s is not None and o.moved_from_healthy == 0 for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
