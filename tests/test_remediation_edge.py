"""Issue 14, the remediation ladder on a node: RemediationManager (edge/remediation/manager.py) over
a real EdgeDaemon in this process (the simulated driver through the real pynvml, the real edge
store), with the simulated node's own tools as the commands (`python -m edge.sim.tools.nvidia_smi
--gpu-reset`, `dcgmi diag`, `cuda_probe`, `reboot`) reaching the simulation through the daemon's
sim HTTP API served on loopback, and XIDs from a real NVML event set (edge/driver/xid.py).

The daemon runs with `remediation=False` and the test's manager is its cycle listener, so the test
does not depend on how the daemon wires its own."""

from __future__ import annotations

import asyncio
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from edge.config import EdgeSettings
from edge.daemon import EdgeDaemon
from edge.driver.xid import XidWatcher
from edge.remediation import diagnostics
from edge.remediation.manager import RemediationManager
from edge.sim import SimulatedNvml, install
from shared.gpu import GpuInventory, Health, XidEvent
from shared.protocol import CommandBody

PY = shlex.quote(sys.executable)
WAIT_S = 90.0  # generous: CI is a busy 2-core box


class Node:
    """One simulated node: the daemon, its HTTP API (for the sim tools), the manager, an XID watcher."""

    def __init__(self, sim: SimulatedNvml, settings: EdgeSettings, pods: dict[str, list[str]]) -> None:
        self.sim, self.settings, self.pods = sim, settings, pods
        self.daemon = EdgeDaemon(settings.model_copy(update={"remediation": False}), sim=sim)
        self.web: web.AppRunner | None = None
        self.manager: RemediationManager | None = None
        self.watcher: XidWatcher | None = None

    async def start(self, port: int = 0) -> int:
        from edge.api import make_app

        await self.daemon.start()
        self.web = web.AppRunner(make_app(self.daemon), access_log=None)
        await self.web.setup()
        site = web.TCPSite(self.web, "127.0.0.1", port)
        await site.start()
        port = self.web.addresses[0][1]
        self.manager = RemediationManager(self.settings, self.daemon.runner, self.daemon.store, self.daemon.record,
                                          pods_of=lambda uuid: self.pods.get(uuid, []),
                                          api_url=f"http://127.0.0.1:{port}",
                                          policy_of=lambda: self.daemon.policy)
        await self.manager.load()
        manager = self.manager
        self.daemon.cycle_listeners.append(lambda _samples: manager.after_cycle(self.daemon.gpus))
        loop = asyncio.get_running_loop()

        def on_xid(event: XidEvent) -> None:  # on the watcher's thread
            loop.call_soon_threadsafe(manager.note_xids, [event])

        self.watcher = XidWatcher(self.daemon.runner.driver, on_xid)
        self.watcher.start()
        return int(port)

    async def stop(self) -> None:
        if self.manager is not None:
            await self.manager.stop()
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
        if self.web is not None:
            await self.web.cleanup()
        await self.daemon.stop()

    async def until(self, what: str, check: Callable[[], bool]) -> None:
        """Run cycles until `check()` holds (a condition, never a fixed sleep)."""
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while not check():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            await self.daemon.cycle()
            await asyncio.sleep(0.05)

    def stage(self, index: int) -> str | None:
        assert self.manager is not None
        return self.manager.stage(self.daemon.gpus[index].inventory.uuid)

    def decisions(self, index: int) -> list[dict[str, Any]]:
        uuid = self.daemon.gpus[index].inventory.uuid
        return list(reversed(self.daemon.store.decisions(limit=500, gpu_uuid=uuid, rule="remediation")))


def _settings(tmp_path: Path) -> EdgeSettings:
    tools = f"{PY} -m edge.sim.tools"
    return EdgeSettings(
        node="edge-r", db=tmp_path / "edge.db", backend="sim", sim_gpus=2,
        remediation_reset_command=f"{tools}.nvidia_smi --gpu-reset -i {{index}}",
        remediation_dcgm_command=f"{tools}.dcgmi diag -r 1 -i {{index}}",
        remediation_cuda_probe_command=f"{tools}.cuda_probe -i {{index}}",
        remediation_reboot_command=f"{tools}.reboot",
        remediation_diag_timeout=60.0, remediation_reset_timeout=60.0, remediation_max_resets=2,
        remediation_reboot="request")


