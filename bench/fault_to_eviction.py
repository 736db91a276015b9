"""Fault-to-eviction latency: from an XID 79 injected on an edge GPU to the controller's eviction
request for the GPU pod on that node.

Real mosquitto, a real emulated Kubernetes API (kmock) with the real kubernetes client, a real
`kgpu cloud run` and real `kgpu edge run --backend sim` processes (sampling every 1 s). Each round
uses a fresh stack so that cool-downs do not interfere. The path measured: XID event thread →
health decision in the next cycle → outbox → MQTT → ingest commit → migration trigger → taint →
target choice → Eviction API call.

    python -m bench.fault_to_eviction [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Row
from kgpu.lab.broker import Mosquitto
from kgpu.lab.kube import KubeEmulator
from kgpu.lab.processes import wait_for
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess

GPU_LABELS = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "2"}


def eviction_requested(kube: KubeEmulator, pod: str) -> bool:
    return any(r.method == "POST" and r.url.path.endswith(f"/pods/{pod}/eviction") for r in kube.requests())


def one_round(work: Path) -> tuple[float, float]:
    """(seconds from injection to the eviction request, of which until the cloud stored the xid)."""
    broker = Mosquitto(work / "broker").start()
    kube = KubeEmulator(work / "kube")
    processes: list[EdgeProcess] = []
    try:
        for name in ("edge-a", "edge-b"):
            kube.add_node(name, {**GPU_LABELS, "kubernetes.io/hostname": name})
        kube.add_pod("trainer", "edge-a")
        kube.react("post /api/v1/namespaces/default/pods/trainer/eviction", 201, {"kind": "Status", "status": "Success"})
        edges = [EdgeProcess(work / n, node=n, mqtt=broker.url, config={"status_interval": 1}) for n in ("edge-a", "edge-b")]
        processes.extend(edges)
        cloud = CloudProcess(work / "cloud", broker.url, kubeconfig=kube.kubeconfig, env={"KGPU_LOG_LEVEL": "warning"})
        processes.append(cloud)
        for process in processes:
            process.start()
        wait_for(lambda: all((n := cloud.node_state(e.node)) and n["online"] and n["gpus"] for e in edges),
                 timeout=30, what="both edges online at the cloud")
        wait_for(lambda: cloud.get("/metrics").count("kgpu_controller_leader 1.0"), timeout=30, what="leader")
        started = time.perf_counter()
        edges[0].inject(1, xid=79)
        stored_at = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if stored_at is None and cloud.get("/api/v1/events?node=edge-a&kind=xid")["events"]:
                stored_at = time.perf_counter() - started
            if eviction_requested(kube, "trainer"):
                return time.perf_counter() - started, stored_at or float("nan")
            time.sleep(0.05)
        raise SystemExit("no eviction within 60 s")
    finally:
        for process in processes:
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()
        kube.stop()
        broker.stop()


def measure(rounds: int = 3) -> tuple[list[float], list[float]]:
    """(seconds to the eviction request, of which until the XID was stored) for each round."""
    totals, stored = [], []
    for index in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            total, at_cloud = one_round(Path(tmp))
        totals.append(total)
        stored.append(at_cloud)
        print(f"  round {index + 1}: xid stored in the cloud after {at_cloud:.2f} s, "
              f"eviction requested after {total:.2f} s", file=sys.stderr)
    return totals, stored


def describe(totals: list[float], stored: list[float]) -> str:
    return "\n".join([
        "fault-to-eviction latency (edge sampling interval 1 s)",
        (f"  median {statistics.median(totals):.2f} s, min {min(totals):.2f} s, max {max(totals):.2f} s "
        f"over {len(totals)} rounds"),
        f"  of which edge -> cloud (xid stored): median {statistics.median(stored):.2f} s",
    ])


def table_rows(totals: list[float], stored: list[float], command: str) -> list[Row]:
    label = f"fault to eviction ({len(totals)} rounds)"
    return [
        Row(label, "XID 79 injected -> eviction requested, median", statistics.median(totals), "s",
            f"{min(totals):.2f}-{max(totals):.2f} s", command),
        Row(label, "of which XID stored in the cloud, median", statistics.median(stored), "s", "", command),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(describe(*measure(args.rounds)))


if __name__ == "__main__":
    main()
