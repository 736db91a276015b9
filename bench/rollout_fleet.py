"""Rollout over a large simulated fleet with offline nodes.

A real mosquitto, kmock's emulated Kubernetes API with the real kubernetes client, a real
`kgpu cloud run --kubeconfig`, and the fleet simulator (kgpu/lab/fleetsim/) for the edges, with
telemetry and events flowing all along. The lab's ClusterPlayer (kgpu/lab/cluster.py) plays the
DaemonSet controller: when the controller deletes a daemon pod, a new pod appears on that node
from the DaemonSet's current template, and the simulated node's daemon reports the image tag as
its version (a fresh retained status), as a restarted `kgpu edge run` would. A share of the
nodes is cut off (their wills say offline) before the rollout starts: they must be deferred, not
block the waves, and be upgraded once they return.

    python -m bench.rollout_fleet --nodes 500 --offline 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Row, metric_sum
from kgpu.lab.broker import Mosquitto
from kgpu.lab.cluster import ClusterPlayer, Replaced
from kgpu.lab.fleetsim import FleetOptions, FleetSim, raise_fd_limit
from kgpu.lab.kube import KubeEmulator
from kgpu.lab.processes import wait_for
from tests.helpers.cloud_process import CloudProcess

NS, DS = "kgpu", "kgpu-edge"
OLD_IMAGE, NEW_IMAGE = "kgpu/edge:0.1.0", "kgpu/edge:0.2.0"
LABELS = {"app": "kgpu-edge"}


@dataclass
class RolloutResult:
    nodes: int
    offline: int
    online_done_s: float  # rollout created -> every online node upgraded, the offline ones deferred
    returned_done_s: float  # offline nodes back -> rollout completed
    max_in_flight: int
    max_unavailable: int
    deleted_twice: int  # nodes whose daemon pod was deleted more than once (must be 0)
    kube_requests: int


async def run(nodes: int = 500, offline_share: float = 0.1, gpus: int = 8, interval_s: float = 10.0,
              max_unavailable: str = "20%") -> RolloutResult:
    options = FleetOptions(mqtt="mqtt://127.0.0.1:1", nodes=nodes, gpus=gpus, interval_s=interval_s,
                           event_every_s=60.0, prefix="edge", daemon_version="0.1.0")
    raise_fd_limit(options.connections + 512)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker").start()
        kube = KubeEmulator(work / "kube")
        cloud: CloudProcess | None = None
        sim = FleetSim(FleetOptions(**{**options.__dict__, "mqtt": broker.url}))
        names = [n.name for n in sim.nodes]
        step = max(1, round(1 / offline_share)) if offline_share > 0 else 0
        offline = set(names[step // 2::step]) if step else set()
        # kmock 0.8 matches every request against all it has served (quadratic): the player drops
        # that history as it goes (forget_requests), or at 500 nodes the emulator sets the pace
        player = ClusterPlayer(kube, names, namespace=NS, daemonset=DS, labels=LABELS, forget_requests=True)

        def restarted(replaced: list[Replaced]) -> None:  # on the loop: the simulator lives there
            for r in replaced:
                if sim.node(r.node).connected:
                    sim.restart(r.node, r.version)

        reactor: asyncio.Task[None] | None = None
        try:
            await asyncio.to_thread(player.seed, OLD_IMAGE, offline=offline)
            await sim.start()
            if not await sim.wait_connected(60):
                raise SystemExit("the simulated fleet did not connect")
            sim.cut_links(sim.connections_of(offline))
            cloud = CloudProcess(work / "cloud", broker.url, kubeconfig=kube.kubeconfig,
                                 env={"KGPU_LOG_LEVEL": "warning", "KGPU_NAMESPACE": NS, "KGPU_DAEMONSET": DS,
                                      "KGPU_API_INSECURE": "true"})  # a lab: POST without a token
            cloud.start()
            await asyncio.to_thread(wait_for, lambda: len(cloud.get("/api/v1/nodes")["nodes"]) == nodes, 60, 0.5,
                                    f"{nodes} nodes in the fleet store")
            await asyncio.to_thread(wait_for, lambda: metric_sum(cloud.base, "kgpu_controller_leader") == 1.0, 60, 0.5,
                                    "the controller leading")
            reactor = asyncio.create_task(player.run(restarted))
            status, created = await asyncio.to_thread(
                cloud.request, "POST", "/api/v1/rollouts",
                {"image": NEW_IMAGE, "maxUnavailable": max_unavailable, "healthTimeout": "120s",
                 "failureThreshold": "5%", "waves": {"canary": [names[0]], "percentages": [10, 50, 100]}})
            if status != 201:
                raise SystemExit(f"rollout refused: {status} {created}")
            started = time.monotonic()
            limit = int(created["maxUnavailableNodes"])
            max_in_flight = 0
            online = nodes - len(offline)

            async def until(check: Any, timeout: float, what: str) -> dict[str, Any]:
                nonlocal max_in_flight
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    r = await asyncio.to_thread(cloud.get, f"/api/v1/rollouts/{created['id']}")
                    counts = r["counts"]
                    max_in_flight = max(max_in_flight,
                                        counts.get("pod-deletion-required", 0) + counts.get("validation-required", 0))
                    if r["state"] not in ("running", "completed"):
                        raise SystemExit(f"rollout {r['state']}: {counts}")
                    if check(r):
                        return r
                    await asyncio.sleep(0.5)
                raise SystemExit(f"timed out waiting for {what}")

            await until(lambda r: r["counts"].get("upgrade-done", 0) == online
                        and r["counts"].get("offline-deferred", 0) == len(offline),
                        600, "every online node upgraded")
            online_done_s = time.monotonic() - started
            back = time.monotonic()
            await sim.restore_links(sim.connections_of(offline))
            await until(lambda r: r["state"] == "completed", 600, "the rollout completed")
            returned_done_s = time.monotonic() - back
            kube_requests = player.served + len(kube.requests())
        finally:
            if reactor is not None:
                reactor.cancel()
                await asyncio.gather(reactor, return_exceptions=True)
            await sim.stop()
            player.stop()
            if cloud is not None and cloud.proc is not None and cloud.proc.poll() is None:
                cloud.stop()
            kube.stop()
            broker.stop()
    return RolloutResult(nodes=nodes, offline=len(offline), online_done_s=online_done_s,
                         returned_done_s=returned_done_s, max_in_flight=max_in_flight, max_unavailable=limit,
                         deleted_twice=sum(1 for n in player.deletions().values() if n > 1),
                         kube_requests=kube_requests)


def describe(r: RolloutResult) -> str:
    return "\n".join([
        f"rollout over {r.nodes} simulated nodes, {r.offline} of them offline when it starts",
        f"  online nodes upgraded (offline deferred)  {r.online_done_s:.1f} s",
        f"  offline nodes back -> rollout completed   {r.returned_done_s:.1f} s",
        f"  most nodes in flight at once             {r.max_in_flight} (maxUnavailable {r.max_unavailable})",
        f"  nodes whose daemon pod was deleted twice {r.deleted_twice}",
        f"  Kubernetes API requests                  {r.kube_requests}",
    ])


def rows(r: RolloutResult, command: str) -> list[Row]:
    label = f"rollout ({r.nodes} nodes, {r.offline} offline)"
    return [
        Row(label, f"{r.nodes - r.offline} online nodes upgraded", r.online_done_s, "s",
            f"{(r.nodes - r.offline) / r.online_done_s:.1f} nodes/s", command),
        Row(label, f"{r.offline} returning nodes upgraded", r.returned_done_s, "s", "", command),
        Row(label, "pods deleted twice", r.deleted_twice, "nodes", "0", command),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--offline", type=float, default=0.1, help="share of the nodes offline when it starts")
    parser.add_argument("--max-unavailable", default="20%")
    args = parser.parse_args()
    print(describe(asyncio.run(run(args.nodes, args.offline, max_unavailable=args.max_unavailable))))


if __name__ == "__main__":
    main()