@pytest.fixture
def sim() -> Iterator[SimulatedNvml]:
    simulated = install(2, "H100")
    yield simulated
    simulated.uninstall()


async def _node(tmp_path: Path, sim: SimulatedNvml, pods: dict[str, list[str]]) -> Node:
    node = Node(sim, _settings(tmp_path), pods)
    await node.start()
    return node


async def test_a_resettable_xid_is_repaired_and_only_that_gpu_is_fenced(tmp_path: Path, sim: SimulatedNvml) -> None:
    pods: dict[str, list[str]] = {}
    node = await _node(tmp_path, sim, pods)
    try:
        await node.daemon.cycle()
        uuid0 = node.daemon.gpus[0].inventory.uuid
        sim.inject(0, {"processes": [{"pid": 4242, "used_memory_mib": 1000, "sm_util": 50}]})
        pods[uuid0] = ["ml/infer-0"]
        sim.inject(0, {"xid": 95})  # RESET_GPU in the catalogue; the board asks for a GPU reset
        await node.until("GPU 0 fenced", lambda: node.stage(0) is not None)
        assert node.daemon.gpus[0].remediation == "draining" and node.stage(1) is None
        await node.daemon.cycle()
        assert node.stage(0) == "draining"  # a process still holds it: no reset
        sim.inject(0, {"processes": []})  # the cloud moved the pod
        pods[uuid0] = []
        await node.until("GPU 0 back in service", lambda: node.stage(0) is None)
        view = node.daemon.gpus[0]
        assert view.remediation is None and view.health.health is Health.HEALTHY  # no quiet period
        steps = [(d["action"], d["outcome"]) for d in node.decisions(0)]
        assert [a for a, _ in steps] == ["fence", "drain", "diagnose", "reset", "validate", "restore"], steps
        assert dict(steps)["reset"] == "applied" and dict(steps)["validate"] == "applied"
        assert node.decisions(1) == [] and node.daemon.gpus[1].remediation is None
        assert sim.state(0)["recovery_action"] == "none"
        # every step was an outbox event too, and nothing is kept once back in service
        assert await asyncio.to_thread(node.daemon.store.saved_remediation) == "{}"
        refused, detail = await node.manager.on_reboot_granted(  # type: ignore[union-attr]
            CommandBody(command="reboot", gpu_uuid=uuid0, args={"request": 1}))
        assert not refused and "no GPU of this node asked" in detail
    finally:
        await node.stop()


async def test_an_uncorrectable_ecc_error_with_its_pending_row_remap_is_reset_away(
        tmp_path: Path, sim: SimulatedNvml) -> None:
    node = await _node(tmp_path, sim, {})
    try:
        await node.daemon.cycle()  # the DBE counter's first value is only a baseline
        sim.inject(0, {"ecc_dbe": 1})  # a DBE retires its row: remap pending until a reset
        await node.until("GPU 0 fenced", lambda: node.stage(0) is not None)
        fence = node.decisions(0)[0]
        assert fence["action"] == "fence" and "row remap pending" in fence["inputs"]["fault"], fence
        await node.until("GPU 0 back in service", lambda: node.stage(0) is None)
        assert sim.state(0)["remapped_rows"]["pending"] is False
        assert [d["action"] for d in node.decisions(0)][-3:] == ["reset", "validate", "restore"]
        assert node.daemon.gpus[0].health.health is Health.HEALTHY and node.stage(1) is None
    finally:
        await node.stop()


async def test_a_fault_only_a_reboot_clears_asks_the_cloud_reboots_and_resumes_after_it(
        tmp_path: Path, sim: SimulatedNvml) -> None:
    node = await _node(tmp_path, sim, {})
    try:
        await node.daemon.cycle()
        uuid1 = node.daemon.gpus[1].inventory.uuid
        sim.inject(1, {"xid": 79, "lost": True, "recovery": "reboot"})
        await node.until("the reboot request", lambda: node.stage(1) == "reboot-requested")
        actions = [d["action"] for d in node.decisions(1)]
        assert actions[:4] == ["fence", "drain", "diagnose", "reset"] and actions[-1] == "request_reboot", actions
        assert "validate" in actions and node.stage(0) is None
        requests = node.daemon.store.events(kind="reboot_request")
        assert len(requests) == 1 and requests[0]["body"]["gpu_uuid"] == uuid1, requests
        assert requests[0]["body"]["attempt"] == 1 and "xid 79" in requests[0]["body"]["reason"]
        manager = node.manager
        assert manager is not None
        other = node.daemon.gpus[0].inventory.uuid
        ok, detail = await manager.on_reboot_granted(CommandBody(command="reboot", gpu_uuid=other))
        assert not ok and "did not ask" in detail and node.stage(1) == "reboot-requested"
        boots = sim.boots
        ok, detail = await manager.on_reboot_granted(CommandBody(command="reboot", gpu_uuid=uuid1,
                                                                 args={"request": requests[0]["seq"]}))
        assert ok, detail
        assert sim.boots == boots + 1 and node.stage(1) == "rebooting"
        kept = await asyncio.to_thread(node.daemon.store.saved_remediation)
        assert kept is not None and "rebooting" in kept
    finally:
        await node.stop()
    # the daemon comes back (after the reboot): the kept ladder validates and the GPU returns
    again = Node(sim, _settings(tmp_path), {})
    await again.start()
    try:
        assert again.manager is not None and again.manager.stage(uuid1) == "validating"
        # the grant sent again after the reboot (its result was not acked): answered, no second reboot
        boots = sim.boots
        ok, detail = await again.manager.on_reboot_granted(CommandBody(command="reboot", gpu_uuid=uuid1))
        assert ok and "already rebooted" in detail and sim.boots == boots
        await again.until("GPU 1 back in service after the reboot", lambda: again.stage(1) is None)
        assert again.daemon.gpus[1].health.health is Health.HEALTHY
        last = again.decisions(1)[-3:]
        assert [d["action"] for d in last] == ["record", "validate", "restore"], last
    finally:
        await again.stop()


async def test_commands_are_bounded_in_time_and_filled_in_safely(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    slow = await diagnostics.run_command(f"echo started; sleep 30; touch {marker}", 0.5)
    assert not slow.ok and "did not finish within" in slow.detail and not marker.exists()
    failed = await diagnostics.run_command(f"{PY} -c 'import sys; print(\"boom\"); sys.exit(3)'", 30.0)
    assert not failed.ok and "exited 3: boom" in failed.detail
    env = await diagnostics.run_command("echo $KGPU_EDGE_API", 30.0, {"KGPU_EDGE_API": "http://127.0.0.1:9"})
    assert env.ok and env.detail.endswith("http://127.0.0.1:9")
    gpu = GpuInventory(index=3, uuid="GPU-x; touch /tmp/pwned", name="H100", pci_bus_id="00000000:18:00.0",
                       memory_total_bytes=1, driver_version="550")
    assert diagnostics.fill("echo {index} {uuid}", gpu) == "echo 3 'GPU-x; touch /tmp/pwned'"
    assert diagnostics.available("sh -c true") and not diagnostics.available("no-such-dcgmi diag -r 1")


async def test_an_unreadable_kept_ladder_is_logged_and_the_daemon_starts_without_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from edge.driver.nvml import NvmlDriver
    from edge.driver.runner import DriverRunner
    from edge.store import open_edge_store

    store, _ = open_edge_store(tmp_path / "edge.db", "edge-r")
    try:
        async def record(_events: list[Any]) -> None:
            raise AssertionError("nothing to record")

        settings = _settings(tmp_path)
        for bad in ("not json", '{"GPU-1": {"stage": "dancing", "remedy": "reset"}}', "[1, 2]"):
            await asyncio.to_thread(store.save_remediation, bad)
            manager = RemediationManager(settings, DriverRunner(NvmlDriver()), store, record,
                                         pods_of=lambda _uuid: [], api_url=None)
            await manager.load()
            assert manager.ladders == {} and manager.stage("GPU-1") is None
        assert "unreadable" in caplog.text
        # a good one comes back, and `remediation: false` ignores it
        await asyncio.to_thread(store.save_remediation, '{"GPU-1": {"stage": "draining", "remedy": "reset"}}')
        manager = RemediationManager(settings, DriverRunner(NvmlDriver()), store, record,
                                     pods_of=lambda _uuid: [], api_url=None)
        await manager.load()
        assert manager.stage("GPU-1") == "draining"
        off = RemediationManager(settings.model_copy(update={"remediation": False}), DriverRunner(NvmlDriver()),
                                 store, record, pods_of=lambda _uuid: [], api_url=None)
        await off.load()
        assert off.stage("GPU-1") is None
    finally:
        store.close()
